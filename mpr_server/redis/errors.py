"""Exceptions raised by the Redis façade (txredisapi's own never escape it)."""

from __future__ import annotations


class RedisError(Exception):
    """Base class of every error raised by mpr_server.redis."""


class RedisUnavailable(RedisError):
    """Redis could not answer in time: not connected, connection lost, timeout,
    or a cluster that keeps redirecting. The command may or may not have run."""


class RedisResponseError(RedisError):
    """Redis answered with an error reply (e.g. ``WRONGTYPE ...``, a Lua error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        """The error's first word, e.g. ``NOSCRIPT``, ``MOVED``, ``ERR``."""
        return self.message.split(" ", 1)[0] if self.message else ""


class RedisNotConnected(RedisUnavailable):
    """There is no connection to the node: the command was not sent (safe to retry)."""


class RedisNotReplicated(RedisUnavailable):
    """The write ran on the master, but fewer replicas than required acknowledged it in
    time (``WAIT``): it is applied, and it may be lost if that master fails now."""
