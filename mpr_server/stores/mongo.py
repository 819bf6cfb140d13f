"""MongoDB cold storage (txmongo) behind a small typed façade.

Documents keep the original server's collection and field names (``storequeuedmessages``:
``messageId``, ``connectionId``, ``recipientKeys``, ``encryptedMessage``, ``state``, ``createdAt``,
``updatedAt``) so that operators can read them with the tools they know.

``MONGODB_URI`` is read the way MongoDB drivers read it, within what txmongo can do:

* ``mongodb://[user:password@]host[:port][,host[:port]...][/database][?options]`` and
  ``mongodb+srv://`` (which implies ``tls=true``, as in every driver).
* Credentials: SCRAM-SHA-1 (``authMechanism`` unset, ``DEFAULT`` or ``SCRAM-SHA-1``), with
  ``authSource``. txmongo only authenticates when the URI names a database, so a URI with
  credentials and no path is rewritten to use ``/MessagePickupRepository`` with
  ``authSource=admin`` (unless given), which is what drivers do. Other mechanisms are refused.
* ``replicaSet``: txmongo finds the primary among the listed hosts and those the servers report.
* TLS (``tls``/``ssl``, or any ``tls*`` file option, or ``mongodb+srv``): txmongo would silently
  connect in plaintext, so this module builds a verifying client TLS connection itself: the chain
  is checked against ``tlsCAFile`` (or the system roots), the certificate against the host name
  (or IP address) in the URI, with a client certificate from ``tlsCertificateKeyFile`` (PEM
  with its key, ``tlsCertificateKeyFilePassword`` if encrypted). ``tlsAllowInvalidHostnames``,
  ``tlsAllowInvalidCertificates`` and ``tlsInsecure`` are honoured only when given, with a warning.
"""

from __future__ import annotations

import datetime
import ipaddress
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.logger import Logger
from txmongo.connection import ConnectionPool
from txmongo.filter import ASCENDING, sort
from zope.interface import implementer

from mpr_server.stores.base import StoreUnavailable

COLLECTION = "storequeuedmessages"
MARK = "mpr"  # set on the documents we write, so that documents of the original server stand out
DEFAULT_DB = "MessagePickupRepository"

_log = Logger()


class MongoConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------
# MONGODB_URI

_TLS_OPTIONS = {
    "tls",
    "ssl",
    "tlscafile",
    "tlscertificatekeyfile",
    "tlscertificatekeyfilepassword",
    "tlsallowinvalidcertificates",
    "tlsallowinvalidhostnames",
    "tlsinsecure",
    # no revocation checks are made at all, so turning them off changes nothing
    "tlsdisableocspendpointcheck",
    "tlsdisablecertificaterevocationcheck",
}
_SCRAM_SHA_1 = ("DEFAULT", "SCRAM-SHA-1")


@dataclass(frozen=True)
class MongoTLS:
    """What the URI asks of TLS. Verification is on unless explicitly turned off."""

    ca_file: str | None = None
    certificate_key_file: str | None = None
    certificate_key_password: str | None = None
    allow_invalid_certificates: bool = False
    allow_invalid_hostnames: bool = False


@dataclass(frozen=True)
class MongoSettings:
    uri: str
    """The URI handed to txmongo (credentials without a path get the default database)."""
    hosts: str
    database: str
    username: str | None
    auth_source: str | None
    replica_set: str | None
    tls: MongoTLS | None


def _flag(options: dict[str, str], name: str) -> bool | None:
    value = options.get(name)
    if value is None:
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MongoConfigError(f"MONGODB_URI option {name} must be true or false, not {value!r}")


def _tls_settings(scheme: str, options: dict[str, str]) -> MongoTLS | None:
    unsupported = sorted(k for k in options if k.startswith(("tls", "ssl")) and k not in _TLS_OPTIONS)
    if unsupported:
        raise MongoConfigError(f"MONGODB_URI TLS options not supported: {', '.join(unsupported)}")
    tls, ssl = _flag(options, "tls"), _flag(options, "ssl")
    if tls is not None and ssl is not None and tls != ssl:
        raise MongoConfigError("MONGODB_URI has conflicting tls and ssl options")
    explicit = tls if tls is not None else ssl
    tuning = sorted(k for k in options if k in _TLS_OPTIONS and k not in ("tls", "ssl"))
    if explicit is False:
        if tuning:
            raise MongoConfigError(f"MONGODB_URI has tls=false but also {', '.join(tuning)}")
        return None
    if not (explicit or tuning or scheme == "mongodb+srv"):
        return None
    insecure = bool(_flag(options, "tlsinsecure"))
    for name in ("tlsdisableocspendpointcheck", "tlsdisablecertificaterevocationcheck"):
        _flag(options, name)
    return MongoTLS(
        ca_file=options.get("tlscafile") or None,
        certificate_key_file=options.get("tlscertificatekeyfile") or None,
        certificate_key_password=options.get("tlscertificatekeyfilepassword"),
        allow_invalid_certificates=insecure or bool(_flag(options, "tlsallowinvalidcertificates")),
        allow_invalid_hostnames=insecure or bool(_flag(options, "tlsallowinvalidhostnames")),
    )


def parse_mongodb_uri(uri: str) -> MongoSettings:
    """Check MONGODB_URI and work out what txmongo must be given. Raises MongoConfigError."""
    parts = urlsplit(uri)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise MongoConfigError("MONGODB_URI must start with mongodb:// or mongodb+srv://")
    try:
        raw = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise MongoConfigError(f"MONGODB_URI has malformed options: {e}") from None
    options = {k.lower(): v[-1] for k, v in raw.items()}
    tls = _tls_settings(parts.scheme, options)

    db = unquote(parts.path.lstrip("/"))
    username = unquote(parts.username) if parts.username is not None else None
    auth_source = options.get("authsource")
    query = parts.query
    mechanism = options.get("authmechanism", "DEFAULT").upper()
    if username is not None:
        if mechanism == "SCRAM-SHA-256":
            raise MongoConfigError(
                "MONGODB_URI asks for authMechanism=SCRAM-SHA-256, which the MongoDB client used here (txmongo) "
                "cannot do; use SCRAM-SHA-1 (users have SHA-1 credentials unless created with "
                "mechanisms: ['SCRAM-SHA-256'] only)"
            )
        if mechanism not in _SCRAM_SHA_1:
            raise MongoConfigError(
                f"MONGODB_URI authMechanism={options['authmechanism']} is not supported; only SCRAM-SHA-1 is"
            )
        if not parts.password:
            raise MongoConfigError("MONGODB_URI has a user name but no password")
        if not db:
            # txmongo authenticates only when the URI names a database; drivers authenticate
            # against authSource, else the path's database, else admin.
            if auth_source is None:
                auth_source = "admin"
                query = f"{query}&authSource=admin" if query else "authSource=admin"
            db = DEFAULT_DB
            uri = urlunsplit((parts.scheme, parts.netloc, "/" + DEFAULT_DB, query, parts.fragment))
        auth_source = auth_source or db
    elif "authmechanism" in options and mechanism not in _SCRAM_SHA_1:
        raise MongoConfigError(f"MONGODB_URI authMechanism={options['authmechanism']} is not supported")

    if parts.scheme == "mongodb":  # +srv would resolve DNS here: left to start()
        _validate_with_pymongo(uri)
    return MongoSettings(
        uri=uri,
        hosts=parts.netloc.rpartition("@")[2],
        database=db or DEFAULT_DB,
        username=username,
        auth_source=auth_source,
        replica_set=options.get("replicaset"),
        tls=tls,
    )


def _validate_with_pymongo(uri: str) -> None:
    from pymongo.errors import PyMongoError
    from pymongo.uri_parser import parse_uri

    try:
        parse_uri(uri, validate=True, warn=False)
    except OSError as e:  # it opens tlsCAFile and tlsCertificateKeyFile
        raise MongoConfigError(f"MONGODB_URI names a file that cannot be read: {e.filename}: {e.strerror}") from None
    except (PyMongoError, ValueError, TypeError) as e:
        raise MongoConfigError(f"MONGODB_URI is invalid: {e}") from None


def database_of(uri: str) -> str:
    """The database the cold store uses: the URI's path, else ``MessagePickupRepository``."""
    return parse_mongodb_uri(uri).database


# ---------------------------------------------------------------------------
# TLS for txmongo

_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}
_ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    112: "unrecognized_name",
    116: "certificate_required",
}


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise MongoConfigError(f"MONGODB_URI {what} {path!r} cannot be read: {e.strerror or e}") from None


def _certificates(data: bytes, what: str, path: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise MongoConfigError(f"MONGODB_URI {what} {path!r} holds no PEM certificate") from None


def _names_in(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return ", ".join(names) or "no host"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class _Attempt:
    host: str
    port: int
    done: bool = False
    failed: bool = False


@implementer(IOpenSSLClientConnectionCreator)
class MongoTLSConnector:
    """The ``ssl_context_factory`` for txmongo: a verifying TLS client for every connection.

    txmongo hands one object to ``reactor.connectSSL`` for all its connections and reconnects a
    connector to the next replica-set host by changing ``connector.host``; Twisted asks
    :meth:`clientConnectionForTLS` for each new connection before it has a transport, so the
    host is read from the txmongo factory's ``connector`` (its current destination). txmongo's
    pingers connect to the IP address of an established connection: that address is mapped back
    to the host name the connection was verified under.
    """

    def __init__(self, settings: MongoTLS) -> None:
        self.settings = settings
        self.last_error: str | None = None
        self.verified: list[tuple[str, str]] = []
        """(host name, peer address) of each completed handshake, most recent last (capped)."""
        self._names: dict[tuple[str, int], str] = {}
        self._attempts: weakref.WeakKeyDictionary[SSL.Connection, _Attempt] = weakref.WeakKeyDictionary()
        self._last_attempt: _Attempt | None = None
        self._ctx = self._context(settings)

    def _context(self, settings: MongoTLS) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        if settings.ca_file:
            data = _read(settings.ca_file, "tlsCAFile")
            _certificates(data, "tlsCAFile", settings.ca_file)
            try:
                ctx.load_verify_locations(str(Path(settings.ca_file).expanduser()))
            except SSL.Error as e:
                raise MongoConfigError(f"MONGODB_URI tlsCAFile {settings.ca_file!r} is unusable: {e}") from None
        else:
            ctx.set_default_verify_paths()
        if settings.certificate_key_file:
            path = settings.certificate_key_file
            data = _read(path, "tlsCertificateKeyFile")
            certs = _certificates(data, "tlsCertificateKeyFile", path)
            password = settings.certificate_key_password
            try:
                key = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
            except (ValueError, TypeError) as e:
                raise MongoConfigError(
                    f"MONGODB_URI tlsCertificateKeyFile {path!r} needs its private key in PEM"
                    f" (and tlsCertificateKeyFilePassword if it is encrypted): {e}"
                ) from None
            try:
                ctx.use_certificate(certs[0])
                for extra in certs[1:]:
                    ctx.add_extra_chain_cert(extra)
                ctx.use_privatekey(key)  # type: ignore[arg-type]
                ctx.check_privatekey()
            except SSL.Error as e:
                raise MongoConfigError(f"MONGODB_URI tlsCertificateKeyFile {path!r} is unusable: {e}") from None
        ctx.set_verify(SSL.VERIFY_NONE if settings.allow_invalid_certificates else SSL.VERIFY_PEER)
        ctx.set_info_callback(self._info)
        return ctx

    def _host_of(self, tls_protocol: Any) -> tuple[str, int]:
        factory = getattr(getattr(tls_protocol, "factory", None), "wrappedFactory", None)
        connector = getattr(factory, "connector", None)
        if connector is None:
            raise StoreUnavailable("MongoDB TLS: cannot tell which host this connection is for; not connecting")
        destination = connector.getDestination()
        host, port = str(destination.host), int(destination.port)
        return self._names.get((host, port), host), port

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        host, port = self._host_of(tlsProtocol)
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        if not _is_ip(host):
            connection.set_tlsext_host_name(host.encode("idna"))
        attempt = _Attempt(host, port)
        if not self.settings.allow_invalid_certificates:
            connection.set_verify(SSL.VERIFY_PEER, self._verifier(attempt))
        self._attempts[connection] = attempt
        self._last_attempt = attempt
        return connection

    def _verifier(self, attempt: _Attempt) -> Any:
        host, port = attempt.host, attempt.port

        def verify(connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
            if not ok:
                reason = _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")
                subject = cert.to_cryptography().subject.rfc4514_string()
                self._fail(attempt, f"certificate verify failed for {host}:{port}: {reason} ({subject})")
                return False
            if depth == 0 and not self.settings.allow_invalid_hostnames:
                try:
                    if _is_ip(host):
                        verify_certificate_ip_address(cert.to_cryptography(), host)
                    else:
                        verify_certificate_hostname(cert.to_cryptography(), host)
                except (VerificationError, CertificateError):
                    names = _names_in(cert.to_cryptography())
                    self._fail(
                        attempt,
                        f"certificate of {host}:{port} does not match the host name (it names {names}; use one of"
                        " those in MONGODB_URI, or tlsAllowInvalidHostnames=true)",
                    )
                    return False
            return True

        return verify

    def _fail(self, attempt: _Attempt, error: str) -> None:
        attempt.failed = True
        self.last_error = error

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        attempt = self._attempts.get(connection)
        if attempt is None:
            return
        if where & SSL.SSL_CB_HANDSHAKE_DONE and not attempt.done:
            attempt.done = True
            self.last_error = None
            peer = getattr(getattr(connection.get_app_data(), "transport", None), "getPeer", lambda: None)()
            if peer is not None and getattr(peer, "host", None):
                self._names[(peer.host, peer.port)] = attempt.host
                self.verified = [*self.verified[-15:], (attempt.host, f"{peer.host}:{peer.port}")]
        elif where & SSL.SSL_CB_ALERT and ret >> 8 == 2 and not attempt.failed:  # a fatal alert
            alert = _ALERTS.get(ret & 0xFF, f"alert {ret & 0xFF}")
            if where & SSL.SSL_CB_READ_ALERT == SSL.SSL_CB_READ_ALERT:
                error = f"{attempt.host}:{attempt.port} refused the TLS connection ({alert})"
            else:
                error = f"TLS with {attempt.host}:{attempt.port} failed (we sent {alert})"
            if not attempt.done:
                error += "; is it a TLS server?"
            elif not self.settings.certificate_key_file:
                error += "; the server may require a client certificate (tlsCertificateKeyFile)"
            self._fail(attempt, error)

    def failure(self) -> str | None:
        """Why TLS connections are not working, as far as we saw, for error messages."""
        if self.last_error:
            return self.last_error
        attempt = self._last_attempt
        if attempt is not None and not attempt.done:
            return f"no TLS handshake completed with {attempt.host}:{attempt.port} (does the server speak TLS?)"
        return None


# ---------------------------------------------------------------------------
# the store


@dataclass(frozen=True)
class ColdMessage:
    message_id: str
    connection_id: str
    recipient_dids: Sequence[str]
    payload: bytes
    received_at_ms: int


class ColdStore:
    def __init__(self, uri: str, reactor: IReactorTime, timeout_s: float = 1.5) -> None:
        self._settings = parse_mongodb_uri(uri)
        self._db_name = self._settings.database
        self._reactor = reactor
        self._timeout = timeout_s
        self._pool: Any = None
        self._collection: Any = None
        self._tls: MongoTLSConnector | None = None
        tls = self._settings.tls
        if tls is not None:
            self._tls = MongoTLSConnector(tls)
            if tls.allow_invalid_certificates:
                _log.warn("MONGODB_URI turns off TLS certificate verification: the connection is not authenticated")
            elif tls.allow_invalid_hostnames:
                _log.warn("MONGODB_URI turns off TLS host name verification: any certificate from the CA is accepted")

    @property
    def database(self) -> str:
        return self._db_name

    @property
    def tls(self) -> MongoTLSConnector | None:
        return self._tls

    async def _timed(self, d: Deferred[Any], what: str) -> Any:
        d.addTimeout(self._timeout, self._reactor)
        try:
            return await d
        except Exception as e:
            if isinstance(e, DeferredTimeoutError | TimeoutError | CancelledError):
                detail = f"MongoDB {what} failed: no answer within {self._timeout} s from {self._settings.hosts}"
                if self._settings.replica_set:
                    detail += f" (replicaSet {self._settings.replica_set!r})"
            else:
                detail = f"MongoDB {what} failed: {type(e).__name__}: {e}"
            why = self._tls.failure() if self._tls is not None else None
            if why:
                detail += f" [TLS: {why}]"
            raise StoreUnavailable(detail) from e

    async def start(self) -> None:
        if self._settings.tls is not None and self._tls is None:  # never let txmongo go plaintext
            raise StoreUnavailable("MongoDB TLS was asked for but is not set up")
        try:
            self._pool = ConnectionPool(self._settings.uri, pool_size=2, ssl_context_factory=self._tls)
        except Exception as e:  # mongodb+srv resolution, option validation
            raise StoreUnavailable(f"MongoDB connection setup failed: {type(e).__name__}: {e}") from e
        db = self._pool[self._db_name]
        self._collection = db[COLLECTION]
        await self._check_connection(db)
        await self._timed(self._collection.create_index(sort(ASCENDING("messageId")), unique=True), "index")
        await self._timed(
            self._collection.create_index(sort(ASCENDING("connectionId") + ASCENDING("createdAt"))), "index"
        )

    async def _check_connection(self, db: Any) -> None:
        """Connect; txmongo logs and swallows authentication failures: ask the server who we are."""
        status = await self._timed(db.command("connectionStatus"), "connection")
        if self._settings.username is None:
            return
        users = status.get("authInfo", {}).get("authenticatedUsers", [])
        user, source = self._settings.username, self._settings.auth_source
        if not any(u.get("user") == user and u.get("db") == source for u in users):
            raise StoreUnavailable(
                f"MongoDB authentication failed for user {user!r} (authSource {source!r}, SCRAM-SHA-1):"
                " check the user name, password and authSource in MONGODB_URI"
            )

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None

    async def ping(self) -> None:
        await self._timed(self._pool[self._db_name].command("ping"), "ping")

    async def save(self, messages: Sequence[ColdMessage]) -> None:
        """Upsert by messageId: writing the same message again is harmless."""
        from pymongo import UpdateOne

        now = datetime.datetime.now(datetime.UTC)
        requests = [
            UpdateOne(
                {"messageId": m.message_id},
                {
                    "$setOnInsert": {
                        "messageId": m.message_id,
                        "connectionId": m.connection_id,
                        "recipientKeys": list(m.recipient_dids),
                        "encryptedMessage": orjson.loads(m.payload),
                        "state": "pending",
                        "createdAt": datetime.datetime.fromtimestamp(m.received_at_ms / 1000, datetime.UTC),
                        "updatedAt": now,
                        MARK: 1,
                    }
                },
                upsert=True,
            )
            for m in messages
        ]
        if requests:
            await self._timed(self._collection.bulk_write(requests, ordered=False), "write")

    async def payloads(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        if not message_ids:
            return {}
        docs = await self._timed(
            self._collection.find({"messageId": {"$in": list(message_ids)}}, {"messageId": 1, "encryptedMessage": 1}),
            "read",
        )
        return {doc["messageId"]: orjson.dumps(doc["encryptedMessage"]) for doc in docs}

    async def originals(self, after: str | None, limit: int) -> list[tuple[str, ColdMessage | None]]:
        """Documents written by the original server (not by us), in insertion order after the
        ObjectId ``after``: what an upgraded deployment must put back in the queue. An unreadable
        document comes as None (logged), so that the caller moves past it."""
        from bson import ObjectId

        query: dict[str, Any] = {MARK: {"$exists": False}}
        if after:
            query["_id"] = {"$gt": ObjectId(after)}
        docs = await self._timed(self._collection.find(query, sort=sort(ASCENDING("_id")), limit=limit), "read")
        found: list[tuple[str, ColdMessage | None]] = []
        for doc in docs:
            try:
                created = doc["createdAt"]
                message = ColdMessage(
                    message_id=str(doc["messageId"]),
                    connection_id=str(doc["connectionId"]),
                    recipient_dids=[str(k) for k in doc.get("recipientKeys") or []],
                    payload=orjson.dumps(doc["encryptedMessage"]),
                    received_at_ms=int(created.timestamp() * 1000)
                    if isinstance(created, datetime.datetime)
                    else int(created),
                )
            except (KeyError, TypeError, ValueError, orjson.JSONEncodeError) as e:
                _log.warn("skipping unreadable document {id} in {c}: {e}", id=str(doc.get("_id")), c=COLLECTION, e=e)
                found.append((str(doc["_id"]), None))
                continue
            found.append((str(doc["_id"]), message))
        return found

    async def delete(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._timed(self._collection.delete_many({"messageId": {"$in": list(message_ids)}}), "delete")
