"""APNs over real HTTP/2 + TLS (ALPN h2) against local fake servers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import task
from twisted.internet.defer import gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs, formatEvent

from mpr_server.push import InvalidTokenError, PermanentPushError, PushService, PushToken, TemporaryPushError
from mpr_server.push.apns import (
    APNS_DATA_TYPE,
    ApnsCredentials,
    ProviderToken,
    classify_apns_error,
)
from tests.push.push_fakes import (
    KEY_ID,
    TEAM_ID,
    TOPIC,
    FakeApns,
    Listeners,
    NoAlpnServerContext,
    ScriptedH2Factory,
    TlsMaterial,
    TrackingFactory,
)

TIMEOUT = 10
ApnsFixture = tuple[FakeApns, TrackingFactory, int]


def apns_service(make_service: Callable[..., PushService], port: int, **overrides: Any) -> PushService:
    return make_service(apns_port=port, **overrides)


@pytest_twisted.ensureDeferred
async def test_push_sent_over_h2(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, site, port = fake_apns
    service = apns_service(make_service, port, push_title="Hi", push_body="Body")

    outcome = await service.push_and_wait(PushToken("apns", "a1b2c3"), "msg-1").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert fake.errors == []
    [request] = fake.requests
    assert request["token"] == "a1b2c3"
    assert request["headers"]["apns-topic"] == TOPIC
    assert request["headers"]["apns-push-type"] == "alert"
    assert request["headers"]["apns-priority"] == "10"
    assert request["headers"]["apns-collapse-id"] == "generic-new-messages"
    assert int(request["headers"]["apns-expiration"]) > time.time()
    assert request["payload"] == {
        "aps": {"alert": {"title": "Hi", "body": "Body"}, "content-available": 1},
        "message_id": "msg-1",
        "@type": APNS_DATA_TYPE,
    }
    assert site.connections == 1
    assert service.counters[("apns", "sent")] == 1


@pytest_twisted.ensureDeferred
async def test_pushes_multiplexed_on_one_connection(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, site, port = fake_apns
    service = apns_service(make_service, port)

    outcomes = await gatherResults(
        [service.push_and_wait(PushToken("apns", f"tok{i}"), f"m{i}") for i in range(10)]
    ).addTimeout(TIMEOUT, reactor)
    later = await service.push_and_wait(PushToken("apns", "later"), "m").addTimeout(TIMEOUT, reactor)

    assert outcomes == ["sent"] * 10
    assert later == "sent"
    assert len(fake.requests) == 11
    assert site.connections == 1
    assert len(fake.jwts) == 1  # provider token reused
    assert fake.errors == []


@pytest_twisted.ensureDeferred
async def test_data_only_is_background_without_alert(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, _site, port = fake_apns
    service = apns_service(make_service, port, notification_data_only=True)

    outcome = await service.push_and_wait(PushToken("ios", "t"), "msg-2").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    [request] = fake.requests
    assert request["headers"]["apns-push-type"] == "background"
    assert request["headers"]["apns-priority"] == "5"
    assert request["payload"] == {"aps": {"content-available": 1}, "message_id": "msg-2", "@type": APNS_DATA_TYPE}


@pytest_twisted.ensureDeferred
async def test_410_unregistered_not_retried(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, _site, port = fake_apns
    service = apns_service(make_service, port)
    fake.script.append((410, {"reason": "Unregistered", "timestamp": 1700000000000}))

    with capturedLogs() as events:
        outcome = await service.push_and_wait(PushToken("apns", "gone-token"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "invalid_token"
    assert len(fake.requests) == 1
    assert service.counters[("apns", "invalid_token")] == 1
    assert service.counters[("apns", "retry")] == 0
    ours = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("mpr_server")]
    assert any("Unregistered" in text for text in ours)
    assert not any("gone-token" in text for text in ours)


@pytest_twisted.ensureDeferred
async def test_500_is_retried(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, site, port = fake_apns
    service = apns_service(make_service, port)
    fake.script.append((500, {"reason": "InternalServerError"}))

    outcome = await service.push_and_wait(PushToken("apns", "t"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert len(fake.requests) == 2
    assert service.counters[("apns", "retry")] == 1
    assert site.connections == 1


@pytest_twisted.ensureDeferred
async def test_expired_provider_token_is_renewed(reactor: Any, fake_apns: ApnsFixture, make_service: Any) -> None:
    fake, _site, port = fake_apns
    service = apns_service(make_service, port)
    fake.script.append((403, {"reason": "ExpiredProviderToken"}))

    outcome = await service.push_and_wait(PushToken("apns", "t"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert len(fake.requests) == 2
    assert service.counters[("apns", "retry")] == 0


# -- connection management against a scripted low-level HTTP/2 server


def listen_scripted(reactor: Any, tls: TlsMaterial, listeners: Listeners, factory: ScriptedH2Factory) -> int:
    port = reactor.listenSSL(0, factory, tls.server_options([b"h2"]), interface="127.0.0.1")
    return listeners.add(port, factory.tracker)


@pytest_twisted.ensureDeferred
async def test_goaway_then_reconnect(
    reactor: Any, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    factory = ScriptedH2Factory("goaway", hold=1)
    service = apns_service(make_service, listen_scripted(reactor, tls_material, listeners, factory))

    first = await service.push_and_wait(PushToken("apns", "a"), "m1").addTimeout(TIMEOUT, reactor)
    second = await service.push_and_wait(PushToken("apns", "b"), "m2").addTimeout(TIMEOUT, reactor)
    third = await service.push_and_wait(PushToken("apns", "c"), "m3").addTimeout(TIMEOUT, reactor)

    assert (first, second, third) == ("sent", "sent", "sent")
    assert factory.connections == 2
    assert service.counters[("apns", "retry")] == 0


@pytest_twisted.ensureDeferred
async def test_goaway_fails_unprocessed_stream_which_is_retried(
    reactor: Any, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    factory = ScriptedH2Factory("goaway", hold=2)
    service = apns_service(make_service, listen_scripted(reactor, tls_material, listeners, factory))

    outcomes = await gatherResults(
        [service.push_and_wait(PushToken("apns", "a"), "m1"), service.push_and_wait(PushToken("apns", "b"), "m2")]
    ).addTimeout(TIMEOUT, reactor)

    assert outcomes == ["sent", "sent"]
    assert factory.connections == 2
    assert factory.requests == 3  # both on the first connection, the refused one again on the second
    assert service.counters[("apns", "retry")] == 1


@pytest_twisted.ensureDeferred
async def test_stream_reset_is_retried(
    reactor: Any, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    factory = ScriptedH2Factory("reset")
    service = apns_service(make_service, listen_scripted(reactor, tls_material, listeners, factory))

    outcome = await service.push_and_wait(PushToken("apns", "a"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "sent"
    assert factory.requests == 2
    assert factory.connections == 1
    assert service.counters[("apns", "retry")] == 1


@pytest_twisted.ensureDeferred
async def test_request_timeout(
    reactor: Any, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    factory = ScriptedH2Factory("silent")
    port = listen_scripted(reactor, tls_material, listeners, factory)
    service = apns_service(make_service, port, push_timeout_ms=200, push_max_attempts=1)

    with capturedLogs() as events:
        outcome = await service.push_and_wait(PushToken("apns", "a"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "failed"
    assert factory.requests == 1
    assert any("timed out" in formatEvent(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_server_without_alpn_h2_is_refused(
    reactor: Any, make_service: Any, tls_material: TlsMaterial, listeners: Listeners
) -> None:
    factory = Factory.forProtocol(Protocol)  # TLS without ALPN, then silence
    port = listeners.add(reactor.listenSSL(0, factory, NoAlpnServerContext(tls_material), interface="127.0.0.1"))
    service = apns_service(make_service, port, push_max_attempts=1)

    with capturedLogs() as events:
        outcome = await service.push_and_wait(PushToken("apns", "a"), "m").addTimeout(TIMEOUT, reactor)

    assert outcome == "failed"
    assert any("ALPN h2" in formatEvent(e) for e in events)


# -- unit tests


def test_provider_token_renewed_before_an_hour(ec_key: ec.EllipticCurvePrivateKey) -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    tokens = ProviderToken(clock, ApnsCredentials(KEY_ID, TEAM_ID, False, ec_key))

    first = tokens.get()
    clock.advance(49 * 60)
    assert tokens.get() == first
    clock.advance(60)
    second = tokens.get()

    assert second != first  # renewed after 50 minutes, the same within them
    assert jwt.get_unverified_header(second)["kid"] == KEY_ID
    claims = jwt.decode(second, ec_key.public_key(), algorithms=["ES256"])
    assert claims == {"iss": TEAM_ID, "iat": 1_700_000_000 + 50 * 60}
    tokens.invalidate(second)
    assert tokens.get() != second


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (400, "BadDeviceToken", InvalidTokenError),
        (400, "DeviceTokenNotForTopic", InvalidTokenError),
        (410, "Unregistered", InvalidTokenError),
        (410, "ExpiredToken", InvalidTokenError),
        (400, "BadTopic", PermanentPushError),
        (403, "InvalidProviderToken", PermanentPushError),
        (413, "PayloadTooLarge", PermanentPushError),
        (429, "TooManyRequests", TemporaryPushError),
        (500, "InternalServerError", TemporaryPushError),
        (503, "ServiceUnavailable", TemporaryPushError),
    ],
)
def test_apns_error_taxonomy(status: int, reason: str, expected: type[Exception]) -> None:
    assert type(classify_apns_error(status, reason, None)) is expected


def test_apns_reason_parsing() -> None:
    from mpr_server.push.apns import apns_reason

    assert apns_reason(json.dumps({"reason": "BadDeviceToken"}).encode()) == "BadDeviceToken"
    assert apns_reason(b"not json") == ""
