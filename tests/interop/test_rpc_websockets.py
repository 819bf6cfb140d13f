"""Interoperability with the npm transport every mediator in the field uses: rpc-websockets 7.11.2,
driven by tests/interop/client.js the way @2060.io/message-pickup-repository-client 0.0.8 uses it,
across a server restart (SIGTERM, then a new process on the same port and data dir).

Needs ``node`` (and ``npm`` the first time, to install tests/interop/node_modules from the lock
file). Without them the test is skipped loudly, or fails when MPR_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.e2e.mprprocess import MprProcess
from tests.services import unavailable

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "client.js"
RPC_WEBSOCKETS_VERSION = "7.11.2"
LINE_TIMEOUT = 20.0
HEX24 = re.compile(r"^[0-9a-f]{24}$")


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with tests/interop/node_modules installed from package-lock.json."""
    node = shutil.which("node")
    if node is None:
        unavailable("node (Node.js)", FileNotFoundError("node is not on PATH"))
    installed = HERE / "node_modules" / "rpc-websockets" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != RPC_WEBSOCKETS_VERSION:
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm", FileNotFoundError("npm is not on PATH and tests/interop/node_modules is missing"))
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            unavailable("npm ci in tests/interop", RuntimeError(done.stdout + done.stderr))
    assert json.loads(installed.read_text())["version"] == RPC_WEBSOCKETS_VERSION
    return node


class NodeScript(ProcessProtocol):
    """The client script as a child process: stdout as a queue of parsed JSON lines."""

    def __init__(self) -> None:
        self.lines: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.stderr = bytearray()
        self.stdout = bytearray()
        self._partial = b""
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.lines.put(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = value.exitCode if isinstance(value, (ProcessDone, ProcessTerminated)) else None
        self.ended.callback(code)
        self.lines.put({"ended": code})  # wakes a reader waiting for a line that will never come

    async def next_line(self, reactor: Any, timeout: float = LINE_TIMEOUT) -> dict[str, Any]:
        d = self.lines.get()
        d.addTimeout(timeout, reactor)
        try:
            return await d
        except Exception as e:
            raise AssertionError(f"no line from client.js ({e!r}); stderr:\n{self.stderr.decode()}") from None


@pytest_twisted.ensureDeferred
async def test_official_client_transport_calls_every_method_and_reconnects(
    node: str, reactor: Any, tmp_path: Path
) -> None:
    server = MprProcess(reactor, str(tmp_path / "data"))
    script = NodeScript()
    transport: Any = None
    try:
        await server.start()
        transport = reactor.spawnProcess(
            script,
            node,
            [node, str(SCRIPT), f"ws://127.0.0.1:{server.ws_port}/"],
            env={**os.environ},
            path=str(HERE),
        )
        steps: dict[str, dict[str, Any]] = {}
        restarted = False
        while True:
            line = await script.next_line(reactor)
            if line.get("event") == "READY_FOR_RESTART":
                port = server.ws_port
                await server.restart(signal.SIGTERM)
                assert server.ws_port == port
                restarted = True
                transport.write(b"RESTARTED\n")
            elif "done" in line:
                done = line
                break
            elif "ended" in line:
                raise AssertionError(
                    f"client.js exited ({line['ended']}) early; steps: {steps}\nstderr:\n{script.stderr.decode()}"
                    f"\nserver:\n{server.output[-4000:]}"
                )
            else:
                steps[line["step"]] = line
        ending = script.ended
        ending.addTimeout(10, reactor)
        exit_code = await ending
    finally:
        if transport is not None and script.ended is not None and not script.ended.called:
            transport.signalProcess("KILL")
        await server.cleanup()

    failed = {name: s["error"] for name, s in steps.items() if not s["ok"]}
    report = (
        f"failed steps: {failed}\ndone: {done}\nstderr:\n{script.stderr.decode()}\nserver:\n{server.output[-4000:]}"
    )
    assert done == {"done": True, "ok": True} and not failed, report
    assert exit_code == 0, report
    assert restarted

    def result(name: str) -> Any:
        assert name in steps, f"step {name} missing: {report}"
        return steps[name]["result"]

    assert result("subscribe") == {"messagesReceived": "ok"}
    assert result("addLiveSession") is True
    assert result("getLiveSession") is True
    added = result("addMessage-live")
    assert list(added) == ["messageId"] and HEX24.match(added["messageId"])
    event = result("messagesReceived")
    assert event["connectionId"] == "live" and event["id"] == ""
    assert [m["id"] for m in event["messages"]] == [added["messageId"]]
    assert result("removeMessages") is True
    assert HEX24.match(result("addMessage-queued")["messageId"])
    assert HEX24.match(result("addMessage-legacy-token")["messageId"])
    assert result("getAvailableMessageCount") == 2
    [taken] = result("takeFromQueue")
    assert taken["id"] == result("addMessage-queued")["messageId"]
    assert [m["id"] for m in result("takeFromQueue-recipient")] == [result("addMessage-legacy-token")["messageId"]]
    assert result("removeAllMessages") is True
    assert result("getAvailableMessageCount-after-removeAll") == 0
    assert result("removeLiveSession") is True
    assert result("getLiveSession-after-remove") is False
    assert result("ping") == "pong"

    assert result("close") == {"code": 1001}
    assert result("reconnected") is True
    assert result("subscribe-after-restart") == {"messagesReceived": "ok"}
    assert result("ping-after-restart") == "pong"
    assert result("getAvailableMessageCount-after-restart") == 1
    assert result("addLiveSession-after-restart") is True
    again = result("addMessage-after-restart")["messageId"]
    assert [m["id"] for m in result("messagesReceived-after-restart")["messages"]] == [again]
