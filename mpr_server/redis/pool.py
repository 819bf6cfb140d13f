"""`NodePool`: a lazily connecting, self-reconnecting txredisapi connection pool to one node
whose calls raise our exceptions (internal to mpr_server.redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import Timeouts, deadline

from .connection import ASKING, Arg, ConnectionSettings, command_name, convert_reply, encode_command, make_endpoint
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
        self._next = 0
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

    async def execute(self, args: Sequence[Arg], *, asking: bool = False, timeouts: Timeouts | None = None) -> Any:
        """Send one command (after ASKING on the same connection if asked to).

        Raises RedisNotConnected without sending when a pool that was connected has
        lost every connection (fail fast while the node is down), RedisUnavailable
        when the connection is lost with the command in flight, RedisResponseError
        for error replies. With ``timeouts``, RedisUnavailable when the reply does not come in
        time (one shared timer, no Deferred more than the reply's); otherwise callers put a
        deadline on the whole call.
        """
        if self._closed:
            raise RedisNotConnected(f"Redis client for {self.address} is closed")
        self._start()
        conn = self._ready_connection()
        if conn is None:
            if self._had_connection and not self.connected:
                raise RedisNotConnected(f"no connection to Redis at {self.address}")
            try:
                waiting = self._factory.getConnection(peek=True)
                if timeouts is None:
                    conn = await waiting
                else:
                    conn = await deadline(waiting, timeouts.seconds, timeouts.clock, lambda: self._late(args, timeouts))
            except txredisapi.ConnectionError as e:
                raise RedisNotConnected(f"Redis {self.address}: {e}") from None
            self._had_connection = True
        self._last_connection = conn
        try:
            data = encode_command(args)
        except (ValueError, UnicodeError) as e:
            raise ValueError(f"cannot encode {command_name(args)} arguments: {e}") from None
        # Written at once and read in order on one connection: ASKING (if asked) then the command.
        conn.transport.write(ASKING + data if asking else data)
        if asking:
            conn.replyQueue.get()  # ASKING's own reply
        pending = _next_reply(conn)
        if timeouts is None:
            reply = await pending
        else:
            watch = timeouts.watch(pending)
            try:
                reply = await pending
            except CancelledError:
                if watch.expired:
                    raise self._late(args, timeouts) from None
                raise
        if isinstance(reply, txredisapi.ResponseError):
            raise RedisResponseError(str(reply))
        if isinstance(reply, Exception):  # txredisapi's ConnectionError on a lost connection
            raise RedisUnavailable(f"Redis {self.address} during {command_name(args)}: {reply}")
        return convert_reply(reply)

    def _late(self, args: Sequence[Arg], timeouts: Timeouts) -> RedisUnavailable:
        return RedisUnavailable(f"no answer from Redis within {timeouts.seconds:g} s ({command_name(args)})")

    def _ready_connection(self) -> Any:
        """A connected member of the pool (round robin), or None: no Deferred on the hot path."""
        pool = self._factory.pool
        for _ in range(len(pool)):
            self._next = (self._next + 1) % len(pool)
            conn = pool[self._next]
            if conn.connected and not conn.inTransaction and not conn.pipelining:
                return conn
        return None

    async def close(self) -> None:
        self._closed = True
        if self._started:
            await self._factory.disconnect()


def _next_reply(conn: Any) -> Deferred[Any]:
    """The connection's next reply. Cancelling the result (a caller's deadline) leaves the reply
    queue in step: the reply, when it comes, is dropped."""
    result: Deferred[Any] = Deferred()

    def settle(reply: Any) -> None:
        if not result.called:
            result.callback(reply)

    conn.replyQueue.get().addCallback(settle)
    return result
