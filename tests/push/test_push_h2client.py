"""The HTTP/2 client on its own: flow control, the server's stream limit, PING keep-alive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

from mpr_server.push.h2client import H2Client, H2ClientProtocol
from mpr_server.push.tls import client_tls, load_trust_root
from tests.push.push_fakes import Listeners, ScriptedH2Factory, TlsMaterial

TIMEOUT = 10


def listen(reactor: Any, tls: TlsMaterial, listeners: Listeners, factory: ScriptedH2Factory) -> int:
    port = reactor.listenSSL(0, factory, tls.server_options([b"h2"]), interface="127.0.0.1")
    return listeners.add(port, factory.tracker)


@pytest_twisted.async_yield_fixture
async def clients(listeners: Listeners) -> AsyncIterator[list[H2Client]]:
    made: list[H2Client] = []
    yield made
    for client in made:
        await client.close()


def make_client(reactor: Any, port: int, ca_file: str, clients: list[H2Client]) -> H2Client:
    tls = client_tls("127.0.0.1", load_trust_root(ca_file), [b"h2"])
    client = H2Client(reactor, reactor, "127.0.0.1", port, tls)
    clients.append(client)
    return client


@pytest_twisted.ensureDeferred
async def test_large_bodies_respect_flow_control(
    reactor: Any, tls_material: TlsMaterial, listeners: Listeners, ca_file: str, clients: list[H2Client]
) -> None:
    factory = ScriptedH2Factory("ok")
    client = make_client(reactor, listen(reactor, tls_material, listeners, factory), ca_file, clients)
    sizes = [300_000, 70_000, 1]

    responses = await gatherResults(
        [Deferred.fromCoroutine(client.request(b"POST", b"/big", [], b"x" * size)) for size in sizes]
    ).addTimeout(TIMEOUT, reactor)

    assert [r.status for r in responses] == [200, 200, 200]
    assert sorted(factory.bodies) == sorted(sizes)
    assert factory.connections == 1


@pytest_twisted.ensureDeferred
async def test_server_stream_limit_is_respected(
    reactor: Any, tls_material: TlsMaterial, listeners: Listeners, ca_file: str, clients: list[H2Client]
) -> None:
    factory = ScriptedH2Factory("ok", max_streams=2)
    client = make_client(reactor, listen(reactor, tls_material, listeners, factory), ca_file, clients)

    responses = await gatherResults(
        [Deferred.fromCoroutine(client.request(b"POST", b"/x", [], b"{}")) for _ in range(7)]
    ).addTimeout(TIMEOUT, reactor)

    assert [r.status for r in responses] == [200] * 7
    assert factory.peak_streams == 2
    assert factory.connections == 1


@pytest_twisted.ensureDeferred
async def test_unanswered_ping_drops_the_connection(
    reactor: Any, tls_material: TlsMaterial, listeners: Listeners, ca_file: str
) -> None:
    factory = ScriptedH2Factory("deaf")
    port = listen(reactor, tls_material, listeners, factory)
    endpoint = wrapClientTLS(
        client_tls("127.0.0.1", load_trust_root(ca_file), [b"h2"]), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    proto = H2ClientProtocol(reactor, ping_interval=0.05, ping_timeout=0.05)

    await connectProtocol(endpoint, proto).addTimeout(TIMEOUT, reactor)
    await proto.ready.addTimeout(TIMEOUT, reactor)
    assert proto.usable
    await proto.when_closed().addTimeout(TIMEOUT, reactor)

    assert not proto.usable
