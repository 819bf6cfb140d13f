"""/metrics after a scripted session (embedded store, in-memory sockets, task.Clock): every family
is there before the first call, and each counter moves by what the session did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_rpc import GOOD_ADD, Harness, RpcClient

FAMILIES = {
    "mpr_calls": "counter",
    "mpr_call_duration_seconds": "histogram",
    "mpr_open_sockets": "gauge",
    "mpr_live_sessions": "gauge",
    "mpr_messages_added": "counter",
    "mpr_messages_delivered": "counter",
    "mpr_messages_acknowledged": "counter",
    "mpr_messages_expired": "counter",
    "mpr_messages_redelivered": "counter",
    "mpr_notifications_sent": "counter",
    "mpr_notifications_dropped": "counter",
    "mpr_store_duration_seconds": "histogram",
    "mpr_store_errors": "counter",
    "mpr_persister_moved_messages": "counter",
    "mpr_persister_lag_seconds": "gauge",
    "mpr_persister_errors": "counter",
    "mpr_original_import": "counter",
    "mpr_oldest_message_age_seconds": "gauge",
    "mpr_push_sends": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.run(harness.store.stop())


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(h: Harness) -> tuple[dict[str, str], Samples]:
    body, content_type = h.server.metrics.render()
    assert content_type.startswith("text/plain")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def moved(before: Samples, after: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The mpr_* counter and histogram-count samples that changed, by how much."""
    keys = set(before) | set(after)
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in keys
        if k[0].startswith("mpr_")
        and (k[0].endswith("_total") or k[0].endswith("_count"))
        and after.get(k, 0) != before.get(k, 0)
    }


def test_every_family_and_label_set_exists_before_the_first_call(h: Harness) -> None:
    types, samples = scrape(h)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    for method in ("addMessage", "takeFromQueue", "removeMessages", "getLiveSession", "ping"):
        for outcome in ("ok", "invalid", "full", "timeout", "error"):
            assert get(samples, "mpr_calls_total", method=method, outcome=outcome) == 0
        assert get(samples, "mpr_call_duration_seconds_count", method=method) == 0
    for provider in ("fcm", "apns"):
        for outcome in ("sent", "failed", "invalid_token", "throttled", "retry"):
            assert get(samples, "mpr_push_sends_total", provider=provider, outcome=outcome) == 0
    for op in ("add", "take", "remove", "release_expired"):
        assert get(samples, "mpr_store_errors_total", store="embedded", operation=op) == 0
    assert get(samples, "mpr_open_sockets") == 0


def test_counters_move_by_what_the_session_did(h: Harness) -> None:
    _, before = scrape(h)
    c: RpcClient = h.connect()
    h.service.startService()  # the lease sweep
    try:
        assert h.call(c, "addLiveSession", {"connectionId": "live", "sessionId": "s1"}) is True
        h.call(c, "addMessage", {**GOOD_ADD, "connectionId": "live"})  # leased to the session: notified
        ids = [h.call(c, "addMessage", {**GOOD_ADD, "connectionId": "off"})["messageId"] for _ in range(3)]
        taken = h.call(c, "takeFromQueue", {"connectionId": "off", "limit": 2})
        assert len(taken) == 2
        h.call(c, "removeMessages", {"connectionId": "off", "messageIds": ids})
        h.request(c, "addMessage", {"connectionId": "off"})  # invalid params
        _, during = scrape(h)
        assert get(during, "mpr_open_sockets") == 1
        assert get(during, "mpr_live_sessions") == 1

        # The notified message is not acknowledged: its lease ends and the sweep redelivers it.
        h.clock.advance(h.server.config.message_lease_ms / 1000 + 1.5)
        h.settle()
        assert h.call(c, "removeLiveSession", {"connectionId": "live", "sessionId": "s1"}) is True
        _, after = scrape(h)
    finally:
        h.service.stopService()

    changes = moved(before, after)
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def expect(value: float, name: str, **labels: str) -> None:
        expected[(name, tuple(sorted(labels.items())))] = value

    for method, ok, invalid in (
        ("addLiveSession", 1, 0),
        ("addMessage", 4, 1),
        ("takeFromQueue", 1, 0),
        ("removeMessages", 1, 0),
        ("removeLiveSession", 1, 0),
    ):
        expect(ok, "mpr_calls_total", method=method, outcome="ok")
        if invalid:
            expect(invalid, "mpr_calls_total", method=method, outcome="invalid")
        expect(ok + invalid, "mpr_call_duration_seconds_count", method=method)
    expect(4, "mpr_messages_added_total")
    expect(2, "mpr_messages_delivered_total", via="taken")
    expect(2, "mpr_messages_delivered_total", via="notified")  # once on add, once redelivered
    expect(1, "mpr_messages_redelivered_total", cause="lease_expired")
    expect(3, "mpr_messages_acknowledged_total")
    expect(2, "mpr_notifications_sent_total", to="local")
    for op, n in (("add", 4), ("take", 1), ("remove", 1), ("add_session", 1), ("remove_session", 1)):
        expect(n, "mpr_store_duration_seconds_count", store="embedded", operation=op)
    sweeps = {k: v for k, v in changes.items() if dict(k[1]).get("operation") in ("release_expired", "expire")}
    assert sweeps and all(v >= 1 for v in sweeps.values()), changes  # the sweep ran; how often is the clock's
    for k in sweeps:
        del changes[k]
    assert changes == expected
    assert get(after, "mpr_live_sessions") == 0


def test_metrics_page_serves_the_registry(h: Harness) -> None:
    from twisted.web.test.requesthelper import DummyRequest

    request: Any = DummyRequest([b"metrics"])
    request.requestHeaders.setRawHeaders(b"accept", [b"application/openmetrics-text; version=1.0.0"])
    resource = h.server.site.resource.getChildWithDefault(b"metrics", request)
    body = resource.render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_sample_dashboard_and_alerts_use_families_the_server_exports(h: Harness) -> None:
    import json
    import re

    import yaml

    docs = Path(__file__).resolve().parent.parent / "docs"
    _, samples = scrape(h)
    exported = {name for name, _ in samples}
    rules = yaml.safe_load((docs / "prometheus-alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"MprStoreDown", "MprPersisterLag", "MprPushFailures", "MprQueueAge"}
    dashboard = json.loads((docs / "grafana-dashboard.json").read_text())
    exprs = [r["expr"] for r in rules] + [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:mpr|process)_[a-z_]+)\b", expr)}
    assert used and used <= exported, used - exported
