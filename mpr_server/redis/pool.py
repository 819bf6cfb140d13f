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

#: connections per node for writes followed by WAIT (each carries one pair at a time)
WAIT_POOL_SIZE = 32


class NodePool:
    """A pool of connections to one node; connects lazily and reconnects by itself."""

    _log = Logger()

    def __init__(self, reactor: IReactorTCP, address: Address, settings: ConnectionSettings) -> None:
        self.address = address
        self._settings = settings
        self._factory = self._new_factory()
        # writes followed by WAIT get connections of their own, one pair at a time each: a WAIT
        # blocks its connection until the replicas answer (or its timeout), and nothing should
        # queue behind it, in our client or in Redis
        self._wait_factory: Any = None
        self._endpoint = make_endpoint(reactor, address, settings)
        self._started = False
        self._next = 0
        self._had_connection = False
        self._last_connection: Any = None
        self._closed = False

    def _new_factory(self, size: int = 0) -> Any:
        settings = self._settings
        factory = txredisapi.RedisFactory(
            str(self.address),
            settings.db or None,
            size or settings.pool_size,
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
        return factory

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
        return (await self._send([args], asking, self._factory, timeouts=timeouts))[0]

    async def execute_then(self, args: Sequence[Arg], then: Sequence[Arg], *, asking: bool = False) -> tuple[Any, Any]:
        """Send ``args`` and ``then`` back to back on one connection, and return both replies
        (a write and the ``WAIT`` that counts the replicas that have it: WAIT looks at the
        replication offset of its own connection). Raises as :meth:`execute`, for the first
        command that failed, once both replies are in."""
        if self._wait_factory is None and not self._closed:
            self._wait_factory = self._new_factory(max(self._settings.pool_size, WAIT_POOL_SIZE))
            self._wait_factory.startConnecting(self._endpoint)
        first, second = await self._send([args, then], asking, self._wait_factory, exclusive=True)
        return first, second

    async def _send(
        self,
        commands: Sequence[Sequence[Arg]],
        asking: bool,
        factory: Any = None,
        exclusive: bool = False,
        timeouts: Timeouts | None = None,
    ) -> list[Any]:
        if self._closed:
            raise RedisNotConnected(f"Redis client for {self.address} is closed")
        self._start()
        factory = factory or self._factory
        conn: Any = self._ready_connection() if factory is self._factory and not exclusive else None
        if conn is None:
            if self._had_connection and not self.connected:
                raise RedisNotConnected(f"no connection to Redis at {self.address}")
            try:
                waiting = factory.getConnection(peek=not exclusive)
                if timeouts is None:
                    conn = await waiting
                else:
                    conn = await deadline(
                        waiting, timeouts.seconds, timeouts.clock, lambda: self._late(commands[0], timeouts)
                    )
            except txredisapi.ConnectionError as e:
                raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        if factory is self._factory:
            self._had_connection = True
            self._last_connection = conn
        try:
            data = b"".join(encode_command(args) for args in commands)
        except (ValueError, UnicodeError) as e:
            if exclusive:
                factory.connectionQueue.put(conn)
            raise ValueError(f"cannot encode {command_name(commands[0])} arguments: {e}") from None
        # Written at once and read in order on one connection: ASKING (if asked), then the commands.
        conn.transport.write(ASKING + data if asking else data)
        if asking:
            conn.replyQueue.get()  # ASKING's own reply
        pending = [_next_reply(conn) for _ in commands]
        if exclusive:
            # back in the pool when its last reply is in, even if our caller gave up before
            pending[-1].raw.addBoth(lambda _: factory.connectionQueue.put(conn))
        replies: list[Any] = []
        error: Exception | None = None
        for args, reply in zip(commands, pending, strict=True):
            watch = timeouts.watch(reply.result) if timeouts is not None else None
            try:
                value = await reply.result
            except CancelledError:
                if watch is not None and watch.expired:
                    raise self._late(args, timeouts) from None  # type: ignore[arg-type]
                raise
            if isinstance(value, txredisapi.ResponseError):
                replies.append(None)
                error = error or RedisResponseError(str(value))
            elif isinstance(value, Exception):  # txredisapi's ConnectionError on a lost connection
                replies.append(None)
                error = error or RedisUnavailable(f"Redis {self.address} during {command_name(args)}: {value}")
            else:
                replies.append(convert_reply(value))
        if error is not None:
            raise error
        return replies

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
        if self._wait_factory is not None:
            await self._wait_factory.disconnect()


class _Reply:
    """A connection's next reply: ``raw`` is the reply queue's own Deferred (never cancelled, so
    the queue stays in step), ``result`` what the caller awaits (cancelled by a deadline)."""

    __slots__ = ("raw", "result")

    def __init__(self, raw: Deferred[Any]) -> None:
        self.raw = raw
        self.result: Deferred[Any] = Deferred()
        raw.addCallback(self._settle)

    def _settle(self, reply: Any) -> Any:
        if not self.result.called:
            self.result.callback(reply)
        return reply


def _next_reply(conn: Any) -> _Reply:
    return _Reply(conn.replyQueue.get())
