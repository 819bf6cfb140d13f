"""Upgrading from the original server, end to end: the original's exact leftovers in a real Redis
(single and a 3-master cluster) and a real mongod (tests/original.py), then real ``twistd mpr``
processes on them, used as mediators use them.

The crash test uses a test-only seam: ``MPR_TEST_IMPORT_PAUSE_AFTER=N`` makes the import stop for
good after queuing the N-th connection's messages and before removing their sources (logging
"import paused (test seam"), where the test kills the process with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

import orjson
import pytest
import pytest_twisted
from twisted.internet import threads

from mpr_server.redis import ClusterRedisClient, RedisClient, SingleRedisClient
from mpr_server.redis.url import Address
from mpr_server.stores.redis.upgrade import DONE_KEY, PAUSE_ENV
from tests.e2e import test_distributed
from tests.e2e.conftest import Connect, RecordingClient, ServerFactory
from tests.e2e.mprprocess import MprProcess, clean_environ
from tests.e2e.test_distributed import MongoDb, eventually, start_all, store_args
from tests.e2e.test_server import count, http_get, take
from tests.original import Original

shared_redis = test_distributed.shared_redis


def client_for(request: pytest.FixtureRequest, reactor: Any, options: list[str]) -> RedisClient:
    if options[0] == "--redis-url":
        return SingleRedisClient(reactor, options[1], timeout=2)
    cluster = request.getfixturevalue("redis_cluster")
    return ClusterRedisClient(reactor, [Address(*n) for n in cluster.nodes], timeout=2)


async def written(request: pytest.FixtureRequest, reactor: Any, redis: list[str], mongo_db: MongoDb) -> Original:
    original = Original()
    client = client_for(request, reactor, redis)
    await original.write(client, mongo_db.uri.rpartition("/")[0], mongo_db.name)
    await client.close()
    return original


def frame_of(client: RecordingClient, marker: str) -> bytes:
    frames = [f for f in client.raw_frames if marker.encode() in f]
    assert len(frames) == 1, frames
    return frames[0]


async def check_served(client: RecordingClient, original: Original) -> None:
    """Counts, then takes in order with the original ids, receivedAt and exact payload bytes."""
    for connection_id, expected in original.expected.items():
        assert await count(client, connection_id) == len(expected)
    for connection_id, expected in original.expected.items():
        taken = await take(client, connection_id, limit=10)
        assert [(m["id"], m["receivedAt"]) for m in taken] == [(e.message_id, e.received_at) for e in expected]
        raw = frame_of(client, expected[0].message_id)
        wanted = b",".join(
            b'{"id":"%s","receivedAt":"%s","encryptedMessage":%s}'
            % (e.message_id.encode(), e.received_at.encode(), orjson.dumps(e.payload))
            for e in expected
        )
        assert wanted in raw, raw


async def imported_metric(reactor: Any, server: MprProcess) -> dict[str, int]:
    code, _, body = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/metrics")
    assert code == 200
    found = re.findall(rb'mpr_original_import_total\{outcome="(\w+)"\} (\d+)', body)
    return {k.decode(): int(v) for k, v in found}


@pytest_twisted.ensureDeferred
async def test_every_message_the_original_held_is_served_once_in_order_from_the_first_call(
    request: pytest.FixtureRequest,
    reactor: Any,
    mpr_servers: ServerFactory,
    connect: Connect,
    shared_redis: list[str],
    mongo_db: MongoDb,
) -> None:
    original = await written(request, reactor, shared_redis, mongo_db)
    server = mpr_servers(extra_args=store_args(shared_redis, mongo_db.uri, "up"))
    await start_all(server)
    mediator = await connect(server.ws_port)
    await check_served(mediator, original)  # the very first calls see everything
    assert await imported_metric(reactor, server) == {
        "found": original.found,
        "imported": original.imported,
        "duplicate": original.duplicates,
        "unreadable": original.unreadable,
    }
    a = original.expected[original.a]
    acked = [a[0].message_id, a[3].message_id]
    assert await mediator.call("removeMessages", {"connectionId": original.a, "messageIds": acked}) is True
    await server.restart()
    assert "already done" not in server.output  # (the done-marker is silent: one GET)
    again = await connect(server.ws_port)
    assert await count(again, original.a) == 3  # acks stuck, nothing imported twice
    assert [m["id"] for m in await take(again, original.a)] == [a[1].message_id, a[2].message_id, a[4].message_id]
    assert await count(again, original.b) == 2 and await count(again, original.c) == 1


@pytest_twisted.ensureDeferred
async def test_a_kill_in_the_middle_of_the_import_loses_and_repeats_nothing(
    request: pytest.FixtureRequest,
    reactor: Any,
    mpr_servers: ServerFactory,
    connect: Connect,
    redis_single: Any,
    mongo_db: MongoDb,
) -> None:
    redis = ["--redis-url", redis_single.url]
    original = await written(request, reactor, redis, mongo_db)
    args = store_args(redis, mongo_db.uri, "crash")
    env = {"INSTANCE_TTL_MS": "2000"}  # the dead claim expires within 2 s
    crashing = mpr_servers(extra_args=args, env={**env, PAUSE_ENV: "2"})
    crashing.spawn(crashing.args())

    async def output() -> str:
        return crashing.output

    await eventually(reactor, output, lambda text: "import paused (test seam" in text, 15, "the import pausing")
    await crashing.kill(signal.SIGKILL)
    server = mpr_servers(extra_args=args, env=env)
    await start_all(server)
    mediator = await connect(server.ws_port)
    await check_served(mediator, original)


@pytest_twisted.ensureDeferred
async def test_two_instances_starting_at_once_import_once_and_both_serve_it_all(
    request: pytest.FixtureRequest,
    reactor: Any,
    mpr_servers: ServerFactory,
    connect: Connect,
    redis_single: Any,
    mongo_db: MongoDb,
) -> None:
    redis = ["--redis-url", redis_single.url]
    original = await written(request, reactor, redis, mongo_db)
    first = mpr_servers(extra_args=store_args(redis, mongo_db.uri, "one"))
    second = mpr_servers(extra_args=store_args(redis, mongo_db.uri, "two"))
    await start_all(first, second)
    on_second = await connect(second.ws_port)
    for connection_id, expected in original.expected.items():
        assert await count(on_second, connection_id) == len(expected)
    await check_served(await connect(first.ws_port), original)
    client = client_for(request, reactor, redis)
    record = orjson.loads(await client.execute(["GET", DONE_KEY], key=DONE_KEY))
    await client.close()
    assert record["imported"] == original.imported
    # Exactly one of them imported (the other waited for it, or started after it was done; the
    # store-level test makes them overlap for sure).
    # (the number found may include what other tests left in the session's shared Redis)
    reports = [
        len(re.findall(r"import of the original deployment: \d+ entries found", s.output)) for s in (first, second)
    ]
    assert sorted(reports) == [0, 1], reports
    assert record["instance"].split("-")[0] in ("one", "two")


@pytest_twisted.ensureDeferred
async def test_the_operator_command_imports_and_then_finds_nothing_left(
    request: pytest.FixtureRequest, reactor: Any, redis_single: Any, mongo_db: MongoDb
) -> None:
    redis = ["--redis-url", redis_single.url]
    original = await written(request, reactor, redis, mongo_db)
    command = [os.path.join(os.path.dirname(sys.executable), "mpr-import-original"), "--json"]
    env = clean_environ(MPR_STORE="redis", REDIS_URL=redis_single.url, MONGODB_URI=mongo_db.uri)

    def run() -> dict[str, Any]:
        done = subprocess.run(command, env=env, capture_output=True, timeout=30, check=True)
        report: dict[str, Any] = orjson.loads(done.stdout)
        return report

    first = await threads.deferToThread(run)
    assert (first["found"], first["imported"], first["duplicates"], first["unreadable"]) == (
        original.found,
        original.imported,
        original.duplicates,
        original.unreadable,
    ), first
    second = await threads.deferToThread(run)
    assert (second["found"], second["imported"], second["skipped"]) == (0, 0, False), second
    bad = subprocess.run([command[0]], env={**env, "MPR_STORE": "embedded"}, capture_output=True, timeout=30)
    assert bad.returncode == 1 and b"MPR_STORE=redis" in bad.stderr and b"Traceback" not in bad.stderr
