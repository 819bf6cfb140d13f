"""The store interface every implementation satisfies, checked by ``tests/store_contract.py``.

A store owns the queued messages, their leases and the live-session registry, so that every
decision that must be atomic (store a message *and* lease it to the live session that holds its
connection; replace a session *and* move its leases) is one store operation. Times are passed in
by the caller (milliseconds since the epoch) so that the domain's injected clock governs leases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mpr_server.model import AddResult, Delivery, Lease, NewMessage, QueuedMessage, SocketRef, SocketRelease, TakeQuery


class MessageStore(Protocol):
    """Queued messages, leases and live sessions.

    Every method may raise :class:`~mpr_server.errors.StoreUnavailable`. A message is *pending* when it has no lease or
    its lease has ended; take and count see only pending messages.
    """

    name: str

    async def start(self) -> None:
        """Open connections and recover (release leases held by processes that are gone)."""

    async def stop(self) -> None:
        """Flush and close."""

    async def ping(self) -> None:
        """Return when the store answers; raise StoreUnavailable otherwise."""

    async def add(self, message: NewMessage, lease: Lease, max_queued: int = 0) -> AddResult:
        """Store ``message`` (raise QueueFull instead if ``max_queued`` > 0 and its connection holds
        that many messages, pending or leased). If a live session holds its connection and the session's socket is
        present, lease the message to that socket and return the delivery; if the socket is away
        (grace period), leave it pending and report ``held_by``."""

    async def take(self, query: TakeQuery, holder: SocketRef | None, lease: Lease) -> list[QueuedMessage]:
        """Oldest pending messages first, within ``limit`` and ``limit_bytes`` (a message larger
        than ``limit_bytes`` alone is skipped). Delete them if ``query.delete``, else lease them to
        ``holder``."""

    async def count(self, connection_id: str, recipient_did: str | None, now_ms: int) -> int:
        """Number of pending messages."""

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        """Delete these ids of this connection, whatever their state; unknown ids are ignored."""

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        """Delete the connection's messages addressed to ``recipient_did``."""

    async def add_session(
        self, connection_id: str, session_id: str, holder: SocketRef, lease: Lease
    ) -> Delivery | None:
        """Bind the connection's live session to ``holder`` (replacing any other), release every
        lease of the connection and lease those messages to ``holder`` for redelivery."""

    async def remove_session(self, connection_id: str, holder: SocketRef, session_id: str | None) -> bool:
        """Remove the connection's session if ``holder`` holds it or ``session_id`` matches, and
        release the leases that session held. True if a session was removed."""

    async def has_session(self, connection_id: str) -> bool:
        """Whether a live session (present or in its grace period) holds the connection."""

    async def release_expired(self, lease: Lease) -> list[Delivery]:
        """Release leases ended by ``lease.now_ms``; re-lease those of connections with a present
        live session to it and return the deliveries."""

    async def release_socket(self, holder: SocketRef, keep_sessions: bool, lease: Lease) -> SocketRelease:
        """The socket is gone: release its leases (redelivering to other sessions). With
        ``keep_sessions`` its sessions stay, marked away; otherwise they are dropped."""

    async def expire(self, received_before_ms: int) -> int:
        """Delete messages received before ``received_before_ms``, whatever their state (the
        message TTL); returns how many. Stores may do this in bounded batches per call."""

    async def attach_socket(self, holder: SocketRef, lease: Lease) -> list[Delivery]:
        """The socket is back: mark its sessions present and lease their pending messages to it."""
