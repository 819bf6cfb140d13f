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

    async def execute(self, args: Sequence[Arg], *, asking: bool = False) -> Any:
        """Send one command (after ASKING on the same connection if asked to).

        Raises RedisNotConnected without sending when a pool that was connected has
        lost every connection (fail fast while the node is down), RedisUnavailable
        when the connection is lost with the command in flight, RedisResponseError
        for error replies. No timeout here: callers put one on the whole call.
        """
        return (await self._send([args], asking, self._factory))[0]

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
        self, commands: Sequence[Sequence[Arg]], asking: bool, factory: Any = None, exclusive: bool = False
    ) -> list[Any]:
        if self._closed:
            raise RedisNotConnected(f"Redis client for {self.address} is closed")
        self._start()
        if self._had_connection and not self.connected:
            raise RedisNotConnected(f"no connection to Redis at {self.address}")
        try:
            factory = factory or self._factory
            conn = await factory.getConnection(peek=not exclusive)
        except txredisapi.ConnectionError as e:
            raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        if factory is self._factory:
            self._had_connection = True
            self._last_connection = conn
        sent: list[Any] = []
        try:
            if asking:
                # written back to back with the command: same connection, in order
                conn.execute_command("ASKING").addErrback(lambda _: None)
            for args in commands:
                sent.append(conn.execute_command(*args))
        except (txredisapi.ConnectionError, txredisapi.InvalidData) as e:
            for d in sent:
                d.addErrback(lambda _: None)
            if exclusive:
                factory.connectionQueue.put(conn)
            if isinstance(e, txredisapi.InvalidData):
                raise ValueError(f"cannot encode {command_name(commands[len(sent)])} arguments: {e}") from None
            raise RedisNotConnected(f"Redis {self.address}: {e}") from None
        if exclusive:
            # back in the pool when its last reply is in, even if our caller gave up before
            def give_back(result: Any) -> Any:
                factory.connectionQueue.put(conn)
                return result

            sent[-1].addBoth(give_back)
        replies: list[Any] = []
        error: Exception | None = None
        for i, (args, reply) in enumerate(zip(commands, sent, strict=True)):
            try:
                replies.append(convert_reply(await reply))
            except txredisapi.ResponseError as e:
                replies.append(None)
                error = error or RedisResponseError(str(e))
            except txredisapi.ConnectionError as e:
                replies.append(None)
                error = error or RedisUnavailable(f"Redis {self.address} during {command_name(args)}: {e}")
            except BaseException:
                # cancelled (the caller's deadline): nobody will read the later replies
                for later in sent[i + 1 :]:
                    later.addErrback(lambda _: None)
                raise
        if error is not None:
            raise error
        return replies

    async def close(self) -> None:
        self._closed = True
        if self._started:
            await self._factory.disconnect()
        if self._wait_factory is not None:
            await self._wait_factory.disconnect()
