"""The JSON-RPC envelope and dispatch over an in-memory WebSocket (iosim, no sockets, task.Clock).

The server side is the real MediatorFactory/MediatorProtocol over the embedded store; the client is
Autobahn's WebSocket client. Bytes move only when the harness pumps them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim

from mpr_server.app import build
from mpr_server.config import load
from tests.drive import drive
from tests.wsclient import ABSENT, RpcClient, _Protocol

T = TypeVar("T")
HEX24 = re.compile(r"^[0-9a-f]{24}$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PAYLOAD = {"protected": "eyJhbGciOi", "iv": "aa", "ciphertext": "bb", "tag": "cc", "z": 1, "a": [1, {"y": None}]}
MAX_MESSAGE = 4096
MAX_FRAME = 64 * 1024


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_000_000)
        config = load(
            {
                "MPR_DATA_DIR": str(tmp_path),
                "MPR_INSTANCE_ID": "i1",
                "MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
                "MAX_FRAME_BYTES": str(MAX_FRAME),
            },
            {},
        )
        self.server = build(config, self.clock)
        self.store = self.server.store
        self.service = self.server.pickup
        self.metrics = self.server.metrics
        self.dispatcher = self.server.dispatcher
        self.factory = self.server.factory
        self.pumps: list[iosim.IOPump] = []
        self.run(self.store.start())

    def connect(self, query: str = "?socket_id=m1", expect_open: bool = True) -> RpcClient:
        address = IPv4Address("TCP", "127.0.0.1", 3100)
        server = self.factory.buildProtocol(address)
        client = RpcClient(self.clock)
        client_factory = WebSocketClientFactory(f"ws://127.0.0.1:3100/{query}", reactor=self.clock)
        protocol = _Protocol()
        protocol.factory = client_factory
        protocol.client = client
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True, hostAddress=address),
            protocol,
            iosim.FakeTransport(protocol, isServer=False, peerAddress=address),
            greet=False,
        )
        self.pumps.append(pump)
        self.settle()
        assert (client.protocol is not None) == expect_open, "handshake outcome"
        return client

    def settle(self) -> None:
        for _ in range(20):
            for pump in self.pumps:
                pump.flush()
            self.clock.advance(0)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Drive a coroutine to completion without reactor time."""
        return drive(coro, self.settle)

    def raw(self, client: RpcClient, frame: bytes | str, binary: bool = False) -> Any:
        """Send a raw frame; return the next reply that no request id claims."""
        client.send_raw(frame, binary)
        self.settle()
        return self.run(client.next_unmatched(timeout=1))

    def silent(self, client: RpcClient, frame: bytes | str) -> bool:
        """Send a frame; True if nothing came back before a ping's reply did."""
        client.send_raw(frame)
        self.settle()
        pong = self.call(client, "ping")
        return pong == "pong" and client.unmatched.pending == []

    def call(self, client: RpcClient, method: str, params: Any = ABSENT) -> Any:
        return self.run(client.call(method, params))

    def request(self, client: RpcClient, method: str, params: Any = ABSENT, request_id: Any = ABSENT) -> Any:
        return self.run(client.request(method, params, request_id))


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.run(harness.store.stop())


@pytest.fixture
def c(h: Harness) -> RpcClient:
    return h.connect()


def error_of(reply: Any) -> tuple[int, str]:
    assert set(reply) == {"jsonrpc", "error", "id"}, reply
    return reply["error"]["code"], reply["error"]["message"]


# -- envelope ----------------------------------------------------------------------------------------


def test_ping_has_no_params_and_answers_pong(h: Harness, c: RpcClient) -> None:
    assert h.request(c, "ping", request_id=7) == {"jsonrpc": "2.0", "result": "pong", "id": 7}
    assert h.request(c, "ping", request_id="abc")["id"] == "abc"


def test_parse_error(h: Harness, c: RpcClient) -> None:
    reply = h.raw(c, "{not json")
    assert error_of(reply) == (-32700, "Parse error") and reply["id"] is None
    assert isinstance(reply["error"]["data"], str)


@pytest.mark.parametrize(
    "frame",
    [
        '"\\ud800"',  # lone surrogate
        '{"jsonrpc":"2.0","method":"ping","id":1,"x":NaN}',
        '{"jsonrpc":"2.0","method":"ping","id":1e999}',
        "[" * 5000 + "]" * 5000,
        '{"a":' * 3000 + "1" + "}" * 3000,
        "1" * 5000,
    ],
    ids=["lone-surrogate", "nan", "infinity", "deep-array", "deep-object", "huge-number"],
)
def test_hostile_frames_get_an_error_and_the_socket_survives(h: Harness, c: RpcClient, frame: str) -> None:
    reply = h.raw(c, frame)
    assert reply["error"]["code"] in (-32700, -32600) and reply["id"] is None
    assert h.call(c, "ping") == "pong"


@pytest.mark.parametrize("frame", ['"text"', "42", "null", "true"])
def test_non_object_frames_are_invalid_requests(h: Harness, c: RpcClient, frame: str) -> None:
    assert error_of(h.raw(c, frame)) == (-32600, "Invalid Request")


def test_envelope_errors(h: Harness, c: RpcClient) -> None:
    reply = h.raw(c, '{"method":"ping","id":5}')
    assert error_of(reply) == (-32600, "Invalid Request") and reply["id"] == 5
    reply = h.raw(c, '{"jsonrpc":"2.0","id":6}')
    assert error_of(reply) == (-32602, "Invalid params") and reply["id"] == 6
    reply = h.raw(c, '{"jsonrpc":"2.0","method":12,"id":7}')
    assert error_of(reply) == (-32600, "Invalid Request")
    reply = h.raw(c, '{"jsonrpc":"2.0","method":"getLiveSession","params":"c1","id":8}')
    assert error_of(reply) == (-32600, "Invalid Request")
    reply = h.raw(c, '{"jsonrpc":"2.0","method":"nope","id":9}')
    assert error_of(reply) == (-32601, "Method not found") and reply["id"] == 9


def test_unknown_method_as_notification_still_gets_an_error(h: Harness, c: RpcClient) -> None:
    reply = h.raw(c, '{"jsonrpc":"2.0","method":"nope","id":0}')
    assert error_of(reply) == (-32601, "Method not found") and reply["id"] is None


@pytest.mark.parametrize("request_id", ["0", '""', "null", None])
def test_successful_notifications_get_no_reply(h: Harness, c: RpcClient, request_id: str | None) -> None:
    id_part = "" if request_id is None else f',"id":{request_id}'
    frame = '{"jsonrpc":"2.0","method":"addMessage","params":{"connectionId":"n1","recipientDids":[],"payload":{}}'
    assert h.silent(c, frame + id_part + "}")
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "n1"}) == 1


def test_batch_answers_in_order_without_notifications(h: Harness, c: RpcClient) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "ping", "id": 1},
        {"jsonrpc": "2.0", "method": "ping"},
        {"jsonrpc": "2.0", "method": "nope", "id": 3},
        {"jsonrpc": "2.0", "method": "getLiveSession", "params": {"connectionId": "x"}, "id": "4"},
    ]
    reply = h.raw(c, orjson.dumps(batch))
    assert reply == [
        {"jsonrpc": "2.0", "result": "pong", "id": 1},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": 3},
        {"jsonrpc": "2.0", "result": False, "id": "4"},
    ]


def test_empty_and_oversize_batches(h: Harness, c: RpcClient) -> None:
    assert h.raw(c, "[]") == {
        "jsonrpc": "2.0",
        "error": {"code": -32600, "message": "Invalid Request", "data": "Invalid array"},
        "id": None,
    }
    big = [{"jsonrpc": "2.0", "method": "ping", "id": i} for i in range(1, 1002)]
    assert error_of(h.raw(c, orjson.dumps(big))) == (-32600, "Invalid Request")
    assert h.call(c, "ping") == "pong"


def test_rpc_on_and_off(h: Harness, c: RpcClient) -> None:
    assert h.call(c, "rpc.on", ["messagesReceived"]) == {"messagesReceived": "ok"}
    assert h.call(c, "rpc.on", ["messagesReceived"]) == {
        "messagesReceived": "socket has already been subscribed to event"
    }
    assert h.call(c, "rpc.on", ["other"]) == {"other": "provided event invalid"}
    assert h.call(c, "rpc.off", ["messagesReceived"]) == {"messagesReceived": "ok"}
    assert h.call(c, "rpc.off", ["messagesReceived"]) == {"messagesReceived": "not subscribed"}


def test_list_methods(h: Harness, c: RpcClient) -> None:
    assert set(h.call(c, "__listMethods")) == {
        "__listMethods",
        "addMessage",
        "takeFromQueue",
        "getAvailableMessageCount",
        "removeMessages",
        "removeAllMessages",
        "addLiveSession",
        "removeLiveSession",
        "getLiveSession",
        "ping",
    }


def test_binary_frames_are_requests_and_replies_are_text(h: Harness, c: RpcClient) -> None:
    c.send_raw(b'{"jsonrpc":"2.0","method":"ping","id":null}', binary=True)
    reply = h.raw(c, b'{"jsonrpc":"2.0","method":"nope","id":2}', binary=True)
    assert error_of(reply) == (-32601, "Method not found")
    assert c.frames_binary and not any(c.frames_binary)
    reply = h.raw(c, b'{"jsonrpc":"2.0","method":"ping","id":"\xff"}', binary=True)
    assert error_of(reply) == (-32700, "Parse error")


def test_overlong_socket_id_is_refused_at_the_handshake(h: Harness) -> None:
    client = h.connect("?socket_id=" + "x" * 300, expect_open=False)
    assert client.closed.called
    failure = h.run(_wait_failure(client.opened))
    assert "handshake failed" in str(failure)
    assert h.connect("?socket_id=" + "x" * 256).protocol is not None


def test_invalid_utf8_text_frame_closes_with_1007(h: Harness, c: RpcClient) -> None:
    assert c.protocol is not None
    c.protocol.sendMessage(b'{"x":"\xff"}', isBinary=False)
    h.settle()
    assert h.run(_wait(c.closed)) == 1007


def test_oversize_frame_closes_with_1009(h: Harness, c: RpcClient) -> None:
    c.send_raw(b'{"x":"' + b"a" * MAX_FRAME + b'"}')
    h.settle()
    assert h.run(_wait(c.closed)) == 1009


# -- methods and their results ---------------------------------------------------------------------


def test_method_results_have_the_wire_shapes(h: Harness, c: RpcClient) -> None:
    added = h.call(c, "addMessage", {"connectionId": "c1", "recipientDids": ["did:key:a"], "payload": PAYLOAD})
    assert set(added) == {"messageId"} and HEX24.match(added["messageId"])
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "c1"}) == 1
    taken = h.call(c, "takeFromQueue", {"connectionId": "c1", "limit": 10})
    assert [set(m) for m in taken] == [{"id", "receivedAt", "encryptedMessage"}]
    assert taken[0]["id"] == added["messageId"] and ISO.match(taken[0]["receivedAt"])
    assert list(taken[0]["encryptedMessage"].items()) == list(PAYLOAD.items())  # same keys, same order
    assert h.call(c, "removeMessages", {"connectionId": "c1", "messageIds": [added["messageId"]]}) is True
    assert h.call(c, "removeAllMessages", {"connectionId": "c1", "recipientDid": "did:key:a"}) is True
    assert h.call(c, "addLiveSession", {"connectionId": "c1", "sessionId": "s1"}) is True
    assert h.call(c, "getLiveSession", {"connectionId": "c1"}) is True
    assert h.call(c, "removeLiveSession", {"connectionId": "c1"}) is True
    assert h.call(c, "removeLiveSession", {"connectionId": "c1"}) is False
    assert h.call(c, "getLiveSession", {"connectionId": "c1"}) is False


def test_payload_bytes_are_returned_as_received(h: Harness, c: RpcClient) -> None:
    body = '{"z":"1","a":{"k":[1,2.5,"\\u00e9",null,true]},"m":"\\/"}'
    c.send_raw(
        '{"jsonrpc":"2.0","method":"addMessage","params":{"connectionId":"raw","recipientDids":[],"payload":'
        + body
        + '},"id":"a"}'
    )
    h.settle()
    taken = h.call(c, "takeFromQueue", {"connectionId": "raw"})
    assert orjson.dumps(taken[0]["encryptedMessage"]) == orjson.dumps(orjson.loads(body))
    assert list(taken[0]["encryptedMessage"]) == ["z", "a", "m"]


def test_live_session_gets_messages_received(h: Harness) -> None:
    mediator, other = h.connect("?socket_id=m1"), h.connect("?socket_id=m2")
    h.call(mediator, "rpc.on", ["messagesReceived"])
    h.call(mediator, "addLiveSession", {"connectionId": "c1", "sessionId": "s1"})
    added = h.call(other, "addMessage", {"connectionId": "c1", "recipientDids": ["d"], "payload": PAYLOAD})
    note = h.run(mediator.next_notification(timeout=1))
    assert set(note) == {"jsonrpc", "method", "params"}
    assert note["method"] == "messagesReceived"
    assert note["params"]["connectionId"] == "c1" and note["params"]["id"] == ""
    assert [m["id"] for m in note["params"]["messages"]] == [added["messageId"]]
    assert other.notifications.pending == []


def test_take_with_delete_and_filters(h: Harness, c: RpcClient) -> None:
    for did in ("a", "b", "a"):
        h.call(c, "addMessage", {"connectionId": "f", "recipientDids": [did], "payload": PAYLOAD})
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "f", "recipientDid": "a"}) == 2
    taken = h.call(c, "takeFromQueue", {"connectionId": "f", "recipientDid": "a", "deleteMessages": True})
    assert len(taken) == 2
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "f"}) == 1


# -- invalid params: a named error, nothing stored changes, the socket stays usable --------------------

GOOD_ADD = {"connectionId": "v", "recipientDids": ["did:key:a"], "payload": {"ciphertext": "x"}}

INVALID = [
    ("addMessage", {**GOOD_ADD, "connectionId": {"$ne": ""}}, "connectionId"),
    ("addMessage", {**GOOD_ADD, "connectionId": ""}, "connectionId"),
    ("addMessage", {**GOOD_ADD, "connectionId": ["v"]}, "connectionId"),
    ("addMessage", {**GOOD_ADD, "connectionId": 5}, "connectionId"),
    ("addMessage", {**GOOD_ADD, "connectionId": "x" * 513}, "connectionId"),
    ("addMessage", {**GOOD_ADD, "recipientDids": "did:key:a"}, "recipientDids"),
    ("addMessage", {**GOOD_ADD, "recipientDids": [1]}, "recipientDids"),
    ("addMessage", {**GOOD_ADD, "payload": "text"}, "payload"),
    ("addMessage", {**GOOD_ADD, "payload": [1]}, "payload"),
    ("addMessage", {**GOOD_ADD, "payload": {"ciphertext": "x" * MAX_MESSAGE}}, "payload"),
    ("addMessage", {**GOOD_ADD, "pushNotificationToken": "tok"}, "pushNotificationToken"),
    ("addMessage", {**GOOD_ADD, "pushNotificationToken": {"token": "t"}}, "pushNotificationToken"),
    ("addMessage", {**GOOD_ADD, "pushNotificationToken": {"type": "fcm", "token": 5}}, "pushNotificationToken"),
    ("addMessage", {**GOOD_ADD, "token": 5}, "token"),
    ("takeFromQueue", {"connectionId": "v", "limit": -1}, "limit"),
    ("takeFromQueue", {"connectionId": "v", "limit": 1.5}, "limit"),
    ("takeFromQueue", {"connectionId": "v", "limit": "10"}, "limit"),
    ("takeFromQueue", {"connectionId": "v", "limit": True}, "limit"),
    ("takeFromQueue", {"connectionId": "v", "limit": 2**40}, "limit"),
    ("takeFromQueue", {"connectionId": "v", "limitBytes": -5}, "limitBytes"),
    ("takeFromQueue", {"connectionId": "v", "deleteMessages": "true"}, "deleteMessages"),
    ("takeFromQueue", {"connectionId": "v", "recipientDid": 3}, "recipientDid"),
    ("takeFromQueue", {"connectionId": None}, "connectionId"),
    ("getAvailableMessageCount", {"connectionId": {"$gt": ""}}, "connectionId"),
    ("removeMessages", {"connectionId": "v", "messageIds": "abc"}, "messageIds"),
    ("removeMessages", {"connectionId": "v", "messageIds": [{"$ne": ""}]}, "messageIds"),
    ("removeAllMessages", {"connectionId": "v"}, "recipientDid"),
    ("removeAllMessages", {"connectionId": "v", "recipientDid": ""}, "recipientDid"),
    ("addLiveSession", {"connectionId": "v"}, "sessionId"),
    ("addLiveSession", {"connectionId": "v", "sessionId": 1}, "sessionId"),
    ("removeLiveSession", {"connectionId": "v", "sessionId": 1}, "sessionId"),
    ("getLiveSession", {}, "connectionId"),
]


@pytest.mark.parametrize(("method", "params", "field"), INVALID)
def test_invalid_params_name_the_field_and_change_nothing(
    h: Harness, c: RpcClient, method: str, params: dict[str, Any], field: str
) -> None:
    kept = h.call(c, "addMessage", GOOD_ADD)["messageId"]
    reply = h.request(c, method, params)
    assert error_of(reply) == (-32602, "Invalid params")
    assert reply["error"]["data"]["param"] == field
    assert field in reply["error"]["data"]["details"]
    taken = h.call(c, "takeFromQueue", {"connectionId": "v"})
    assert [m["id"] for m in taken] == [kept]
    assert h.call(c, "getLiveSession", {"connectionId": "v"}) is False
    assert h.metrics.registry.get_sample_value("mpr_calls_total", {"method": method, "outcome": "invalid"}) == 1


def test_params_must_be_named(h: Harness, c: RpcClient) -> None:
    reply = h.request(c, "getLiveSession", ["v"])
    assert error_of(reply) == (-32602, "Invalid params")
    reply = h.request(c, "addMessage")
    assert error_of(reply) == (-32602, "Invalid params")


def test_unknown_params_are_ignored_and_legacy_token_accepted(h: Harness, c: RpcClient) -> None:
    added = h.call(c, "addMessage", {**GOOD_ADD, "id": "ignored", "token": "legacy-fcm-token"})
    assert HEX24.match(added["messageId"])


# -- store trouble ---------------------------------------------------------------------------------


def test_store_failure_is_a_500_with_details_and_recovers(h: Harness, c: RpcClient) -> None:
    h.run(h.store.stop())
    reply = h.request(c, "getAvailableMessageCount", {"connectionId": "s"})
    assert error_of(reply) == (500, "Internal server error")
    assert "store" in reply["error"]["data"]["details"]
    assert h.call(c, "addLiveSession", {"connectionId": "s", "sessionId": "x"}) is False
    h.run(h.store.start())
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "s"}) == 0


def test_a_hanging_store_call_times_out_with_an_error(h: Harness, c: RpcClient, monkeypatch: Any) -> None:
    async def hang(*args: Any) -> int:
        return await Deferred()

    monkeypatch.setattr(h.store, "count", hang)
    d = Deferred.fromCoroutine(c.request("getAvailableMessageCount", {"connectionId": "t"}, timeout=10))
    h.settle()
    assert not d.called
    h.clock.advance(1.5)
    h.settle()
    reply = h.run(_wait(d))
    assert error_of(reply) == (500, "Internal server error")
    assert "in time" in reply["error"]["data"]["details"]


async def _wait(d: Deferred[T]) -> T:
    return await d


async def _wait_failure(d: Deferred[Any]) -> Exception:
    try:
        await d
    except Exception as e:
        return e
    raise AssertionError("expected a failure")


def test_full_queue_is_a_named_error_and_nothing_is_stored(h: Harness, c: RpcClient) -> None:
    h.service.settings = dataclasses.replace(h.service.settings, max_queued=2)
    for _ in range(2):
        h.call(c, "addMessage", GOOD_ADD)
    reply = h.request(c, "addMessage", GOOD_ADD)
    assert error_of(reply) == (-32001, "Queue full")
    assert "full" in reply["error"]["data"]["details"]
    assert h.call(c, "getAvailableMessageCount", {"connectionId": "v"}) == 2
