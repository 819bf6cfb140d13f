"""``twistd mpr``: wires the configuration into services. The only place that builds things."""

from __future__ import annotations

import os
import socket
from typing import Any

from autobahn import __version__ as autobahn_version
from autobahn.websocket import USES_NVX
from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from mpr_server import __version__
from mpr_server.auth import Authenticator
from mpr_server.config import Config, Options
from mpr_server.http import make_site
from mpr_server.metrics import Metrics
from mpr_server.protocol import MediatorFactory
from mpr_server.push import MemoryThrottle, Throttle, build_push_service
from mpr_server.redis.client import RedisClient, SingleRedisClient
from mpr_server.redis.cluster import ClusterRedisClient
from mpr_server.redis.url import parse_natmap, parse_nodes
from mpr_server.rpc import Dispatcher, RpcLimits
from mpr_server.service import DomainSettings, PickupService
from mpr_server.stores.base import MessageStore
from mpr_server.stores.distributed import DistributedStore, Persister, RedisThrottle
from mpr_server.stores.embedded import EmbeddedStore
from mpr_server.stores.mongo import ColdStore

__all__ = ["Options", "makeService"]


def build_distributed_store(config: Config, reactor: Any) -> DistributedStore:
    timeout = config.call_timeout_ms / 1000
    redis: RedisClient
    if config.redis_type == "cluster":
        redis = ClusterRedisClient(
            reactor, parse_nodes(config.redis_nodes), natmap=parse_natmap(config.redis_natmap), timeout=timeout
        )
    else:
        redis = SingleRedisClient(reactor, config.redis_url, timeout=timeout)
    return DistributedStore(
        redis,
        ColdStore(config.mongodb_uri, reactor, timeout),
        reactor,
        config.instance_id,
        instance_ttl_ms=config.instance_ttl_ms,
        lease_ms=config.message_lease_ms,
        threshold_ms=config.threshold_timestamp,
        allow_evicting=config.allow_evicting_redis,
        timeout_s=timeout,
        message_ttl=config.message_ttl_ms > 0,
    )


class MprService(MultiService):
    """Starts the store, then the domain, then the listeners; stops them in the reverse order,
    closing mediator sockets with 1001 so that they reconnect elsewhere."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.persister: Persister | None = None
        throttle: Throttle
        remote_notify = None
        self.store: MessageStore
        if config.store == "redis":
            distributed = build_distributed_store(config, reactor)
            self.store = distributed
            throttle = RedisThrottle(distributed.redis)
            remote_notify = distributed.publish
            interval = min(max(config.threshold_timestamp / 4000, 0.5), 5.0)
            self.persister = Persister(distributed, reactor, interval)
        else:
            self.store = EmbeddedStore(config.data_dir, reactor, config.sqlite_synchronous)
            throttle = MemoryThrottle(reactor)
        self.push = build_push_service(config.push, reactor, throttle)
        self.pickup = PickupService(
            self.store,
            reactor,
            DomainSettings(
                instance_id=config.instance_id,
                lease_ms=config.message_lease_ms,
                session_grace_ms=config.session_grace_ms,
                max_queued=config.max_queued_messages,
                message_ttl_ms=config.message_ttl_ms,
            ),
            pusher=self.push,
            remote_notify=remote_notify,
        )
        if isinstance(self.store, DistributedStore):
            self.store.on_notification = self.pickup.notify_local
        limits = RpcLimits(max_message_bytes=config.max_message_bytes, call_timeout_s=config.call_timeout_ms / 1000)
        self.dispatcher = Dispatcher(self.pickup, reactor, limits, self.metrics)
        self.factory = MediatorFactory(
            self.pickup,
            self.dispatcher,
            reactor,
            config.max_frame_bytes,
            slow_reader_timeout_s=config.slow_reader_timeout_ms / 1000,
            authenticator=Authenticator(config.auth),
        )
        self.metrics.gauge("mpr_open_sockets", lambda: len(self.factory.sockets), "open mediator sockets")
        self.metrics.describe("mpr_push_total", "push notifications by provider and outcome")
        self.metrics.source(self._push_counts)
        self.site = make_site(self.store, reactor, self._info, self.metrics.render)
        self._ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()

    def _push_counts(self) -> None:
        for (provider, outcome), count in self.push.counters.items():
            self.metrics.set_counter("mpr_push_total", count, provider=provider, outcome=outcome)

    def _info(self) -> dict[str, Any]:
        return {"version": __version__, "store": self.store.name, "instance": self.config.instance_id}

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)

    async def _start(self) -> None:
        await self.store.start()
        self.push.startService()
        self.pickup.startService()
        if self.persister is not None:
            self.persister.start(self.persister.interval_s, now=False)
        if self.config.ws_reuse_port:
            ws = listen_reuse_port(self.reactor, self.config.ws_port, self.factory)
        else:
            ws = await endpoints.serverFromString(self.reactor, self.config.ws_endpoint).listen(self.factory)
        self._ports.append(ws)
        # With WS_REUSE_PORT, several processes share the WebSocket port; each needs its own APP_PORT.
        http = await endpoints.serverFromString(self.reactor, self.config.app_endpoint).listen(self.site)
        self._ports.append(http)
        self._log.info(
            "mpr-server {version} serving: store={store} websocket={ws} http={http} instance={instance}"
            " auth={auth} (autobahn {autobahn} nvx={nvx})",
            version=__version__,
            store=self.store.name
            if self.store.name != "embedded"
            else f"embedded:{os.path.abspath(self.config.data_dir)}",
            ws=_address(ws),
            http=_address(http),
            instance=self.config.instance_id,
            auth="on" if self.config.auth.enabled else "off",
            autobahn=autobahn_version,
            nvx=USES_NVX,
        )
        self.ready.callback(None)

    def _start_failed(self, failure: Any) -> None:
        self._log.critical("mpr-server could not start: {error}", error=failure.getErrorMessage())
        self._log.failure("start-up failure", failure)
        # twistd has no exit status for a failed start: leave with 1 once the reactor has stopped.
        # startService runs before reactor.run(), so the stop may have to wait until it runs.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for port in self._ports:
            stopping = port.stopListening()
            if stopping is not None:
                await stopping
        self._ports.clear()
        await self.factory.close_all(3.0, self.reactor)
        await self.pickup.end_grace_periods()
        await self.push.drain(2.0)
        if self.pickup.running:
            self.pickup.stopService()
        if self.persister is not None and self.persister.running:
            self.persister.stop()
        if self.push.running:
            stopping = self.push.stopService()
            if stopping is not None:
                await stopping
        await self.store.stop()
        stopped = super().stopService()
        if stopped is not None:
            await stopped


def listen_reuse_port(reactor: Any, port: int, factory: Any) -> IListeningPort:
    """Listen on all interfaces with SO_REUSEPORT, so that the kernel spreads connections over
    every MPR process bound to the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("", port))
        sock.listen(511)
        sock.setblocking(False)
        listening: IListeningPort = reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory)
        return listening
    finally:
        sock.close()  # the reactor holds its own duplicate


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}" if hasattr(host, "port") else str(host)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return MprService(options.config, reactor)
