"""The WebSocket transport: one Autobahn protocol per mediator socket, a thin adapter to the
dispatcher (frames in, frames out) and to the domain (socket open/close, notifications)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mpr_server._async import Waiters
from mpr_server.auth import AuthenticationFailed, Authenticator, AuthSettings
from mpr_server.model import QueuedMessage
from mpr_server.service import PickupService
from mpr_server.wire.frames import notification_frames
from mpr_server.wire.jsonrpc import CallContext, Dispatcher

GOING_AWAY = 1001
MAX_SOCKET_ID = 256


@implementer(IPushProducer)
class _OutputGate:
    """Told by the transport when its send buffer fills (pause) and drains (resume)."""

    def __init__(self, protocol: MediatorProtocol) -> None:
        self._protocol = protocol

    def pauseProducing(self) -> None:
        self._protocol.output_blocked()

    def resumeProducing(self) -> None:
        self._protocol.output_drained()

    def stopProducing(self) -> None:
        pass


class MediatorProtocol(WebSocketServerProtocol):
    """One mediator socket.

    Back-pressure: while the mediator does not read our replies (the send buffer is full), we stop
    reading its requests; a mediator that stays that way for ``slow_reader_timeout_s``, or while
    notifications pile up past ``max_blocked_bytes``, is disconnected (its leases are released and
    redelivered) rather than allowed to grow our memory without bound.
    """

    _log = Logger()
    factory: MediatorFactory

    socket_id: str = ""
    explicit_id: bool = False
    _ctx: CallContext | None = None
    _opened: bool = False
    _blocked: IDelayedCall | None = None
    _blocked_bytes: int = 0
    _in_flight: int = 0
    _going_away: bool = False

    def onMessageEnd(self) -> None:
        # Autobahn's own version also fires a "message" event after every onMessage, gathering its
        # listeners' results through txaio (futures, a gather, callbacks) even when there is none:
        # a sixth of the server's time per call. Nothing listens for it here, so it is not fired.
        if not self.failedByMe:
            payload = b"".join(self.message_data)
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(payload, self.message_is_binary)
        self.message_data = None  # type: ignore[assignment]  # as Autobahn does

    def connectionMade(self) -> None:
        # Autobahn tries to disable Nagle before it has copied the factory's options onto the
        # protocol, and silently fails; without this, a notification following a reply waits for
        # the mediator's delayed ACK (~40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:  # not a TCP socket
                pass
        super().connectionMade()

    def onConnect(self, request: ConnectionRequest) -> None:
        try:
            self.factory.authenticator.check(request.params, request.headers)
        except AuthenticationFailed as e:
            self._log.warn("refused a mediator from {peer}: {reason}", peer=request.peer, reason=str(e))
            raise ConnectionDeny(401, str(e)) from None
        requested = request.params.get("socket_id", [""])[0]
        if len(requested) > MAX_SOCKET_ID:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, f"socket_id longer than {MAX_SOCKET_ID} characters")
        self.explicit_id = bool(requested)
        self.socket_id = requested or str(uuid.uuid4())
        self._ctx = CallContext(self.socket_id)
        return None  # accept, no subprotocol

    def onOpen(self) -> None:
        self._opened = True
        self.registerProducer(_OutputGate(self), True)
        self.factory.opened(self)

    def output_blocked(self) -> None:
        if self._blocked is None:
            cast(Any, self.transport).pauseProducing()
            self._blocked_bytes = 0
            self._blocked = self.factory.clock.callLater(self.factory.slow_reader_timeout_s, self._too_slow)

    def output_drained(self) -> None:
        if self._blocked is not None:
            if self._blocked.active():
                self._blocked.cancel()
            self._blocked = None
            if not self._going_away:
                cast(Any, self.transport).resumeProducing()

    def _too_slow(self) -> None:
        self._log.warn("socket {socket_id} does not read its replies: disconnecting it", socket_id=self.socket_id)
        self._blocked = None
        self.dropConnection(abort=True)

    def _write_frame(self, frame: bytes) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        if self._blocked is not None:
            self._blocked_bytes += len(frame)
            if self._blocked_bytes > self.factory.max_blocked_bytes:
                if self._blocked.active():
                    self._blocked.cancel()
                self._too_slow()
                return
        self.sendMessage(frame, isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self._ctx is not None
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return  # read after our close frame: its reply could not be sent, so it is not run
        self._in_flight += 1
        d = self.factory.dispatcher.handle(payload, self._ctx)
        d.addCallbacks(self._reply, self._failed)
        d.addBoth(self._answered)

    def _answered(self, _: Any) -> None:
        self._in_flight -= 1
        if self._going_away and self._in_flight == 0:
            self._send_going_away()

    def _reply(self, frame: bytes | None) -> None:
        if frame is not None:
            self._write_frame(frame)

    def _failed(self, failure: Any) -> None:
        # The dispatcher turns every error into a reply; reaching here is a bug: log it loudly.
        self._log.failure("unhandled error answering socket {socket_id}", failure, socket_id=self.socket_id)

    def notify(self, connection_id: str, messages: Sequence[QueuedMessage]) -> None:
        for frame in notification_frames(connection_id, messages):
            self._write_frame(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._blocked is not None and self._blocked.active():
            self._blocked.cancel()
        self._blocked = None
        if self._opened:
            self._opened = False
            self.factory.closed(self)

    def going_away(self) -> None:
        """Close with 1001 so that clients reconnect (they do not after 1000), once the calls in
        flight are answered: their effect may be done (a take with ``deleteMessages`` has deleted
        what it returns), so their replies must reach the mediator. No new request is read meanwhile."""
        if self.state == WebSocketServerProtocol.STATE_OPEN and not self._going_away:
            self._going_away = True
            cast(Any, self.transport).pauseProducing()
            if self._in_flight == 0:
                self._send_going_away()

    def _send_going_away(self) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            if self._blocked is None:
                cast(Any, self.transport).resumeProducing()  # to read the mediator's close reply
            self.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"server going away", isReply=False)


class MediatorFactory(WebSocketServerFactory):
    protocol = MediatorProtocol  # type: ignore[assignment]
    _log = Logger()

    def __init__(
        self,
        service: PickupService,
        dispatcher: Dispatcher,
        reactor: IReactorTime,
        max_frame_bytes: int = 100 * 1024 * 1024,
        slow_reader_timeout_s: float = 30.0,
        max_blocked_bytes: int = 16 * 1024 * 1024,
        authenticator: Authenticator | None = None,
        ping_interval_s: float = 30.0,
        ping_timeout_s: float = 20.0,
    ) -> None:
        super().__init__(reactor=reactor)
        self.authenticator = authenticator or Authenticator(AuthSettings())
        self.clock = reactor
        self.slow_reader_timeout_s = slow_reader_timeout_s
        self.max_blocked_bytes = max_blocked_bytes
        self.service = service
        self.dispatcher = dispatcher
        self.sockets: set[MediatorProtocol] = set()
        self._all_closed: Waiters[None] = Waiters()
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_frame_bytes,
            maxMessagePayloadSize=max_frame_bytes,
            failByDrop=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=3,
            # a mediator whose socket vanished without a close is dropped after interval + timeout
            autoPingInterval=ping_interval_s,
            autoPingTimeout=ping_timeout_s,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.server = "mpr-server"
        self.noisy = False

    def opened(self, protocol: MediatorProtocol) -> None:
        self.sockets.add(protocol)
        self.service.socket_opened(protocol.socket_id, protocol)

    def closed(self, protocol: MediatorProtocol) -> None:
        self.sockets.discard(protocol)
        self.service.socket_closed(protocol.socket_id, protocol, protocol.explicit_id)
        if not self.sockets:
            self._all_closed.fire(None)

    def close_all(self, timeout_s: float, clock: IReactorTime) -> Deferred[Any]:
        """Send 1001 to every socket and fire when all are closed (or after ``timeout_s``)."""
        if not self.sockets:
            return succeed(None)
        d = self._all_closed.wait()
        for protocol in list(self.sockets):
            protocol.going_away()
        d.addTimeout(timeout_s, clock)
        return DeferredList([d], consumeErrors=True)
