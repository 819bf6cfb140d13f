"""End to end with the distributed store: real ``twistd mpr`` processes sharing real Redis (single
and a 3-master cluster) and MongoDB, used over real sockets the way horizontally scaled Credo
mediators use them; instances killed, Redis killed and restarted.

Every wait is on an event (a reply, a notification, a process exit) with a timeout. Where the
event is a state change in another system (an instance declared dead after its liveness TTL, a
message persisted to MongoDB) the test asks again every 0.2 s until a deadline.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import task, threads
from twisted.internet.defer import Deferred, gatherResults

from scripts.services.redis import start_redis
from tests.e2e.conftest import Connect, MongoDb, ServerFactory, uid
from tests.e2e.mprprocess import MprProcess
from tests.e2e.test_server import DID_A, DID_B, add, count, expect_failed_start, jwe, raw_payload_text, take
from tests.services import start_or_skip
from tests.wsclient import RpcCallError, RpcClient

T = TypeVar("T")
POLL_S = 0.2
PACE_S = 0.01


async def eventually(
    reactor: Any,
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    timeout: float,
    what: str,
) -> T:
    """Ask ``probe`` every POLL_S seconds until ``accept`` says yes; fail after ``timeout`` s."""
    deadline = reactor.seconds() + timeout
    while True:
        value = await probe()
        if accept(value):
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout} s")
        await task.deferLater(reactor, POLL_S, lambda: None)


def store_args(redis: list[str], mongo_uri: str, instance: str, *extra: str) -> list[str]:
    return ["--mpr-store", "redis", *redis, "--mongodb-uri", mongo_uri, "--mpr-instance-id", instance, *extra]


async def start_all(*servers: MprProcess) -> None:
    await gatherResults([Deferred.fromCoroutine(s.start()) for s in servers])
    for server in servers:
        assert server.serving_line is not None and server.serving_line["store"] == b"redis", server.output


@pytest.fixture(params=["single", "cluster"])
def shared_redis(request: pytest.FixtureRequest) -> list[str]:
    """The server options for the session's single Redis or its 3-master cluster."""
    if request.param == "single":
        return ["--redis-url", request.getfixturevalue("redis_single").url]
    cluster = request.getfixturevalue("redis_cluster")
    return ["--redis-type", "cluster", "--redis-nodes", cluster.nodes_string]


@dataclass
class OwnRedis:
    """Dedicated redis-servers a test may kill and restart; all stopped (by pid) at teardown."""

    started: list[Any] = field(default_factory=list)

    def start(self, **options: Any) -> Any:
        server = start_or_skip("redis-server", lambda: start_redis(**options))
        self.started.append(server)
        return server

    def restart(self, port: int, **options: Any) -> Any:
        """Start again on ``port`` (blocking, no pytest skip: run it in a thread)."""
        server = start_redis(port, **options)
        self.started.append(server)
        return server


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    servers = OwnRedis()
    try:
        yield servers
    finally:
        for server in servers.started:
            server.stop()


def kill_redis(server: Any) -> None:
    """SIGKILL one redis-server we started and reap it (blocking: run in a thread)."""
    assert "redis-server" in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)


def iso_ms(value: datetime.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# -- two instances ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_notification_crosses_instances_and_both_agree(
    mongo_db: MongoDb, shared_redis: list[str], mpr_servers: ServerFactory, connect: Connect
) -> None:
    run = uid()
    a = mpr_servers(extra_args=store_args(shared_redis, mongo_db.uri, f"A-{run}", "--instance-ttl-ms", "3000"))
    b = mpr_servers(extra_args=store_args(shared_redis, mongo_db.uri, f"B-{run}", "--instance-ttl-ms", "3000"))
    await start_all(a, b)
    on_a = await connect(a.ws_port, socket_id=f"ma-{run}")
    on_b = await connect(b.ws_port, socket_id=f"mb-{run}")

    # Several connections, so that on a cluster the sessions live in different slots than the
    # instance channel of B.
    connections = [f"x{i}-{run}" for i in range(3)]
    for c in connections:
        assert await on_b.call("addLiveSession", {"connectionId": c, "sessionId": f"s-{c}"}) is True
        assert await on_a.call("getLiveSession", {"connectionId": c}) is True

    for i, c in enumerate(connections):
        payload = jwe(f"cross{i}")
        message_id = await add(on_a, c, payload)
        note = await on_b.next_notification()
        assert note["method"] == "messagesReceived" and note["params"]["connectionId"] == c, note
        [delivered] = note["params"]["messages"]
        assert delivered["id"] == message_id and delivered["encryptedMessage"] == payload
        assert raw_payload_text(payload) in on_b.raw_frames[-1]
        # Leased to B's session: counted nowhere, taken by no one, until acknowledged on A.
        assert await count(on_a, c) == 0 and await count(on_b, c) == 0
        assert await take(on_a, c) == []
        assert await on_a.call("removeMessages", {"connectionId": c, "messageIds": [message_id]}) is True
        assert await count(on_a, c) == 0 and await count(on_b, c) == 0
    assert not on_a.notifications.pending

    # Without a live session the message waits; both instances count it, either takes it.
    c = connections[0]
    assert await on_b.call("removeLiveSession", {"connectionId": c}) is True
    assert await on_a.call("getLiveSession", {"connectionId": c}) is False
    queued = jwe("queued")
    queued_id = await add(on_a, c, queued, [DID_A, DID_B])
    assert await count(on_a, c) == 1 and await count(on_b, c) == 1
    assert await count(on_b, c, DID_B) == 1 and await count(on_a, c, "did:key:other") == 0
    [taken] = await take(on_b, c)
    assert taken["id"] == queued_id and taken["encryptedMessage"] == queued
    assert await count(on_a, c) == 0 and await count(on_b, c) == 0
    assert await on_a.call("removeMessages", {"connectionId": c, "messageIds": [queued_id]}) is True
    assert await take(on_b, c) == [] and await count(on_a, c) == 0
    assert not on_b.notifications.pending


@pytest_twisted.ensureDeferred
async def test_sigkilled_instance_releases_sessions_and_leases_after_its_ttl(
    mongo_db: MongoDb, redis_single: Any, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    run = uid()
    redis = ["--redis-url", redis_single.url]
    a = mpr_servers(extra_args=store_args(redis, mongo_db.uri, f"A-{run}", "--instance-ttl-ms", "2000"))
    b = mpr_servers(extra_args=store_args(redis, mongo_db.uri, f"B-{run}", "--instance-ttl-ms", "2000"))
    await start_all(a, b)
    on_a = await connect(a.ws_port)
    on_b = await connect(b.ws_port, socket_id=f"mb-{run}")
    live, queue = f"live-{run}", f"queue-{run}"

    # B holds a live session with a delivered, unacknowledged message ...
    assert await on_b.call("addLiveSession", {"connectionId": live, "sessionId": "s1"}) is True
    delivered_payload = jwe("delivered")
    delivered_id = await add(on_a, live, delivered_payload)
    note = await on_b.next_notification()
    assert [m["id"] for m in note["params"]["messages"]] == [delivered_id]
    # ... and a lease on two messages it took from a queue.
    queued_payloads = [jwe("q0"), jwe("q1")]
    queued_ids = [await add(on_a, queue, p) for p in queued_payloads]
    assert [m["id"] for m in await take(on_b, queue)] == queued_ids
    assert await count(on_a, live) == 0 and await count(on_a, queue) == 0

    ended = await b.kill(signal.SIGKILL)
    assert ended.signal == signal.SIGKILL, ended
    killed_at = reactor.seconds()
    # Not declared dead before its liveness TTL has run out.
    assert await on_a.call("getLiveSession", {"connectionId": live}) is True

    def has_session() -> Awaitable[Any]:
        return on_a.call("getLiveSession", {"connectionId": live})

    await eventually(reactor, has_session, lambda v: v is False, 15, "B's session seen from A")
    session_gone_s = reactor.seconds() - killed_at
    await eventually(reactor, lambda: count(on_a, live), lambda n: n == 1, 10, "count of the delivered message")
    await eventually(reactor, lambda: count(on_a, queue), lambda n: n == 2, 10, "count of B's taken messages")
    assert session_gone_s < 12, session_gone_s

    taker = await connect(a.ws_port)
    [redelivered] = await take(taker, live)
    assert redelivered["id"] == delivered_id and redelivered["encryptedMessage"] == delivered_payload
    retaken = await take(taker, queue)
    assert [m["id"] for m in retaken] == queued_ids
    assert [m["encryptedMessage"] for m in retaken] == queued_payloads

    # A new add with a push token is not held for the dead session: it stays pending (and the
    # push path is taken; the push itself is checked in test_push_e2e).
    result = await on_a.call(
        "addMessage",
        {
            "connectionId": live,
            "recipientDids": [DID_A],
            "payload": jwe("after"),
            "pushNotificationToken": {"type": "fcm", "token": f"dead-{run}"},
        },
    )
    assert await on_a.call("getLiveSession", {"connectionId": live}) is False
    assert await count(on_a, live) == 1
    assert [m["id"] for m in await take(taker, live)] == [result["messageId"]]
    assert not on_a.notifications.pending and not taker.notifications.pending


# -- Redis restart --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    phase: str
    message_id: str | None  # None: the call failed
    error: Any
    seconds: float


class Traffic:
    """A loop of addMessage calls on one socket, recording each outcome and its duration."""

    def __init__(self, reactor: Any, client: RpcClient, connection_id: str) -> None:
        self.reactor = reactor
        self.client = client
        self.connection_id = connection_id
        self.phase = "before"
        self.outcomes: list[Outcome] = []
        self.payloads: dict[str, dict[str, Any]] = {}
        self.running = True
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def count(self, phase: str, ok: bool) -> int:
        return sum(1 for o in self.outcomes if o.phase == phase and (o.message_id is not None) == ok)

    async def run(self) -> None:
        n = 0
        while self.running:
            phase, payload = self.phase, jwe(f"r{n}")
            n += 1
            started = self.reactor.seconds()
            try:
                result = await self.client.call(
                    "addMessage",
                    {"connectionId": self.connection_id, "recipientDids": [DID_A], "payload": payload},
                    timeout=5.0,
                )
            except RpcCallError as e:
                self.outcomes.append(Outcome(phase, None, e.error, self.reactor.seconds() - started))
            except Exception as e:  # a client timeout or a closed socket: recorded, asserted on later
                self.outcomes.append(Outcome(phase, None, repr(e), self.reactor.seconds() - started))
            else:
                self.outcomes.append(Outcome(phase, result["messageId"], None, self.reactor.seconds() - started))
                self.payloads[result["messageId"]] = payload
            self._wake()
            await task.deferLater(self.reactor, PACE_S, lambda: None)  # traffic, not hammering

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            check, d = waiter
            if check():
                self._waiters.remove(waiter)
                d.callback(None)

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        if check():
            return
        d: Deferred[None] = Deferred()
        self._waiters.append((check, d))
        d.addTimeout(timeout, self.reactor)
        try:
            await d
        except Exception:
            raise AssertionError(f"{what} within {timeout} s; outcomes: {self.outcomes}") from None


@pytest_twisted.ensureDeferred
async def test_redis_restart_during_traffic_loses_no_acknowledged_add(
    mongo_db: MongoDb, own_redis: OwnRedis, mpr_servers: ServerFactory, connect: Connect, reactor: Any, tmp_path: Path
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    aof = {"dir": str(redis_dir), "aof": True, "extra_args": ["--appendfsync", "always"]}
    redis = own_redis.start(**aof)
    server = mpr_servers(
        extra_args=store_args(
            ["--redis-url", f"redis://127.0.0.1:{redis.port}/0"],
            mongo_db.uri,
            f"R-{uid()}",
            "--instance-ttl-ms",
            "3000",
        )
    )
    await server.start()
    client = await connect(server.ws_port)
    traffic = Traffic(reactor, client, f"restart-{uid()}")
    running = Deferred.fromCoroutine(traffic.run())
    try:
        await traffic.until(lambda: traffic.count("before", True) >= 20, 10, "20 adds before the outage")

        traffic.phase = "down"
        await threads.deferToThread(kill_redis, redis)
        await traffic.until(lambda: traffic.count("down", False) >= 3, 10, "3 failed adds while Redis is down")

        traffic.phase = "after"
        redis = await threads.deferToThread(own_redis.restart, redis.port, **aof)
        await traffic.until(lambda: traffic.count("after", True) >= 20, 20, "20 adds after Redis is back")

        # A Redis that hangs instead of refusing: the call timeout answers, the socket stays.
        traffic.phase = "stalled"
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            await traffic.until(lambda: traffic.count("stalled", False) >= 2, 10, "2 failed adds while Redis hangs")
            traffic.phase = "resumed"
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        await traffic.until(lambda: traffic.count("resumed", True) >= 10, 20, "10 adds after Redis resumed")
    finally:
        traffic.running = False
        await running.addTimeout(10, reactor)

    slow = [o for o in traffic.outcomes if o.seconds >= 2.0]
    assert not slow, f"calls that took the client's 2 s or more: {slow}"
    errors = [o.error for o in traffic.outcomes if o.message_id is None]
    assert errors and all(isinstance(e, dict) and e.get("code") == 500 for e in errors), errors
    assert not client.closed.called, "the socket must stay open through the outage"

    acknowledged = [o.message_id for o in traffic.outcomes if o.message_id is not None]
    stored = await take(client, traffic.connection_id)
    stored_ids = [m["id"] for m in stored]
    assert len(set(stored_ids)) == len(stored_ids), "a message stored twice"
    lost = set(acknowledged) - set(stored_ids)
    assert not lost, f"{len(lost)} acknowledged adds lost: {sorted(lost)}"
    # Oldest first; at most the failed calls' messages may exist besides (applied, reply lost).
    assert [i for i in stored_ids if i in set(acknowledged)] == acknowledged
    assert len(stored_ids) - len(acknowledged) <= len(errors)
    for message in stored:
        if message["id"] in traffic.payloads:
            assert message["encryptedMessage"] == traffic.payloads[message["id"]]


# -- persister ------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_persister_moves_old_messages_to_mongodb_and_take_reads_them(
    mongo_db: MongoDb, redis_single: Any, mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    server = mpr_servers(
        extra_args=store_args(
            ["--redis-url", redis_single.url], mongo_db.uri, f"P-{uid()}", "--threshold-timestamp", "200"
        )
    )
    await server.start()
    m = await connect(server.ws_port)
    c = f"persist-{uid()}"
    dids = [[DID_A], [DID_A, DID_B], [DID_B]]
    payloads = [jwe(f"old{i}", filler=i * 100) for i in range(3)]
    ids = [await add(m, c, p, d) for p, d in zip(payloads, dids, strict=True)]

    docs = await eventually(reactor, lambda: mongo_db.find(c), lambda d: len(d) == 3, 10, "messages in MongoDB")
    by_id = {doc["messageId"]: doc for doc in docs}
    assert set(by_id) == set(ids)
    for message_id, payload, recipients in zip(ids, payloads, dids, strict=True):
        doc = by_id[message_id]
        assert doc["connectionId"] == c and doc["recipientKeys"] == recipients, doc
        assert doc["encryptedMessage"] == payload and list(doc["encryptedMessage"]) == list(payload), doc
        assert doc["state"] == "pending", doc
        assert isinstance(doc["createdAt"], datetime.datetime), doc

    # One more that is (most likely) still in Redis: take merges both tiers, oldest first.
    fresh = jwe("fresh")
    ids.append(await add(m, c, fresh))
    payloads.append(fresh)
    assert await count(m, c) == 4
    frames_before = len(m.raw_frames)
    taken = await take(m, c)
    assert [t["id"] for t in taken] == ids
    assert [t["encryptedMessage"] for t in taken] == payloads
    for payload in payloads:
        assert raw_payload_text(payload) in m.raw_frames[frames_before], "payload text changed on its way"
    for t in taken[:3]:
        assert iso_ms(by_id[t["id"]]["createdAt"]) == t["receivedAt"]

    assert await m.call("removeMessages", {"connectionId": c, "messageIds": ids}) is True
    assert {d["messageId"] for d in await mongo_db.find(c)}.isdisjoint(ids[:3])
    # The fresh one may have been mid-move when it was removed: the persister cleans that up.
    await eventually(reactor, lambda: mongo_db.find(c), lambda d: d == [], 10, "MongoDB after the ack")
    assert await count(m, c) == 0 and await take(m, c) == []


# -- refusing an evicting Redis ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refuses_an_evicting_redis_unless_allowed(
    mongo_db: MongoDb, own_redis: OwnRedis, mpr_servers: ServerFactory, connect: Connect
) -> None:
    redis = own_redis.start(extra_args=["--maxmemory-policy", "allkeys-lru"])
    options = ["--redis-url", f"redis://127.0.0.1:{redis.port}/0"]

    refused = mpr_servers(extra_args=store_args(options, mongo_db.uri, f"E-{uid()}"))
    await expect_failed_start(refused)
    assert "maxmemory-policy" in refused.output and "noeviction" in refused.output, refused.output
    assert "allkeys-lru" in refused.output, refused.output

    allowed = mpr_servers(extra_args=store_args(options, mongo_db.uri, f"E-{uid()}", "--allow-evicting-redis", "true"))
    await allowed.start()
    m = await connect(allowed.ws_port)
    assert await m.call("ping") == "pong"
    message_id = await add(m, f"evict-{uid()}", jwe("evict"))
    assert len(message_id) == 24
