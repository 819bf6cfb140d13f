"""MONGODB_URI as MongoDB users write it: TLS (verified), authentication and replica sets, against
real mongod processes started here (tests/services.py, scripts/services/), plus URI parsing.

The TLS server's certificate names only ``localhost`` (no IP address), so that host name checking is
seen to work: ``localhost`` URIs verify, ``127.0.0.1`` URIs fail unless ``tlsAllowInvalidHostnames``.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import task
from twisted.logger import capturedLogs, formatEvent
from txmongo.connection import ConnectionPool

from mpr_server.errors import StoreUnavailable
from mpr_server.stores.mongo.cold import ColdMessage, ColdStore
from mpr_server.stores.mongo.uri import DEFAULT_DB, MongoConfigError, MongoTLS, database_of, parse_mongodb_uri
from scripts.services.mongo import MongoTLS as MongodTLS
from scripts.services.mongo import start_mongo_replica_set, start_mongod
from tests.services import start_or_skip

TIMEOUT_S = 1.5
USER, PASSWORD = "mpr", "p@ss:w/rd"  # needs percent-encoding in a URI
KEY_PASSWORD = "key-secret"


# ---------------------------------------------------------------------------
# a throwaway PKI


@dataclass(frozen=True)
class Pki:
    ca: str
    wrong_ca: str
    server: str  # certificate (DNS:localhost only) + key
    client: str  # certificate + key
    client_encrypted: str  # certificate + key encrypted with KEY_PASSWORD


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    dns: list[str] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_pki(directory: Path) -> Pki:
    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, wrong_key, server_key, client_key = key(), key(), key(), key()
    ca = _cert("mpr test CA", ca_key, None, ca=True)
    wrong = _cert("mpr test CA", wrong_key, None, ca=True)  # same name, other key
    server = _cert(
        "localhost", server_key, ("mpr test CA", ca_key), dns=["localhost"], usage=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    client = _cert("mpr-client", client_key, ("mpr test CA", ca_key), usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "ca": _pem(ca),
        "wrong_ca": _pem(wrong),
        "server": _pem(server) + _key_pem(server_key),
        "client": _pem(client) + _key_pem(client_key),
        "client_encrypted": _pem(client) + _key_pem(client_key, KEY_PASSWORD),
    }
    for name, data in files.items():
        (directory / f"{name}.pem").write_bytes(data)
    return Pki(**{name: str(directory / f"{name}.pem") for name in files})


# ---------------------------------------------------------------------------
# servers (one per variant for the module)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_mongod(pki: Pki) -> Iterator[Any]:
    server = start_or_skip("mongod (TLS)", lambda: start_mongod(tls=MongodTLS(pki.server, pki.ca, pki.client)))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_mongod() -> Iterator[Any]:
    server = start_or_skip("mongod (auth)", lambda: start_mongod(auth=(USER, PASSWORD)))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replica_set() -> Iterator[Any]:
    rs = start_or_skip("mongod replica set", lambda: start_mongo_replica_set("rs0", members=2))
    try:
        yield rs
    finally:
        rs.stop()


def tls_uri(host: str, port: int, pki: Pki, **options: str) -> str:
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"tls": "true", **options}.items())
    return f"mongodb://{host}:{port}/mpr_tls_{uuid.uuid4().hex[:8]}?{query}"


def message() -> ColdMessage:
    payload = orjson.dumps({"protected": "eyJ", "ciphertext": uuid.uuid4().hex, "tag": "x"})
    return ColdMessage(f"m-{uuid.uuid4().hex}", "conn-1", ["did:key:z6Mk1"], payload, 1_700_000_000_000)


async def roundtrip(store: ColdStore) -> None:
    await store.start()
    try:
        await store.ping()
        messages = [message(), message()]
        ids = [m.message_id for m in messages]
        await store.save(messages)
        await store.save(messages)  # an upsert: harmless
        assert await store.payloads(ids) == {m.message_id: m.payload for m in messages}
        await store.delete(ids)
        assert await store.payloads(ids) == {}
    finally:
        await store.stop()


async def unavailable(store: ColdStore) -> str:
    """start() must fail with StoreUnavailable, promptly; return its message."""
    began = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.start()
    finally:
        await store.stop()
    assert time.monotonic() - began < TIMEOUT_S + 1.0
    return str(info.value)


# ---------------------------------------------------------------------------
# TLS


@pytest_twisted.ensureDeferred
async def test_tls_with_the_right_ca_verifies_and_works(reactor: Any, tls_mongod: Any, pki: Pki) -> None:
    store = ColdStore(
        tls_uri("localhost", tls_mongod.port, pki, tlsCAFile=pki.ca, tlsCertificateKeyFile=pki.client),
        reactor,
        TIMEOUT_S,
    )
    assert store.tls is not None
    await roundtrip(store)
    assert ("localhost", f"127.0.0.1:{tls_mongod.port}") in store.tls.verified
    assert store.tls.last_error is None


@pytest_twisted.ensureDeferred
async def test_tls_pinger_connections_are_verified_under_the_uri_host_name(
    reactor: Any, tls_mongod: Any, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """txmongo's pingers connect to the peer's IP address; the certificate names only localhost."""
    monkeypatch.setattr(ConnectionPool, "_ConnectionPool__pinger_discovery_interval", 0.05)
    uri = tls_uri(
        "localhost",
        tls_mongod.port,
        pki,
        tlsCAFile=pki.ca,
        tlsCertificateKeyFile=pki.client_encrypted,
        tlsCertificateKeyFilePassword=KEY_PASSWORD,
    )
    store = ColdStore(uri, reactor, TIMEOUT_S)
    assert store.tls is not None
    await store.start()
    try:
        deadline = time.monotonic() + 5
        while len(store.tls.verified) < 3 and time.monotonic() < deadline:  # 2 pool connections + 1 pinger
            await task.deferLater(reactor, 0.02)
        assert len(store.tls.verified) >= 3, store.tls.verified
        assert {host for host, _ in store.tls.verified} == {"localhost"}
        assert store.tls.last_error is None
        assert await store.payloads(["nothing"]) == {}
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_tls_with_a_wrong_ca_fails_clearly(reactor: Any, tls_mongod: Any, pki: Pki) -> None:
    uri = tls_uri("localhost", tls_mongod.port, pki, tlsCAFile=pki.wrong_ca, tlsCertificateKeyFile=pki.client)
    message = await unavailable(ColdStore(uri, reactor, TIMEOUT_S))
    assert "certificate verify failed" in message
    assert f"localhost:{tls_mongod.port}" in message


@pytest_twisted.ensureDeferred
async def test_tls_host_name_mismatch_fails(reactor: Any, tls_mongod: Any, pki: Pki) -> None:
    uri = tls_uri("127.0.0.1", tls_mongod.port, pki, tlsCAFile=pki.ca, tlsCertificateKeyFile=pki.client)
    message = await unavailable(ColdStore(uri, reactor, TIMEOUT_S))
    assert "does not match the host name" in message


@pytest_twisted.ensureDeferred
async def test_tls_allow_invalid_hostnames_is_honoured_with_a_warning(reactor: Any, tls_mongod: Any, pki: Pki) -> None:
    uri = tls_uri(
        "127.0.0.1",
        tls_mongod.port,
        pki,
        tlsCAFile=pki.ca,
        tlsCertificateKeyFile=pki.client,
        tlsAllowInvalidHostnames="true",
    )
    with capturedLogs() as events:
        store = ColdStore(uri, reactor, TIMEOUT_S)
    assert any("host name verification" in (formatEvent(e) or "") for e in events)
    await roundtrip(store)
    # the chain is still checked
    uri = tls_uri(
        "127.0.0.1",
        tls_mongod.port,
        pki,
        tlsCAFile=pki.wrong_ca,
        tlsCertificateKeyFile=pki.client,
        tlsAllowInvalidHostnames="true",
    )
    assert "certificate verify failed" in await unavailable(ColdStore(uri, reactor, TIMEOUT_S))


@pytest_twisted.ensureDeferred
async def test_tls_insecure_is_honoured_with_a_warning(reactor: Any, tls_mongod: Any, pki: Pki) -> None:
    uri = tls_uri(
        "127.0.0.1", tls_mongod.port, pki, tlsCAFile=pki.wrong_ca, tlsCertificateKeyFile=pki.client, tlsInsecure="true"
    )
    with capturedLogs() as events:
        store = ColdStore(uri, reactor, TIMEOUT_S)
    assert any("certificate verification" in (formatEvent(e) or "") for e in events)
    await roundtrip(store)


@pytest_twisted.ensureDeferred
async def test_tls_without_the_client_certificate_the_server_requires_fails(
    reactor: Any, tls_mongod: Any, pki: Pki
) -> None:
    uri = tls_uri("localhost", tls_mongod.port, pki, tlsCAFile=pki.ca)
    message = await unavailable(ColdStore(uri, reactor, TIMEOUT_S))
    assert "client certificate" in message


@pytest_twisted.ensureDeferred
async def test_tls_uri_never_falls_back_to_plaintext(reactor: Any, replica_set: Any, pki: Pki) -> None:
    """A plaintext server (which would answer a plaintext client) must not be used."""
    uri = tls_uri("127.0.0.1", replica_set.primary_port, pki, tlsCAFile=pki.ca, tlsAllowInvalidHostnames="true")
    message = await unavailable(ColdStore(uri, reactor, TIMEOUT_S))
    assert "does the server speak TLS?" in message or "TLS with" in message, message


# ---------------------------------------------------------------------------
# authentication


def auth_uri(port: int, password: str = PASSWORD, path: str = "", query: str = "") -> str:
    return f"mongodb://{USER}:{quote(password, safe='')}@127.0.0.1:{port}{path}{query}"


@pytest_twisted.ensureDeferred
async def test_auth_with_a_database_path_and_auth_source(reactor: Any, auth_mongod: Any) -> None:
    uri = auth_uri(auth_mongod.port, path=f"/mpr_auth_{uuid.uuid4().hex[:8]}", query="?authSource=admin")
    await roundtrip(ColdStore(uri, reactor, TIMEOUT_S))


@pytest.mark.parametrize("path", ["", "/", "/?w=majority"])
@pytest_twisted.ensureDeferred
async def test_auth_without_a_database_path_uses_the_default_database(
    reactor: Any, auth_mongod: Any, path: str
) -> None:
    path, _, query = path.partition("?")
    store = ColdStore(auth_uri(auth_mongod.port, path=path, query=f"?{query}" if query else ""), reactor, TIMEOUT_S)
    assert store.database == DEFAULT_DB
    await roundtrip(store)


@pytest_twisted.ensureDeferred
async def test_auth_with_a_bad_password_fails_clearly(reactor: Any, auth_mongod: Any) -> None:
    uri = auth_uri(auth_mongod.port, password="wrong", path="/mpr_auth", query="?authSource=admin")
    message = await unavailable(ColdStore(uri, reactor, TIMEOUT_S))
    assert "authentication failed" in message and repr(USER) in message
    assert "wrong" not in message


@pytest_twisted.ensureDeferred
async def test_no_credentials_against_an_auth_server_fails(reactor: Any, auth_mongod: Any) -> None:
    message = await unavailable(ColdStore(f"mongodb://127.0.0.1:{auth_mongod.port}/mpr_auth", reactor, TIMEOUT_S))
    assert "authentication" in message.lower() or "unauthorized" in message.lower()


# ---------------------------------------------------------------------------
# replica set


@pytest_twisted.ensureDeferred
async def test_replica_set_uri_finds_the_primary(reactor: Any, replica_set: Any) -> None:
    base, _, query = replica_set.uri.partition("/?")  # secondaries listed first
    assert query == "replicaSet=rs0"
    await roundtrip(ColdStore(f"{base}/mpr_rs_{uuid.uuid4().hex[:8]}?{query}", reactor, TIMEOUT_S))


@pytest_twisted.ensureDeferred
async def test_replica_set_name_mismatch_fails(reactor: Any, replica_set: Any) -> None:
    base, _, _ = replica_set.uri.partition("/?")
    await unavailable(ColdStore(f"{base}/mpr_rs?replicaSet=other", reactor, TIMEOUT_S))


# ---------------------------------------------------------------------------
# parsing (no server)


def test_uri_forms() -> None:
    plain = parse_mongodb_uri("mongodb://localhost:27017/MessagePickupRepository")
    assert (plain.database, plain.username, plain.tls) == ("MessagePickupRepository", None, None)
    assert database_of("mongodb://localhost:27017") == DEFAULT_DB

    rewritten = parse_mongodb_uri("mongodb://u:p%40ss@h1:1,h2:2?replicaSet=rs0")
    assert rewritten.uri == "mongodb://u:p%40ss@h1:1,h2:2/MessagePickupRepository?replicaSet=rs0&authSource=admin"
    assert (rewritten.database, rewritten.auth_source, rewritten.replica_set) == (DEFAULT_DB, "admin", "rs0")

    own_source = parse_mongodb_uri("mongodb://u:p@h/?authSource=users")
    assert (own_source.database, own_source.auth_source) == (DEFAULT_DB, "users")
    assert parse_mongodb_uri("mongodb://u:p@h/app").auth_source == "app"

    srv = parse_mongodb_uri("mongodb+srv://u:p@cluster0.example.net/?retryWrites=true&w=majority")
    assert srv.tls == MongoTLS()  # +srv means TLS, verified
    assert parse_mongodb_uri("mongodb://h/?ssl=true").tls == MongoTLS()
    assert parse_mongodb_uri(f"mongodb://h/?tlsCAFile={__file__}").tls == MongoTLS(ca_file=__file__)  # implies TLS
    assert parse_mongodb_uri("mongodb://h/?tls=false").tls is None
    insecure = parse_mongodb_uri("mongodb://h/?tls=true&tlsInsecure=true").tls
    assert insecure is not None and insecure.allow_invalid_certificates and insecure.allow_invalid_hostnames


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("mongodb://u:p@h/db?authMechanism=SCRAM-SHA-256", "SCRAM-SHA-256"),
        ("mongodb://u:p@h/db?authMechanism=GSSAPI", "not supported"),
        ("mongodb://u@h/db", "no password"),
        ("mongodb://h/?tls=false&tlsCAFile=/x.pem", "tls=false"),
        ("mongodb://h/?tls=true&ssl=false", "conflicting"),
        ("mongodb://h/?tls=yes", "true or false"),
        ("mongodb://h/?tls=true&tlsCRLFile=/x.pem", "not supported"),
        ("mongodb://h/?replicaSet=rs0&nonsense=1", "invalid"),
        ("redis://h/", "mongodb://"),
    ],
)
def test_refused_uris(uri: str, words: str) -> None:
    with pytest.raises(MongoConfigError, match=words):
        parse_mongodb_uri(uri)


def test_unreadable_tls_files_are_config_errors(reactor: Any, tmp_path: Path) -> None:
    with pytest.raises(MongoConfigError, match=r"missing\.pem"):
        ColdStore(f"mongodb://h/?tls=true&tlsCAFile={tmp_path}/missing.pem", reactor)
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    with pytest.raises(MongoConfigError, match="no PEM certificate"):
        ColdStore(f"mongodb://h/?tls=true&tlsCertificateKeyFile={tmp_path}/empty.pem", reactor)
