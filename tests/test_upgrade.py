"""The import of an original deployment (stores/redis/upgrade.py) at the store's level, on real
Redis (single and a 3-master cluster) and a real mongod, with the original's exact layout
(tests/original.py). The end-to-end view of mediators is in tests/e2e/test_upgrade.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred, gatherResults

from mpr_server.model import TakeQuery
from mpr_server.redis import RedisClient, SingleRedisClient
from mpr_server.redis.cluster import ClusterRedisClient
from mpr_server.redis.url import Address
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis.store import RedisStore
from mpr_server.stores.redis.upgrade import UNREADABLE_KEY, ImportReport
from tests.original import Original, ms, read_mongo
from tests.services import Mongo
from tests.store_contract import A, lease


@dataclass
class Stores:
    reactor: Any
    make_redis: Any
    mongo: Mongo
    database: str
    made: list[RedisStore]

    @property
    def uri(self) -> str:
        return f"{self.mongo.uri}/{self.database}"

    def store(self, instance: str = "inst") -> RedisStore:
        store = RedisStore(
            self.make_redis(),
            ColdStore(self.uri, self.reactor),
            self.reactor,
            f"{instance}-{uuid.uuid4().hex[:6]}",
            instance_ttl_ms=2000,
        )
        self.made.append(store)
        return store


@pytest_twisted.async_yield_fixture(params=["single", "cluster"])
async def stores(request: pytest.FixtureRequest, reactor: Any, mongod: Mongo) -> AsyncIterator[Stores]:
    if request.param == "single":
        url = request.getfixturevalue("redis_single").url

        def make_redis() -> RedisClient:
            return SingleRedisClient(reactor, url, timeout=2)
    else:
        nodes = [Address(*n) for n in request.getfixturevalue("redis_cluster").nodes]

        def make_redis() -> RedisClient:
            return ClusterRedisClient(reactor, nodes, timeout=2)

    made: list[RedisStore] = []
    database = f"mpr_upgrade_{uuid.uuid4().hex[:8]}"
    yield Stores(reactor, make_redis, mongod, database, made)
    for store in made:
        if store.liveness._heartbeat.running:
            await store.stop()
    await threads.deferToThread(_drop, mongod.uri, database)


def _drop(uri: str, database: str) -> None:
    import pymongo

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    client.drop_database(database)
    client.close()


async def written(stores: Stores) -> Original:
    original = Original()
    redis = stores.make_redis()
    await original.write(redis, stores.mongo.uri, stores.database)
    await redis.close()
    return original


def check_report(report: ImportReport, original: Original) -> None:
    assert (report.found, report.imported, report.duplicates, report.unreadable) == (
        original.found,
        original.imported,
        original.duplicates,
        original.unreadable,
    ), report
    assert report.connections == 3 and report.lists == 2 and not report.skipped


async def check_queues(store: RedisStore, original: Original) -> None:
    for connection_id, expected in original.expected.items():
        assert await store.count(connection_id, None, 0) == len(expected)
        taken = await store.take(TakeQuery(connection_id), A, lease())
        assert [m.id for m in taken] == [e.message_id for e in expected]
        assert [m.payload for m in taken] == [orjson.dumps(e.payload) for e in expected]


@pytest_twisted.ensureDeferred
async def test_everything_the_original_left_is_queued_once_in_order(stores: Stores) -> None:
    original = await written(stores)
    store = stores.store()
    await store.start()  # imports before it returns
    check_report(store.originals.report, original)
    for connection_id, expected in original.expected.items():
        taken = await store.take(TakeQuery(connection_id), A, lease())
        assert [(m.id, m.received_at_ms) for m in taken] == [(e.message_id, ms_of(e.received_at)) for e in expected]
    await check_sources_removed(store, original, stores)
    # A start finding the done-marker looks at nothing; a forced run finds nothing left.
    assert (await store.originals.run()).skipped
    again = await store.originals.run(force=True)
    assert (again.found, again.imported, again.skipped) == (0, 0, False)


def ms_of(iso_text: str) -> int:
    import datetime

    return ms(datetime.datetime.fromisoformat(iso_text))


async def check_sources_removed(store: RedisStore, original: Original, stores: Stores) -> None:
    redis = store.redis
    for connection_id in original.lists:
        key = original.list_key(connection_id)
        assert await redis.execute(["EXISTS", key], key=key) == 0
    live = f"liveSession:{original.a}"
    assert await redis.execute(["HGET", live, "sessionId"], key=live) == "stale-session"  # ignored, left
    aside = await redis.execute(["LRANGE", UNREADABLE_KEY, 0, -1], key=UNREADABLE_KEY)
    records = [orjson.loads(r) for r in aside]
    assert {"key": original.list_key(original.a), "entry": '{"messageId": "not json'} in records
    mongo = await threads.deferToThread(read_mongo, stores.mongo.uri, stores.database)
    assert mongo["indexes"]["messageId_1"].get("unique") is True
    assert "connectionId_1" in mongo["indexes"]
    assert all(d.get("mpr") == 1 for d in mongo["documents"]), mongo["documents"]
    assert len(mongo["documents"]) == 4  # a1, a2, a3, c1: payloads stay in MongoDB
    assert [d["mprAsideReason"] for d in mongo["aside"]] == ["duplicate"]
    assert mongo["livesessions"] == 1


@pytest_twisted.ensureDeferred
async def test_a_crash_between_queuing_and_removing_the_sources_imports_nothing_twice(stores: Stores) -> None:
    original = await written(stores)
    store = stores.store()
    calls = 0

    async def crash_on_second() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("crash (test)")

    store.originals.before_sources_removed = crash_on_second  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await store.start()
    await store.stop()
    again = stores.store()
    await again.start()
    report = again.originals.report
    # A (done before the crash) is gone from the sources; B crashed after its messages were
    # queued: found again, counted as duplicates, not queued twice; C was not reached.
    assert (report.found, report.imported, report.duplicates) == (3, 1, 2), report
    await check_queues(again, original)
    await check_sources_removed(again, original, stores)


@pytest_twisted.ensureDeferred
async def test_two_instances_starting_at_once_import_once(stores: Stores) -> None:
    original = await written(stores)
    first, second = stores.store("first"), stores.store("second")
    await gatherResults([Deferred.fromCoroutine(first.start()), Deferred.fromCoroutine(second.start())])
    reports = [first.originals.report, second.originals.report]
    assert sorted(r.skipped for r in reports) == [False, True], reports
    assert sum(r.imported for r in reports) == original.imported
    # Both serve the same, complete queues (the waiting one started only once they were there).
    await check_queues(second, original)
