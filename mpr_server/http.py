"""The operator's HTTP endpoint on APP_PORT: /health, /ready and /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mpr_server.metrics import Metrics
from mpr_server.stores.base import MessageStore


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(body)


class Health(Resource):
    isLeaf = True

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._info = info

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok", **self._info()})


class Ready(Resource):
    """200 when the store answers within the timeout, 503 otherwise."""

    isLeaf = True

    def __init__(self, store: MessageStore, clock: IReactorTime, timeout_s: float) -> None:
        super().__init__()
        self._store = store
        self._clock = clock
        self._timeout_s = timeout_s

    def render_GET(self, request: Request) -> int:
        d: Deferred[None] = Deferred.fromCoroutine(self._store.ping())
        d.addTimeout(self._timeout_s, self._clock)

        def ready(_: object) -> None:
            request.write(_json(request, 200, {"status": "ready", "store": self._store.name}))
            request.finish()

        def not_ready(failure: Any) -> None:
            reason = str(failure.value) or type(failure.value).__name__
            request.write(_json(request, 503, {"status": "unavailable", "store": self._store.name, "reason": reason}))
            request.finish()

        d.addCallbacks(ready, not_ready)
        return NOT_DONE_YET


class MetricsPage(Resource):
    """The registry in the Prometheus text format (OpenMetrics when the scraper asks for it).

    Rendered on the reactor thread, unlike ``prometheus_client.twisted.MetricsResource`` (a WSGI
    app in the reactor's thread pool): the collectors read state that only the reactor thread may
    touch (the socket table, the push counts, the embedded store's SQLite connection)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self._metrics.render(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body


def make_site(
    store: MessageStore,
    clock: IReactorTime,
    info: Callable[[], dict[str, Any]],
    metrics: Metrics,
    timeout_s: float = 1.0,
) -> Site:
    root = Resource()
    root.putChild(b"health", Health(info))
    root.putChild(b"ready", Ready(store, clock, timeout_s))
    root.putChild(b"metrics", MetricsPage(metrics))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
