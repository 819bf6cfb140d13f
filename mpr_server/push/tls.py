"""TLS trust for the push providers: system roots, or a PEM bundle (PUSH_CA_FILE)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


def load_trust_root(ca_file: str | None) -> IOpenSSLTrustRoot | None:
    """Trust root for ``ca_file`` (every certificate in the bundle); None means system roots."""
    if ca_file is None:
        return None
    with open(ca_file, "rb") as f:
        pem = f.read()
    certs = x509.load_pem_x509_certificates(pem)
    root: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.load_certificate(crypto.FILETYPE_ASN1, c.public_bytes(Encoding.DER))) for c in certs]
    )
    return root


def client_tls(
    host: str, trust_root: IOpenSSLTrustRoot | None, alpn: list[bytes] | None = None
) -> IOpenSSLClientConnectionCreator:
    """Verifying client TLS options for ``host``."""
    return ssl.optionsForClientTLS(host, trustRoot=trust_root, acceptableProtocols=alpn)


@implementer(IPolicyForHTTPS)
class TrustRootPolicy:
    """HTTPS policy for treq/Agent that trusts a given root instead of the system's."""

    def __init__(self, trust_root: IOpenSSLTrustRoot) -> None:
        self._trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return client_tls(hostname.decode("ascii"), self._trust_root)


def https_policy(trust_root: IOpenSSLTrustRoot | None) -> IPolicyForHTTPS:
    """Agent policy: ``trust_root`` if given, else the system roots."""
    if trust_root is None:
        return BrowserLikePolicyForHTTPS()
    return TrustRootPolicy(trust_root)
