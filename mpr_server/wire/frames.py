"""How queued messages look on the wire (wire-protocol §3) and the ``messagesReceived``
notification frames (§4)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from mpr_server.model import QueuedMessage

# A notification frame carries at most this many messages; more are split over several frames.
NOTIFY_CHUNK = 100


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_millis(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as the original server wrote ``receivedAt``
    (the date and time of a second are computed once: messages come in bursts of the same one)."""
    seconds, millis = divmod(ms, 1000)
    return f"{_second(seconds)}.{millis:03d}Z"


def message_json(message: QueuedMessage) -> dict[str, object]:
    """A queued message as the wire shows it; the payload is inserted byte for byte."""
    return {
        "id": message.id,
        "receivedAt": iso_millis(message.received_at_ms),
        "encryptedMessage": orjson.Fragment(message.payload),
    }


def notification_frames(connection_id: str, messages: Sequence[QueuedMessage]) -> list[bytes]:
    """The ``messagesReceived`` frames for these messages, chunked."""
    return [
        orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "messagesReceived",
                "params": {
                    "connectionId": connection_id,
                    "messages": [message_json(m) for m in messages[i : i + NOTIFY_CHUNK]],
                    "id": "",
                },
            }
        )
        for i in range(0, len(messages), NOTIFY_CHUNK)
    ]
