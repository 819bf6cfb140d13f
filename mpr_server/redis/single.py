"""The client for one Redis server (REDIS_URL)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .base import ClientBase
from .connection import Arg, ConnectionSettings, TLSOptions
from .errors import RedisResponseError
from .pool import NodePool
from .pubsub import PubSubConnection
from .script import Script
from .url import RedisURL, parse_redis_url


class SingleRedisClient(ClientBase):
    """A client for one Redis server (REDIS_URL): a lazy txredisapi pool plus one
    pub/sub connection opened on the first subscribe. Sharded pub/sub is plain
    pub/sub here (the same thing on one server, and it works before Redis 7)."""

    def __init__(
        self,
        reactor: Any,
        url: RedisURL | str,
        *,
        timeout: float = 5.0,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 2.0,
        decode_responses: bool = True,
        tls: TLSOptions | None = None,
        ping_interval: float | None = 15.0,
    ) -> None:
        parsed = parse_redis_url(url) if isinstance(url, str) else url
        if parsed.tls and tls is None:
            tls = TLSOptions()
        if tls is not None and not parsed.tls:
            raise ValueError("TLS options given for a redis:// URL; use rediss://")
        settings = ConnectionSettings(
            password=parsed.password,
            username=parsed.username,
            db=parsed.db,
            tls=tls,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            reconnect_max_delay=reconnect_max_delay,
            decode_responses=decode_responses,
            ping_interval=ping_interval,
        )
        super().__init__(reactor, settings, timeout)
        self.url = parsed
        self._pool = NodePool(reactor, parsed.address, settings)
        self._pubsub: PubSubConnection | None = None

    def _wire_sharded(self, sharded: bool) -> bool:
        return False

    # The hot path: one deadline on the reply itself (see NodePool.execute), no layers between.

    async def execute(
        self, args: Sequence[Arg], *, key: str | bytes | None = None, timeout: float | None = None
    ) -> Any:
        return await self._pool.execute(args, timeouts=self._timeouts(timeout))

    async def eval_script(
        self,
        script: Script,
        keys: Sequence[str | bytes],
        args: Sequence[Arg] = (),
        *,
        timeout: float | None = None,
        replicas: int = 0,
    ) -> Any:
        if replicas > 0:
            return await super().eval_script(script, keys, args, timeout=timeout, replicas=replicas)
        timeouts = self._timeouts(timeout)
        tail: list[Arg] = [len(keys), *keys, *args]
        try:
            return await self._pool.execute(["EVALSHA", script.sha1, *tail], timeouts=timeouts)
        except RedisResponseError as e:
            if e.code != "NOSCRIPT":
                raise
        # EVAL also caches the script for the next EVALSHA
        return await self._pool.execute(["EVAL", script.source, *tail], timeouts=timeouts)

    async def _execute(self, args: Sequence[Arg], key: str | bytes | None) -> Any:
        return await self._pool.execute(args)

    async def _execute_then(
        self, args: Sequence[Arg], then: Callable[[], Sequence[Arg]], key: str | bytes | None
    ) -> tuple[Any, Any]:
        return await self._pool.execute_then(args, then())

    async def _execute_all(self, args: Sequence[Arg]) -> dict[str, Any]:
        return {str(self.url.address): await self._pool.execute(args)}

    async def _node_commands(self) -> list[Callable[[Sequence[Arg]], Coroutine[Any, Any, Any]]]:
        return [self._pool.execute]

    async def _pubsub_subscribe(self, channel: str, sharded: bool) -> None:
        if self._pubsub is None:
            self._pubsub = self._new_pubsub(self.url.address)
        await self._pubsub.subscribe(channel, sharded)

    async def _pubsub_unsubscribe(self, channel: str, sharded: bool) -> None:
        if self._pubsub is not None:
            await self._pubsub.unsubscribe(channel, sharded)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await self._timed(self._pool.wait_connected(), timeout, "connect")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pubsub is not None:
            await self._pubsub.close()
        await self._pool.close()
