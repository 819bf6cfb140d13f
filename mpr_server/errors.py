"""Errors that cross layers: raised by the stores, mapped to JSON-RPC errors by the wire layer."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot be reached or failed; the call may be retried later."""


class QueueFull(Exception):
    """The connection's queue holds the configured maximum number of messages."""
