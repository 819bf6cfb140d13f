"""Real Credo 0.6 agents (two mediator processes using clients/credo, a recipient and a sender)
exchanging messages through mpr-server: live delivery across mediator instances, offline
queueing across a mediator restart, Pickup v2 polling; every message exactly once
(clients/credo/test/e2e/two-mediators.test.mjs). Here: the servers, and MPR's state at the end,
read over the wire after every mediator socket closed (so no message can hide in a lease)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from tests.credo.node import CredoClient, run_node_tests
from tests.e2e.conftest import ServerFactory
from tests.e2e.mprprocess import MprProcess
from tests.e2e.test_server import count, take
from tests.services import Mongo, RedisSingle
from tests.wsclient import RpcClient

E2E = "test/e2e/two-mediators.test.mjs"
NODE_TIMEOUT = 150.0


def redis_args(redis: RedisSingle, mongod: Mongo, instance: str) -> list[str]:
    db = f"credo{uuid.uuid4().hex[:8]}"
    return [
        "--mpr-store",
        "redis",
        "--redis-url",
        redis.url,
        "--mongodb-uri",
        f"{mongod.uri}/{db}",
        "--mpr-instance-id",
        instance,
    ]


async def scenario(reactor: Any, client: CredoClient, servers: list[MprProcess], tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    env = {"MPR_URL": f"ws://127.0.0.1:{servers[0].ws_port}/", "MPR_E2E_RESULT": str(result_file)}
    if len(servers) > 1:
        env["MPR_URL_2"] = f"ws://127.0.0.1:{servers[1].ws_port}/"
    result = await run_node_tests(reactor, client, [E2E], env, NODE_TIMEOUT)
    report = f"{result.output[-12000:]}\n--- mpr ---\n" + "\n".join(s.output[-3000:] for s in servers)
    assert result.code == 0 and result.passed == 1 and result.failed == 0, report
    outcome = json.loads(result_file.read_text())
    assert len(outcome["messages"]) == 13, outcome  # 5 live, 4 + 4 offline
    # The mediators have exited: their sockets are closed, so any unacknowledged message would be
    # released and counted again. Nothing may be left, on any instance.
    for server in servers:
        probe = await RpcClient.connect(reactor, server.ws_port)
        try:
            assert await count(probe, outcome["connectionId"]) == 0, report
            assert await take(probe, outcome["connectionId"]) == [], report
        finally:
            await probe.close()


@pytest_twisted.ensureDeferred
async def test_credo_mediators_embedded_store(
    reactor: Any, credo_client: CredoClient, mpr: MprProcess, tmp_path: Path
) -> None:
    await scenario(reactor, credo_client, [mpr], tmp_path)


@pytest.mark.parametrize("instances", [1, 2], ids=["one-mpr", "two-mpr-instances"])
@pytest_twisted.ensureDeferred
async def test_credo_mediators_redis_store(
    reactor: Any,
    credo_client: CredoClient,
    mpr_servers: ServerFactory,
    redis_single: RedisSingle,
    mongod: Mongo,
    tmp_path: Path,
    instances: int,
) -> None:
    servers = [mpr_servers(extra_args=redis_args(redis_single, mongod, f"credo-{i}")) for i in range(instances)]
    await gatherResults([Deferred.fromCoroutine(s.start()) for s in servers])
    for server in servers:
        assert server.serving_line is not None and server.serving_line["store"] == b"redis", server.output
    await scenario(reactor, credo_client, servers, tmp_path)
