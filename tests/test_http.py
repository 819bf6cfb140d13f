"""The operator's HTTP endpoint: /health, /ready (200 or 503 by the store), /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from mpr_server.http import make_site
from mpr_server.metrics import Metrics
from mpr_server.stores.embedded import EmbeddedStore


async def get(site: Any, path: bytes) -> tuple[int, bytes]:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.path = path  # type: ignore[attr-defined]
    resource = site.getResourceFor(request)
    body = resource.render(request)
    if body == NOT_DONE_YET:
        if not request.finished:
            finished: Deferred[None] = request.notifyFinish()
            await finished
        body = b"".join(request.written)
    return request.responseCode or 200, body


@pytest_twisted.ensureDeferred
async def test_health_ready_and_metrics(tmp_path: Path, reactor: Any) -> None:
    store = EmbeddedStore(str(tmp_path), reactor)
    metrics = Metrics()
    metrics.calls.labels("ping", "ok").inc()
    metrics.open_sockets.set_function(lambda: 3)
    site = make_site(store, reactor, lambda: {"store": "embedded"}, metrics)

    status, body = await get(site, b"/health")
    assert status == 200 and orjson.loads(body)["status"] == "ok"

    status, body = await get(site, b"/ready")
    assert status == 503 and orjson.loads(body)["status"] == "unavailable"

    await store.start()
    try:
        status, body = await get(site, b"/ready")
        assert status == 200 and orjson.loads(body) == {"status": "ready", "store": "embedded"}
    finally:
        await store.stop()

    status, body = await get(site, b"/metrics")
    assert b'mpr_calls_total{method="ping",outcome="ok"} 1.0' in body
    assert b"mpr_open_sockets 3.0" in body
    assert b"process_cpu_seconds_total" in body
