"""ClusterRedisClient (and the distributed store on it) through master failovers of a real
Redis Cluster: 3 masters with one replica each and a short cluster-node-timeout.

- a master is SIGKILLed: commands on its slots may fail (RedisUnavailable) while the cluster
  notices and promotes the replica, then succeed again within a bounded time, with the
  replicated data, scripts (NOSCRIPT -> EVAL on the new master) and sharded subscriptions;
- a replica takes over gracefully (CLUSTER FAILOVER): the client follows MOVED;
- the distributed store keeps serving across a kill, with what was replicated before it.

The tests share one cluster (module scope); each picks a master that still has a live replica.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mpr_server.errors import StoreUnavailable
from mpr_server.model import TakeQuery
from mpr_server.redis import (
    Address,
    ClusterRedisClient,
    RedisError,
    RedisUnavailable,
    Script,
    SingleRedisClient,
    key_slot,
)
from mpr_server.stores.redis.keys import tag as connection_tag
from scripts.services.redis import start_redis_cluster
from tests.redis.events import Inbox
from tests.services import Mongo, start_or_skip
from tests.store_contract import T0, A, add, cid, ids, lease
from tests.test_distributed_store import make_store

NODE_TIMEOUT_MS = 1000
RECOVERY_S = 15.0  # a failover must be over (for the client) within this
PAUSE_S = 0.1  # between attempts while it is not
WAIT = 5.0
T = TypeVar("T")


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[Any]:
    """A dedicated cluster (the session's cluster has no replicas and must not be killed):
    the scripts.services.redis handle, whose nodes have ports and pids."""
    cluster = start_or_skip(
        "redis cluster with replicas",
        lambda: start_redis_cluster(masters=3, replicas=1, node_timeout_ms=NODE_TIMEOUT_MS),
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def live_nodes(handle: Any) -> list[Address]:
    return [Address(n.host, n.port) for n in handle.nodes if n.proc is None or n.proc.poll() is None]


@pytest_twisted.async_yield_fixture
async def client(reactor: Any, failover_cluster: Any) -> AsyncIterator[ClusterRedisClient]:
    # every node as a seed, as REDIS_NODES would list them; the default reconnect back-off
    c = ClusterRedisClient(reactor, live_nodes(failover_cluster), timeout=2.0, ping_interval=None)
    await c.wait_ready(timeout=WAIT)
    yield c
    await c.close()


@pytest_twisted.async_yield_fixture
async def admin(reactor: Any, failover_cluster: Any) -> AsyncIterator[dict[Address, SingleRedisClient]]:
    """One plain client per live node, one connection each (WAIT counts that connection's writes)."""
    clients = node_clients(reactor, failover_cluster)
    yield clients
    for c in clients.values():
        await c.close()


def node_clients(reactor: Any, cluster: Any) -> dict[Address, SingleRedisClient]:
    return {
        a: SingleRedisClient(reactor, f"redis://{a.host}:{a.port}", pool_size=1, timeout=2.0, ping_interval=None)
        for a in live_nodes(cluster)
    }


# -- helpers


@dataclass(frozen=True)
class Pair:
    master: Address
    replica: Address


async def healthy_pair(admin: dict[Address, SingleRedisClient]) -> Pair:
    """A master (with slots) and a live replica of it, as the cluster sees them now."""
    nodes = await next(iter(admin.values())).execute(["CLUSTER", "NODES"])
    by_id: dict[str, tuple[Address, str, str, bool]] = {}
    for line in str(nodes).splitlines():
        parts = line.split()
        host, _, port = parts[1].split("@")[0].rpartition(":")
        flags = parts[2]
        by_id[parts[0]] = (Address(host, int(port)), flags, parts[3], len(parts) > 8)
    for address, flags, master_id, _ in sorted(by_id.values()):
        if "slave" in flags and "fail" not in flags and master_id in by_id:
            master, master_flags, _, has_slots = by_id[master_id]
            if "fail" not in master_flags and has_slots and master in admin and address in admin:
                return Pair(master, address)
    raise AssertionError(f"no master with a live replica left:\n{nodes}")


def tag_on(client: ClusterRedisClient, node: Address) -> str:
    """A fresh hash tag whose slot is served by `node`."""
    while True:
        tag = uuid.uuid4().hex[:12]
        if client.node_for_slot(key_slot(tag)) == node:
            return tag


async def replicated(admin: dict[Address, SingleRedisClient], client: ClusterRedisClient, master: Address) -> None:
    """Return once everything written to `master` so far is on its replica: a write on one
    connection and WAIT on the same one (the replication stream is ordered)."""
    fence = f"fence:{{{tag_on(client, master)}}}"
    assert await admin[master].execute(["SET", fence, "1"]) == "OK"
    assert await admin[master].execute(["WAIT", 1, 1000]) >= 1


@dataclass
class Recovery:
    """What happened while waiting for a command to succeed again."""

    value: Any
    seconds: float
    errors: list[str]


async def until_it_works(reactor: Any, attempt: Callable[[], Awaitable[T]], limit: float = RECOVERY_S) -> Recovery:
    """Retry `attempt` (pausing between attempts) until it succeeds; fail after `limit` s.
    Only "Redis unavailable" errors are tolerated meanwhile."""
    start = time.monotonic()
    errors: list[str] = []
    while True:
        try:
            value = await attempt()
        except (RedisUnavailable, StoreUnavailable) as e:
            errors.append(f"{time.monotonic() - start:.2f}s {type(e).__name__}: {e}")
            if time.monotonic() - start > limit:
                raise AssertionError(f"not recovered after {limit}s:\n" + "\n".join(errors[-10:])) from e
            await deferLater(reactor, PAUSE_S, lambda: None)
            continue
        return Recovery(value, time.monotonic() - start, errors)


class Counter:
    """Counts calls; `reached(n)` fires once it has been called n times."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.calls = 0
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def __call__(self) -> None:
        self.calls += 1
        still = []
        for n, d in self._waiting:
            if self.calls >= n:
                d.callback(None)
            else:
                still.append((n, d))
        self._waiting = still

    async def reached(self, n: int, timeout: float) -> None:
        if self.calls >= n:
            return
        d: Deferred[None] = Deferred()
        self._waiting.append((n, d))
        d.addTimeout(timeout, self.reactor)
        await d


async def reaches(client: ClusterRedisClient, inbox: Inbox, channel: str) -> None:
    """A message published on the sharded channel after a failover arrives, within WAIT. The
    subscription may sit on the new master or on the old one turned replica (replicas serve
    SSUBSCRIBE and get their master's SPUBLISH), so SPUBLISH's receiver count is no criterion."""
    deadline = time.monotonic() + WAIT
    while True:
        await client.publish(channel, "after", sharded=True)
        try:
            assert await inbox.next(timeout=0.5) == (channel, "after")
            return
        except DeferredTimeoutError:
            assert time.monotonic() < deadline, "no message reached the sharded subscription after the failover"


# -- tests


@pytest_twisted.ensureDeferred
async def test_master_killed_replica_takes_over(
    reactor: Any, failover_cluster: Any, client: ClusterRedisClient, admin: dict[Address, SingleRedisClient]
) -> None:
    pair = await healthy_pair(admin)
    assert pair.master in client.masters
    prefix = uuid.uuid4().hex[:8]
    # keys over every master, and some on the victim for sure
    keys = [f"fo:{prefix}:{i}" for i in range(200)]
    tag = tag_on(client, pair.master)
    slot = key_slot(tag)
    victim_keys = [f"{{{tag}}}:{i}" for i in range(5)]
    for key in [*keys, *victim_keys]:
        assert await client.execute(["SET", key, key], key=key) == "OK"
    assert {client.node_for_slot(key_slot(k)) for k in keys} == set(client.masters)

    script = Script(f"-- failover {prefix}\nreturn redis.call('INCR', KEYS[1])")
    counter = f"{{{tag}}}:counter"
    assert await client.eval_script(script, [counter]) == 1
    # the replica must not know the script, so that the new master answers NOSCRIPT
    await admin[pair.replica].execute(["SCRIPT", "FLUSH"])
    for master in client.masters:
        await replicated(admin, client, master)

    inbox, resubscribed = Inbox(reactor), Counter(reactor)
    channel = f"instance:{{{tag}}}"
    await client.subscribe(channel, inbox, sharded=True, on_reconnect=resubscribed)
    classic = f"classic:{prefix}"
    await client.subscribe(classic, inbox)
    assert await client.publish(channel, "before", sharded=True) == 1
    assert await inbox.next() == (channel, "before")

    failover_cluster.node(pair.master.port).kill()

    got = await until_it_works(reactor, lambda: client.execute(["GET", victim_keys[0]], key=victim_keys[0]))
    print(f"GET on the killed master's slot back after {got.seconds:.2f}s, {len(got.errors)} failed attempts")
    assert got.value == victim_keys[0]
    assert client.node_for_slot(slot) == pair.replica
    assert pair.master not in client.masters and pair.replica in client.masters
    # everything replicated before the kill is there, on every master
    for key in [*keys, *victim_keys]:
        assert await client.execute(["GET", key], key=key) == key
    assert await client.execute(["SET", victim_keys[0], "after"], key=victim_keys[0]) == "OK"
    assert await client.execute(["GET", victim_keys[0]], key=victim_keys[0]) == "after"

    # EVALSHA meets NOSCRIPT on the promoted replica and falls back to EVAL
    assert await client.execute(["SCRIPT", "EXISTS", script.sha1], key=counter) == [0]
    assert await client.eval_script(script, [counter]) == 2
    assert await client.execute(["SCRIPT", "EXISTS", script.sha1], key=counter) == [1]

    # the sharded subscription moves to the new master (the hook says messages may be lost)
    await resubscribed.reached(1, timeout=RECOVERY_S)
    await reaches(client, inbox, channel)
    # classic pub/sub is broadcast: it works wherever its connection went
    await client.publish(classic, "classic after")
    assert await inbox.next() == (classic, "classic after")


@pytest_twisted.ensureDeferred
async def test_manual_failover_is_followed_through_moved(
    reactor: Any, client: ClusterRedisClient, admin: dict[Address, SingleRedisClient]
) -> None:
    pair = await healthy_pair(admin)
    tag = tag_on(client, pair.master)
    slot = key_slot(tag)
    key = f"{{{tag}}}:manual"
    assert await client.execute(["SET", key, "v0"], key=key) == "OK"
    await replicated(admin, client, pair.master)
    inbox, resubscribed = Inbox(reactor), Counter(reactor)
    channel = f"instance:{{{tag}}}"
    await client.subscribe(channel, inbox, sharded=True, on_reconnect=resubscribed)

    assert await admin[pair.replica].execute(["CLUSTER", "FAILOVER"]) == "OK"

    # keep writing and reading the slot until the client has moved to the new master
    n = 0

    async def write_and_read() -> bool:
        nonlocal n
        n += 1
        assert await client.execute(["SET", key, f"v{n}"], key=key) == "OK"
        assert await client.execute(["GET", key], key=key) == f"v{n}"
        return client.node_for_slot(slot) == pair.replica

    start = time.monotonic()
    errors: list[str] = []
    while True:
        got = await until_it_works(reactor, write_and_read, limit=10.0)
        errors += got.errors
        if got.value:
            break
        assert time.monotonic() - start < 10.0, "the client never moved to the new master"
        await deferLater(reactor, PAUSE_S, lambda: None)
    print(f"moved after {time.monotonic() - start:.2f}s, {n} writes, errors: {errors}")
    # a graceful failover: the old master pauses writes, then redirects; nothing fails
    assert errors == []
    roles = await admin[pair.replica].execute(["ROLE"])
    assert roles[0] == "master"

    await resubscribed.reached(1, timeout=WAIT)
    # The subscription may have moved to the new master or stayed on the old one, now its
    # replica (replicas serve SSUBSCRIBE and get the master's SPUBLISH): either way a message
    # published after the failover must arrive. (The receiver count SPUBLISH returns is only
    # the new master's own, so it is not the criterion.)
    await reaches(client, inbox, channel)


@pytest_twisted.ensureDeferred
async def test_distributed_store_keeps_serving_after_a_master_is_killed(
    reactor: Any, failover_cluster: Any, admin: dict[Address, SingleRedisClient], mongod: Mongo
) -> None:
    redis = ClusterRedisClient(reactor, live_nodes(failover_cluster), timeout=2.0)
    store = make_store(reactor, redis, mongod)
    await store.start()
    try:
        pair = await healthy_pair(admin)
        c = cid()
        while redis.node_for_slot(key_slot(connection_tag(c))) != pair.master:
            c = cid()
        sent = [await add(store, c, n) for n in range(5)]
        await replicated(admin, redis, pair.master)
        # acknowledged but maybe not replicated yet: Redis replication is asynchronous, a
        # failover may lose it (the store does not WAIT)
        late = await add(store, c, 5)

        failover_cluster.node(pair.master.port).kill()

        got = await until_it_works(reactor, lambda: store.count(c, None, T0))
        print(f"store count back after {got.seconds:.2f}s, {len(got.errors)} failed attempts; count {got.value}")
        assert got.value in (5, 6)
        after = await add(store, c, 6)
        taken = await store.take(TakeQuery(c), A, lease())
        survivors = [*sent, late] if got.value == 6 else sent
        assert ids(taken) == ids([*survivors, after])
        assert [m.payload for m in taken] == [m.payload for m in [*survivors, after]]
        await store.remove(c, ids(taken))
        assert await store.count(c, None, T0) == 0
    finally:
        try:
            await store.stop()
        except RedisError:
            pass


@pytest_twisted.ensureDeferred
async def test_hung_master_is_failed_over_and_left_behind(
    reactor: Any, failover_cluster: Any, admin: dict[Address, SingleRedisClient]
) -> None:
    """A master that stops answering but keeps its connections open (SIGSTOP: a hung process,
    or a partition without resets): calls time out, and the client must look at the map again
    rather than keep waiting on the old node. A subscriber notices through its PINGs."""
    nodes = live_nodes(failover_cluster)
    client = ClusterRedisClient(reactor, nodes, timeout=1.0, ping_interval=None)  # no pub/sub, no pings
    subscriber = ClusterRedisClient(reactor, nodes, timeout=1.0, connect_timeout=1.0, ping_interval=0.5)
    node = None
    with capturedLogs() as events:
        try:
            await client.wait_ready(timeout=WAIT)
            await subscriber.wait_ready(timeout=WAIT)
            pair = await healthy_pair(admin)
            tag = tag_on(client, pair.master)
            key = f"{{{tag}}}:hung"
            assert await client.execute(["SET", key, "v"], key=key) == "OK"
            await replicated(admin, client, pair.master)
            inbox, resubscribed = Inbox(reactor), Counter(reactor)
            channel = f"instance:{{{tag}}}"
            await subscriber.subscribe(channel, inbox, sharded=True, on_reconnect=resubscribed)

            node = failover_cluster.node(pair.master.port)
            node.freeze()

            got = await until_it_works(reactor, lambda: client.execute(["GET", key], key=key))
            print(f"GET on the hung master's slot back after {got.seconds:.2f}s, {len(got.errors)} failed attempts")
            assert got.value == "v"
            assert client.node_for_slot(key_slot(tag)) == pair.replica
            # the subscriber's PING times out, and the subscription moves to the new master
            await resubscribed.reached(1, timeout=RECOVERY_S)
            await reaches(subscriber, inbox, channel)
        finally:
            if node is not None:
                node.kill()
            await client.close()
            await subscriber.close()
        # connections to the dead node end after the kill: give them a moment to be noticed
        await deferLater(reactor, 0.2, lambda: None)
    # nothing went wrong unseen (e.g. a connection state machine out of step: "Unhandled Error")
    critical = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.critical]
    assert critical == []
