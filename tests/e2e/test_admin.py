"""``mpr-admin`` (the installed console script, as a subprocess) against a running ``twistd mpr``
on both stores, its numbers checked against what the test did; on Redis + MongoDB also the
server's /metrics (persister, notifications) parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.internet.utils import getProcessOutputAndValue

from scripts.services.redis import start_redis
from tests.e2e.conftest import Connect, ServerFactory
from tests.e2e.mprprocess import MprProcess, clean_environ
from tests.e2e.test_distributed import eventually
from tests.e2e.test_server import add, count, http_get, take
from tests.services import Mongo, start_or_skip

MPR_ADMIN = os.path.join(os.path.dirname(sys.executable), "mpr-admin")
PAYLOAD = {"protected": "eyJ", "ciphertext": "x", "iv": "y", "tag": "z"}


async def admin(reactor: Any, env: dict[str, str], *args: str, expect: int = 0) -> Any:
    out, err, code = await getProcessOutputAndValue(MPR_ADMIN, args, env=clean_environ(**env), reactor=reactor)
    assert code == expect, (args, code, out.decode(), err.decode())
    return json.loads(out) if "--json" in args and code == 0 else out.decode()


async def scrape(reactor: Any, server: MprProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, _, body = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@pytest_twisted.ensureDeferred
async def test_admin_on_the_embedded_store(mpr: MprProcess, connect: Connect, reactor: Any) -> None:
    env = {"MPR_DATA_DIR": mpr.data_dir, "APP_PORT": str(mpr.app_port)}
    m = await connect(mpr.ws_port)
    for _ in range(3):
        await add(m, "c1", PAYLOAD)
    await add(m, "c2", PAYLOAD)
    assert len(await take(m, "c1", limit=2)) == 2  # leased to this socket
    assert await m.call("addLiveSession", {"connectionId": "c2", "sessionId": "s2"}) is True

    stats = await admin(reactor, env, "--json", "stats")
    assert stats["messages"] == 4 and stats["tiers"] == {"sqlite": 4}
    assert stats["connections_with_messages"] == 2 and stats["leased"] == 2
    assert stats["live_sessions"] == 1  # from the running server's /metrics
    assert stats["instances"] == [{"instance": "embedded server", "alive": True}]

    inspected = await admin(reactor, env, "--json", "inspect", "c1")
    assert (inspected["messages"], inspected["pending"], inspected["leased"]) == (3, 1, 2)
    assert len(inspected["leases"]) == 1 and inspected["leases"][0]["messages"] == 2

    top = await admin(reactor, env, "--json", "top", "--by", "depth")
    assert [(r["connection"], r["messages"]) for r in top] == [("c1", 3), ("c2", 1)]
    human = await admin(reactor, env, "top")
    assert human.splitlines()[0].split() == ["CONNECTION", "MESSAGES", "OLDEST_MESSAGE_AGE_S"]

    released = await admin(reactor, env, "--json", "release", "c1")
    assert released["released"] == 2
    assert await count(m, "c1") == 3  # pending again, seen by the running server

    refused = await admin(reactor, env, "purge", "c2", expect=1)  # no confirmation on stdin
    assert refused == ""
    purged = await admin(reactor, env, "--json", "purge", "c2", "--yes")
    assert purged["removed"] == 1
    assert await count(m, "c2") == 0
    assert (await admin(reactor, env, "--json", "stats"))["messages"] == 3


@pytest.fixture
def own_store(mongod: Mongo) -> Iterator[tuple[str, str, pymongo.MongoClient[dict[str, Any]], str]]:
    """A Redis of its own (stats count everything in it) and a MongoDB database of its own."""
    redis = start_or_skip("redis-server", start_redis)
    name = f"mpr_admin_{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongod.uri, serverSelectionTimeoutMS=5000)
    try:
        yield f"redis://127.0.0.1:{redis.port}", f"{mongod.uri}/{name}", client, name
    finally:
        client.drop_database(name)
        client.close()
        redis.stop()


@pytest_twisted.ensureDeferred
async def test_admin_and_metrics_on_redis_and_mongodb(
    mpr_servers: ServerFactory, connect: Connect, reactor: Any, own_store: Any
) -> None:
    redis_url, mongo_uri, client, db = own_store
    env = {"REDIS_URL": redis_url, "MONGODB_URI": mongo_uri}
    server = mpr_servers(env={**env, "THRESHOLD_TIMESTAMP": "1000", "MPR_INSTANCE_ID": "adm"})
    before = await await_start(server, reactor)
    for name in ("mpr_persister_moved_messages_total", "mpr_persister_lag_seconds"):
        assert (name, ()) in before, name
    assert before[("mpr_original_import_total", (("outcome", "found"),))] == 0  # nothing left by an original

    m = await connect(server.ws_port)
    for _ in range(3):
        await add(m, "c1", PAYLOAD)
    moved = await eventually(
        reactor,
        lambda: scrape(reactor, server),
        lambda s: s[("mpr_persister_moved_messages_total", ())] >= 3,
        15,
        "the persister moving c1's payloads to MongoDB",
    )
    assert moved[("mpr_persister_moved_messages_total", ())] == 3
    assert moved[("mpr_messages_added_total", ())] == 3
    await add(m, "c2", PAYLOAD)  # its payload stays in Redis (younger than the threshold)
    assert await m.call("addLiveSession", {"connectionId": "c3", "sessionId": "s3"}) is True
    assert len(await take(m, "c1", limit=2)) == 2

    stats = await admin(reactor, env, "--json", "stats")
    assert stats["messages"] == 4, stats
    assert stats["tiers"] == {"redis": 1, "mongodb": 3}, stats
    assert stats["connections_with_messages"] == 2 and stats["leased"] == 2, stats
    assert stats["live_sessions"] == 1, stats  # c3 has no messages: found by the bounded SCAN
    (instance,) = stats["instances"]
    assert instance["instance"].startswith("adm-") and instance["alive"] is True, stats

    inspected = await admin(reactor, env, "--json", "inspect", "c1")
    assert (inspected["messages"], inspected["pending"], inspected["leased"]) == (3, 1, 2), inspected
    assert inspected["tiers"] == {"redis": 0, "mongodb": 3}
    (lease,) = inspected["leases"]
    assert lease["holder"].startswith(instance["instance"] + "/") and lease["messages"] == 2
    session = (await admin(reactor, env, "--json", "inspect", "c3"))["live_session"]
    assert session["session"] == "s3" and session["instance"] == instance["instance"] and session["instance_alive"]

    top = await admin(reactor, env, "--json", "top", "--by", "age")
    assert [r["connection"] for r in top] == ["c1", "c2"]

    assert (await admin(reactor, env, "--json", "release", "c1"))["released"] == 2
    assert await count(m, "c1") == 3
    assert (await admin(reactor, env, "--json", "purge", "c1", "--yes"))["removed"] == 3
    assert await count(m, "c1") == 0
    left = await threads.deferToThread(
        lambda: client[db]["storequeuedmessages"].count_documents({"connectionId": "c1"})
    )
    assert left == 0
    assert (await admin(reactor, env, "--json", "import-original"))["found"] == 0  # nothing left by an original


async def await_start(server: MprProcess, reactor: Any) -> Any:
    await server.start()
    return await scrape(reactor, server)
