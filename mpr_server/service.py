"""The message-pickup domain: message lifecycle, leases and live sessions, without any transport.

``PickupService`` turns mediator calls into store operations, sends ``messagesReceived`` to the
sockets that hold live sessions, decides when a push is due, and runs the time-based parts
(lease expiry sweep, the grace period of sockets that named themselves) on an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mpr_server.model import Delivery, NewMessage, ObjectIdFactory, QueuedMessage, SocketRef
from mpr_server.push.model import PushToken
from mpr_server.stores.base import Lease, MessageStore, StoreUnavailable, TakeQuery

# A notification frame carries at most this many messages; more are split over several frames.
NOTIFY_CHUNK = 100
RELEASE_RETRY_S = 5.0


class NotificationSink(Protocol):
    """One open mediator socket, as the domain sees it."""

    def send_notification(self, frame: bytes) -> None: ...


class Pusher(Protocol):
    def push(self, token: PushToken, message_id: str) -> None: ...


RemoteNotify = Callable[[Delivery, Sequence[bytes]], None]


@dataclass(frozen=True)
class DomainSettings:
    instance_id: str
    lease_ms: int = 60_000
    session_grace_ms: int = 10_000
    sweep_interval_ms: int = 1_000
    max_queued: int = 0  # per connection; 0 = no cap
    message_ttl_ms: int = 0  # messages older than this are deleted; 0 = kept until acknowledged


def notification_frames(connection_id: str, messages: Sequence[QueuedMessage]) -> list[bytes]:
    """The ``messagesReceived`` frames of wire-protocol §4, chunked."""
    return [
        orjson.dumps(
            {
                "jsonrpc": "2.0",
                "method": "messagesReceived",
                "params": {
                    "connectionId": connection_id,
                    "messages": [m.to_wire() for m in messages[i : i + NOTIFY_CHUNK]],
                    "id": "",
                },
            }
        )
        for i in range(0, len(messages), NOTIFY_CHUNK)
    ]


class PickupService(Service):
    """The domain service; also an ``IService`` whose start/stop run the lease sweeper."""

    _log = Logger()

    def __init__(
        self,
        store: MessageStore,
        clock: IReactorTime,
        settings: DomainSettings,
        pusher: Pusher | None = None,
        remote_notify: RemoteNotify | None = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self.settings = settings
        self._pusher = pusher
        self._remote_notify = remote_notify
        self._ids = ObjectIdFactory()
        self._sinks: dict[str, list[NotificationSink]] = {}
        self._grace: dict[str, IDelayedCall] = {}
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock

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
        self.deliver(await self.store.release_expired(self._lease()))
        if self.settings.message_ttl_ms:
            expired = await self.store.expire(self.now_ms() - self.settings.message_ttl_ms)
            if expired:
                self._log.info("deleted {n} messages older than MESSAGE_TTL_MS", n=expired)

    def _sweep(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._sweep_once())
        d.addErrback(lambda f: self._log.failure("lease sweep failed; the next tick retries", f))
        return d

    # -- sockets -----------------------------------------------------------------------------------

    def socket_opened(self, socket_id: str, sink: NotificationSink) -> None:
        self._sinks.setdefault(socket_id, []).append(sink)
        grace = self._grace.pop(socket_id, None)
        if grace is not None:
            if grace.active():
                grace.cancel()
            self._background(self._attach(socket_id), "re-attaching socket {socket_id}", socket_id)

    def socket_closed(self, socket_id: str, sink: NotificationSink, explicit_id: bool) -> None:
        sinks = self._sinks.get(socket_id)
        if sinks is None or sink not in sinks:
            return
        sinks.remove(sink)
        if sinks:
            return
        del self._sinks[socket_id]
        keep = explicit_id and self.settings.session_grace_ms > 0
        if keep:
            self._grace[socket_id] = self._clock.callLater(
                self.settings.session_grace_ms / 1000, self._grace_ended, socket_id
            )
        self._background(self._release(socket_id, keep), "releasing socket {socket_id}", socket_id)

    async def _attach(self, socket_id: str) -> None:
        self.deliver(await self.store.attach_socket(self.holder(socket_id), self._lease()))

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
        self.deliver(released.deliveries)
        for token, message_id in released.held_pushes:
            self._push(token, message_id)

    def _retry_release(self, socket_id: str, keep_sessions: bool) -> None:
        if socket_id in self._sinks or not self.running:
            return  # the socket is back (or we are stopping): nothing to release
        if keep_sessions and socket_id not in self._grace:
            return  # its grace period ended meanwhile, which released it for good
        self._background(self._release(socket_id, keep_sessions), "releasing socket {socket_id}", socket_id)

    def _grace_ended(self, socket_id: str) -> None:
        self._grace.pop(socket_id, None)
        self._background(self._release(socket_id, False), "ending grace of socket {socket_id}", socket_id)

    def _background(self, coro: object, what: str, socket_id: str) -> None:
        d: Deferred[None] = Deferred.fromCoroutine(coro)  # type: ignore[arg-type]
        d.addErrback(lambda f: self._log.failure("failed " + what, f, socket_id=socket_id))

    # -- notifications -------------------------------------------------------------------------------

    def deliver(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            if not delivery.messages:
                continue
            frames = notification_frames(delivery.connection_id, delivery.messages)
            if delivery.target.instance == self.settings.instance_id:
                self.notify_local(delivery.target.socket, frames)
            elif self._remote_notify is not None:
                self._remote_notify(delivery, frames)

    def notify_local(self, socket_id: str, frames: Sequence[bytes]) -> None:
        """Send frames to every open socket with this id. If none is open, the lease ends and the
        messages are redelivered or taken later."""
        for sink in self._sinks.get(socket_id, ()):
            for frame in frames:
                sink.send_notification(frame)

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
            id=self._ids.new(now),
            connection_id=connection_id,
            recipient_dids=tuple(recipient_dids),
            payload=payload,
            received_at_ms=int(now * 1000),
            push_token=token,
        )
        result = await self.store.add(message, self._lease(), self.settings.max_queued)
        if result.delivery is not None:
            self.deliver((result.delivery,))
        elif result.held_by is None and token is not None:
            self._push(token, message.id)
        return message.id

    async def take(self, query: TakeQuery, socket_id: str) -> list[QueuedMessage]:
        return await self.store.take(query, self.holder(socket_id), self._lease())

    async def count(self, connection_id: str, recipient_did: str | None) -> int:
        return await self.store.count(connection_id, recipient_did, self.now_ms())

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        await self.store.remove(connection_id, message_ids)

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        await self.store.remove_all(connection_id, recipient_did)

    async def add_live_session(self, connection_id: str, session_id: str, socket_id: str) -> None:
        delivery = await self.store.add_session(connection_id, session_id, self.holder(socket_id), self._lease())
        if delivery is not None:
            self.deliver((delivery,))

    async def remove_live_session(self, connection_id: str, socket_id: str, session_id: str | None) -> bool:
        return await self.store.remove_session(connection_id, self.holder(socket_id), session_id)

    async def has_live_session(self, connection_id: str) -> bool:
        return await self.store.has_session(connection_id)
