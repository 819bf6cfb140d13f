"""mongod started and stopped by pid: plain, with a root user (--auth), requiring TLS, or as a
replica set whose first member is the primary."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from scripts.services.install import ensure_mongod
from scripts.services.process import HOST, ServiceError, free_port, stop_pid, wait_until


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
        wait_until(lambda: mongo_ping(port, tls=context), f"mongod on port {port}", timeout, proc, log)
        if auth:
            user, password = auth
            roles = [{"role": "root", "db": "admin"}]
            mongo_command(port, {"createUser": user, "pwd": password, "roles": roles}, tls=context)
        if repl_set and initiate:
            config = {"_id": repl_set, "members": [{"_id": 0, "host": f"{HOST}:{port}"}]}
            mongo_command(port, {"replSetInitiate": config}, tls=context)
            wait_until(lambda: _mongo_is(port, context, "primary"), f"mongod {port} primary", timeout, proc, log)
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
        wait_until(lambda: _stepped_up(rs.primary_port), f"replica set {name} primary", timeout)
        for port in rs.ports[1:]:
            wait_until(partial(_mongo_is, port, None, "secondary"), f"replica set {name} secondary", timeout)
    except BaseException:
        rs.stop()
        raise
    return rs
