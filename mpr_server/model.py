"""Values shared by every layer: messages, sockets, leases, queries, push tokens. No behaviour."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PushToken:
    """A device token as the mediator sends it: ``type`` "fcm" means FCM, anything else APNs."""

    type: str
    token: str


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


@dataclass(frozen=True)
class TakeQuery:
    connection_id: str
    recipient_did: str | None = None
    limit: int = 0  # 0: no count limit
    limit_bytes: int = 0  # 0: no size limit
    delete: bool = False


@dataclass(frozen=True)
class Lease:
    """When a lease taken now ends: ``now_ms`` and ``until_ms`` (both epoch milliseconds)."""

    now_ms: int
    until_ms: int


@dataclass(frozen=True)
class SocketRelease:
    """Outcome of a socket going away: sessions it lost, redeliveries to other sessions, and the
    pushes held back while the dropped sessions were away (token, message id)."""

    dropped_connections: Sequence[str]
    deliveries: Sequence[Delivery]
    held_pushes: Sequence[tuple[PushToken, str]] = ()
