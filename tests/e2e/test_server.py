"""End to end: a real ``twistd mpr`` process (embedded store), used over real sockets the way a
Credo mediator uses it (wire-protocol.md), killed and restarted.

Every wait is on an event (a reply, a notification, a log line, a process exit) with a timeout.
"""

from __future__ import annotations

import json
import re
import signal
from typing import Any

import orjson
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.defer import TimeoutError as DeferredTimeout

from tests.e2e.conftest import Connect, ServerFactory
from tests.e2e.mprprocess import TWISTD, Exit, MprProcess
from tests.wsclient import RpcClient

HEX24 = re.compile(r"^[0-9a-f]{24}$")
ISO_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
DID_A = "did:key:z6MkAlice"
DID_B = "did:key:z6MkBob"


def jwe(tag: str, filler: int = 0) -> dict[str, Any]:
    """A DIDComm JWE-shaped payload whose keys are deliberately not in sorted order."""
    return {
        "protected": "eyJlbmMiOiJYQzIwUCJ9",
        "recipients": [{"header": {"kid": DID_A + "#key-1"}, "encrypted_key": "ek-" + tag}],
        "iv": "iv-" + tag,
        "ciphertext": "ct-" + tag + "x" * filler,
        "tag": tag,
        "aad": None,
        "n": 1.5,
        "é": "ünïcode",
    }


def size_of(payload: dict[str, Any]) -> int:
    """The size the server counts for limitBytes: UTF-8 length of the compact JSON."""
    return len(orjson.dumps(payload))


async def add(client: RpcClient, connection_id: str, payload: dict[str, Any], dids: list[str] | None = None) -> str:
    result = await client.call(
        "addMessage", {"connectionId": connection_id, "recipientDids": dids or [DID_A], "payload": payload}
    )
    assert isinstance(result, dict) and set(result) == {"messageId"}, result
    message_id = result["messageId"]
    assert HEX24.match(message_id), message_id
    return str(message_id)


async def count(client: RpcClient, connection_id: str, recipient_did: str | None = None) -> int:
    params = {"connectionId": connection_id}
    if recipient_did is not None:
        params["recipientDid"] = recipient_did
    result = await client.call("getAvailableMessageCount", params)
    assert type(result) is int, result
    return result


async def take(client: RpcClient, connection_id: str, **options: Any) -> list[dict[str, Any]]:
    result = await client.call("takeFromQueue", {"connectionId": connection_id, **options})
    assert isinstance(result, list), result
    for message in result:
        assert list(message) == ["id", "receivedAt", "encryptedMessage"], message
        assert HEX24.match(message["id"]) and ISO_MS_Z.match(message["receivedAt"]), message
    return result


def raw_payload_text(payload: dict[str, Any]) -> bytes:
    return b'"encryptedMessage":' + orjson.dumps(payload)


# -- a mediator's view ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_live_session_notification_ack_and_count(mpr: MprProcess, connect: Connect) -> None:
    m1 = await connect(mpr.ws_port, socket_id="m1")
    m2 = await connect(mpr.ws_port, socket_id="m2")

    assert await m1.call("rpc.on", ["messagesReceived"]) == {"messagesReceived": "ok"}
    assert await m1.call("rpc.on", ["messagesReceived"]) == {
        "messagesReceived": "socket has already been subscribed to event"
    }
    assert await m1.call("addLiveSession", {"connectionId": "c1", "sessionId": "s1"}) is True
    assert await m2.call("getLiveSession", {"connectionId": "c1"}) is True
    assert await m2.call("getLiveSession", {"connectionId": "nobody"}) is False
    assert await m2.call("ping") == "pong"

    payload = jwe("live")
    message_id = await add(m2, "c1", payload)

    notification = await m1.next_notification()
    assert notification == {
        "jsonrpc": "2.0",
        "method": "messagesReceived",
        "params": {"connectionId": "c1", "messages": [notification["params"]["messages"][0]], "id": ""},
    }
    [message] = notification["params"]["messages"]
    assert message["id"] == message_id
    assert ISO_MS_Z.match(message["receivedAt"]), message
    assert message["encryptedMessage"] == payload
    # The exact JSON text, key order included, is what the mediator forwards to the wallet.
    notification_frames = [f for f in m1.raw_frames if b'"messagesReceived"' in f and b'"method"' in f]
    assert len(notification_frames) == 1
    assert raw_payload_text(payload) in notification_frames[0]
    assert b'"id":""}' in notification_frames[0]
    assert not m2.notifications.pending, "only the socket holding the live session is notified"

    # The delivered message is leased (in flight) until acknowledged: not counted, not taken.
    assert await count(m2, "c1") == 0
    assert await take(m2, "c1") == []
    assert await m1.call("removeMessages", {"connectionId": "c1", "messageIds": [message_id]}) is True
    assert await count(m2, "c1") == 0

    # Only the socket holding the session may remove it without naming the session.
    assert await m2.call("removeLiveSession", {"connectionId": "c1"}) is False
    assert await m2.call("getLiveSession", {"connectionId": "c1"}) is True
    assert await m1.call("removeLiveSession", {"connectionId": "c1"}) is True
    assert await m1.call("getLiveSession", {"connectionId": "c1"}) is False

    # Without a live session the message stays pending: counted, then taken with its exact text.
    later = jwe("later")
    later_id = await add(m2, "c1", later)
    assert await count(m2, "c1") == 1
    frames_before = len(m2.raw_frames)
    [queued] = await take(m2, "c1")
    assert queued["id"] == later_id and queued["encryptedMessage"] == later
    assert raw_payload_text(later) in m2.raw_frames[frames_before]
    assert await m1.call("rpc.off", ["messagesReceived"]) == {"messagesReceived": "ok"}
    assert not m1.notifications.pending


@pytest_twisted.ensureDeferred
async def test_take_limit_bytes_delete_and_recipient_filter(mpr: MprProcess, connect: Connect) -> None:
    m = await connect(mpr.ws_port)
    other = await connect(mpr.ws_port)

    payloads = [jwe(f"m{i}", filler=10 * i) for i in range(5)]
    dids = [[DID_A], [DID_B], [DID_A, DID_B], [DID_A], [DID_B]]
    ids = [await add(m, "c2", p, d) for p, d in zip(payloads, dids, strict=True)]
    assert len(set(ids)) == 5
    assert await count(m, "c2") == 5
    assert await count(m, "c2", DID_A) == 3
    assert await count(m, "c2", DID_B) == 3
    assert await count(m, "c2", "did:key:nobody") == 0
    assert await count(m, "elsewhere") == 0

    # limit: the oldest first, exactly `limit` of them; they are leased (not counted) afterwards.
    first = await take(other, "c2", limit=2)
    assert [x["id"] for x in first] == ids[:2]
    assert [x["encryptedMessage"] for x in first] == payloads[:2]
    assert await count(m, "c2") == 3

    # limitBytes: stops before the total would exceed it (equality fits).
    budget = size_of(payloads[2]) + size_of(payloads[3])
    second = await take(other, "c2", limitBytes=budget)
    assert [x["id"] for x in second] == ids[2:4]
    assert await count(m, "c2") == 1
    assert await take(other, "c2", limitBytes=size_of(payloads[4]) - 1) == [], "too big for the budget"

    # recipientDid + deleteMessages (Pickup v1): removed at once, never leased nor seen again.
    assert await take(other, "c2", recipientDid=DID_A, deleteMessages=True) == []
    [last] = await take(other, "c2", recipientDid=DID_B, deleteMessages=True)
    assert last["id"] == ids[4]
    assert await count(m, "c2") == 0

    # A message too large for limitBytes on its own is skipped, it does not block the queue.
    big, small = jwe("big", filler=1000), jwe("small")
    big_id = await add(m, "c3", big)
    small_id = await add(m, "c3", small)
    assert [x["id"] for x in await take(m, "c3", limitBytes=size_of(small) + 10)] == [small_id]

    # recipientDid filter is connection AND recipient; removeAllMessages deletes by recipient.
    x_ids = [await add(m, "c4", jwe(f"x{i}"), d) for i, d in enumerate([[DID_A], [DID_B], [DID_A, DID_B]])]
    await add(m, "c5", jwe("c5"), [DID_B])  # another connection, same recipient
    assert [x["id"] for x in await take(m, "c4", recipientDid=DID_B, limit=1)] == [x_ids[1]]
    assert await m.call("removeAllMessages", {"connectionId": "c4", "recipientDid": DID_A}) is True
    assert await count(m, "c4") == 0  # x0 and x2 removed, x1 leased
    assert await count(m, "c5", DID_B) == 1
    # removeMessages of another connection's ids touches nothing.
    assert await m.call("removeMessages", {"connectionId": "c4", "messageIds": [big_id]}) is True
    assert await count(m, "c3") == 1
    # Unknown ids are ignored.
    assert await m.call("removeMessages", {"connectionId": "c3", "messageIds": ["0" * 24, big_id]}) is True
    assert await count(m, "c3") == 0


# -- durability and restarts ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_acknowledged_adds_survive_kill_9_and_leases_are_released(
    mpr: MprProcess, connect: Connect, reactor: Any
) -> None:
    n = 200
    writer = await connect(mpr.ws_port)
    taker = await connect(mpr.ws_port, socket_id="taker")
    payloads = [jwe(f"d{i}", filler=i % 17) for i in range(n + 20)]

    async def add_all(indexes: range) -> list[str]:
        calls = [Deferred.fromCoroutine(add(writer, "dur", payloads[i])) for i in indexes]
        return list(await gatherResults(calls))

    ids = await add_all(range(n))
    assert len(set(ids)) == n
    removed = {ids[i] for i in range(0, n, 5)}
    # One ack of 40 ids (the original only looked at the first 24 of a list).
    assert await writer.call("removeMessages", {"connectionId": "dur", "messageIds": sorted(removed)}) is True
    kept = [i for i in range(n) if ids[i] not in removed]
    leased = await take(taker, "dur", limit=10)
    assert [m["id"] for m in leased] == [ids[i] for i in kept[:10]]
    assert await count(writer, "dur") == len(kept) - 10
    ids += await add_all(range(n, n + 20))
    kept += list(range(n, n + 20))

    ended = await mpr.kill(signal.SIGKILL)  # right after the last reply arrived
    assert ended.signal == signal.SIGKILL, ended
    await writer.closed
    await mpr.start()

    reader = await connect(mpr.ws_port)
    assert await count(reader, "dur") == len(kept), "leases of the dead process are released"
    frames_before = len(reader.raw_frames)
    survived = await take(reader, "dur")
    assert [m["id"] for m in survived] == [ids[i] for i in kept], "every acknowledged add once, oldest first"
    assert not removed & {m["id"] for m in survived}, "a removed message came back"
    assert [m["encryptedMessage"] for m in survived] == [payloads[i] for i in kept]
    assert raw_payload_text(payloads[kept[-1]]) in reader.raw_frames[frames_before]
    assert await count(reader, "dur") == 0


@pytest_twisted.ensureDeferred
async def test_sigterm_closes_mediator_sockets_with_1001(mpr: MprProcess, connect: Connect) -> None:
    m = await connect(mpr.ws_port, socket_id="m1")
    assert await m.call("rpc.on", ["messagesReceived"]) == {"messagesReceived": "ok"}
    message_id = await add(m, "c1", jwe("term"))

    ended = await mpr.kill(signal.SIGTERM)
    code = await m.closed
    assert code == 1001, f"close code {code}: the client reconnects only when it is not 1000"
    # twistd re-raises the signal it stopped on after a graceful shutdown (Twisted's choice).
    assert ended in (Exit(0, None), Exit(None, signal.SIGTERM)), ended
    assert "Main loop terminated" in mpr.output, mpr.output

    # A clean stop keeps the queue, of course.
    await mpr.start()
    again = await connect(mpr.ws_port)
    assert [x["id"] for x in await take(again, "c1")] == [message_id]


async def http_get(reactor: Any, url: str) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    response = await treq.get(url, reactor=reactor, timeout=5)
    body = await treq.content(response)
    return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest_twisted.ensureDeferred
async def test_port_options_health_ready_and_embedded_default(
    mpr_servers: ServerFactory, connect: Connect, reactor: Any
) -> None:
    server = mpr_servers(port_options=True)
    ws_port, app_port = server.ws_port, server.app_port
    await server.start()
    assert server.serving_line is not None
    assert (server.ws_port, server.app_port) == (ws_port, app_port)
    assert server.serving_line["ws"] == b"0.0.0.0" and server.serving_line["http"] == b"0.0.0.0"
    # No Redis or MongoDB configured (the environment is cleaned of them): the embedded store.
    assert server.serving_line["store"].startswith(b"embedded:"), server.serving_line[0]

    code, headers, body = await http_get(reactor, f"http://127.0.0.1:{app_port}/health")
    assert code == 200
    assert headers[b"Content-Type"] == [b"application/json"]
    health = json.loads(body)
    assert health["status"] == "ok" and health["store"] == "embedded", health

    code, headers, body = await http_get(reactor, f"http://127.0.0.1:{app_port}/ready")
    assert code == 200, body
    assert json.loads(body)["status"] == "ready"

    m = await connect(ws_port)
    assert await m.call("ping") == "pong"
    # On every interface without authentication: the operator is told, before "serving:".
    warning = server.output.index("authentication is off")
    assert warning < server.output.index("serving:"), server.output
    assert "MPR_AUTH_TOKENS" in server.output[warning:]


@pytest_twisted.ensureDeferred
async def test_loopback_or_authenticated_listeners_get_no_exposure_warning(
    mpr: MprProcess, mpr_servers: ServerFactory
) -> None:
    assert "authentication is off" not in mpr.output, mpr.output
    authenticated = mpr_servers(port_options=True, env={"MPR_AUTH_TOKENS": "a-shared-secret-of-16+"})
    await authenticated.start()
    assert "authentication is off" not in authenticated.output, authenticated.output


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL"),
        ({"REDIS_TYPE": "cluster", "REDIS_NODES": "redis-a"}, "REDIS_NODES"),
        ({"MPR_STORE": "redis", "REDIS_NATMAP": "10.0.0.1:6379"}, "REDIS_NATMAP"),
        ({"MONGODB_URI": "mongo://db/x"}, "MONGODB_URI"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_store_addresses_exit_1_naming_the_variable_without_a_traceback(
    mpr_servers: ServerFactory, env: dict[str, str], named: str
) -> None:
    server = mpr_servers(env=env)
    server.spawn([TWISTD, "-n", "--pidfile=", "mpr"])
    ended = await server.wait_ended()
    assert ended.code == 1, (ended, server.output)
    assert f"{named}" in server.output and "is invalid" in server.output, server.output
    assert "Traceback" not in server.output, server.output


@pytest_twisted.ensureDeferred
async def test_invalid_ws_port_stops_start_up_naming_the_variable(mpr_servers: ServerFactory) -> None:
    server = mpr_servers()
    server.spawn([TWISTD, "-n", "--pidfile=", "mpr", "--ws-port", "notaport"])
    ended = await server.wait_ended()
    assert ended.code not in (0, None), ended
    assert "WS_PORT" in server.output and "notaport" in server.output, server.output

    by_env = mpr_servers(env={"WS_PORT": "70000"})
    by_env.spawn([TWISTD, "-n", "--pidfile=", "mpr"])
    ended = await by_env.wait_ended()
    assert ended.code not in (0, None), ended
    assert "WS_PORT" in by_env.output, by_env.output


# A server that cannot start must exit (non-zero) so that a supervisor notices and restarts it;
# these start-up failures happen before the reactor runs.
FAILED_START_TIMEOUT = 5.0


async def expect_failed_start(server: MprProcess) -> Exit:
    server.spawn(server.args())
    try:
        ended = await server.wait_ended(FAILED_START_TIMEOUT)
    except DeferredTimeout:
        pytest.fail(f"the server is still running {FAILED_START_TIMEOUT} s after a failed start:\n{server.output}")
    assert ended.code not in (0, None), ended
    return ended


@pytest_twisted.ensureDeferred
async def test_second_server_on_the_same_data_dir_is_refused(mpr: MprProcess, mpr_servers: ServerFactory) -> None:
    twin = mpr_servers(data_dir=mpr.data_dir)
    await expect_failed_start(twin)
    assert "in use" in twin.output, twin.output
    assert mpr.running


@pytest_twisted.ensureDeferred
async def test_websocket_port_in_use_exits_non_zero(mpr: MprProcess, mpr_servers: ServerFactory) -> None:
    other = mpr_servers()
    other.ws_port = mpr.ws_port  # taken by the running server
    await expect_failed_start(other)
    assert str(mpr.ws_port) in other.output, other.output
