"""Values shared by the domain, the stores and the transport."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from mpr_server.push.model import PushToken


@dataclass(frozen=True)
class SocketRef:
    """One mediator socket (by its socket id) on one MPR instance."""

    instance: str
    socket: str

    def key(self) -> str:
        return f"{self.instance}/{self.socket}"


@dataclass(frozen=True)
class NewMessage:
    """A validated message about to be stored."""

    id: str
    connection_id: str
    recipient_dids: tuple[str, ...]
    payload: bytes  # compact JSON of the DIDComm JWE, key order preserved
    received_at_ms: int
    push_token: PushToken | None = None  # the recipient's device, if the mediator gave one

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class QueuedMessage:
    """A stored message as handed to a mediator."""

    id: str
    received_at_ms: int
    payload: bytes

    def to_wire(self) -> dict[str, object]:
        return {
            "id": self.id,
            "receivedAt": iso_millis(self.received_at_ms),
            "encryptedMessage": orjson.Fragment(self.payload),
        }


@dataclass(frozen=True)
class Delivery:
    """Messages just leased to a live session, to be notified to its socket(s)."""

    target: SocketRef
    connection_id: str
    messages: Sequence[QueuedMessage] = field(default_factory=tuple)


@dataclass(frozen=True)
class AddResult:
    """What the store decided while adding a message.

    ``delivery`` is set when a live session held the connection (the message is then leased to it);
    ``held_by`` is set when a session exists but its socket is away (grace period): no push, no
    notification now, the message stays pending until the socket returns; the store keeps its
    push token and hands it back if the session ends without the socket returning.
    """

    delivery: Delivery | None = None
    held_by: SocketRef | None = None


def iso_millis(ms: int) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``, as the original server wrote ``receivedAt``."""
    seconds, millis = divmod(ms, 1000)
    stamp = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{millis:03d}Z"


class ObjectIdFactory:
    """Time-ordered 12-byte ids rendered as 24 lowercase hex characters (MongoDB ObjectId layout)."""

    def __init__(self) -> None:
        self._random = os.urandom(5)
        self._counter = int.from_bytes(os.urandom(3), "big")
        self._lock = threading.Lock()

    def new(self, seconds: float) -> str:
        with self._lock:
            self._counter = (self._counter + 1) & 0xFFFFFF
            counter = self._counter
        return (struct.pack(">I", int(seconds) & 0xFFFFFFFF) + self._random + counter.to_bytes(3, "big")).hex()
