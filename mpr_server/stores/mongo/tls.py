"""Verified TLS for txmongo, which would silently connect in plaintext.

The chain is checked against ``tlsCAFile`` (or the system roots), the certificate against the
host name (or IP address) in the URI, with a client certificate from ``tlsCertificateKeyFile`` (PEM
with its key, ``tlsCertificateKeyFilePassword`` if encrypted). ``tlsAllowInvalidHostnames``,
``tlsAllowInvalidCertificates`` and ``tlsInsecure`` are honoured only when given.
"""

from __future__ import annotations

import ipaddress
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from mpr_server.errors import StoreUnavailable
from mpr_server.stores.mongo.uri import MongoConfigError, MongoTLS

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
