"""Fixtures of the end-to-end tests: real ``twistd mpr`` processes and WebSocket clients on them,
all torn down (processes SIGKILLed, sockets closed) whatever the test did."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.defer import Deferred

from tests.e2e.mprprocess import MprProcess
from tests.services import Mongo
from tests.wsclient import RpcClient

ServerFactory = Callable[..., MprProcess]
Connect = Callable[..., Awaitable["RecordingClient"]]


class RecordingClient(RpcClient):
    """An ``RpcClient`` that also keeps every received frame as raw bytes (to check the exact JSON
    text the server sent, e.g. the key order of a payload)."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.raw_frames: list[bytes] = []

    def _received(self, payload: bytes, binary: bool) -> None:
        self.raw_frames.append(payload)
        super()._received(payload, binary)


@pytest_twisted.async_yield_fixture
async def mpr_servers(reactor: Any, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """A factory of (not yet started) servers, each with its own data dir unless given one;
    every server it made is SIGKILLed at teardown if still running."""
    made: list[MprProcess] = []

    def make(
        data_dir: str | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port_options: bool = False,
    ) -> MprProcess:
        directory = data_dir or str(tmp_path / f"data{len(made)}")
        server = MprProcess(reactor, directory, extra_args, env, port_options)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            await server.cleanup()


@pytest_twisted.async_yield_fixture
async def mpr(mpr_servers: ServerFactory) -> AsyncIterator[MprProcess]:
    """One started server (embedded store, 127.0.0.1, kernel-chosen ports)."""
    server = mpr_servers()
    await server.start()
    yield server


@pytest_twisted.async_yield_fixture
async def connect(reactor: Any) -> AsyncIterator[Connect]:
    """``await connect(port, socket_id=None)`` opens a recording client; all are closed at teardown."""
    clients: list[RecordingClient] = []

    async def open_client(port: int, socket_id: str | None = None, path: str = "/") -> RecordingClient:
        if socket_id is not None:
            path = f"{path}?socket_id={socket_id}"
        client = await RecordingClient.connect(reactor, port, path=path)
        assert isinstance(client, RecordingClient)
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            if client.protocol is not None and not client.closed.called:
                client.protocol.dropConnection(abort=True)


def uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class MongoDb:
    """A database of its own on the session's mongod, read directly with pymongo (in a thread)."""

    client: pymongo.MongoClient[dict[str, Any]]
    name: str
    uri: str

    @property
    def messages(self) -> Any:
        return self.client[self.name]["storequeuedmessages"]

    def find(self, connection_id: str) -> Deferred[list[dict[str, Any]]]:
        return threads.deferToThread(lambda: list(self.messages.find({"connectionId": connection_id}, {"_id": 0})))


@pytest.fixture
def mongo_db(mongod: Mongo) -> Iterator[MongoDb]:
    name = f"mpr_e2e_{uid()}"
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongod.uri, serverSelectionTimeoutMS=5000)
    try:
        yield MongoDb(client, name, f"{mongod.uri}/{name}")
    finally:
        client.drop_database(name)
        client.close()
