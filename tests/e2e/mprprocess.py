"""Run ``twistd -n mpr`` as a child process on the test reactor (end-to-end and interop tests).

Everything is event driven: the process's output is read line by line through a
``ProcessProtocol`` and start-up is complete when the "serving:" log line appears (the
server writes it after the store is open and both listeners listen); a stop is complete
when the reactor reports the process ended. Every wait has a timeout, nothing sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from mpr_server.config import SETTINGS

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

SERVING = re.compile(
    rb"serving: store=(?P<store>\S+) websocket=(?P<ws>\S+):(?P<ws_port>\d+) http=(?P<http>\S+):(?P<http_port>\d+)"
)


def free_port() -> int:
    """A TCP port that was free a moment ago (for the tests of --ws-port/--app-port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_environ(**extra: str) -> dict[str, str]:
    """The test process's environment without any MPR setting (a developer's REDIS_URL must not
    switch the store), unbuffered output, plus ``extra``."""
    names = {s.env for s in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass(frozen=True)
class Exit:
    """How a child process ended: ``code`` for an exit, ``signal`` for a death by signal."""

    code: int | None
    signal: int | None


class _Child(ProcessProtocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.output = bytearray()
        self._partial = b""
        self.serving: Deferred[re.Match[bytes]] = Deferred()
        self.ended: Deferred[Exit] = Deferred()
        self.exit: Exit | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            match = SERVING.search(line)
            if match is not None and not self.serving.called:
                self.serving.callback(match)

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessTerminated):
            self.exit = Exit(value.exitCode, value.signal)
        elif isinstance(value, ProcessDone):
            self.exit = Exit(0, None)
        else:  # pragma: no cover - Twisted only reports the two above
            self.exit = Exit(None, None)
        if not self.serving.called:
            self.serving.errback(ChildError(f"the server ended ({self.exit}) before serving"))
            self.serving.addErrback(lambda _: None)  # delivered to start() if it waits; else expected
        self.ended.callback(self.exit)


class ChildError(Exception):
    pass


class MprProcess:
    """One MPR server (``twistd -n --pidfile= mpr``) with a fixed data dir; it can be killed and
    started again on the same ports and data dir.

    By default it listens on ``tcp:0:interface=127.0.0.1`` endpoints: the first start lets the
    kernel pick the ports (read back from the "serving:" line) and later starts reuse them. With
    ``port_options=True`` it passes ``--ws-port``/``--app-port`` with free ports instead (the
    operator's way; listens on all interfaces).
    """

    def __init__(
        self,
        reactor: Any,
        data_dir: str,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port_options: bool = False,
    ) -> None:
        self.reactor = reactor
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.env = clean_environ(**(env or {}))
        self.port_options = port_options
        self.ws_port = free_port() if port_options else 0
        self.app_port = free_port() if port_options else 0
        self.child: _Child | None = None
        self.transport: Any = None
        self.serving_line: re.Match[bytes] | None = None
        self.starts = 0
        self.outputs: list[bytes] = []  # output of every run, for failure messages

    # -- state ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.exit is None

    @property
    def output(self) -> str:
        return b"".join(self.outputs + ([bytes(self.child.output)] if self.child else [])).decode("utf-8", "replace")

    def args(self) -> list[str]:
        args = [TWISTD, "-n", "--pidfile=", "mpr", "--mpr-data-dir", self.data_dir]
        if self.port_options:
            args += ["--ws-port", str(self.ws_port), "--app-port", str(self.app_port)]
        else:
            args += [
                "--ws-endpoint",
                f"tcp:{self.ws_port}:interface=127.0.0.1",
                "--app-endpoint",
                f"tcp:{self.app_port}:interface=127.0.0.1",
            ]
        return args + self.extra_args

    # -- life cycle ---------------------------------------------------------------------------

    def spawn(self, args: Sequence[str]) -> _Child:
        """Start a child process with ``args`` (no waiting)."""
        assert not self.running, "the previous server process is still running"
        os.makedirs(self.data_dir, exist_ok=True)
        if self.child is not None:
            self.outputs.append(bytes(self.child.output))
        child = _Child(self.reactor)
        self.transport = self.reactor.spawnProcess(
            child, args[0], list(args), env=self.env, path=self.data_dir, childFDs={0: "w", 1: "r", 2: "r"}
        )
        self.child = child
        return child

    async def start(self, timeout: float = START_TIMEOUT) -> MprProcess:
        """Start the server and wait for its "serving:" line."""
        child = self.spawn(self.args())
        self.starts += 1
        serving = child.serving
        serving.addTimeout(timeout, self.reactor)
        try:
            match = await serving
        except Exception as e:
            await self.kill(signal.SIGKILL)
            raise ChildError(f"mpr-server did not start: {e!r}\n--- output ---\n{self.output}") from None
        self.serving_line = match
        self.ws_port = int(match["ws_port"])
        self.app_port = int(match["http_port"])
        return self

    async def wait_ended(self, timeout: float = STOP_TIMEOUT) -> Exit:
        assert self.child is not None
        if self.child.exit is not None:
            return self.child.exit
        waiter: Deferred[Exit] = Deferred()
        self.child.ended.addBoth(_relay, waiter)
        waiter.addTimeout(timeout, self.reactor)
        return await waiter

    async def kill(self, sig: int = signal.SIGKILL, timeout: float = STOP_TIMEOUT) -> Exit:
        """Send ``sig`` and wait until the process has ended."""
        assert self.child is not None
        if self.child.exit is None:
            self.transport.signalProcess(sig)
        return await self.wait_ended(timeout)

    async def restart(self, sig: int = signal.SIGTERM) -> MprProcess:
        """Stop with ``sig`` and start again on the same ports and data dir."""
        await self.kill(sig)
        return await self.start()

    async def cleanup(self) -> None:
        """Make sure no server process is left behind (always SIGKILL, the fastest)."""
        if self.running:
            await self.kill(signal.SIGKILL)


def _relay(result: Any, waiter: Deferred[Any]) -> Any:
    """Pass a shared Deferred's result to one waiter without consuming it for the others."""
    if waiter.called:
        return result
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
    return result
