"""A small HTTP/2 client over ``h2`` (Twisted has none): one long-lived multiplexed TLS connection.

Enough for APNs: ALPN ``h2`` check, one stream per request, flow control on both sides, the
server's stream limit, GOAWAY and stream resets, PING keep-alive, reconnect on demand.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, NoAvailableStreamIDError, ProtocolError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    INegotiated,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

Headers = list[tuple[bytes, bytes]]


class H2ConnectionError(Exception):
    """The connection failed or went away (loss, GOAWAY, protocol error) before the response."""


class H2StreamError(Exception):
    """The stream was reset (by the peer or by us) before the response completed."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(eq=False)
class _Request:
    headers: Headers
    body: bytes
    deferred: Deferred[H2Response] | None = None
    stream_id: int | None = None
    to_send: bytes = b""
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    received: int = 0


@implementer(IHandshakeListener)
class H2ClientProtocol(Protocol):
    """One HTTP/2 connection.

    ``ready`` fires once TLS is up with ALPN h2 (skipped without TLS) and the server's first
    SETTINGS frame has arrived, so its stream limit is known before the first request.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        ping_interval: float | None = 60.0,
        ping_timeout: float = 20.0,
        max_body: int = 65536,
    ) -> None:
        self._clock = clock
        self._conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self._streams: dict[int, _Request] = {}
        self._queued: deque[_Request] = deque()
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_call: IDelayedCall | None = None
        self._ping_deadline: IDelayedCall | None = None
        self._max_body = max_body
        self._closed_waiters: list[Deferred[None]] = []
        # While a received batch is processed, results are held back so that a caller resumed by
        # one response sees the whole batch (e.g. a GOAWAY right behind it) before it acts.
        self._held: list[tuple[_Request, H2Response | Exception]] | None = None
        self._alpn_ok = False
        self._got_settings = False
        self.ready: Deferred[None] = Deferred()
        self.accepting = False
        self.lost = False

    # -- connection life cycle

    def connectionMade(self) -> None:
        self._conn.initiate_connection()
        self._flush()
        if not INegotiated.providedBy(self.transport):
            self._alpn_ok = True  # cleartext (h2c with prior knowledge)

    def handshakeCompleted(self) -> None:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated != b"h2":
            if not self.ready.called:
                self.ready.errback(H2ConnectionError(f"server did not negotiate ALPN h2 (got {negotiated!r})"))
            self._abort()
            return
        self._alpn_ok = True
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.lost or self.ready.called or not (self._alpn_ok and self._got_settings):
            return
        self.accepting = True
        self._schedule_ping()
        self.ready.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.accepting = False
        for call in (self._ping_call, self._ping_deadline):
            if call is not None and call.active():
                call.cancel()
        self._ping_call = self._ping_deadline = None
        error = H2ConnectionError(f"connection lost: {reason.getErrorMessage()}")
        if not self.ready.called:
            self.ready.errback(error)
        self._fail_all(error)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    def close(self) -> Deferred[None]:
        """Send GOAWAY, fail what is pending and drop the connection."""
        d = self.when_closed()
        if not self.lost:
            self.accepting = False
            try:
                self._conn.close_connection()
                self._flush()
            except H2Error:
                pass
            self._fail_all(H2ConnectionError("connection closed by client"))
            self._lose()
        return d

    @property
    def usable(self) -> bool:
        return self.accepting and not self.lost

    # -- requests

    def request(self, headers: Headers, body: bytes) -> Deferred[H2Response]:
        """Send one request on a new stream; cancelling the Deferred resets the stream."""
        if not self.usable:
            return fail(H2ConnectionError("connection does not accept new streams"))
        req = _Request(headers=headers, body=body)
        d: Deferred[H2Response] = Deferred(lambda _: self._cancel(req))
        req.deferred = d
        if self._can_open():
            self._open(req)
            self._flush()
        else:
            self._queued.append(req)
        return d

    def _can_open(self) -> bool:
        limit: int = self._conn.remote_settings.max_concurrent_streams
        return self._conn.open_outbound_streams < limit

    def _open(self, req: _Request) -> None:
        try:
            stream_id = self._conn.get_next_available_stream_id()
        except NoAvailableStreamIDError:
            self.accepting = False
            self._finish(req, H2ConnectionError("stream ids exhausted"))
            self._close_if_drained()
            return
        req.stream_id = stream_id
        self._streams[stream_id] = req
        self._conn.send_headers(stream_id, req.headers, end_stream=not req.body)
        req.to_send = req.body
        self._send_body(req)

    def _send_body(self, req: _Request) -> None:
        stream_id = req.stream_id
        if stream_id is None or not req.to_send:
            return
        while req.to_send:
            window = self._conn.local_flow_control_window(stream_id)
            if window <= 0:
                return  # resumed by a WindowUpdated event
            size = min(window, self._conn.max_outbound_frame_size, len(req.to_send))
            self._conn.send_data(stream_id, req.to_send[:size])
            req.to_send = req.to_send[size:]
        self._conn.end_stream(stream_id)

    def _start_queued(self) -> None:
        while self._queued and self.usable and self._can_open():
            self._open(self._queued.popleft())
        self._flush()

    def _cancel(self, req: _Request) -> None:
        if req.stream_id is None:
            try:
                self._queued.remove(req)
            except ValueError:
                pass
            return
        if self._streams.pop(req.stream_id, None) is not None and not self.lost:
            try:
                self._conn.reset_stream(req.stream_id, ErrorCodes.CANCEL)
            except H2Error:
                pass
            self._start_queued()

    def _finish(self, req: _Request, result: H2Response | Exception) -> None:
        if self._held is not None:
            self._held.append((req, result))
            return
        d = req.deferred
        if d is None or d.called:
            return
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def _fail_all(self, error: Exception) -> None:
        pending = list(self._streams.values()) + list(self._queued)
        self._streams.clear()
        self._queued.clear()
        for req in pending:
            self._finish(req, error)

    def _close_if_drained(self) -> None:
        if not self.accepting and not self._streams and not self.lost:
            self._lose()

    # -- incoming frames

    def dataReceived(self, data: bytes) -> None:
        self._held = []
        try:
            self._receive(data)
        finally:
            held, self._held = self._held, None
            for req, result in held:
                self._finish(req, result)

    def _receive(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except ProtocolError as e:
            self._log.warn("HTTP/2 protocol error from server: {error}", error=str(e))
            self.accepting = False
            self._fail_all(H2ConnectionError(f"HTTP/2 protocol error: {e}"))
            self._abort()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                self._on_response(event)
            elif isinstance(event, DataReceived):
                self._on_data(event)
            elif isinstance(event, StreamEnded):
                self._on_end(event)
            elif isinstance(event, StreamReset):
                self._on_reset(event)
            elif isinstance(event, WindowUpdated):
                self._on_window(event)
            elif isinstance(event, RemoteSettingsChanged):
                self._got_settings = True
                self._maybe_ready()
                self._start_queued()
            elif isinstance(event, PingAckReceived):
                self._on_ping_ack()
            elif isinstance(event, ConnectionTerminated):
                self._on_goaway(event)
        if not self.lost:
            self._flush()

    def _on_response(self, event: ResponseReceived) -> None:
        req = self._streams.get(event.stream_id or 0)
        if req is None:
            return
        for name, value in event.headers or []:
            key = bytes(name).decode("latin-1")
            text = bytes(value).decode("latin-1")
            if key == ":status":
                req.status = int(text)
            else:
                req.response_headers[key] = text

    def _on_data(self, event: DataReceived) -> None:
        stream_id = event.stream_id or 0
        if event.flow_controlled_length:
            self._conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        req = self._streams.get(stream_id)
        if req is None or event.data is None:
            return
        req.received += len(event.data)
        if req.received > self._max_body:
            del self._streams[stream_id]
            self._conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            self._finish(req, H2StreamError("response body too large"))
            return
        req.chunks.append(event.data)

    def _on_end(self, event: StreamEnded) -> None:
        req = self._streams.pop(event.stream_id or 0, None)
        if req is None:
            return
        if req.status == 0:
            self._finish(req, H2StreamError("stream ended without a response"))
        else:
            self._finish(req, H2Response(req.status, req.response_headers, b"".join(req.chunks)))
        self._start_queued()
        self._close_if_drained()

    def _on_reset(self, event: StreamReset) -> None:
        req = self._streams.pop(event.stream_id or 0, None)
        if req is None:
            return
        code = int(event.error_code) if event.error_code is not None else None
        self._finish(req, H2StreamError(f"stream reset by server (error code {code})", code))
        self._start_queued()
        self._close_if_drained()

    def _on_window(self, event: WindowUpdated) -> None:
        if event.stream_id:
            req = self._streams.get(event.stream_id)
            targets = [req] if req is not None else []
        else:
            targets = list(self._streams.values())
        for req in targets:
            self._send_body(req)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        # h2 accepts no further frames after GOAWAY: whatever is still open cannot complete here.
        self.accepting = False
        self._log.info(
            "HTTP/2 GOAWAY from server (error code {code}, last stream {last})",
            code=event.error_code,
            last=event.last_stream_id,
        )
        self._fail_all(
            H2ConnectionError(f"server sent GOAWAY (error code {event.error_code}, last stream {event.last_stream_id})")
        )
        self._lose()

    # -- keep-alive

    def _schedule_ping(self) -> None:
        if self._ping_interval is not None and not self.lost:
            self._ping_call = self._clock.callLater(self._ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_call = None
        if self.lost:
            return
        self._conn.ping(os.urandom(8))
        self._flush()
        self._ping_deadline = self._clock.callLater(self._ping_timeout, self._ping_timed_out)

    def _on_ping_ack(self) -> None:
        if self._ping_deadline is not None and self._ping_deadline.active():
            self._ping_deadline.cancel()
            self._ping_deadline = None
            self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._ping_deadline = None
        self._log.warn("HTTP/2 PING not answered in {timeout}s; dropping the connection", timeout=self._ping_timeout)
        self.accepting = False
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _lose(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


class H2Client:
    """Requests to one HTTPS origin over a shared HTTP/2 connection, (re)connected on demand."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTCP,
        clock: IReactorTime,
        host: str,
        port: int,
        tls: IOpenSSLClientConnectionCreator,
        connect_timeout: float = 10.0,
        ping_interval: float | None = 60.0,
        ping_timeout: float = 20.0,
    ) -> None:
        self._clock = clock
        self._host = host
        self._port = port
        self._authority = (host if port == 443 else f"{host}:{port}").encode("idna")
        self._endpoint = wrapClientTLS(tls, HostnameEndpoint(reactor, host, port, timeout=connect_timeout))
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._proto: H2ClientProtocol | None = None
        self._connecting = False
        self._waiters: list[Deferred[H2ClientProtocol]] = []
        self._closed = False

    async def request(self, method: bytes, path: bytes, headers: Headers, body: bytes) -> H2Response:
        proto = await self._connection()
        pseudo: Headers = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", self._authority),
            (b":path", path),
        ]
        return await proto.request(pseudo + headers, body)

    def _connection(self) -> Deferred[H2ClientProtocol]:
        if self._closed:
            return fail(H2ConnectionError("client closed"))
        if self._proto is not None and self._proto.usable:
            return succeed(self._proto)
        waiter: Deferred[H2ClientProtocol] = Deferred(self._forget_waiter)
        self._waiters.append(waiter)
        if not self._connecting:
            self._connecting = True
            Deferred.fromCoroutine(self._connect())
        return waiter

    def _forget_waiter(self, waiter: Deferred[H2ClientProtocol]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    async def _connect(self) -> None:
        proto = H2ClientProtocol(self._clock, self._ping_interval, self._ping_timeout)
        attempt = Deferred.fromCoroutine(self._handshake(proto))
        attempt.addTimeout(self._connect_timeout, self._clock)
        try:
            await attempt
        except Exception as e:
            self._connecting = False
            if proto.transport is not None and not proto.lost:
                proto._abort()
            self._log.warn(
                "HTTP/2 connection to {host}:{port} failed: {error}", host=self._host, port=self._port, error=repr(e)
            )
            self._release_waiters(H2ConnectionError(f"connection to {self._host}:{self._port} failed: {e!r}"))
            return
        self._connecting = False
        if self._closed:
            proto.close()
            self._release_waiters(H2ConnectionError("client closed"))
            return
        self._proto = proto
        self._log.debug("HTTP/2 connection to {host}:{port} ready", host=self._host, port=self._port)
        self._release_waiters(proto)

    async def _handshake(self, proto: H2ClientProtocol) -> None:
        await connectProtocol(self._endpoint, proto)
        await proto.ready

    def _release_waiters(self, result: H2ClientProtocol | Exception) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Exception):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def close(self) -> Deferred[None]:
        """Close the connection (if any); later requests fail."""
        self._closed = True
        self._release_waiters(H2ConnectionError("client closed"))
        proto, self._proto = self._proto, None
        if proto is None:
            return succeed(None)
        return proto.close()
