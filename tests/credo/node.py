"""Run the Node tests of clients/credo (``node --test``) from pytest, against servers the test
started: the MPR URLs go to node through the environment.

The Node side is installed by scripts/install-credo (npm ci from the lock file, the ffi modules
rebuilt, libaries_askar.so cached under ~/.cache, the TypeScript built); when it is missing the
fixture runs that script once. Without node/npm, or if the install fails, the tests are skipped
loudly, or fail when MPR_TEST_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.services import unavailable

ROOT = Path(__file__).resolve().parent.parent.parent
CLIENT = ROOT / "clients" / "credo"
INSTALL = ROOT / "scripts" / "install-credo"
ASKAR_VERSION = "0.4.6"


def askar_dir() -> Path:
    """Where scripts/install-credo caches libaries_askar.so (same rule as the script)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mpr-server" / f"askar-{ASKAR_VERSION}"


def _installed() -> bool:
    return (
        (CLIENT / "node_modules" / ".mpr-install-stamp").is_file()
        and (CLIENT / "build" / "index.js").is_file()
        and (askar_dir() / "libaries_askar.so").is_file()
    )


@dataclass(frozen=True)
class CredoClient:
    node: str
    directory: Path
    env: Mapping[str, str]


@pytest.fixture(scope="session")
def credo_client() -> CredoClient:
    node = shutil.which("node")
    if node is None:
        unavailable("node (Node.js)", FileNotFoundError("node is not on PATH"))
    if not _installed():
        if shutil.which("npm") is None:
            unavailable("npm", FileNotFoundError("npm is not on PATH and clients/credo is not installed"))
        done = subprocess.run([str(INSTALL)], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not _installed():
            unavailable("the Credo client install (scripts/install-credo)", RuntimeError(done.stdout + done.stderr))
    env = {**os.environ, "LIB_ASKAR_PATH": str(askar_dir())}
    return CredoClient(node, CLIENT, env)


class _NodeRun(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[int | None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        code = value.exitCode if isinstance(value, (ProcessDone, ProcessTerminated)) else None
        if not self.ended.called:  # not after a timeout
            self.ended.callback(code)


@dataclass(frozen=True)
class NodeResult:
    code: int | None
    output: str

    @property
    def passed(self) -> int:
        return _tap_count(self.output, "pass")

    @property
    def failed(self) -> int:
        return _tap_count(self.output, "fail")


def _tap_count(output: str, name: str) -> int:
    for line in output.splitlines():
        if line.startswith(f"# {name} "):
            return int(line.split()[2])
    return -1


async def run_node_tests(
    reactor: Any, client: CredoClient, files: list[str], env: Mapping[str, str], timeout: float
) -> NodeResult:
    """``node --test`` on ``files`` (relative to clients/credo), one file at a time; SIGKILLed
    after ``timeout`` seconds."""
    run = _NodeRun()
    args = [client.node, "--test", "--test-concurrency=1", "--test-reporter=tap", *files]
    transport = reactor.spawnProcess(
        run, client.node, args, env={**client.env, **env}, path=str(client.directory), childFDs={0: "w", 1: "r", 2: "r"}
    )
    ended = run.ended
    ended.addTimeout(timeout, reactor)
    try:
        code = await ended
    except Exception:
        transport.signalProcess("KILL")
        raise AssertionError(
            f"node --test {' '.join(files)} did not end within {timeout} s:\n{run.output.decode(errors='replace')}"
        ) from None
    return NodeResult(code, run.output.decode(errors="replace"))
