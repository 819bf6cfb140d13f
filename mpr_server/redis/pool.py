"""`NodePool`: a lazily connecting, self-reconnecting txredisapi connection pool to one node
whose calls raise our exceptions (internal to mpr_server.redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure

from .connection import Arg, ConnectionSettings, command_name, convert_reply, make_endpoint
from .errors import RedisNotConnected, RedisResponseError, RedisUnavailable
from .url import Address


class NodePool:
    """A pool of connections to one node; connects lazily and reconnects by itself."""

    _log = Logger()

    def __init__(self, reactor: IReactorTCP, address: Address, settings: ConnectionSettings) -> None:
        self.address = address
        factory = txredisapi.RedisFactory(
            str(address),
            settings.db or None,
            settings.pool_size,
            isLazy=True,
            charset="utf-8" if settings.decode_responses else None,
            password=settings.password,
            replyTimeout=None,
            convertNumbers=False,
            username=settings.username,
        )
        factory.initialDelay = 0.1
        factory.factor = 2.0
        factory.maxDelay = settings.reconnect_max_delay  # type: ignore[assignment]
        # a lazy pool reports a failed AUTH/SELECT here, and only here
        factory.deferred.addErrback(self._connect_failed)
        self._factory = factory
        self._endpoint = make_endpoint(reactor, address, settings)
        self._started = False
        self._had_connection = False
        self._last_connection: Any = None
        self._closed = False

    def _connect_failed(self, failure: Failure) -> None:
        self._log.error(
            "Redis {address}: {error}; not retrying", address=str(self.address), error=failure.getErrorMessage()
        )

    @property
    def connected(self) -> bool:
        # a new connection is handed to waiters before the pool counts it
        last = self._last_connection
        return bool(self._factory.size) or (last is not None and bool(last.connected))

    def _start(self) -> None:
        """Connect on first use: building a client does no I/O."""
        if not self._started:
            self._started = True
            self._factory.startConnecting(self._endpoint)

    async def wait_connected(self) -> None:
        """Wait until the pool has a live connection (no timeout: wrap it)."""
        self._start()
        try:
            self._last_connection = await self._factory.getConnection(peek=True)
        except txredisapi.ConnectionError as e:
            raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        self._had_connection = True

    async def execute(self, args: Sequence[Arg], *, asking: bool = False) -> Any:
        """Send one command (after ASKING on the same connection if asked to).

        Raises RedisNotConnected without sending when a pool that was connected has
        lost every connection (fail fast while the node is down), RedisUnavailable
        when the connection is lost with the command in flight, RedisResponseError
        for error replies. No timeout here: callers put one on the whole call.
        """
        if self._closed:
            raise RedisNotConnected(f"Redis client for {self.address} is closed")
        self._start()
        if self._had_connection and not self.connected:
            raise RedisNotConnected(f"no connection to Redis at {self.address}")
        try:
            conn = await self._factory.getConnection(peek=True)
        except txredisapi.ConnectionError as e:
            raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        self._had_connection = True
        self._last_connection = conn
        try:
            if asking:
                # written back to back with the command: same connection, in order
                conn.execute_command("ASKING").addErrback(lambda _: None)
            reply = conn.execute_command(*args)
        except txredisapi.ConnectionError as e:
            raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        except txredisapi.InvalidData as e:
            raise ValueError(f"cannot encode {command_name(args)} arguments: {e}") from None
        try:
            return convert_reply(await reply)
        except txredisapi.ResponseError as e:
            raise RedisResponseError(str(e)) from None
        except txredisapi.ConnectionError as e:
            raise RedisUnavailable(f"Redis {self.address} during {command_name(args)}: {e}") from None

    async def close(self) -> None:
        self._closed = True
        if self._started:
            await self._factory.disconnect()
