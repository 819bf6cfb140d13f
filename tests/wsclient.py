"""A small JSON-RPC WebSocket client for tests and the benchmark (a mediator's view of MPR)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredQueue

ABSENT: Any = object()
DEFAULT_TIMEOUT = 5.0


class RpcCallError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')} {error.get('message')}: {error.get('data')}")
        self.error = error
        self.code = error.get("code")


class _Protocol(WebSocketClientProtocol):
    client: RpcClient

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)  # as the server does (see MediatorProtocol.connectionMade)
        super().connectionMade()

    def onOpen(self) -> None:
        self.client._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.client._received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client._closed(code)


class RpcClient:
    """Send calls, await their replies by id; other frames (notifications, replies with id null,
    batch replies) go to ``notifications`` or ``unmatched``."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.protocol: _Protocol | None = None
        self._ids = itertools.count(1)
        self._pending: dict[Any, Deferred[dict[str, Any]]] = {}
        self.notifications: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.unmatched: DeferredQueue[Any] = DeferredQueue()
        self.frames_binary: list[bool] = []
        self.closed: Deferred[int | None] = Deferred()
        self.opened: Deferred[RpcClient] = Deferred()

    @classmethod
    async def connect(
        cls, reactor: Any, port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT
    ) -> RpcClient:
        client = cls(reactor)
        factory = WebSocketClientFactory(f"ws://{host}:{port}{path}", reactor=reactor)
        factory.setProtocolOptions(maxFramePayloadSize=0, maxMessagePayloadSize=0)

        def build() -> _Protocol:
            protocol = _Protocol()
            protocol.factory = factory
            protocol.client = client
            return protocol

        factory.protocol = build  # type: ignore[assignment]
        factory.noisy = False
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        await endpoint.connect(factory)
        opening = client.opened
        opening.addTimeout(timeout, reactor)
        return await opening

    def _opened(self, protocol: _Protocol) -> None:
        self.protocol = protocol
        self.opened.callback(self)

    def _received(self, payload: bytes, binary: bool) -> None:
        self.frames_binary.append(binary)
        message = orjson.loads(payload)
        if isinstance(message, dict) and "method" in message and "id" not in message:
            self.notifications.put(message)
            return
        if isinstance(message, dict):
            waiter = self._pending.pop(message.get("id"), None)
            if waiter is not None:
                waiter.callback(message)
                return
        self.unmatched.put(message)

    def _closed(self, code: int | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed, close code {code}"))
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            waiter.errback(ConnectionError(f"socket closed with {code}"))
        if not self.closed.called:
            self.closed.callback(code)

    def send_raw(self, frame: bytes | str, binary: bool = False) -> None:
        assert self.protocol is not None
        self.protocol.sendMessage(frame.encode() if isinstance(frame, str) else frame, isBinary=binary)

    async def request(
        self, method: str, params: Any = ABSENT, request_id: Any = ABSENT, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Send one request and return its whole reply object."""
        if request_id is ABSENT:
            request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if params is not ABSENT:
            message["params"] = params
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._pending[request_id] = waiter
        waiter.addTimeout(timeout, self.reactor)
        try:
            self.send_raw(orjson.dumps(message))
        except BaseException:
            self._pending.pop(request_id, None)
            waiter.addErrback(lambda _: None)
            waiter.cancel()
            raise
        return await waiter

    async def call(self, method: str, params: Any = ABSENT, timeout: float = DEFAULT_TIMEOUT) -> Any:
        reply = await self.request(method, params, timeout=timeout)
        if "error" in reply:
            raise RpcCallError(reply["error"])
        assert "result" in reply, reply
        return reply["result"]

    async def next_unmatched(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        d = self.unmatched.get()
        d.addTimeout(timeout, self.reactor)
        return await d

    async def next_notification(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        d = self.notifications.get()
        d.addTimeout(timeout, self.reactor)
        return await d

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> int | None:
        if self.protocol is not None and not self.closed.called:
            self.protocol.sendClose(1000)
        closed = self.closed
        if not closed.called:
            closed.addTimeout(timeout, self.reactor)
        return await closed
