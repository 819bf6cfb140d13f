"""The WebSocket transport: one Autobahn protocol per mediator socket, a thin adapter to the
dispatcher (frames in, frames out) and to the domain (socket open/close, notifications)."""

from __future__ import annotations

import uuid
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server.rpc import CallContext, Dispatcher
from mpr_server.service import PickupService

GOING_AWAY = 1001
MAX_SOCKET_ID = 256


class MediatorProtocol(WebSocketServerProtocol):
    """One mediator socket."""

    _log = Logger()
    factory: MediatorFactory

    socket_id: str = ""
    explicit_id: bool = False
    _ctx: CallContext | None = None
    _opened: bool = False

    def onConnect(self, request: ConnectionRequest) -> None:
        requested = request.params.get("socket_id", [""])[0]
        if len(requested) > MAX_SOCKET_ID:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, f"socket_id longer than {MAX_SOCKET_ID} characters")
        self.explicit_id = bool(requested)
        self.socket_id = requested or str(uuid.uuid4())
        self._ctx = CallContext(self.socket_id)
        return None  # accept, no subprotocol

    def onOpen(self) -> None:
        self._opened = True
        self.factory.opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self._ctx is not None
        d = Deferred.fromCoroutine(self.factory.dispatcher.handle_frame(payload, self._ctx))
        d.addCallbacks(self._reply, self._failed)

    def _reply(self, frame: bytes | None) -> None:
        if frame is not None and self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(frame, isBinary=False)

    def _failed(self, failure: Any) -> None:
        # The dispatcher turns every error into a reply; reaching here is a bug: log it loudly.
        self._log.failure("unhandled error answering socket {socket_id}", failure, socket_id=self.socket_id)

    def send_notification(self, frame: bytes) -> None:
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendMessage(frame, isBinary=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._opened:
            self._opened = False
            self.factory.closed(self)

    def going_away(self) -> None:
        """Close with 1001 so that clients reconnect (they do not after 1000)."""
        if self.state == WebSocketServerProtocol.STATE_OPEN:
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
    ) -> None:
        super().__init__(reactor=reactor)
        self.service = service
        self.dispatcher = dispatcher
        self.sockets: set[MediatorProtocol] = set()
        self._closed_waiters: list[Deferred[None]] = []
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_frame_bytes,
            maxMessagePayloadSize=max_frame_bytes,
            failByDrop=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=3,
            autoPingInterval=30,
            autoPingTimeout=20,
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
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def close_all(self, timeout_s: float, clock: IReactorTime) -> Deferred[Any]:
        """Send 1001 to every socket and fire when all are closed (or after ``timeout_s``)."""
        if not self.sockets:
            return Deferred.fromCoroutine(_done())
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        for protocol in list(self.sockets):
            protocol.going_away()
        d.addTimeout(timeout_s, clock)
        return DeferredList([d], consumeErrors=True)


async def _done() -> None:
    return None
