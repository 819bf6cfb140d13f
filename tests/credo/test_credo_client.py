"""The Credo client's own tests (clients/credo/test/unit, Node's test runner) against a real
mpr-server that this test starts, and stops/starts/restarts on request of the Node test through a
small HTTP control endpoint (POST /stop, /start, /restart), on the same port and data dir."""

from __future__ import annotations

import signal
from typing import Any

import pytest_twisted
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from tests.credo.node import CredoClient, run_node_tests
from tests.e2e.mprprocess import MprProcess

UNIT = "test/unit/client.test.mjs"
NODE_TIMEOUT = 120.0


class Control(resource.Resource):
    isLeaf = True

    def __init__(self, mpr: MprProcess) -> None:
        super().__init__()
        self.mpr = mpr
        self.actions: list[str] = []

    def render_POST(self, request: Any) -> Any:
        action = request.path.decode().strip("/")
        if action not in ("stop", "start", "restart"):
            request.setResponseCode(404)
            return b"unknown action"
        self.actions.append(action)
        d = Deferred.fromCoroutine(self._run(action))

        def done(_: Any) -> None:
            request.write(b"ok")
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(str(failure.value).encode())
            request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    async def _run(self, action: str) -> None:
        port = self.mpr.ws_port
        if action in ("stop", "restart"):
            await self.mpr.kill(signal.SIGTERM)
        if action in ("start", "restart"):
            await self.mpr.start()
            assert self.mpr.ws_port == port


@pytest_twisted.ensureDeferred
async def test_credo_client_unit_tests(reactor: Any, credo_client: CredoClient, mpr: MprProcess) -> None:
    control = Control(mpr)
    listening = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(control))
    try:
        env = {
            "MPR_URL": f"ws://127.0.0.1:{mpr.ws_port}/",
            "MPR_CONTROL_URL": f"http://127.0.0.1:{listening.getHost().port}",
        }
        result = await run_node_tests(reactor, credo_client, [UNIT], env, NODE_TIMEOUT)
    finally:
        await listening.stopListening()
    report = f"{result.output[-12000:]}\n--- mpr ---\n{mpr.output[-4000:]}"
    assert result.code == 0 and result.failed == 0, report
    assert result.passed == 5, report
    assert control.actions == ["restart", "restart", "stop", "start"], report
