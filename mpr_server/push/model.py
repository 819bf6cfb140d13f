"""Push value types and the error taxonomy shared by the providers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Coroutine
from typing import Any

from twisted.internet.interfaces import IReactorTime

from mpr_server._async import deadline
from mpr_server.model import PushToken as PushToken  # the value type the providers send to


def token_hash(token: str) -> str:
    """Short, stable, non-reversible label for a device token in logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


class PushError(Exception):
    """A push attempt failed."""


class TemporaryPushError(PushError):
    """Worth retrying later: transport error, 5xx, 429. ``retry_after`` in seconds if the provider said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentPushError(PushError):
    """Retrying the same request will not help (bad request, auth or configuration problem)."""


class InvalidTokenError(PermanentPushError):
    """The provider says the device token is unknown, expired or malformed."""


class CredentialsError(Exception):
    """A credentials file is missing, unreadable or incomplete."""


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


async def send_within(provider: str, attempt: Coroutine[Any, Any, None], timeout_s: float, clock: IReactorTime) -> None:
    """Run one provider request with a deadline; anything but a classified PushError (a timeout, a
    transport failure) becomes a TemporaryPushError, so the caller retries it."""
    try:
        await deadline(attempt, timeout_s, clock, lambda: TemporaryPushError(f"{provider} request timed out"))
    except PushError:
        raise
    except Exception as e:
        raise TemporaryPushError(f"{provider} transport error: {e!r}") from e


def read_json_object(path: str) -> dict[str, Any]:
    """A credentials file's JSON object; CredentialsError says what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise CredentialsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    return data
