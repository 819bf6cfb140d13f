"""Optional authentication of mediators at the WebSocket handshake (off by default).

The official client can only set its URL, so the credential comes as ``?token=...``; an
``Authorization: Bearer ...`` header is accepted too. A credential is either one of the shared
secrets (compared in constant time; several may be configured to rotate them) or a JWT signed
with the configured key (HS256 with a secret, or RS256/ES256 with a public key).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jwt


class AuthenticationFailed(Exception):
    """The handshake carries no valid credential; the message says why (never the credential)."""


@dataclass(frozen=True)
class AuthSettings:
    tokens: tuple[str, ...] = ()
    jwt_key: str | None = None  # HS256 secret or PEM public key
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or self.jwt_key is not None


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._settings = settings
        self._tokens = [t.encode() for t in settings.tokens]

    @property
    def enabled(self) -> bool:
        return self._settings.enabled

    def check(self, params: Mapping[str, Sequence[str]], headers: Mapping[str, str]) -> None:
        """Raise AuthenticationFailed unless the request carries a valid credential."""
        if not self.enabled:
            return
        credential = _credential(params, headers)
        if credential is None:
            raise AuthenticationFailed("no token: pass ?token=... or an Authorization: Bearer header")
        given = credential.encode()
        # compare against every secret so the time taken does not depend on which one matched
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(given, token)
        if matched:
            return
        if self._settings.jwt_key is None:
            raise AuthenticationFailed("invalid token")
        try:
            jwt.decode(
                credential,
                self._settings.jwt_key,
                algorithms=list(self._settings.jwt_algorithms),
                audience=self._settings.jwt_audience,
                options={"require": ["exp"], "verify_aud": self._settings.jwt_audience is not None},
            )
        except jwt.PyJWTError as e:
            raise AuthenticationFailed(f"invalid token: {e}") from None


def _credential(params: Mapping[str, Sequence[str]], headers: Mapping[str, str]) -> str | None:
    values = params.get("token")
    if values and values[0]:
        return values[0]
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None
