"""FCM HTTP v1 against a local fake OAuth2 + FCM server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from mpr_server.push import InvalidTokenError, PermanentPushError, PushService, PushToken, TemporaryPushError
from mpr_server.push.fcm import FCM_DATA_TYPE, classify_fcm_error
from mpr_server.push.model import token_hash
from tests.push.push_fakes import (
    FakeFcm,
    Listeners,
    SignallingClock,
    TlsMaterial,
    TrackingFactory,
    fcm_error,
    make_tls_material,
)

TIMEOUT = 10


def fcm_service(make_service: Callable[..., PushService], fake: FakeFcm, **overrides: Any) -> PushService:
    return make_service(fcm_base_url=fake.base_url, fcm_token_url=fake.token_url, **overrides)


@pytest_twisted.ensureDeferred
async def test_push_sent_with_original_payload(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm, push_title="Hi", push_body="New stuff")

    outcome = await service.push_and_wait(PushToken("fcm", "device-1"), "msg-1").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert fake_fcm.errors == []
    assert fake_fcm.token_requests == 1
    [message] = fake_fcm.messages
    assert message["token"] == "device-1"
    assert message["data"] == {"@type": FCM_DATA_TYPE, "message_id": "msg-1"}
    assert message["notification"] == {"title": "Hi", "body": "New stuff"}
    assert message["android"]["priority"] == "high"
    assert message["android"]["collapse_key"] == "generic-new-messages"
    assert message["apns"]["headers"]["apns-priority"] == "10"
    assert message["apns"]["headers"]["apns-push-type"] == "alert"
    assert message["apns"]["payload"]["aps"]["alert"] == {"title": "Hi", "body": "New stuff"}
    assert service.counters[("fcm", "sent")] == 1


@pytest_twisted.ensureDeferred
async def test_access_token_cached_across_pushes(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm)

    for i in range(3):
        outcome = await service.push_and_wait(PushToken("fcm", f"seq-{i}"), "m").addTimeout(TIMEOUT, reactor)
        assert outcome == "sent"
    concurrent = [service.push_and_wait(PushToken("fcm", f"par-{i}"), "m") for i in range(5)]
    outcomes = await gatherResults(concurrent).addTimeout(TIMEOUT, reactor)

    assert outcomes == ["sent"] * 5
    assert fake_fcm.token_requests == 1
    assert len(fake_fcm.messages) == 8
    assert fake_fcm.errors == []


@pytest_twisted.ensureDeferred
async def test_401_refreshes_token_once(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm)
    assert await service.push_and_wait(PushToken("fcm", "a"), "m1").addTimeout(TIMEOUT, reactor) == "sent"
    fake_fcm.revoke_tokens()

    outcome = await service.push_and_wait(PushToken("fcm", "b"), "m2").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert fake_fcm.token_requests == 2
    assert fake_fcm.send_attempts == 3  # ok, 401, ok
    assert service.counters[("fcm", "retry")] == 0
    assert fake_fcm.errors == []


@pytest_twisted.ensureDeferred
async def test_503_retry_after_is_honoured(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    clock = SignallingClock()
    service = fcm_service(make_service, fake_fcm, clock=clock)
    fake_fcm.script.append((503, fcm_error(503, "UNAVAILABLE"), {"Retry-After": "7"}))

    scheduled = clock.next_call()
    result = service.push_and_wait(PushToken("fcm", "dev"), "m")
    delay = await scheduled.addTimeout(TIMEOUT, reactor)
    assert delay == 7
    assert fake_fcm.messages == []
    clock.advance(7)
    outcome = await result.addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert fake_fcm.send_attempts == 2
    assert len(fake_fcm.messages) == 1
    assert service.counters[("fcm", "retry")] == 1
    assert service.counters[("fcm", "sent")] == 1


@pytest_twisted.ensureDeferred
async def test_5xx_gives_up_after_max_attempts(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm, push_max_attempts=3)
    for _ in range(3):
        fake_fcm.script.append((500, fcm_error(500, "INTERNAL"), {}))

    outcome = await service.push_and_wait(PushToken("fcm", "dev"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "failed"
    assert fake_fcm.send_attempts == 3
    assert service.counters[("fcm", "retry")] == 2
    assert service.counters[("fcm", "failed")] == 1


@pytest_twisted.ensureDeferred
async def test_unregistered_not_retried_and_token_hashed(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm)
    fake_fcm.script.append((404, fcm_error(404, "NOT_FOUND", "UNREGISTERED"), {}))
    secret = "secret-device-token-123"

    with capturedLogs() as events:
        outcome = await service.push_and_wait(PushToken("fcm", secret), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "invalid_token"
    assert fake_fcm.send_attempts == 1
    assert service.counters[("fcm", "invalid_token")] == 1
    assert service.counters[("fcm", "retry")] == 0
    ours = [e for e in events if e.get("log_namespace", "").startswith("mpr_server")]
    texts = [formatEvent(e) for e in ours]
    assert any(token_hash(secret) in t and "UNREGISTERED" in t for t in texts)
    assert not any(secret in t for t in texts)
    assert not any(secret in repr(v) for e in ours for k, v in e.items() if not k.startswith("log_"))


@pytest_twisted.ensureDeferred
async def test_data_only_has_no_visible_alert(reactor: Any, fake_fcm: FakeFcm, make_service: Any) -> None:
    service = fcm_service(make_service, fake_fcm, notification_data_only=True)

    outcome = await service.push_and_wait(PushToken("fcm", "dev"), "msg-9").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    [message] = fake_fcm.messages
    assert "notification" not in message
    assert "notification" not in message["android"]
    assert message["data"] == {"@type": FCM_DATA_TYPE, "message_id": "msg-9"}
    assert message["apns"]["payload"]["aps"] == {"content-available": 1}
    assert message["apns"]["headers"]["apns-push-type"] == "background"
    assert message["apns"]["headers"]["apns-priority"] == "5"
    assert "alert" not in repr(message["apns"]["payload"])


@pytest_twisted.ensureDeferred
async def test_https_with_push_ca_file(
    reactor: Any, fake_fcm: FakeFcm, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    site = TrackingFactory(Site(fake_fcm, timeout=None))
    options = tls_material.server_options([b"http/1.1"])
    port = listeners.add(reactor.listenSSL(0, site, options, interface="127.0.0.1"), site.tracker)
    fake_fcm.base_url = f"https://127.0.0.1:{port}"
    service = fcm_service(make_service, fake_fcm)

    outcome = await service.push_and_wait(PushToken("fcm", "dev"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert fake_fcm.errors == []


@pytest_twisted.ensureDeferred
async def test_untrusted_server_certificate_fails(
    reactor: Any,
    fake_fcm: FakeFcm,
    make_service: Any,
    tls_material: TlsMaterial,
    listeners: Listeners,
    tmp_path: Path,
) -> None:
    site = TrackingFactory(Site(fake_fcm, timeout=None))
    options = tls_material.server_options([b"http/1.1"])
    port = listeners.add(reactor.listenSSL(0, site, options, interface="127.0.0.1"), site.tracker)
    fake_fcm.base_url = f"https://127.0.0.1:{port}"
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(make_tls_material().ca_pem)
    service = fcm_service(make_service, fake_fcm, push_ca_file=str(other_ca), push_max_attempts=1)

    with capturedLogs() as events:
        outcome = await service.push_and_wait(PushToken("fcm", "dev"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "failed"
    assert fake_fcm.token_requests == 0
    assert any("certificate verify failed" in formatEvent(e) for e in events)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, fcm_error(404, "NOT_FOUND", "UNREGISTERED"), InvalidTokenError),
        (400, fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"), InvalidTokenError),
        (403, fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"), InvalidTokenError),
        (429, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), TemporaryPushError),
        (500, fcm_error(500, "INTERNAL", "INTERNAL"), TemporaryPushError),
        (503, {"not": "json error"}, TemporaryPushError),
        (401, fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), PermanentPushError),
        (403, fcm_error(403, "PERMISSION_DENIED"), PermanentPushError),
    ],
)
def test_fcm_error_taxonomy(status: int, body: Any, expected: type[Exception]) -> None:
    import json

    error = classify_fcm_error(status, json.dumps(body).encode(), 3.0)
    assert type(error) is expected
    if isinstance(error, TemporaryPushError):
        assert error.retry_after == 3.0
