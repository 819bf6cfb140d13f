"""A ``MessageStore`` that times every operation of another one and counts its failures
(``mpr_store_duration_seconds``, ``mpr_store_errors_total``), so that no store carries metric code."""

from __future__ import annotations

import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from mpr_server.errors import StoreUnavailable
from mpr_server.metrics import Metrics, StoreMetrics
from mpr_server.model import AddResult, Delivery, Lease, NewMessage, QueuedMessage, SocketRef, SocketRelease, TakeQuery
from mpr_server.stores.base import MessageStore

T = TypeVar("T")


class TimedStore:
    """See the module docstring; ``inner`` is the store being measured."""

    def __init__(self, inner: MessageStore, metrics: Metrics) -> None:
        self.inner = inner
        self.name = inner.name
        self._ops = metrics.store_ops

    async def _timed(self, op: StoreMetrics, work: Coroutine[Any, Any, T]) -> T:
        started = time.perf_counter()
        try:
            return await work
        except StoreUnavailable:
            op.errors.inc()
            raise
        finally:
            op.seconds.observe(time.perf_counter() - started)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def ping(self) -> None:
        await self._timed(self._ops["ping"], self.inner.ping())

    async def add(self, message: NewMessage, lease: Lease, max_queued: int = 0) -> AddResult:
        return await self._timed(self._ops["add"], self.inner.add(message, lease, max_queued))

    async def take(self, query: TakeQuery, holder: SocketRef | None, lease: Lease) -> list[QueuedMessage]:
        return await self._timed(self._ops["take"], self.inner.take(query, holder, lease))

    async def count(self, connection_id: str, recipient_did: str | None, now_ms: int) -> int:
        return await self._timed(self._ops["count"], self.inner.count(connection_id, recipient_did, now_ms))

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        await self._timed(self._ops["remove"], self.inner.remove(connection_id, message_ids))

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        await self._timed(self._ops["remove_all"], self.inner.remove_all(connection_id, recipient_did))

    async def add_session(
        self, connection_id: str, session_id: str, holder: SocketRef, lease: Lease
    ) -> Delivery | None:
        return await self._timed(
            self._ops["add_session"], self.inner.add_session(connection_id, session_id, holder, lease)
        )

    async def remove_session(self, connection_id: str, holder: SocketRef, session_id: str | None) -> bool:
        return await self._timed(
            self._ops["remove_session"], self.inner.remove_session(connection_id, holder, session_id)
        )

    async def has_session(self, connection_id: str) -> bool:
        return await self._timed(self._ops["has_session"], self.inner.has_session(connection_id))

    async def release_expired(self, lease: Lease) -> list[Delivery]:
        return await self._timed(self._ops["release_expired"], self.inner.release_expired(lease))

    async def release_socket(self, holder: SocketRef, keep_sessions: bool, lease: Lease) -> SocketRelease:
        return await self._timed(self._ops["release_socket"], self.inner.release_socket(holder, keep_sessions, lease))

    async def expire(self, received_before_ms: int) -> int:
        return await self._timed(self._ops["expire"], self.inner.expire(received_before_ms))

    async def attach_socket(self, holder: SocketRef, lease: Lease) -> list[Delivery]:
        return await self._timed(self._ops["attach_socket"], self.inner.attach_socket(holder, lease))
