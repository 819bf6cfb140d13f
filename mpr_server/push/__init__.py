"""Push notifications (FCM HTTP v1, APNs over HTTP/2) for messages queued while no session is live."""

from .factory import build_push_service
from .model import (
    CredentialsError,
    InvalidTokenError,
    PermanentPushError,
    PushError,
    PushToken,
    TemporaryPushError,
)
from .service import PushService, Sender
from .settings import PushSettings
from .throttle import MemoryThrottle, Throttle

__all__ = [
    "CredentialsError",
    "InvalidTokenError",
    "MemoryThrottle",
    "PermanentPushError",
    "PushError",
    "PushService",
    "PushSettings",
    "PushToken",
    "Sender",
    "TemporaryPushError",
    "Throttle",
    "build_push_service",
]
