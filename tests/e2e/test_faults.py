"""The fault matrix: the accounting harness (tests/harness/accounting.py) run against real
``twistd -n mpr`` processes while one thing fails, each row bounded and on 127.0.0.1.

Rows here: the Redis server frozen (SIGSTOP) for longer than the call deadline; Redis killed
(-9) and restarted with AOF (``appendfsync always``); one of two instances killed (-9); a SIGTERM
rolling restart of both of two instances (every socket reconnects after its 1001); MongoDB
stopped (SIGTERM) while the persister moves payloads and started again on its port and data; a
mediator that stops reading while its live sessions are flooded.
The Redis Cluster master kill with and without REDIS_WAIT_REPLICAS is in
tests/redis/test_replica_acks.py, the embedded store's rollback in tests/test_embedded_store.py.
A mediator socket that vanishes without a close: a mediator process (silent_mediator.mjs)
stopped with SIGSTOP while it holds live sessions.

``MPR_SOAK=N`` multiplies the messages of every row (a longer soak on demand).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from scripts.services.mongo import MongoServer, mongo_client, start_mongod
from scripts.services.redis import RedisServer, start_redis
from tests.e2e.conftest import Connect, MongoDb, ServerFactory, uid
from tests.e2e.test_distributed import start_all, store_args
from tests.harness.accounting import DID, Ledger, Mediators, marked_payload
from tests.services import start_or_skip
from tests.wsclient import RpcCallError

SOAK = max(1, int(os.environ.get("MPR_SOAK", "1") or "1"))
TOTAL = 240 * SOAK
CALL_TIMEOUT_MS = 500
LEASE_MS = 2000
DRAIN_S = 30.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own (it is frozen or killed), AOF on and fsynced at every write."""
    server = start_or_skip("redis-server", lambda: start_redis(aof=True, extra_args=["--appendfsync", "always"]))
    try:
        yield server
    finally:
        try:
            server.thaw()
        except Exception:
            pass
        server.stop()


@pytest.fixture
def own_mongod() -> Iterator[list[MongoServer]]:
    """A mongod of this test's own (it is stopped and started again): the running one is last."""
    servers = [start_or_skip("mongod", start_mongod)]
    try:
        yield servers
    finally:
        for i, server in enumerate(servers):
            server.stop(remove_dir=i == len(servers) - 1)


def instance(mpr_servers: ServerFactory, redis: RedisServer, mongo_db: MongoDb | str, name: str, **env: str) -> Any:
    mongo_uri = mongo_db if isinstance(mongo_db, str) else mongo_db.uri
    return mpr_servers(
        extra_args=store_args(["--redis-url", f"redis://{redis.host}:{redis.port}"], mongo_uri, name),
        env={"CALL_TIMEOUT_MS": str(CALL_TIMEOUT_MS), "MESSAGE_LEASE_MS": str(LEASE_MS), **env},
    )


async def until(reactor: Any, check: Any, what: str, timeout: float, every: float = 0.05) -> None:
    """Poll ``check()`` (a value or a Deferred of one) until true, failing after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not await check():
        assert reactor.seconds() < deadline, f"not within {timeout} s: {what}"
        await deferLater(reactor, every, lambda: None)


async def serving(
    reactor: Any, connect: Connect, server: Any, poll_s: float = 0.05
) -> tuple[Ledger, Mediators, Any, Any, Any]:
    """A row on one instance: started, with its mediators (the live one attached), a poller and a
    producer connected."""
    await start_all(server)
    ledger = Ledger()
    mediators = Mediators(reactor, ledger, poll_s=poll_s)
    live, poller, producer = [await connect(server.ws_port) for _ in range(3)]
    await mediators.attach_live(live)
    return ledger, mediators, live, poller, producer


async def two_instances(mpr_servers: ServerFactory, redis: RedisServer, mongo_db: MongoDb) -> tuple[Any, Any]:
    a = instance(mpr_servers, redis, mongo_db, "a")
    b = instance(mpr_servers, redis, mongo_db, "b")
    await start_all(a, b)
    return a, b


async def finish(mediators: Mediators, poller: Any, consumers: list[Deferred[None]]) -> None:
    """Wait until everything added is acknowledged and nothing is queued, then stop consuming."""
    await mediators.drained(poller, DRAIN_S)
    mediators.running = False
    for d in consumers:
        await d


async def run(reactor: Any, mediators: Mediators, producers: list[Any], live: Any, poller: Any, fault: Any) -> None:
    """Produce TOTAL messages while consuming, with ``fault()`` started after a third of them."""
    consumers = [
        Deferred.fromCoroutine(mediators.consume_live(live)),
        Deferred.fromCoroutine(mediators.poll(poller)),
    ]
    await mediators.produce(producers, TOTAL // 3)
    await fault()
    await mediators.produce(producers, TOTAL)
    await finish(mediators, poller, consumers)


@pytest_twisted.ensureDeferred
async def test_redis_frozen_beyond_the_call_deadline(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    server = instance(mpr_servers, own_redis, mongo_db, "frozen")
    ledger, mediators, live, poller, producer = await serving(reactor, connect, server)
    seen: dict[str, Any] = {}

    async def freeze() -> None:
        own_redis.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(RpcCallError) as error:
                await producer.call(
                    "addMessage",
                    {"connectionId": mediators.v2[0], "recipientDids": [DID], "payload": marked_payload("x")},
                )
            seen["error_after_s"] = time.monotonic() - started
            seen["error"] = error.value.error
            # frozen for three call deadlines in all: every call meanwhile fails, none hangs
            with pytest.raises(RpcCallError):
                await poller.call("getAvailableMessageCount", {"connectionId": mediators.v2[0]})
            with pytest.raises(RpcCallError):
                await poller.call("takeFromQueue", {"connectionId": mediators.v2[0], "limit": 1})
        finally:
            own_redis.thaw()

    await run(reactor, mediators, [producer], live, poller, freeze)
    # the add that got the error may have been applied (at-least-once): it is then delivered as
    # an unknown id, which the ledger counts and lets through
    assert seen["error_after_s"] < CALL_TIMEOUT_MS / 1000 + 0.5, seen
    print("redis frozen:", ledger.check(max_duplicates=TOTAL // 10), "first error", seen)


@pytest_twisted.ensureDeferred
async def test_redis_killed_and_restarted_with_aof(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    server = instance(mpr_servers, own_redis, mongo_db, "aof")
    ledger, mediators, live, poller, producer = await serving(reactor, connect, server)
    restarted: list[RedisServer] = []

    async def restart() -> None:
        own_redis.kill()
        restarted.append(
            start_redis(own_redis.port, dir=own_redis.dir, aof=True, extra_args=["--appendfsync", "always"])
        )
        # the live sessions survive in Redis (AOF); the mediator re-adds them anyway, as after
        # any error, so that the harness does not depend on it
        await mediators.attach_live(live)

    try:
        await run(reactor, mediators, [producer], live, poller, restart)
    finally:
        for r in restarted:
            r.stop(remove_dir=False)
    print("redis restarted (AOF):", ledger.check(max_duplicates=TOTAL // 10))


@pytest_twisted.ensureDeferred
async def test_one_of_two_instances_killed(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    a, b = await two_instances(mpr_servers, own_redis, mongo_db)
    ledger = Ledger()
    mediators = Mediators(reactor, ledger)
    # the live sessions and a producer on B (killed); polling and another producer on A
    live_b, producer_b = await connect(b.ws_port), await connect(b.ws_port)
    poller, producer_a = await connect(a.ws_port), await connect(a.ws_port)
    await mediators.attach_live(live_b)
    consumers = [
        Deferred.fromCoroutine(mediators.consume_live(live_b)),
        Deferred.fromCoroutine(mediators.poll(poller)),
    ]
    await mediators.produce([producer_a, producer_b], TOTAL // 3)
    await b.kill()
    # the mediator of the live wallets reconnects to A and opens the sessions again: the leases
    # B held come back (released with its instance, or at their end) and are delivered there
    live_a = await connect(a.ws_port)
    await mediators.attach_live(live_a)
    consumers.append(Deferred.fromCoroutine(mediators.consume_live(live_a)))
    await mediators.produce([producer_a], TOTAL)
    await finish(mediators, poller, consumers)
    print("instance killed:", ledger.check(max_duplicates=TOTAL // 5))


async def closed_with(client: Any, reactor: Any, timeout: float = 5.0) -> int | None:
    """Wait until ``client``'s socket is closed; its close code."""
    closed: Deferred[int | None] = client.closed
    if not closed.called:
        closed.addTimeout(timeout, reactor)
    return await closed


@pytest_twisted.ensureDeferred
async def test_rolling_restart_of_both_instances(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    a, b = await two_instances(mpr_servers, own_redis, mongo_db)
    ledger = Ledger()
    mediators = Mediators(reactor, ledger)
    # the live sessions on A, polling on B, a producer on each; every socket reconnects to the
    # instance it was on once that is serving again, as a mediator would after a 1001
    live = await connect(a.ws_port)
    poller = await connect(b.ws_port)
    producers: list[Any] = [await connect(a.ws_port), await connect(b.ws_port)]
    await mediators.attach_live(live)
    consumers = [
        Deferred.fromCoroutine(mediators.consume_live(live)),
        Deferred.fromCoroutine(mediators.poll(poller)),
    ]
    await mediators.produce(producers, TOTAL // 3)
    codes = []

    await a.restart(signal.SIGTERM)
    codes += [await closed_with(live, reactor), await closed_with(producers[0], reactor)]
    producers[0] = await connect(a.ws_port)  # produce() picks its clients from this list at each add
    live = await connect(a.ws_port)
    await mediators.attach_live(live)
    consumers.append(Deferred.fromCoroutine(mediators.consume_live(live)))
    await mediators.produce(producers, 2 * TOTAL // 3)

    await b.restart(signal.SIGTERM)
    codes += [await closed_with(poller, reactor), await closed_with(producers[1], reactor)]
    producers[1] = await connect(b.ws_port)
    poller = await connect(b.ws_port)
    consumers.append(Deferred.fromCoroutine(mediators.poll(poller)))
    await mediators.produce(producers, TOTAL)

    await finish(mediators, poller, consumers)
    assert codes == [1001] * 4, codes  # a graceful stop says "going away": mediators reconnect
    assert a.starts == b.starts == 2
    print("rolling restart (SIGTERM):", ledger.check(max_duplicates=TOTAL // 5))


@pytest_twisted.ensureDeferred
async def test_mongodb_stopped_during_persister_ticks_and_restarted(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, own_mongod: list[MongoServer]
) -> None:
    mongod = own_mongod[0]
    database = "mpr_faults"
    # messages older than 100 ms move to MongoDB (a tick every 0.5 s); the pollers come every
    # second, so that many of theirs are taken back from MongoDB
    server = instance(mpr_servers, own_redis, f"{mongod.uri}/{database}", "mongo", THRESHOLD_TIMESTAMP="100")
    ledger, mediators, live, poller, producer = await serving(reactor, connect, server, poll_s=1.0)
    persisted: list[int] = []

    def cold_counts() -> tuple[int, int]:
        with mongo_client(mongod.port) as client:
            collection = client[database]["storequeuedmessages"]
            v1 = {"connectionId": {"$in": mediators.v1}}
            return int(collection.count_documents({})), int(collection.count_documents(v1))

    async def some_in_mongodb() -> bool:
        # Pickup v1 messages among them: their takes delete, the case that must not lose any
        everything, v1 = await threads.deferToThread(cold_counts)
        persisted.append(everything)
        return everything >= 5 and v1 >= 2

    async def stop_and_restart() -> None:
        await until(reactor, some_in_mongodb, "the persister moved messages to MongoDB", 10.0, every=0.2)
        failed_before = server.output.count("persister tick failed")
        await threads.deferToThread(mongod.stop, False)  # SIGTERM, the data kept
        added_before = len(ledger.added)

        async def ticks_failed_meanwhile() -> bool:
            # at least two persister ticks failed and the mediators went on adding meanwhile
            return server.output.count("persister tick failed") >= failed_before + 2 and (
                len(ledger.added) >= added_before + 20
            )

        await until(reactor, ticks_failed_meanwhile, "persister ticks failed with MongoDB down", 10.0)
        own_mongod.append(await threads.deferToThread(start_mongod, mongod.port, dir=mongod.dir))

    async def paced() -> None:
        # adds go on through the fault, about 40 a second
        while len(ledger.added) < TOTAL:
            await mediators.produce([producer], min(TOTAL, len(ledger.added) + 4))
            await deferLater(reactor, 0.1, lambda: None)

    consumers = [
        Deferred.fromCoroutine(mediators.consume_live(live)),
        Deferred.fromCoroutine(mediators.poll(poller)),
    ]
    producing = Deferred.fromCoroutine(paced())
    await stop_and_restart()
    await producing
    await finish(mediators, poller, consumers)
    print(
        "mongodb restarted:",
        ledger.check(max_duplicates=TOTAL // 5),
        f"; {persisted[-1]} in MongoDB at the stop, {server.output.count('persister tick failed')} ticks failed",
    )


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


SLOW_READER_MS = 1000
SLOW_PAYLOAD = 64 * 1024
SLOW_ADDS = 400  # 25 MiB of notifications for a socket that reads none of them
# What the server may grow by meanwhile: the 16 MiB it lets pile up for a blocked socket, plus
# the same again for what is in flight to Redis and the kernel's buffers.
RSS_BOUND = 48 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_a_mediator_that_stops_reading(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    server = instance(mpr_servers, own_redis, mongo_db, "slow", SLOW_READER_TIMEOUT_MS=str(SLOW_READER_MS))
    ledger, mediators, live, poller, producer = await serving(reactor, connect, server)
    slow = await connect(server.ws_port)
    slow_connections = [f"slow-{uid()}-{i}" for i in range(4)]
    for c in slow_connections:
        assert await slow.call("addLiveSession", {"connectionId": c, "sessionId": "s"}) is True
    seen: dict[str, Any] = {}

    async def stop_reading() -> None:
        assert slow.protocol is not None
        transport: Any = slow.protocol.transport
        transport.pauseProducing()  # the mediator reads nothing more
        before = rss_bytes(server.transport.pid)
        started = time.monotonic()
        body = "x" * SLOW_PAYLOAD
        sent: list[str] = []
        for n in range(SLOW_ADDS):
            if slow.closed.called:
                break
            reply = await producer.call(
                "addMessage",
                {"connectionId": slow_connections[n % 4], "recipientDids": [DID], "payload": {"ciphertext": body}},
            )
            sent.append(reply["messageId"])
        seen["rss_growth"] = rss_bytes(server.transport.pid) - before
        transport.resumeProducing()
        await slow.closed.addTimeout(SLOW_READER_MS / 1000 + 10, reactor)
        seen["closed_after_s"] = time.monotonic() - started
        seen["sent"] = sent

    await run(reactor, mediators, [producer], live, poller, stop_reading)
    assert seen["rss_growth"] < RSS_BOUND, seen["rss_growth"]
    assert "does not read its replies: disconnecting it" in server.output  # the server cut it off
    # Its leases were released when it went: every message for it is still there, for the next
    # mediator that takes (Pickup v1 here).
    left: list[str] = []
    for c in slow_connections:
        while taken := await poller.call("takeFromQueue", {"connectionId": c, "limit": 50, "deleteMessages": True}):
            left.extend(m["id"] for m in taken)
    assert sorted(left) == sorted(seen["sent"])
    print(
        "slow reader:",
        ledger.check(max_duplicates=TOTAL // 10),
        f"; disconnected after {seen['closed_after_s']:.1f} s and {len(seen['sent'])} adds,"
        f" server grew by {seen['rss_growth'] / 2**20:.1f} MiB",
    )


PING_MS = 1000
SILENT = os.path.join(os.path.dirname(__file__), "silent_mediator.mjs")


@pytest_twisted.ensureDeferred
async def test_a_mediator_socket_that_vanishes_without_a_close(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, own_redis: RedisServer, mongo_db: MongoDb
) -> None:
    # Leases far longer than the test: what the vanished socket held can come back only through
    # its release, when the server's keep-alive gives up on the socket.
    server = instance(
        mpr_servers,
        own_redis,
        mongo_db,
        "vanish",
        WS_PING_INTERVAL_MS=str(PING_MS),
        WS_PING_TIMEOUT_MS=str(PING_MS),
        MESSAGE_LEASE_MS="60000",
    )
    ledger, mediators, live, poller, producer = await serving(reactor, connect, server)
    vanishing = [f"vanish-{uid()}-{i}" for i in range(4)]
    node = subprocess.Popen(
        ["node", SILENT, f"ws://127.0.0.1:{server.ws_port}", *vanishing],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, Any] = {}
    try:
        ready = threads.deferToThread(node.stdout.readline)  # type: ignore[union-attr]
        assert (await ready.addTimeout(10, reactor)).strip() == "ready"

        async def vanish() -> None:
            sent = []
            for n in range(8):  # leased to the silent mediator's sessions (notified, never acknowledged)
                reply = await producer.call(
                    "addMessage",
                    {"connectionId": vanishing[n % 4], "recipientDids": [DID], "payload": marked_payload(f"v{n}")},
                )
                sent.append(reply["messageId"])
            assert [await poller.call("getAvailableMessageCount", {"connectionId": c}) for c in vanishing] == [0] * 4
            started = time.monotonic()
            os.kill(node.pid, signal.SIGSTOP)  # its host is gone: no close, no FIN, no pong

            async def released() -> bool:
                for c in vanishing:
                    if await poller.call("getLiveSession", {"connectionId": c}) is not False:
                        return False
                return True

            await until(reactor, released, "the vanished socket's sessions ended", 2 * PING_MS / 1000 + 3)
            seen["released_after_s"] = round(time.monotonic() - started, 2)
            # its leases went with it: everything it held is pending again, long before 60 s
            back: list[str] = []
            for c in vanishing:
                taken = await poller.call("takeFromQueue", {"connectionId": c, "deleteMessages": True})
                back.extend(m["id"] for m in taken)
            assert sorted(back) == sorted(sent)

        await run(reactor, mediators, [producer], live, poller, vanish)
    finally:
        node.kill()
        node.wait()
    print("vanished socket:", ledger.check(max_duplicates=TOTAL // 10), f"; released after {seen}")
