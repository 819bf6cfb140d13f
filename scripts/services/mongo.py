"""mongod started and stopped by pid: plain, with a root user (--auth), requiring TLS, or as a
replica set whose first member is the primary. Admin commands go through pymongo."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from scripts.services.install import ensure_mongod
from scripts.services.process import HOST, ServiceError, accepts, free_port, stop_pid, wait_until


@dataclass(frozen=True)
class MongoTLS:
    """TLS files for a test mongod (all PEM)."""

    certificate_key_file: str
    """The server's certificate followed by its private key."""
    ca_file: str
    """The CA the server trusts for client certificates (and that readiness checks trust)."""
    client_certificate_key_file: str | None = None
    """A client certificate + key: clients must then present one; None: clients need none."""


Client = MongoClient[dict[str, Any]]


def mongo_client(port: int, *, tls: MongoTLS | None = None, host: str = HOST, timeout: float = 5.0) -> Client:
    """A pymongo client for admin commands on exactly this mongod (no replica-set discovery).

    With `tls` the server's chain is verified against tls.ca_file, its host name is not.
    """
    options: dict[str, Any] = {}
    if tls is not None:
        options.update(tls=True, tlsCAFile=tls.ca_file, tlsAllowInvalidHostnames=True)
        if tls.client_certificate_key_file:
            options["tlsCertificateKeyFile"] = tls.client_certificate_key_file
    ms = int(timeout * 1000)
    return MongoClient(
        host,
        port,
        directConnection=True,
        serverSelectionTimeoutMS=ms,
        connectTimeoutMS=ms,
        socketTimeoutMS=ms,
        appname="mpr-services",
        **options,
    )


def mongo_command(client: Client, command: dict[str, Any]) -> dict[str, Any]:
    """Run one command in the admin database; any failure (unreachable, not ok: 1) raises ServiceError."""
    try:
        return client.admin.command(command)
    except PyMongoError as e:
        where = ", ".join(f"{h}:{p}" for h, p in client.topology_description.server_descriptions())
        raise ServiceError(f"{next(iter(command))} on mongod {where}: {e}") from e


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

    def stop(self, remove_dir: bool = True) -> None:
        """SIGTERM (a clean shutdown) and wait; remove_dir=False keeps the data for a restart
        (``start_mongod(port, dir=...)``)."""
        stop_pid(self.pid, "mongod", self.proc, timeout=30.0)
        if remove_dir:
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


def _mongo_is(client: Client, role: str) -> bool:
    hello = mongo_command(client, {"hello": 1})
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
    dir: str | None = None,
) -> MongoServer:
    """Start a throwaway mongod on 127.0.0.1 with a small cache and journal.

    auth=(user, password): run with --auth and create that user (role root, in admin) through
    the localhost exception. tls: require TLS with these files. repl_set: run as a member of that
    replica set and, with initiate, make it a one-member set and wait until it is primary.
    dir: the work directory of a stopped mongod (MongoServer.dir) to start again on its data.
    """
    if auth and repl_set:
        raise ServiceError("start_mongod: auth with a replica set (needs a keyFile) is not supported")
    mongod = ensure_mongod()
    workdir = dir or tempfile.mkdtemp(prefix="mpr-mongod-")
    port = port or free_port()
    dbpath = Path(workdir) / "db"
    dbpath.mkdir(exist_ok=dir is not None)
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
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach
    )
    handle = MongoServer(HOST, port, proc.pid, workdir, proc, repl_set, auth, tls)
    what = f"mongod on port {port}"
    try:
        wait_until(lambda: accepts(port), what, timeout, proc, log)
        with mongo_client(port, tls=tls) as client:
            wait_until(lambda: bool(mongo_command(client, {"ping": 1})), what, timeout, proc, log)
            if auth:
                user, password = auth
                roles = [{"role": "root", "db": "admin"}]
                mongo_command(client, {"createUser": user, "pwd": password, "roles": roles})
            if repl_set and initiate:
                config = {"_id": repl_set, "members": [{"_id": 0, "host": f"{HOST}:{port}"}]}
                mongo_command(client, {"replSetInitiate": config})
                wait_until(lambda: _mongo_is(client, "primary"), f"mongod {port} primary", timeout, proc, log)
    except BaseException:
        handle.stop(remove_dir=dir is None)
        raise
    return handle


def _stepped_up(client: Client) -> bool:
    """Primary yet? A secondary is asked to stand for election rather than wait ~10 s for one."""
    hello = mongo_command(client, {"hello": 1})
    if hello.get("isWritablePrimary"):
        return True
    if hello.get("secondary"):
        try:
            mongo_command(client, {"replSetStepUp": 1})
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
        with ExitStack() as clients:
            primary, *secondaries = (clients.enter_context(mongo_client(p)) for p in rs.ports)
            mongo_command(primary, {"replSetInitiate": config})
            wait_until(lambda: _stepped_up(primary), f"replica set {name} primary", timeout)
            for secondary in secondaries:
                wait_until(partial(_mongo_is, secondary, "secondary"), f"replica set {name} secondary", timeout)
    except BaseException:
        rs.stop()
        raise
    return rs
