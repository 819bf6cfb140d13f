"""End to end: push notifications sent by a real ``twistd mpr`` process to the local fake OAuth2 +
FCM server of tests/push (nothing reaches the internet).

A push that must not happen is proved absent by a later positive event: the push of a later add
arriving, or the server counting the push as throttled (``mpr_push_sends_total`` on /metrics).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.defer import Deferred

from mpr_server.push.fcm import FCM_DATA_TYPE
from tests.e2e.conftest import Connect, ServerFactory
from tests.e2e.mprprocess import MprProcess
from tests.e2e.test_distributed import MongoDb, eventually, start_all, store_args
from tests.e2e.test_server import DID_A, http_get, jwe
from tests.push import conftest as push_fixtures
from tests.push.push_fakes import FakeFcm
from tests.wsclient import RpcClient

# The fake OAuth2 + FCM server and the service-account file of the push tests, reused here.
rsa_key = push_fixtures.rsa_key
listeners = push_fixtures.listeners
fake_fcm = push_fixtures.fake_fcm
firebase_file = push_fixtures.firebase_file

PUSH_TIMEOUT = 10.0


def uid() -> str:
    return uuid.uuid4().hex[:10]


class Inbox(list[dict[str, Any]]):
    """The fake's list of accepted FCM messages, telling waiters when one arrives."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def append(self, message: dict[str, Any]) -> None:
        super().append(message)
        for waiter in list(self._waiters):
            check, d = waiter
            if check():
                self._waiters.remove(waiter)
                d.callback(None)

    def to(self, token: str) -> list[dict[str, Any]]:
        return [m for m in self if m["token"] == token]

    async def wait_for(self, token: str, n: int = 1, timeout: float = PUSH_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until ``n`` pushes to ``token`` arrived; return them."""

        def check() -> bool:
            return len(self.to(token)) >= n

        if not check():
            d: Deferred[None] = Deferred()
            self._waiters.append((check, d))
            d.addTimeout(timeout, self._reactor)
            try:
                await d
            except Exception:
                raise AssertionError(f"no {n} push(es) to {token} within {timeout} s; got {list(self)}") from None
        return self.to(token)


@dataclass
class Fcm:
    fake: FakeFcm
    inbox: Inbox
    args: list[str]


@pytest.fixture
def fcm(reactor: Any, fake_fcm: FakeFcm, firebase_file: str, mpr_servers: ServerFactory) -> Iterator[Fcm]:
    """The fake FCM with an event-driven inbox, and the server options that point at it.

    Depends on ``mpr_servers`` after the fake, so that the servers are killed (closing their
    connections to the fake) before the fake's listener is stopped."""
    inbox = Inbox(reactor)
    fake_fcm.messages = inbox
    args = ["--firebase-cfg-file", firebase_file, "--fcm-base-url", fake_fcm.base_url]
    yield Fcm(fake_fcm, inbox, [*args, "--fcm-token-url", fake_fcm.token_url])
    assert fake_fcm.errors == [], "the fake FCM saw requests a real one would reject"


async def add_with_token(client: RpcClient, connection_id: str, token: str, tag: str, provider: str = "fcm") -> str:
    result = await client.call(
        "addMessage",
        {
            "connectionId": connection_id,
            "recipientDids": [DID_A],
            "payload": jwe(tag),
            "pushNotificationToken": {"type": provider, "token": token},
        },
    )
    return str(result["messageId"])


async def push_counts(reactor: Any, server: MprProcess, provider: str = "fcm") -> dict[str, int]:
    """Push outcomes of ``provider`` as counted by the server (/metrics), by outcome."""
    code, _, body = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/metrics")
    assert code == 200, body
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(body.decode()):
        if family.name != "mpr_push_sends":
            continue
        for sample in family.samples:
            assert set(sample.labels) == {"provider", "outcome"}, sample
            if sample.labels["provider"] == provider and sample.value:
                counts[sample.labels["outcome"]] = int(sample.value)
    return counts


# -- embedded store ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_without_live_session_pushes_once(
    fcm: Fcm, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    server = mpr_servers(extra_args=fcm.args)
    await server.start()
    m = await connect(server.ws_port)
    token = f"T1-{uid()}"

    message_id = await add_with_token(m, "c1", token, "p1")

    [push] = await fcm.inbox.wait_for(token)
    assert push["data"] == {"@type": FCM_DATA_TYPE, "message_id": message_id}
    assert push["notification"] == {"title": "New message", "body": "You have a new message"}
    counts = await eventually(reactor, lambda: push_counts(reactor, server), lambda c: c != {}, 5, "push metrics")
    assert counts == {"sent": 1}, counts
    assert fcm.fake.send_attempts == 1 and len(fcm.inbox) == 1
    # The message is queued as usual.
    assert await m.call("getAvailableMessageCount", {"connectionId": "c1"}) == 1


@pytest_twisted.ensureDeferred
async def test_live_session_suppresses_the_push(
    fcm: Fcm, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    server = mpr_servers(extra_args=fcm.args)
    await server.start()
    mediator = await connect(server.ws_port, socket_id="live-mediator")
    writer = await connect(server.ws_port)
    online, offline = f"online-{uid()}", f"offline-{uid()}"
    assert await mediator.call("addLiveSession", {"connectionId": online, "sessionId": "s1"}) is True

    suppressed_id = await add_with_token(writer, online, online, "to-online")
    note = await mediator.next_notification()
    assert [x["id"] for x in note["params"]["messages"]] == [suppressed_id]

    # A later add for an offline connection is pushed: by then the first push would have arrived.
    offline_id = await add_with_token(writer, offline, offline, "to-offline")
    [push] = await fcm.inbox.wait_for(offline)
    assert push["data"]["message_id"] == offline_id
    assert fcm.inbox.to(online) == [] and len(fcm.inbox) == 1
    counts = await eventually(reactor, lambda: push_counts(reactor, server), lambda c: c != {}, 5, "push metrics")
    assert counts == {"sent": 1}, counts


@pytest_twisted.ensureDeferred
async def test_throttle_then_session_close_resumes_pushes(
    fcm: Fcm, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    window_s = 1.0
    server = mpr_servers(extra_args=[*fcm.args, "--push-throttle-ms", str(int(window_s * 1000))])
    await server.start()
    writer = await connect(server.ws_port)
    c, token, other_token = f"c3-{uid()}", f"T3-{uid()}", f"T3b-{uid()}"

    # Two adds within the window: one push, the other counted as throttled.
    first_id = await add_with_token(writer, c, token, "first")
    await add_with_token(writer, c, token, "second")
    [push] = await fcm.inbox.wait_for(token)
    first_push_at = reactor.seconds()
    assert push["data"]["message_id"] == first_id
    counts = await eventually(
        reactor, lambda: push_counts(reactor, server), lambda c: c.get("throttled") == 1, 5, "a throttled push"
    )
    assert counts == {"sent": 1, "throttled": 1}, counts

    # While a session is live on a connected socket (no socket_id: no grace period), no push ...
    session = await connect(server.ws_port)
    assert await session.call("addLiveSession", {"connectionId": c, "sessionId": "s3"}) is True
    delivered_id = await add_with_token(writer, c, other_token, "during-session")
    note = await session.next_notification()
    assert [x["id"] for x in note["params"]["messages"]] == [delivered_id]

    # ... and once its socket is closed the session is gone at once and pushes resume.
    await session.close()

    def has_session() -> Any:
        return writer.call("getLiveSession", {"connectionId": c})

    await eventually(reactor, has_session, lambda v: v is False, 5, "the closed socket's session")
    remaining = first_push_at + window_s + 0.1 - reactor.seconds()
    if remaining > 0:  # let the throttle window of the first push run out (bounded by window_s)
        await task.deferLater(reactor, remaining, lambda: None)
    resumed_id = await add_with_token(writer, c, token, "after-close")
    pushes = await fcm.inbox.wait_for(token, 2)
    assert [p["data"]["message_id"] for p in pushes] == [first_id, resumed_id]
    assert fcm.inbox.to(other_token) == [], "pushed although a live session held the connection"
    counts = await eventually(
        reactor, lambda: push_counts(reactor, server), lambda c: c.get("sent") == 2, 5, "the resumed push"
    )
    assert counts == {"sent": 2, "throttled": 1}, counts


# -- distributed store: one throttle across instances -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_throttle_is_shared_by_instances_on_redis(
    fcm: Fcm, mongo_db: MongoDb, redis_single: Any, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    run = uid()
    redis = ["--redis-url", redis_single.url]
    a = mpr_servers(extra_args=[*fcm.args, *store_args(redis, mongo_db.uri, f"PA-{run}")])
    b = mpr_servers(extra_args=[*fcm.args, *store_args(redis, mongo_db.uri, f"PB-{run}")])
    await start_all(a, b)
    on_a, on_b = await connect(a.ws_port), await connect(b.ws_port)
    token = f"T4-{run}"

    id_a = await add_with_token(on_a, f"ca-{run}", token, "on-a")
    id_b = await add_with_token(on_b, f"cb-{run}", token, "on-b")

    [push] = await fcm.inbox.wait_for(token)
    assert push["data"]["message_id"] in (id_a, id_b)

    async def both() -> list[dict[str, int]]:
        return [await push_counts(reactor, a), await push_counts(reactor, b)]

    counts = await eventually(
        reactor, both, lambda cs: sum(sum(c.values()) for c in cs) == 2, 5, "both instances' push outcomes"
    )
    assert sorted(counts, key=list) == [{"sent": 1}, {"throttled": 1}], counts
    assert len(fcm.inbox.to(token)) == 1 and fcm.fake.send_attempts == 1
