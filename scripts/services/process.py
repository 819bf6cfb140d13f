"""Free loopback ports, signalling only the processes we started, and waiting for a condition."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped."""


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False, exclude: Sequence[int] = ()) -> int:
    """A free loopback port; with_bus also needs port + 10000 free (cluster bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port in exclude:
            continue
        if with_bus and (port + 10000 > 65535 or port + 10000 in exclude or not port_free(port + 10000)):
            continue
        return port
    raise ServiceError("no free port found")


def accepts(port: int, host: str = HOST, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.create_connection((host, port), timeout=timeout):
        return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def signal_pid(pid: int, expect: str, sig: signal.Signals) -> None:
    """Send `sig` to exactly `pid`, provided its command line contains `expect`."""
    if expect not in cmdline(pid):
        raise ServiceError(f"pid {pid} is not {expect!r} ({cmdline(pid)!r}); not sending it {sig.name}")
    os.kill(pid, sig)


def stop_pid(pid: int, expect: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """SIGTERM exactly `pid` if its command line contains `expect`, and wait for it to exit."""
    if proc is not None and proc.poll() is not None:
        return
    if exited(pid):
        return
    signal_pid(pid, expect, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)  # a SIGSTOPped server (a fault test) acts on SIGTERM only once continued
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            try:
                proc.wait(timeout=0.05)
                return
            except subprocess.TimeoutExpired:
                continue
        if exited(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Call `check` until it returns true; fail if `proc` exits (with the tail of `log`) or on timeout.

    An OSError or ServiceError from `check` counts as "not yet" (and is reported on timeout).
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ServiceError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except (OSError, ServiceError) as e:
            last = e
        time.sleep(0.02)
    raise ServiceError(f"{what}: not ready after {timeout}s ({last})")
