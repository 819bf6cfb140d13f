"""A mediator that stops reading is disconnected instead of growing the server's memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.defer import Deferred

from mpr_server.app import build
from mpr_server.config import load
from tests.wsclient import RpcClient


@pytest_twisted.async_yield_fixture
async def server_port(reactor: Any, tmp_path: Path) -> AsyncIterator[int]:
    config = load({"MPR_DATA_DIR": str(tmp_path), "SESSION_GRACE_MS": "0", "SLOW_READER_TIMEOUT_MS": "500"}, {})
    server = build(config, reactor)
    store, factory = server.store, server.factory
    factory.max_blocked_bytes = 1024 * 1024
    await store.start()
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        yield port.getHost().port
    finally:
        for protocol in list(factory.sockets):
            protocol.dropConnection(abort=True)
        await port.stopListening()
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_mediator_that_stops_reading_is_disconnected(reactor: Any, server_port: int) -> None:
    port = server_port
    slow = await RpcClient.connect(reactor, port, path="/?socket_id=slow")
    healthy = await RpcClient.connect(reactor, port, path="/?socket_id=healthy")
    assert await slow.call("addLiveSession", {"connectionId": "c1", "sessionId": "s1"}) is True
    assert slow.protocol is not None and slow.protocol.transport is not None
    transport: Any = slow.protocol.transport
    transport.pauseProducing()  # the mediator stops reading

    payload = {"ciphertext": "x" * 512 * 1024}
    for _ in range(40):  # 20 MiB of notifications for the slow socket
        await healthy.call("addMessage", {"connectionId": "c1", "recipientDids": [], "payload": payload})

    closed: Deferred[int | None] = slow.closed
    transport.resumeProducing()  # read what is left, and see the connection end
    closed.addTimeout(10, reactor)
    await closed
    # Its session ended with the socket and the deliveries it never read are pending again.
    assert await healthy.call("getLiveSession", {"connectionId": "c1"}) is False
    assert await healthy.call("getAvailableMessageCount", {"connectionId": "c1"}) == 40
    await healthy.close()
