"""MPR_WORKERS: one ``twistd mpr`` supervising worker processes that share its WebSocket port, on
real Redis and mongod. Whichever worker a mediator lands on, it is one MPR: notifications cross
workers, a killed worker is started again while the other serves, SIGTERM closes every socket
with 1001, and the supervisor's /health, /ready and /metrics speak for all the workers."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import orjson
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task

from tests.e2e.conftest import Connect, MongoDb, ServerFactory, uid
from tests.e2e.mprprocess import Exit, MprProcess
from tests.e2e.test_distributed import store_args
from tests.e2e.test_server import add, http_get, jwe

WORKERS = 2
SOCKETS = 8
DEADLINE_S = 20.0


async def health(reactor: Any, server: MprProcess) -> tuple[int, dict[str, Any]]:
    code, _, body = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/health")
    return code, orjson.loads(body)


async def until(reactor: Any, what: str, check: Any) -> Any:
    """Poll ``check()`` (a coroutine function) until it returns something truthy, within DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"not within {DEADLINE_S} s: {what}")


@pytest_twisted.ensureDeferred
async def test_workers_share_the_port_and_act_as_one_mpr(
    reactor: Any, redis_single: Any, mongo_db: MongoDb, mpr_servers: ServerFactory, connect: Connect
) -> None:
    db = mongo_db
    run = uid()
    server = mpr_servers(
        extra_args=store_args(["--redis-url", redis_single.url], db.uri, f"w-{run}", "--mpr-workers", "2")
    )
    await server.start()
    code, status = await health(reactor, server)
    assert code == 200 and len(status["workers"]) == WORKERS, status
    pids = {w["pid"] for w in status["workers"]}
    instances = {w["instance"] for w in status["workers"]}
    assert len(pids) == WORKERS and len(instances) == WORKERS and server.transport.pid not in pids

    # Many sockets, so that both workers get some; each connection's live session is on one of them.
    sockets = [await connect(server.ws_port, socket_id=f"m{i}-{run}") for i in range(SOCKETS)]
    for i, receiver in enumerate(sockets):
        assert await receiver.call("addLiveSession", {"connectionId": f"c{i}-{run}", "sessionId": "s"}) is True
    for i, receiver in enumerate(sockets):
        for sender in sockets:
            message_id = await add(sender, f"c{i}-{run}", jwe(f"{i}"))
            note = await receiver.next_notification()
            assert [m["id"] for m in note["params"]["messages"]] == [message_id]
            await receiver.call("removeMessages", {"connectionId": f"c{i}-{run}", "messageIds": [message_id]})

    code, _, body = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/metrics")
    assert code == 200
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "mpr_calls_total" and sample.labels["method"] == "addMessage":
                worker = sample.labels["worker"]
                calls[worker] = calls.get(worker, 0) + sample.value
    assert set(calls) == {"0", "1"} and sum(calls.values()) == SOCKETS * SOCKETS
    code, _, _ = await http_get(reactor, f"http://127.0.0.1:{server.app_port}/ready")
    assert code == 200

    # A worker killed: started again while the other one serves.
    victim = status["workers"][0]
    os.kill(victim["pid"], signal.SIGKILL)

    async def back() -> Any:
        code, now = await health(reactor, server)
        w = now["workers"][0]
        return code == 200 and w["restarts"] == 1 and w["pid"] != victim["pid"] and now

    after = await until(reactor, "the killed worker serves again", back)
    assert after["workers"][1]["pid"] == status["workers"][1]["pid"]  # the other one never stopped
    fresh = await connect(server.ws_port, socket_id=f"fresh-{run}")
    await add(fresh, f"after-{run}", jwe("after"))

    # SIGTERM: every worker closes its sockets with 1001 and the supervisor ends as twistd does.
    open_sockets = [s for s in [*sockets, fresh] if not s.closed.called]
    ended = await server.kill(signal.SIGTERM)
    assert ended in (Exit(0, None), Exit(None, signal.SIGTERM)), (ended, server.output)
    codes = [await s.closed for s in open_sockets]
    assert set(codes) == {1001}, codes
