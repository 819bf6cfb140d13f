"""Building the server from its configuration: ``build(config, reactor)`` makes every part and
wires them, once, in one direction (wire → domain → store / notifier / push).

The result is an ``MprService`` whose children start in order, each waiting for the one before
(store, notifier, push, domain, shutdown drain, persister, listeners), and stop in the reverse
order, each stop awaited, so that the listeners close first and the store last. Nothing here does
I/O before ``startService``.
"""

from __future__ import annotations

import gc
import ipaddress
import os
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from autobahn import __version__ as autobahn_version
from autobahn.websocket import USES_NVX
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.server import Site

from mpr_server import __version__
from mpr_server.auth import Authenticator
from mpr_server.config import Config
from mpr_server.http import make_site
from mpr_server.metrics import Metrics
from mpr_server.notify import LocalNotifier, LocalSockets, Notifier
from mpr_server.push import MemoryThrottle, PushService, Throttle, build_push_service
from mpr_server.push.service import OUTCOMES
from mpr_server.redis import ClusterRedisClient, RedisClient, SingleRedisClient, parse_natmap, parse_nodes
from mpr_server.service import DomainSettings, PickupService
from mpr_server.stores.base import MessageStore
from mpr_server.stores.embedded import EmbeddedStore
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis.fanout import RedisNotifier
from mpr_server.stores.redis.store import RedisStore
from mpr_server.stores.redis.throttle import RedisThrottle
from mpr_server.stores.redis.tiering import Persister
from mpr_server.stores.timed import TimedStore
from mpr_server.wire.jsonrpc import Dispatcher
from mpr_server.wire.methods import MprMethods, ParamLimits
from mpr_server.wire.websocket import MediatorFactory

SHUTDOWN_CLOSE_S = 3.0
GC_THRESHOLDS = (20_000, 50, 100)  # Python's defaults: (700, 10, 10)
SHUTDOWN_PUSH_DRAIN_S = 2.0


class Stage(Service):
    """A child of ``MprService`` whose start and stop are coroutines, awaited in order."""

    def __init__(
        self,
        name: str,
        start: Callable[[], Coroutine[Any, Any, None]] | None = None,
        stop: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    async def start(self) -> None:
        self.running = True
        if self._start is not None:
            await self._start()

    async def stop(self) -> None:
        self.running = False
        if self._stop is not None:
            await self._stop()

    def startService(self) -> None:
        Deferred.fromCoroutine(self.start())

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.stop())


@dataclass(frozen=True)
class Backend:
    """What a store brings: the store, how notifications reach sockets, the push throttle, and
    periodic work of its own."""

    store: MessageStore
    notifier: Notifier
    throttle: Throttle
    persister: IService | None = None
    import_report: Callable[[], Mapping[str, object] | None] = lambda: None  # of an original deployment's data


def redis_client(config: Config, reactor: Any) -> RedisClient:
    timeout = config.call_timeout_ms / 1000
    if config.redis_type == "cluster":
        return ClusterRedisClient(
            reactor, parse_nodes(config.redis_nodes), natmap=parse_natmap(config.redis_natmap), timeout=timeout
        )
    return SingleRedisClient(reactor, config.redis_url, timeout=timeout)


def redis_backend(config: Config, reactor: Any, sockets: LocalSockets, metrics: Metrics) -> Backend:
    redis = redis_client(config, reactor)
    store = RedisStore(
        redis,
        ColdStore(config.mongodb_uri, reactor, config.call_timeout_ms / 1000, config.mongodb_write_concern),
        reactor,
        config.instance_id,
        instance_ttl_ms=config.instance_ttl_ms,
        lease_ms=config.message_lease_ms,
        threshold_ms=config.threshold_timestamp,
        allow_evicting=config.allow_evicting_redis,
        message_ttl=config.message_ttl_ms > 0,
        wait_replicas=config.redis_wait_replicas,
    )
    notifier = RedisNotifier(redis, reactor, config.instance_id, sockets, store.holders, config.message_lease_ms)
    interval = min(max(config.threshold_timestamp / 4000, 0.5), 5.0)
    persister = Persister(store.tiering, reactor, interval, metrics)
    return Backend(store, notifier, RedisThrottle(redis), persister, lambda: store.originals.last_done)


def embedded_backend(config: Config, reactor: Any, sockets: LocalSockets, metrics: Metrics) -> Backend:
    store = EmbeddedStore(config.data_dir, reactor, config.sqlite_synchronous)
    oldest = store.oldest_received_ms

    def oldest_age_s() -> float:
        received = oldest()
        return 0.0 if received is None else max(0.0, reactor.seconds() - received / 1000)

    metrics.oldest_message_age.set_function(oldest_age_s)
    return Backend(store, LocalNotifier(sockets), MemoryThrottle(reactor))


class MprService(MultiService):
    """The whole server; see the module docstring."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any, backend: Backend, sockets: LocalSockets) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = sockets.metrics
        self.store = backend.store
        timed = TimedStore(self.store, self.metrics)
        self.push: PushService = build_push_service(config.push, reactor, backend.throttle)
        self.pickup = PickupService(
            timed,
            reactor,
            DomainSettings(
                instance_id=config.instance_id,
                lease_ms=config.message_lease_ms,
                session_grace_ms=config.session_grace_ms,
                max_queued=config.max_queued_messages,
                message_ttl_ms=config.message_ttl_ms,
            ),
            pusher=self.push,
            sockets=sockets,
            notifier=backend.notifier,
            metrics=self.metrics,
        )
        methods = MprMethods(self.pickup, ParamLimits(max_message_bytes=config.max_message_bytes))
        self.dispatcher = Dispatcher(
            methods.table(), reactor, call_timeout_s=config.call_timeout_ms / 1000, metrics=self.metrics
        )
        self.factory = MediatorFactory(
            self.pickup,
            self.dispatcher,
            reactor,
            config.max_frame_bytes,
            slow_reader_timeout_s=config.slow_reader_timeout_ms / 1000,
            authenticator=Authenticator(config.auth),
            ping_interval_s=config.ws_ping_interval_ms / 1000,
            ping_timeout_s=config.ws_ping_timeout_ms / 1000,
        )
        self.metrics.open_sockets.set_function(lambda: len(self.factory.sockets))
        self.metrics.count_pushes(lambda: self.push.counters, (*OUTCOMES, "retry"))
        self.metrics.count_import(backend.import_report)
        self.site: Site = make_site(timed, reactor, self._info, self.metrics)
        self._ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()

        Stage("store", self.store.start, self.store.stop).setServiceParent(self)
        Stage("notifier", backend.notifier.start, backend.notifier.stop).setServiceParent(self)
        self.push.setName("push")
        self.push.setServiceParent(self)
        self.pickup.setName("domain")
        self.pickup.setServiceParent(self)
        Stage("drain", stop=self._drain).setServiceParent(self)
        if backend.persister is not None:
            backend.persister.setName("persister")
            backend.persister.setServiceParent(self)
        Stage("listeners", self._listen, self._close_listeners).setServiceParent(self)

    def _info(self) -> dict[str, Any]:
        return {"version": __version__, "store": self.store.name, "instance": self.config.instance_id}

    # -- life cycle ------------------------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        Deferred.fromCoroutine(self._start()).addErrback(self._start_failed)

    async def _start(self) -> None:
        for child in self:
            if isinstance(child, Stage):
                await child.start()
            else:
                child.startService()
        # What start-up made lives as long as the process: keep the collector from scanning it
        # again, and let it run less often (each call makes short-lived objects, no cycles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
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
        Service.stopService(self)
        for child in reversed(list(self)):
            if child.running:
                await maybeDeferred(child.stopService)

    # -- stages ------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self.config.inherited_ws is not None:  # a worker: the supervisor bound it (workers.py)
            fd, family = self.config.inherited_ws
            ws = self.reactor.adoptStreamPort(fd, family, self.factory)
        elif self.config.ws_reuse_port:
            ws = listen_reuse_port(self.reactor, self.config.ws_port, self.factory)
        else:
            ws = await endpoints.serverFromString(self.reactor, self.config.ws_endpoint).listen(self.factory)
        self._ports.append(ws)
        # With WS_REUSE_PORT, several processes share the WebSocket port; each needs its own APP_PORT.
        http = await endpoints.serverFromString(self.reactor, self.config.app_endpoint).listen(self.site)
        self._ports.append(http)
        # Before the "serving:" line, so that whoever waits for that line has seen this one.
        exposed = _exposed(ws)
        if exposed and not self.config.auth.enabled:
            self._log.warn(
                "the WebSocket listener is on {address}, reachable from other hosts, and authentication is off:"
                " anyone who reaches it can read and delete every queued message. Set MPR_AUTH_TOKENS or"
                " MPR_AUTH_JWT_KEY, or listen on loopback only (WS_ENDPOINT=tcp:3100:interface=127.0.0.1).",
                address=exposed,
            )
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

    async def _close_listeners(self) -> None:
        """Stop accepting, then close mediator sockets with 1001 so that they reconnect elsewhere."""
        for port in self._ports:
            stopping = port.stopListening()
            if stopping is not None:
                await stopping
        self._ports.clear()
        await self.factory.close_all(SHUTDOWN_CLOSE_S, self.reactor)

    async def _drain(self) -> None:
        """With every socket closed: let their releases finish, end the grace periods (their held
        pushes are sent) and let the pushes under way finish, before the domain and push service
        stop."""
        await self.pickup.settle()
        await self.pickup.end_grace_periods()
        await self.push.drain(SHUTDOWN_PUSH_DRAIN_S)


def build(config: Config, reactor: Any) -> MprService:
    """The server for ``config``, not started."""
    metrics = Metrics(config.store)
    sockets = LocalSockets(metrics)
    backend = (
        redis_backend(config, reactor, sockets, metrics)
        if config.store == "redis"
        else embedded_backend(config, reactor, sockets, metrics)
    )
    return MprService(config, reactor, backend, sockets)


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


def _exposed(port: IListeningPort) -> str | None:
    """The listener's address if it is not a loopback address (None for loopback and UNIX sockets)."""
    host = getattr(port.getHost(), "host", None)
    if not isinstance(host, str):
        return None
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return None if loopback else _address(port)


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}" if hasattr(host, "port") else str(host)
