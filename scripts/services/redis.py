"""One redis-server, or a Redis Cluster (with replicas if asked), started and stopped by pid;
crashing (SIGKILL) or freezing (SIGSTOP) a node for fault tests; a small RESP client for the
readiness and cluster checks."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from scripts.services.install import ensure_redis
from scripts.services.process import HOST, ServiceError, exited, free_port, signal_pid, stop_pid, wait_until

# ---------------------------------------------------------------------------
# a minimal RESP client (readiness checks and cluster checks only)


def resp_command(port: int, *args: str | int, host: str = HOST, timeout: float = 2.0) -> object:
    with socket.create_connection((host, port), timeout=timeout) as s:
        parts = [str(a).encode() for a in args]
        s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return _read_reply(s.makefile("rb"))


def _read_reply(f: BinaryIO) -> object:
    line = f.readline()
    if not line:
        raise ServiceError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise ServiceError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ServiceError(f"bad RESP reply {line!r}")


# ---------------------------------------------------------------------------
# servers


def _redis_answers(port: int) -> bool:
    try:
        return resp_command(port, "PING") == "PONG"
    except ServiceError as e:
        if str(e).startswith("NOAUTH"):  # started with --requirepass: it answers
            return True
        raise


@dataclass
class RedisServer:
    host: str
    port: int
    pid: int
    dir: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    owns_dir: bool = True

    def stop(self, remove_dir: bool | None = None) -> None:
        stop_pid(self.pid, "redis-server", self.proc)
        if self.owns_dir if remove_dir is None else remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL exactly this server (a crash, for fault tests) and wait until it is gone."""
        if (self.proc is not None and self.proc.poll() is not None) or exited(self.pid):
            return
        signal_pid(self.pid, "redis-server", signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=timeout)
            return
        wait_until(lambda: exited(self.pid), f"redis-server pid {self.pid} to exit", timeout)

    def freeze(self) -> None:
        """SIGSTOP exactly this server: it keeps its connections open but answers nothing (a
        hung node; a fault test). SIGKILL and stop() end a frozen server too."""
        signal_pid(self.pid, "redis-server", signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT exactly this server: a frozen server resumes where it stopped."""
        signal_pid(self.pid, "redis-server", signal.SIGCONT)

    def to_json(self) -> dict[str, object]:
        return {"kind": "redis", "host": self.host, "port": self.port, "pid": self.pid, "dir": self.dir}


def start_redis(
    port: int | None = None,
    *,
    dir: str | None = None,
    aof: bool = False,
    extra_args: Sequence[str] = (),
    detach: bool = False,
    timeout: float = 10.0,
) -> RedisServer:
    """Start one redis-server on 127.0.0.1 (no persistence unless aof=True)."""
    server = ensure_redis()
    owns_dir = dir is None
    workdir = dir or tempfile.mkdtemp(prefix="mpr-redis-")
    port = port or free_port()
    log = Path(workdir) / f"redis-{port}.log"
    args = [
        server,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "yes" if aof else "no",
        "--dir",
        workdir,
        "--logfile",
        str(log),
        "--daemonize",
        "no",
        *extra_args,
    ]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach
    )
    handle = RedisServer(HOST, port, proc.pid, workdir, proc, owns_dir)
    try:
        wait_until(lambda: _redis_answers(port), f"redis-server on port {port}", timeout, proc, log)
    except BaseException:
        handle.stop()
        raise
    return handle


@dataclass
class RedisCluster:
    nodes: list[RedisServer]
    dir: str

    @property
    def host(self) -> str:
        return HOST

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes]

    def node(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def stop(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop(remove_dir=False)
            except Exception as e:  # keep stopping the others
                errors.append(e)
        shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise ServiceError(f"stopping cluster nodes: {errors}")

    def to_json(self) -> dict[str, object]:
        return {"kind": "cluster", "host": HOST, "ports": self.ports, "pids": self.pids, "dir": self.dir}


def _cluster_ready(ports: Sequence[int], masters: int, replicas: int) -> bool:
    for port in ports:
        info = str(resp_command(port, "CLUSTER", "INFO"))
        fields = dict(line.split(":", 1) for line in info.split("\r\n") if ":" in line)
        if fields.get("cluster_state") != "ok" or fields.get("cluster_known_nodes") != str(len(ports)):
            return False
        if fields.get("cluster_size") != str(masters):
            return False
        roles = [line.split()[2] for line in str(resp_command(port, "CLUSTER", "NODES")).splitlines()]
        if sum("master" in r for r in roles) != masters or sum("slave" in r for r in roles) != masters * replicas:
            return False
        # a replica is of use (WAIT, failover) once its initial sync is done
        replication = str(resp_command(port, "INFO", "replication"))
        if "role:slave" in replication and "master_link_status:up" not in replication:
            return False
    return True


def start_redis_cluster(
    masters: int = 3,
    replicas: int = 0,
    *,
    node_timeout_ms: int = 5000,
    detach: bool = False,
    timeout: float = 30.0,
) -> RedisCluster:
    """Start a Redis Cluster of `masters` masters (and `replicas` replicas each) and wait until
    every node sees it ok, with the expected roles and every replica in sync with its master.

    `node_timeout_ms` is cluster-node-timeout: how long a node may be unreachable before it is
    failed over (a failover test wants it short).
    """
    ensure_redis()
    workdir = tempfile.mkdtemp(prefix="mpr-redis-cluster-")
    ports: list[int] = []
    for _ in range(masters * (1 + replicas)):
        ports.append(free_port(with_bus=True, exclude=ports + [p + 10000 for p in ports]))
    cluster = RedisCluster([], workdir)
    try:
        for port in ports:
            node_dir = Path(workdir) / str(port)
            node_dir.mkdir()
            cluster.nodes.append(
                start_redis(
                    port,
                    dir=str(node_dir),
                    detach=detach,
                    extra_args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(node_dir / "nodes.conf"),
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            )
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{HOST}:{p}" for p in ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if create.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed:\n{create.stdout[-2000:]}{create.stderr}")
        wait_until(lambda: _cluster_ready(ports, masters, replicas), "redis cluster", timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
