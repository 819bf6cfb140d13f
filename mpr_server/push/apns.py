"""APNs sender: token-based auth (ES256 provider JWT) over the HTTP/2 client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
)
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .h2client import H2Client, Headers
from .model import (
    CredentialsError,
    InvalidTokenError,
    PermanentPushError,
    PushError,
    TemporaryPushError,
    parse_retry_after,
    read_json_object,
    send_within,
)
from .settings import PushSettings

APNS_DATA_TYPE = "https://didcomm.org/push-notifications-apns"
PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.sandbox.push.apple.com"
#: Apple rejects provider tokens older than an hour and refreshes more often than every 20 minutes.
PROVIDER_TOKEN_MAX_AGE_S = 50 * 60

INVALID_TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"})
PROVIDER_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken"})


@dataclass(frozen=True)
class ApnsCredentials:
    key_id: str
    team_id: str
    production: bool
    private_key: EllipticCurvePrivateKey


def load_apns_credentials(cfg_file: str, key_file: str) -> ApnsCredentials:
    """Read ``{keyId, teamId, production}`` and the ``.p8`` key; CredentialsError says what is wrong."""
    cfg = read_json_object(cfg_file)
    missing = [k for k in ("keyId", "teamId") if not isinstance(cfg.get(k), str) or not cfg[k]]
    if missing:
        raise CredentialsError(f"{cfg_file} lacks {', '.join(missing)}")
    production = cfg.get("production", False)
    if isinstance(production, str):
        production = production.strip().lower() in ("1", "true", "yes")
    try:
        with open(key_file, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise CredentialsError(f"cannot read {key_file}: {e.strerror or e}") from e
    try:
        key = load_pem_private_key(pem, password=None)
    except ValueError as e:
        raise CredentialsError(f"{key_file} is not a PEM private key") from e
    if not isinstance(key, EllipticCurvePrivateKey) or not isinstance(key.curve, SECP256R1):
        raise CredentialsError(f"{key_file} is not an EC P-256 key")
    return ApnsCredentials(cfg["keyId"], cfg["teamId"], bool(production), key)


class ProviderToken:
    """The ES256 provider JWT, reused until it is ``max_age`` old (or rejected), then re-signed."""

    def __init__(self, clock: IReactorTime, credentials: ApnsCredentials, max_age: float = PROVIDER_TOKEN_MAX_AGE_S):
        self._clock = clock
        self._credentials = credentials
        self._max_age = max_age
        self._token: str | None = None
        self._issued_at = 0.0
        #: Tokens signed so far.

    def get(self) -> str:
        now = self._clock.seconds()
        if self._token is None or now - self._issued_at >= self._max_age:
            self._token = jwt.encode(
                {"iss": self._credentials.team_id, "iat": int(now)},
                self._credentials.private_key,
                algorithm="ES256",
                headers={"kid": self._credentials.key_id},
            )
            self._issued_at = now
        return self._token

    def invalidate(self, used: str) -> None:
        if self._token == used:
            self._token = None


def build_apns_payload(message_id: str, settings: PushSettings) -> dict[str, Any]:
    """The notification JSON, shaped like the original server's."""
    aps: dict[str, Any] = {"content-available": 1}
    if not settings.notification_data_only:
        aps["alert"] = {"title": settings.push_title, "body": settings.push_body}
    return {"aps": aps, "message_id": message_id, "@type": APNS_DATA_TYPE}


def build_apns_headers(settings: PushSettings, jwt_token: str, now: float) -> Headers:
    """APNs request headers (without the HTTP/2 pseudo-headers)."""
    data_only = settings.notification_data_only
    headers: Headers = [
        (b"authorization", f"bearer {jwt_token}".encode("ascii")),
        (b"apns-topic", (settings.apns_topic or "").encode("utf-8")),
        (b"apns-push-type", b"background" if data_only else b"alert"),
        (b"apns-priority", b"5" if data_only else b"10"),
        (b"apns-expiration", str(int(now) + settings.apns_expiration_s).encode("ascii")),
        (b"content-type", b"application/json"),
    ]
    if settings.push_collapse_key:
        headers.append((b"apns-collapse-id", settings.push_collapse_key.encode("utf-8")))
    return headers


def apns_reason(body: bytes) -> str:
    try:
        reason = orjson.loads(body).get("reason")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return reason if isinstance(reason, str) else ""


def classify_apns_error(status: int, reason: str, retry_after: float | None) -> PushError:
    """Map a non-200 APNs response onto the error taxonomy."""
    what = f"APNs {status} {reason or '-'}"
    if reason in INVALID_TOKEN_REASONS or status == 410:
        return InvalidTokenError(what)
    if status == 429 or status >= 500:
        return TemporaryPushError(what, retry_after)
    return PermanentPushError(what)


class ApnsSender:
    """Sends one APNs push per call; raises the error taxonomy of ``model``."""

    name = "apns"
    _log = Logger()

    def __init__(
        self, clock: IReactorTime, settings: PushSettings, credentials: ApnsCredentials, client: H2Client
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._client = client
        self.provider_token = ProviderToken(clock, credentials)

    async def send(self, token: str, message_id: str) -> None:
        await send_within("APNs", self._send(token, message_id), self._settings.push_timeout_ms / 1000.0, self._clock)

    async def _send(self, token: str, message_id: str) -> None:
        path = f"/3/device/{quote(token, safe='')}".encode("ascii")
        body = orjson.dumps(build_apns_payload(message_id, self._settings))
        for renewed in (False, True):
            provider_token = self.provider_token.get()
            headers = build_apns_headers(self._settings, provider_token, self._clock.seconds())
            response = await self._client.request(b"POST", path, headers, body)
            if response.status == 200:
                return
            reason = apns_reason(response.body)
            if response.status == 403 and reason in PROVIDER_TOKEN_REASONS and not renewed:
                self._log.info("APNs rejected the provider token ({reason}); signing a new one", reason=reason)
                self.provider_token.invalidate(provider_token)
                continue
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock.seconds())
            raise classify_apns_error(response.status, reason, retry_after)

    def close(self) -> Deferred[None]:
        """Close the HTTP/2 connection."""
        return self._client.close()
