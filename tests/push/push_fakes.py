"""Offline fakes for the push tests: keys, a throwaway CA, fake OAuth/FCM and APNs servers."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded
from h2.settings import SettingCodes, Settings
from twisted.internet import ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from mpr_server.push.fcm import FCM_SCOPE, JWT_BEARER_GRANT

# test identities
PROJECT_ID = "mpr-test"
CLIENT_EMAIL = "push@mpr-test.iam.gserviceaccount.com"
KEY_ID = "ABC123DEFG"
TEAM_ID = "TEAM123456"
TOPIC = "org.example.wallet"


# -- listeners


class Listeners:
    """Listening ports of a test; stopped at teardown, waiting for their connections to close."""

    def __init__(self) -> None:
        self._ports: list[tuple[IListeningPort, ConnectionTracker | None]] = []

    def add(self, port: IListeningPort, tracker: ConnectionTracker | None = None) -> int:
        """Track ``port``; returns its port number."""
        self._ports.append((port, tracker))
        return int(cast(IPv4Address, port.getHost()).port)

    async def stop(self, clock: Any) -> None:
        for port, tracker in self._ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
            if tracker is not None:
                await tracker.all_closed().addTimeout(5, clock)


# -- keys and certificates


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class TlsMaterial:
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes

    def server_options(self, protocols: list[bytes]) -> ssl.CertificateOptions:
        pc = ssl.PrivateCertificate.loadPEM(self.server_cert_pem + self.server_key_pem)
        return ssl.CertificateOptions(
            privateKey=pc.privateKey.original, certificate=pc.original, acceptableProtocols=protocols
        )


@implementer(IOpenSSLContextFactory)
class NoAlpnServerContext:
    """Server TLS context with no ALPN support at all (Twisted's own always answers ALPN)."""

    def __init__(self, material: TlsMaterial) -> None:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from OpenSSL import SSL

        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate(x509.load_pem_x509_certificate(material.server_cert_pem))
        self._context.use_privatekey(load_pem_private_key(material.server_key_pem, None))  # type: ignore[arg-type]

    def getContext(self) -> Any:
        return self._context


def make_tls_material() -> TlsMaterial:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpr push test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        server_cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        server_key_pem=pem_private(key),
    )


# -- clocks


class SignallingClock(task.Clock):
    """A task.Clock that tells waiters the delay of the next ``callLater``."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[Deferred[float]] = []

    def next_call(self) -> Deferred[float]:
        d: Deferred[float] = Deferred()
        self._waiters.append(d)
        return d

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        call = super().callLater(delay, callable, *args, **kw)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(delay)
        return call


# -- fake OAuth2 + FCM HTTP v1


def _body(request: Request) -> bytes:
    assert request.content is not None
    return bytes(request.content.read())


def _json(request: Request, status: int, body: object, headers: dict[str, str] | None = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    return json.dumps(body).encode()


class FakeFcm(Resource):
    """Google's token endpoint and FCM ``messages:send``, checking what a real one would."""

    isLeaf = True

    def __init__(self, public_key: rsa.RSAPublicKey, project_id: str, client_email: str) -> None:
        super().__init__()
        self.public_key = public_key
        self.project_id = project_id
        self.client_email = client_email
        self.base_url = ""
        self.expires_in = 3600
        self.token_requests = 0
        self.send_attempts = 0
        self.valid_tokens: set[str] = set()
        #: Parsed ``message`` objects of accepted sends.
        self.messages: list[dict[str, Any]] = []
        #: Scripted answers for the next sends: (status, JSON body, headers).
        self.script: deque[tuple[int, object, dict[str, str]]] = deque()
        #: Anything a real server would have rejected as a client bug.
        self.errors: list[str] = []

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    def render_POST(self, request: Request) -> bytes:
        path = request.path.decode()
        if path == "/token":
            return self._token(request)
        if path == f"/v1/projects/{self.project_id}/messages:send":
            return self._send(request)
        self.errors.append(f"unexpected path {path}")
        return _json(request, 404, {"error": "not found"})

    def _token(self, request: Request) -> bytes:
        self.token_requests += 1
        ctype = request.getHeader("content-type") or ""
        form = parse_qs(_body(request).decode())
        if not ctype.startswith("application/x-www-form-urlencoded"):
            self.errors.append(f"token request content-type {ctype!r}")
        if form.get("grant_type") != [JWT_BEARER_GRANT]:
            self.errors.append(f"grant_type {form.get('grant_type')!r}")
            return _json(request, 400, {"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(
                form["assertion"][0],
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_url,
                issuer=self.client_email,
                options={"require": ["iat", "exp", "iss", "aud"]},
            )
        except (jwt.PyJWTError, KeyError) as e:
            self.errors.append(f"bad assertion: {e!r}")
            return _json(request, 400, {"error": "invalid_grant"})
        if claims.get("scope") != FCM_SCOPE or claims["exp"] - claims["iat"] != 3600:
            self.errors.append(f"bad claims {claims!r}")
            return _json(request, 400, {"error": "invalid_scope"})
        token = f"ya29.test-{self.token_requests}"
        self.valid_tokens.add(token)
        return _json(request, 200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"})

    def _send(self, request: Request) -> bytes:
        self.send_attempts += 1
        auth = request.getHeader("authorization") or ""
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.valid_tokens:
            return _json(
                request, 401, {"error": {"code": 401, "message": "invalid credentials", "status": "UNAUTHENTICATED"}}
            )
        try:
            body = json.loads(_body(request))
            message = body["message"]
            assert isinstance(message["token"], str)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            self.errors.append(f"bad send body: {e!r}")
            return _json(request, 400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}})
        if self.script:
            status, answer, headers = self.script.popleft()
            if status != 200:
                return _json(request, status, answer, headers)
        self.messages.append(message)
        return _json(request, 200, {"name": f"projects/{self.project_id}/messages/{len(self.messages)}"})


def fcm_error(status: int, code: str, error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": code.lower(), "status": code}
    if error_code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
    return {"error": error}


# -- fake APNs (Twisted's own HTTP/2 server)


class ConnectionTracker:
    """Counts the connections a server accepted and tells when all of them are closed."""

    def __init__(self) -> None:
        self.connections = 0
        self._live: set[Any] = set()
        self._waiters: list[Deferred[None]] = []

    def opened(self, proto: Any) -> None:
        self.connections += 1
        self._live.add(proto)

    def closed(self, proto: Any) -> None:
        self._live.discard(proto)
        if not self._live:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._live:
            self._waiters.append(d)
        else:
            d.callback(None)
        return d


class TrackingFactory(WrappingFactory):
    """Wraps a server factory (e.g. a Site) to track its connections."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.tracker = ConnectionTracker()

    @property
    def connections(self) -> int:
        return self.tracker.connections

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.tracker.opened(p)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.tracker.closed(p)


class FakeApns(Resource):
    """``POST /3/device/<token>`` checking the provider JWT, the APNs headers and the payload."""

    isLeaf = True

    def __init__(self, public_key: ec.EllipticCurvePublicKey, key_id: str, team_id: str, topic: str) -> None:
        super().__init__()
        self.public_key = public_key
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        self.requests: list[dict[str, Any]] = []
        self.jwts: set[str] = set()
        self.script: deque[tuple[int, dict[str, Any]]] = deque()
        self.errors: list[str] = []

    def render_POST(self, request: Request) -> bytes:
        path = request.path.decode()
        if not path.startswith("/3/device/"):
            self.errors.append(f"unexpected path {path}")
            request.setResponseCode(404)
            return b'{"reason":"BadPath"}'
        if request.clientproto != b"HTTP/2":
            self.errors.append(f"protocol {request.clientproto!r}")
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        token = headers.get("authorization", "")
        if not token.startswith("bearer "):
            return self._fail(request, 403, "MissingProviderToken")
        token = token[len("bearer ") :]
        try:
            if jwt.get_unverified_header(token).get("kid") != self.key_id:
                return self._fail(request, 403, "InvalidProviderToken")
            claims = jwt.decode(token, self.public_key, algorithms=["ES256"], options={"require": ["iat", "iss"]})
        except jwt.PyJWTError as e:
            self.errors.append(f"bad provider token {e!r}")
            return self._fail(request, 403, "InvalidProviderToken")
        if claims["iss"] != self.team_id or abs(claims["iat"] - time.time()) > 3600:
            return self._fail(request, 403, "InvalidProviderToken")
        self.jwts.add(token)
        if headers.get("apns-topic") != self.topic:
            self.errors.append(f"apns-topic {headers.get('apns-topic')!r}")
            return self._fail(request, 400, "TopicDisallowed")
        expected_priority = {"alert": "10", "background": "5"}.get(headers.get("apns-push-type", ""))
        if expected_priority is None or headers.get("apns-priority") != expected_priority:
            self.errors.append(f"push type/priority {headers.get('apns-push-type')}/{headers.get('apns-priority')}")
            return self._fail(request, 400, "InvalidPushType")
        if not headers.get("apns-expiration", "").isdigit():
            self.errors.append("apns-expiration")
        try:
            payload = json.loads(_body(request))
            assert isinstance(payload["aps"], dict)
        except (ValueError, KeyError, AssertionError) as e:
            self.errors.append(f"bad payload {e!r}")
            return self._fail(request, 400, "PayloadEmpty")
        self.requests.append({"token": path[len("/3/device/") :], "headers": headers, "payload": payload})
        if self.script:
            status, body = self.script.popleft()
            request.setResponseCode(status)
            return json.dumps(body).encode()
        request.setHeader(b"apns-id", b"00000000-0000-0000-0000-000000000001")
        return b""

    def _fail(self, request: Request, status: int, reason: str) -> bytes:
        request.setResponseCode(status)
        return json.dumps({"reason": reason}).encode()


# -- low-level h2 server for GOAWAY / RST_STREAM / silence


class ScriptedH2Factory(Factory):
    """Answers 200 to every request, except on the first connection where ``mode`` applies:

    - "goaway": once ``hold`` requests arrived, answer the first, send GOAWAY naming it as the
      last processed stream and close;
    - "reset": refuse the first request with RST_STREAM (REFUSED_STREAM);
    - "silent": never answer;
    - "deaf": ignore everything the client sends (PINGs included).

    ``max_streams`` sets SETTINGS_MAX_CONCURRENT_STREAMS on every connection.
    """

    def __init__(self, mode: str, hold: int = 1, max_streams: int | None = None) -> None:
        self.mode = mode
        self.hold = hold
        self.max_streams = max_streams
        #: Request body sizes, in completion order.
        self.bodies: list[int] = []
        #: Most streams open at once on any connection.
        self.peak_streams = 0
        self.tracker = ConnectionTracker()
        self.requests = 0

    @property
    def connections(self) -> int:
        return self.tracker.connections

    def buildProtocol(self, addr: Any) -> Protocol:
        return ScriptedH2Server(self, first=self.tracker.connections == 0)


class ScriptedH2Server(Protocol):
    def __init__(self, factory: ScriptedH2Factory, first: bool) -> None:
        self.scripted = factory
        self.first = first
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.ended: list[int] = []
        self.sizes: dict[int, int] = {}
        self.done = False
        if factory.max_streams is not None:
            self.conn.local_settings = Settings(
                client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: factory.max_streams}
            )

    def connectionMade(self) -> None:
        self.scripted.tracker.opened(self)
        self.conn.initiate_connection()
        self._write(self.conn.data_to_send())

    def connectionLost(self, reason: Any = None) -> None:
        self.scripted.tracker.closed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.done or (self.first and self.scripted.mode == "deaf"):
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.sizes[event.stream_id] = self.sizes.get(event.stream_id, 0) + len(event.data)
            elif isinstance(event, RequestReceived):
                self.scripted.peak_streams = max(self.scripted.peak_streams, self.conn.open_inbound_streams)
            elif isinstance(event, StreamEnded):
                self.scripted.requests += 1
                self.scripted.bodies.append(self.sizes.pop(event.stream_id, 0))
                self.ended.append(event.stream_id)
                self._on_request(event.stream_id)
        if not self.done:
            self._write(self.conn.data_to_send())

    def _on_request(self, stream_id: int) -> None:
        mode = self.scripted.mode if self.first else "ok"
        if mode == "ok":
            self._answer(stream_id)
        elif mode == "reset":
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.first = False  # later requests on this connection are answered
        elif mode == "goaway" and len(self.ended) == self.scripted.hold:
            first = self.ended[0]
            self._answer(first)
            self.conn.close_connection(last_stream_id=first)
            self._write(self.conn.data_to_send())
            self.done = True
            assert self.transport is not None
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _answer(self, stream_id: int) -> None:
        self.conn.send_headers(stream_id, [(b":status", b"200"), (b"apns-id", b"x")], end_stream=True)
