"""WS_REUSE_PORT: two MPR processes on one WebSocket port, sharing Redis + MongoDB, both serve."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest_twisted
import treq

from tests.e2e.conftest import Connect, ServerFactory
from tests.services import Mongo, RedisSingle


async def open_sockets(reactor: Any, app_port: int) -> int:
    response = await treq.get(f"http://127.0.0.1:{app_port}/metrics", reactor=reactor, timeout=5)
    body = (await response.content()).decode()
    match = re.search(r"^mpr_open_sockets (\d+)", body, re.M)
    assert match, body
    return int(match.group(1))


@pytest_twisted.ensureDeferred
async def test_two_processes_share_the_websocket_port(
    reactor: Any, mpr_servers: ServerFactory, connect: Connect, redis_single: RedisSingle, mongod: Mongo
) -> None:
    shared = [
        "--ws-reuse-port",
        "true",
        "--redis-url",
        redis_single.url,
        "--mongodb-uri",
        f"{mongod.uri}/mpr_reuse_{uuid.uuid4().hex[:8]}",
    ]
    first = mpr_servers(extra_args=shared, port_options=True)
    second = mpr_servers(extra_args=shared, port_options=True)
    second.ws_port = first.ws_port
    await first.start()
    await second.start()

    clients = [await connect(first.ws_port) for _ in range(24)]
    for client in clients:
        assert await client.call("ping") == "pong"
    counts = [await open_sockets(reactor, server.app_port) for server in (first, second)]
    assert sum(counts) == 24
    assert min(counts) > 0, counts

    # One queue whichever process a call lands on.
    added = await clients[0].call("addMessage", {"connectionId": "shared", "recipientDids": [], "payload": {}})
    for client in clients:
        assert await client.call("getAvailableMessageCount", {"connectionId": "shared"}) == 1
    await clients[-1].call("removeMessages", {"connectionId": "shared", "messageIds": [added["messageId"]]})
    assert await clients[0].call("getAvailableMessageCount", {"connectionId": "shared"}) == 0
