"""End to end: APNs pushes sent by a real ``twistd mpr`` process over HTTP/2 + TLS (ALPN h2) to the
local fake APNs of tests/push, and a graceful stop of one of two instances on the distributed store
releasing its sessions at once (nothing reaches the internet).

A push that must not happen is proved absent by a later positive event: the push of a later add
arriving, or the server counting the final outcome of the push (``mpr_push_sends_total`` on /metrics).
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import threads

from mpr_server.push.apns import APNS_DATA_TYPE
from mpr_server.stores.redis.keys import connection_keys
from scripts.services.redis import resp_command
from tests.e2e.conftest import Connect, ServerFactory
from tests.e2e.mprprocess import Exit, MprProcess
from tests.e2e.test_distributed import MongoDb, eventually, start_all, store_args
from tests.e2e.test_push_e2e import Inbox, add_with_token
from tests.e2e.test_push_e2e import push_counts as provider_push_counts
from tests.e2e.test_server import count
from tests.push import conftest as push_fixtures
from tests.push.push_fakes import KEY_ID, TEAM_ID, TOPIC, FakeApns, TrackingFactory
from tests.wsclient import RpcClient

# The fake APNs (Twisted's HTTP/2 server over TLS), its CA, key and credential files, reused here.
ec_key = push_fixtures.ec_key
tls_material = push_fixtures.tls_material
ca_file = push_fixtures.ca_file
apns_files = push_fixtures.apns_files
listeners = push_fixtures.listeners
fake_apns = push_fixtures.fake_apns

ALERT = {"title": "New message", "body": "You have a new message"}


def uid() -> str:
    return uuid.uuid4().hex[:10]


def device_token() -> str:
    """A device token shaped like Apple's (64 hex digits)."""
    return uuid.uuid4().hex + uuid.uuid4().hex


@dataclass
class Apns:
    fake: FakeApns
    site: TrackingFactory
    inbox: Inbox
    args: list[str]


@pytest.fixture
def apns(
    reactor: Any,
    fake_apns: tuple[FakeApns, TrackingFactory, int],
    apns_files: tuple[str, str],
    ca_file: str,
    mpr_servers: ServerFactory,
) -> Iterator[Apns]:
    """The fake APNs with an event-driven record of its requests, and the server options that
    point at it (no throttle unless a test adds one).

    Depends on ``mpr_servers`` after the fake, so that the servers are killed (closing their
    HTTP/2 connections to the fake) before the fake's listener is stopped."""
    fake, site, port = fake_apns
    inbox = Inbox(reactor)
    fake.requests = inbox
    args = [
        "--apns-cfg-file",
        apns_files[0],
        "--apns-path-key",
        apns_files[1],
        "--apns-topic",
        TOPIC,
        "--apns-host",
        "127.0.0.1",
        "--apns-port",
        str(port),
        "--push-ca-file",
        ca_file,
        "--push-throttle-ms",
        "0",
    ]
    yield Apns(fake, site, inbox, args)
    assert fake.errors == [], "the fake APNs saw requests a real one would reject"


async def add_for_apns(client: RpcClient, connection_id: str, token: str, tag: str) -> str:
    return await add_with_token(client, connection_id, token, tag, "apns")


async def push_counts(reactor: Any, server: MprProcess) -> dict[str, int]:
    return await provider_push_counts(reactor, server, "apns")


def check_provider_token(request: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> None:
    """The bearer token is an ES256 JWT of our team and key id, verified with the public key."""
    scheme, _, token = request["headers"]["authorization"].partition(" ")
    assert scheme == "bearer", request["headers"]
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": KEY_ID, "typ": "JWT"}
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], options={"require": ["iat", "iss"]})
    assert claims["iss"] == TEAM_ID, claims


# -- embedded store ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_apns_alert_push_over_h2(
    apns: Apns, mpr_servers: ServerFactory, connect: Connect, reactor: Any, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    server = mpr_servers(extra_args=apns.args)
    await server.start()
    m = await connect(server.ws_port)
    token = device_token()

    message_id = await add_for_apns(m, f"c1-{uid()}", token, "apns-alert")

    [request] = await apns.inbox.wait_for(token)
    headers = request["headers"]
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    check_provider_token(request, ec_key)
    assert request["payload"] == {
        "aps": {"alert": ALERT, "content-available": 1},
        "message_id": message_id,
        "@type": APNS_DATA_TYPE,
    }
    # The fake only records POST /3/device/<token> over HTTP/2 (anything else is in its errors).
    assert apns.fake.errors == []
    counts = await eventually(reactor, lambda: push_counts(reactor, server), lambda c: c != {}, 5, "push metrics")
    assert counts == {"sent": 1}, counts
    assert len(apns.inbox) == 1 and apns.site.connections == 1


@pytest_twisted.ensureDeferred
async def test_apns_data_only_is_a_background_push(
    apns: Apns, mpr_servers: ServerFactory, connect: Connect, reactor: Any, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    server = mpr_servers(extra_args=[*apns.args, "--notification-data-only", "true"])
    await server.start()
    m = await connect(server.ws_port)
    token = device_token()

    message_id = await add_for_apns(m, f"c2-{uid()}", token, "apns-background")

    [request] = await apns.inbox.wait_for(token)
    headers = request["headers"]
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    check_provider_token(request, ec_key)
    assert request["payload"] == {"aps": {"content-available": 1}, "message_id": message_id, "@type": APNS_DATA_TYPE}
    assert "alert" not in repr(request["payload"]), request["payload"]
    counts = await eventually(reactor, lambda: push_counts(reactor, server), lambda c: c != {}, 5, "push metrics")
    assert counts == {"sent": 1}, counts


@pytest_twisted.ensureDeferred
async def test_apns_410_unregistered_is_counted_and_not_retried(
    apns: Apns, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    server = mpr_servers(extra_args=apns.args)
    await server.start()
    m = await connect(server.ws_port)
    gone, good = device_token(), device_token()
    apns.fake.script.append((410, {"reason": "Unregistered", "timestamp": 1700000000000}))

    await add_for_apns(m, f"c3-{uid()}", gone, "to-gone")
    await apns.inbox.wait_for(gone)
    # The outcome of a push is counted once its attempts are over: no retry can follow.
    counts = await eventually(
        reactor, lambda: push_counts(reactor, server), lambda c: c != {}, 5, "the outcome of the push"
    )
    assert counts == {"invalid_token": 1}, counts

    # A later push to another token goes through, on the same connection.
    good_id = await add_for_apns(m, f"c3b-{uid()}", good, "to-good")
    [pushed] = await apns.inbox.wait_for(good)
    assert pushed["payload"]["message_id"] == good_id
    counts = await eventually(
        reactor, lambda: push_counts(reactor, server), lambda c: c.get("sent") == 1, 5, "the second push"
    )
    assert counts == {"invalid_token": 1, "sent": 1}, counts
    assert len(apns.inbox.to(gone)) == 1 and len(apns.inbox) == 2
    assert apns.site.connections == 1
    assert "Unregistered" in server.output and gone not in server.output


# -- distributed store: a graceful stop releases the instance's sessions at once -----------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_of_one_instance_releases_its_sessions_at_once(
    apns: Apns, mongo_db: MongoDb, redis_single: Any, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    run = uid()
    ttl_s = 10.0
    redis = ["--redis-url", redis_single.url]
    ttl = ["--instance-ttl-ms", str(int(ttl_s * 1000))]
    a = mpr_servers(extra_args=[*apns.args, *store_args(redis, mongo_db.uri, f"SA-{run}", *ttl)])
    b = mpr_servers(extra_args=[*apns.args, *store_args(redis, mongo_db.uri, f"SB-{run}", *ttl)])
    await start_all(a, b)
    on_a = await connect(a.ws_port)
    mediator = await connect(b.ws_port)  # no socket_id: no grace period for its sessions
    c1 = f"c1-{run}"
    held, after = device_token(), device_token()

    # B's socket holds a live session for c1: an add on A is delivered there, not pushed.
    assert await mediator.call("addLiveSession", {"connectionId": c1, "sessionId": "s1"}) is True
    assert await on_a.call("getLiveSession", {"connectionId": c1}) is True
    delivered_id = await add_for_apns(on_a, c1, held, "while-live")
    note = await mediator.next_notification()
    assert [x["id"] for x in note["params"]["messages"]] == [delivered_id]

    stopped_at = reactor.seconds()
    ended = await b.kill(signal.SIGTERM)
    code = await mediator.closed
    assert code == 1001, f"close code {code}"
    assert ended in (Exit(0, None), Exit(None, signal.SIGTERM)), (ended, b.output)

    # At once (no waiting for B's liveness TTL): no session, and an add on A is pushed. What frees
    # the session is B releasing its closed socket before it stops: B's leaving mpr:instances
    # alone would not, as a session younger than 2 x TTL still counts as live (the cutoff).
    assert await on_a.call("getLiveSession", {"connectionId": c1}) is False
    pushed_id = await add_for_apns(on_a, c1, after, "after-stop")
    [push] = await apns.inbox.wait_for(after, timeout=3.0)
    push_after_s = reactor.seconds() - stopped_at
    assert push["payload"]["message_id"] == pushed_id
    assert push_after_s < ttl_s / 3, f"pushed {push_after_s:.2f} s after the stop (liveness TTL {ttl_s} s)"
    # The add made while the session was live was never pushed (its push would have come first).
    assert apns.inbox.to(held) == [], apns.inbox
    # The message B had been given (unacknowledged) is back in the queue with the new one.
    assert await count(on_a, c1) == 2
    counts = await eventually(
        reactor, lambda: push_counts(reactor, a), lambda c: c.get("sent") == 1, 5, "A's push outcome"
    )
    assert counts == {"sent": 1}, counts


@pytest_twisted.ensureDeferred
async def test_sigterm_ends_grace_periods_and_sends_the_pushes_they_held(
    apns: Apns, mongo_db: MongoDb, redis_single: Any, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    run = uid()
    redis = ["--redis-url", redis_single.url]
    ttl = ["--instance-ttl-ms", "10000"]
    a = mpr_servers(extra_args=[*apns.args, *store_args(redis, mongo_db.uri, f"GA-{run}", *ttl)])
    b = mpr_servers(extra_args=[*apns.args, *store_args(redis, mongo_db.uri, f"GB-{run}", *ttl)])
    await start_all(a, b)
    on_a = await connect(a.ws_port)
    mediator = await connect(b.ws_port, socket_id=f"named-{run}")  # its sessions get a grace period
    c1 = f"c1-{run}"
    token = device_token()
    assert await mediator.call("addLiveSession", {"connectionId": c1, "sessionId": "s1"}) is True

    await mediator.close()  # the mediator drops off; B keeps its session for the grace period
    # B marks the session away once it has seen the close; only then is an add held back (before,
    # it is still leased to the socket that is going)
    session_key = connection_keys(c1)[5]

    async def away() -> Any:
        return await threads.deferToThread(resp_command, redis_single.port, "HGET", session_key, "away")

    await eventually(reactor, away, lambda v: v in (b"1", "1"), 5.0, "the session marked away")
    held_id = await add_for_apns(on_a, c1, token, "while-away")
    assert await on_a.call("getLiveSession", {"connectionId": c1}) is True
    assert apns.inbox.to(token) == []  # held back: the mediator may come back

    await b.kill(signal.SIGTERM)  # nobody will end that grace period: B ends it as it stops
    [push] = await apns.inbox.wait_for(token, timeout=5.0)
    assert push["payload"]["message_id"] == held_id
    assert await on_a.call("getLiveSession", {"connectionId": c1}) is False
