"""The message-pickup domain: message lifecycle, leases and live sessions, without any transport.

``PickupService`` turns mediator calls into store operations, hands the messages leased to live
sessions to the notifier, decides when a push is due, and runs the time-based parts (lease expiry
sweep, the grace period of sockets that named themselves) on an injected clock.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bson import ObjectId
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mpr_server._async import background
from mpr_server.errors import StoreUnavailable
from mpr_server.metrics import REDELIVERY_CAUSES, Metrics
from mpr_server.model import Delivery, Lease, NewMessage, PushToken, QueuedMessage, SocketRef, TakeQuery
from mpr_server.notify import LocalNotifier, LocalSockets, MessageSink, Notifier
from mpr_server.stores.base import MessageStore

RELEASE_RETRY_S = 5.0


class Pusher(Protocol):
    def push(self, token: PushToken, message_id: str) -> None: ...


@dataclass(frozen=True)
class DomainSettings:
    instance_id: str
    lease_ms: int = 60_000
    session_grace_ms: int = 10_000
    sweep_interval_ms: int = 1_000
    max_queued: int = 0  # per connection; 0 = no cap
    message_ttl_ms: int = 0  # messages older than this are deleted; 0 = kept until acknowledged


class PickupService(Service):
    """The domain service; also an ``IService`` whose start/stop run the lease sweeper."""

    _log = Logger()

    def __init__(
        self,
        store: MessageStore,
        clock: IReactorTime,
        settings: DomainSettings,
        pusher: Pusher | None = None,
        *,
        sockets: LocalSockets | None = None,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self.settings = settings
        self._pusher = pusher
        self.sockets = sockets if sockets is not None else LocalSockets()
        self._notifier = notifier if notifier is not None else LocalNotifier(self.sockets)
        self._grace: dict[str, IDelayedCall] = {}
        self._socket_work: set[Deferred[None]] = set()  # releases and re-attaches under way
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self.metrics = metrics if metrics is not None else Metrics(store.name)
        m = self.metrics
        self._added, self._acknowledged, self._expired = m.messages_added, m.messages_acknowledged, m.messages_expired
        self._taken, self._notified = m.messages_delivered.labels("taken"), m.messages_delivered.labels("notified")
        self._redelivered = {cause: m.messages_redelivered.labels(cause) for cause in REDELIVERY_CAUSES}
        #: connection -> socket id of the live sessions bound through this instance's sockets (a
        #: session taken over through another instance stays here until this socket goes)
        self.live_sessions: dict[str, str] = {}
        m.live_sessions.set_function(lambda: len(self.live_sessions))

    # -- time ----------------------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _lease(self) -> Lease:
        now = self.now_ms()
        return Lease(now, now + self.settings.lease_ms)

    def holder(self, socket_id: str) -> SocketRef:
        return SocketRef(self.settings.instance_id, socket_id)

    # -- service life cycle -----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self.settings.sweep_interval_ms / 1000, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        for call in self._grace.values():
            if call.active():
                call.cancel()
        self._grace.clear()
        return None

    async def end_grace_periods(self) -> None:
        """At shutdown: nobody will be here to end the grace periods of sockets that named
        themselves, so end them now — their sessions go and the pushes they held back are sent
        (otherwise those sessions would look alive to other instances for a while, and the held
        pushes would never be sent)."""
        sockets = list(self._grace)
        for socket_id in sockets:
            call = self._grace.pop(socket_id)
            if call.active():
                call.cancel()
        for socket_id in sockets:
            await self._release(socket_id, False)

    async def _sweep_once(self) -> None:
        self.deliver(await self.store.release_expired(self._lease()), "lease_expired")
        if self.settings.message_ttl_ms:
            expired = await self.store.expire(self.now_ms() - self.settings.message_ttl_ms)
            if expired:
                self._expired.inc(expired)
                self._log.info("deleted {n} messages older than MESSAGE_TTL_MS", n=expired)

    def _sweep(self) -> Deferred[None]:
        return background(self._sweep_once(), self._log, "lease sweep failed; the next tick retries")

    # -- sockets -----------------------------------------------------------------------------------

    def socket_opened(self, socket_id: str, sink: MessageSink) -> None:
        self.sockets.add(socket_id, sink)
        grace = self._grace.pop(socket_id, None)
        if grace is not None:
            if grace.active():
                grace.cancel()
            self._for_socket(self._attach(socket_id), "re-attaching socket {socket_id}", socket_id)

    def socket_closed(self, socket_id: str, sink: MessageSink, explicit_id: bool) -> None:
        if not self.sockets.discard(socket_id, sink):
            return
        keep = explicit_id and self.settings.session_grace_ms > 0
        if keep:
            self._grace[socket_id] = self._clock.callLater(
                self.settings.session_grace_ms / 1000, self._grace_ended, socket_id
            )
        self._for_socket(self._release(socket_id, keep), "releasing socket {socket_id}", socket_id)

    async def _attach(self, socket_id: str) -> None:
        self.deliver(await self.store.attach_socket(self.holder(socket_id), self._lease()), "socket_returned")

    async def _release(self, socket_id: str, keep_sessions: bool) -> None:
        try:
            released = await self.store.release_socket(self.holder(socket_id), keep_sessions, self._lease())
        except StoreUnavailable as e:
            # Left alone, the sessions of a gone socket would hold their connections (and
            # suppress pushes) for as long as this instance lives: try again until it works.
            self._log.warn(
                "could not release socket {socket_id} ({error}); retrying in {delay} s",
                socket_id=socket_id,
                error=str(e),
                delay=RELEASE_RETRY_S,
            )
            self._clock.callLater(RELEASE_RETRY_S, self._retry_release, socket_id, keep_sessions)
            return
        if not keep_sessions:
            for connection_id in released.dropped_connections:
                if self.live_sessions.get(connection_id) == socket_id:
                    del self.live_sessions[connection_id]
        self.deliver(released.deliveries, "socket_closed")
        for token, message_id in released.held_pushes:
            self._push(token, message_id)

    def _retry_release(self, socket_id: str, keep_sessions: bool) -> None:
        if socket_id in self.sockets or not self.running:
            return  # the socket is back (or we are stopping): nothing to release
        if keep_sessions and socket_id not in self._grace:
            return  # its grace period ended meanwhile, which released it for good
        self._for_socket(self._release(socket_id, keep_sessions), "releasing socket {socket_id}", socket_id)

    def _grace_ended(self, socket_id: str) -> None:
        self._grace.pop(socket_id, None)
        self._for_socket(self._release(socket_id, False), "ending grace of socket {socket_id}", socket_id)

    def _for_socket(self, work: Coroutine[Any, Any, None], what: str, socket_id: str) -> None:
        d = background(work, self._log, "failed " + what, socket_id=socket_id)
        if not d.called:
            self._socket_work.add(d)
            d.addBoth(lambda _: self._socket_work.discard(d))

    async def settle(self) -> None:
        """Wait for the releases of closed sockets under way (at shutdown, before the store stops)."""
        while self._socket_work:
            await next(iter(self._socket_work))

    # -- notifications -------------------------------------------------------------------------------

    def deliver(self, deliveries: Iterable[Delivery], redelivery: str | None = None) -> None:
        """Hand the deliveries to the notifier; ``redelivery`` names why, for those that are."""
        for delivery in deliveries:
            if delivery.messages:
                self._notified.inc(len(delivery.messages))
                if redelivery is not None:
                    self._redelivered[redelivery].inc(len(delivery.messages))
                self._notifier.notify(delivery)

    def _push(self, token: PushToken, message_id: str) -> None:
        if self._pusher is not None:
            self._pusher.push(token, message_id)

    # -- the methods of wire-protocol §3 -----------------------------------------------------------

    async def add_message(
        self,
        connection_id: str,
        recipient_dids: Sequence[str],
        payload: bytes,
        token: PushToken | None,
    ) -> str:
        now = self._clock.seconds()
        message = NewMessage(
            id=str(ObjectId()),
            connection_id=connection_id,
            recipient_dids=tuple(recipient_dids),
            payload=payload,
            received_at_ms=int(now * 1000),
            push_token=token,
        )
        result = await self.store.add(message, self._lease(), self.settings.max_queued)
        self._added.inc()
        if result.delivery is not None:
            self.deliver((result.delivery,))
        elif result.held_by is None and token is not None:
            self._push(token, message.id)
        return message.id

    async def take(self, query: TakeQuery, socket_id: str) -> list[QueuedMessage]:
        taken = await self.store.take(query, self.holder(socket_id), self._lease())
        self._taken.inc(len(taken))
        return taken

    async def count(self, connection_id: str, recipient_did: str | None) -> int:
        return await self.store.count(connection_id, recipient_did, self.now_ms())

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        await self.store.remove(connection_id, message_ids)
        self._acknowledged.inc(len(message_ids))

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        await self.store.remove_all(connection_id, recipient_did)

    async def add_live_session(self, connection_id: str, session_id: str, socket_id: str) -> None:
        delivery = await self.store.add_session(connection_id, session_id, self.holder(socket_id), self._lease())
        self.live_sessions[connection_id] = socket_id
        if delivery is not None:
            self.deliver((delivery,), "session_changed")

    async def remove_live_session(self, connection_id: str, socket_id: str, session_id: str | None) -> bool:
        removed = await self.store.remove_session(connection_id, self.holder(socket_id), session_id)
        if removed:
            self.live_sessions.pop(connection_id, None)
        return removed

    async def has_live_session(self, connection_id: str) -> bool:
        return await self.store.has_session(connection_id)
