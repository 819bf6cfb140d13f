"""FCM HTTP v1 sender: service-account OAuth2 (JWT bearer grant) and ``messages:send`` over treq."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

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

FCM_DATA_TYPE = "https://didcomm.org/push-notifications-fcm"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600


@dataclass(frozen=True)
class ServiceAccount:
    """The parts of a Firebase service-account file the sender needs."""

    project_id: str
    client_email: str
    private_key: RSAPrivateKey
    private_key_id: str | None = None
    token_uri: str | None = None


def load_service_account(path: str) -> ServiceAccount:
    """Read a service-account JSON file; CredentialsError says what is wrong with it."""
    data = read_json_object(path)
    missing = [k for k in ("project_id", "client_email", "private_key") if not isinstance(data.get(k), str)]
    if missing:
        raise CredentialsError(f"{path} lacks {', '.join(missing)}")
    try:
        key = load_pem_private_key(data["private_key"].encode("utf-8"), password=None)
    except ValueError as e:
        raise CredentialsError(f"{path}: private_key is not a PEM private key") from e
    if not isinstance(key, RSAPrivateKey):
        raise CredentialsError(f"{path}: private_key is not an RSA key")
    key_id = data.get("private_key_id")
    token_uri = data.get("token_uri")
    return ServiceAccount(
        project_id=data["project_id"],
        client_email=data["client_email"],
        private_key=key,
        private_key_id=key_id if isinstance(key_id, str) else None,
        token_uri=token_uri if isinstance(token_uri, str) else None,
    )


def build_fcm_message(token: str, message_id: str, settings: PushSettings) -> dict[str, Any]:
    """The ``message`` object of ``messages:send``, shaped like the original server's."""
    data_only = settings.notification_data_only
    collapse = settings.push_collapse_key
    android: dict[str, Any] = {"priority": "high"}
    apns_headers = {
        "apns-priority": "5" if data_only else "10",
        "apns-push-type": "background" if data_only else "alert",
    }
    aps: dict[str, Any] = {"content-available": 1}
    message: dict[str, Any] = {
        "token": token,
        "data": {"@type": FCM_DATA_TYPE, "message_id": message_id},
        "android": android,
        "apns": {"headers": apns_headers, "payload": {"aps": aps}},
    }
    if collapse:
        android["collapse_key"] = collapse
        apns_headers["apns-collapse-id"] = collapse
    if not data_only:
        alert = {"title": settings.push_title, "body": settings.push_body}
        message["notification"] = dict(alert)
        aps["alert"] = dict(alert)
        if collapse:
            android["notification"] = {"tag": collapse}
    return message


def _fcm_error_codes(body: bytes) -> tuple[set[str], str]:
    """Status and FcmError codes of an error response, plus its message (best effort)."""
    try:
        error = orjson.loads(body).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        return set(), body[:200].decode("utf-8", "replace")
    if not isinstance(error, dict):
        return set(), ""
    codes: set[str] = set()
    if isinstance(error.get("status"), str):
        codes.add(error["status"])
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
            codes.add(detail["errorCode"])
    message = error.get("message")
    return codes, message if isinstance(message, str) else ""


def classify_fcm_error(status: int, body: bytes, retry_after: float | None) -> PushError:
    """Map a non-200 ``messages:send`` response onto the error taxonomy."""
    codes, message = _fcm_error_codes(body)
    what = f"FCM {status} {'/'.join(sorted(codes)) or '-'}: {message}"
    if "UNREGISTERED" in codes or "SENDER_ID_MISMATCH" in codes or status == 404:
        return InvalidTokenError(what)
    if status == 400:
        # INVALID_ARGUMENT: in practice a malformed registration token (our payload is fixed).
        return InvalidTokenError(what)
    if status == 429 or "QUOTA_EXCEEDED" in codes:
        return TemporaryPushError(what, retry_after)
    if status >= 500 or codes & {"UNAVAILABLE", "INTERNAL"}:
        return TemporaryPushError(what, retry_after)
    return PermanentPushError(what)


def make_http_client(
    reactor: IReactorTCP, policy: IPolicyForHTTPS, max_connections: int
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client with its own persistent pool (closed by the sender's ``close``)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_connections
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), pool


class FcmSender:
    """Sends one FCM push per call; raises the error taxonomy of ``model``."""

    name = "fcm"
    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        settings: PushSettings,
        account: ServiceAccount,
        http: HTTPClient,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self._clock = reactor
        self._settings = settings
        self._account = account
        self._http = http
        self._pool = pool
        self._token_url = settings.fcm_token_url or account.token_uri or DEFAULT_TOKEN_URL
        base = settings.fcm_base_url.rstrip("/")
        self._send_url = f"{base}/v1/projects/{account.project_id}/messages:send"
        self._lock = DeferredLock()
        self._access_token: str | None = None
        self._access_valid_until = 0.0

    async def send(self, token: str, message_id: str) -> None:
        await send_within("FCM", self._send(token, message_id), self._settings.push_timeout_ms / 1000.0, self._clock)

    async def _send(self, token: str, message_id: str) -> None:
        body = orjson.dumps({"message": build_fcm_message(token, message_id, self._settings)})
        for refreshed in (False, True):
            access = await self._get_access_token()
            headers: dict[bytes | str, bytes | str] = {
                b"Authorization": f"Bearer {access}".encode("ascii"),
                b"Content-Type": b"application/json; charset=utf-8",
            }
            response = await self._http.post(self._send_url, data=body, headers=headers)
            content = await response.content()
            if response.code == 200:
                return
            if response.code == 401 and not refreshed:
                self._log.info("FCM rejected the access token (401); refreshing it")
                self._forget_access_token(access)
                continue
            retry_after = parse_retry_after(
                response.headers.getRawHeaders("retry-after", [None])[0], self._clock.seconds()
            )
            raise classify_fcm_error(response.code, content, retry_after)

    async def _get_access_token(self) -> str:
        async with self._lock:
            if self._access_token is not None and self._clock.seconds() < self._access_valid_until:
                return self._access_token
            token, expires_in = await self._fetch_access_token()
            # Renew shortly before expiry (a minute, or half the lifetime if it is very short).
            margin = min(60.0, expires_in / 2.0)
            self._access_token = token
            self._access_valid_until = self._clock.seconds() + expires_in - margin
            return token

    def _forget_access_token(self, used: str) -> None:
        if self._access_token == used:
            self._access_token = None

    def _assertion(self) -> str:
        now = int(self._clock.seconds())
        claims = {
            "iss": self._account.client_email,
            "scope": FCM_SCOPE,
            "aud": self._token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
        return jwt.encode(claims, self._account.private_key, algorithm="RS256", headers=headers)

    async def _fetch_access_token(self) -> tuple[str, float]:
        form = urlencode({"grant_type": JWT_BEARER_GRANT, "assertion": self._assertion()})
        headers: dict[bytes | str, bytes | str] = {b"Content-Type": b"application/x-www-form-urlencoded"}
        response = await self._http.post(self._token_url, data=form.encode("ascii"), headers=headers)
        content = await response.content()
        if response.code != 200:
            what = f"OAuth token endpoint answered {response.code}: {content[:200].decode('utf-8', 'replace')}"
            if response.code == 429 or response.code >= 500:
                retry_after = parse_retry_after(
                    response.headers.getRawHeaders("retry-after", [None])[0], self._clock.seconds()
                )
                raise TemporaryPushError(what, retry_after)
            raise PermanentPushError(what)
        try:
            data = orjson.loads(content)
            token = data["access_token"]
            expires_in = float(data.get("expires_in", 3600))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise TemporaryPushError(f"bad OAuth token response: {e!r}") from e
        if not isinstance(token, str) or not token:
            raise TemporaryPushError("bad OAuth token response: no access_token")
        self._log.debug("FCM access token obtained, valid for {expires_in}s", expires_in=expires_in)
        return token, expires_in

    def close(self) -> Deferred[None]:
        """Close pooled HTTP connections."""
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d
