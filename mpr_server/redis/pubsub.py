"""`PubSubConnection`: a self-reconnecting subscriber connection to one node with (sharded)
pub/sub, which txredisapi lacks, that resubscribes after every reconnect (internal to
mpr_server.redis)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mpr_server._async import Waiters

from .connection import Arg, ConnectionSettings, make_endpoint, to_text
from .errors import RedisResponseError, RedisUnavailable
from .url import Address


class _PubSubProtocol(txredisapi.RedisProtocol):
    """txredisapi's parser with pub/sub push handling: messages go to the owner,
    command replies (one per command: we (un)subscribe one channel at a time) go to
    the reply queue, and an sunsubscribe nobody asked for (the slot moved away)
    is reported to the owner."""

    def __init__(self, owner: PubSubConnection, charset: str | None) -> None:
        super().__init__(charset, convertNumbers=False)
        self.owner = owner
        self.pending_unsubscribes: Counter[tuple[str, str]] = Counter()

    def replyReceived(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) == 3:
            kind = to_text(reply[0]).lower()
            if kind in ("message", "smessage"):
                self.owner.message_received(to_text(reply[1]), kind == "smessage", reply[2])
                return
            if kind in ("unsubscribe", "sunsubscribe"):
                key = (kind, to_text(reply[1]))
                if self.pending_unsubscribes[key] > 0:
                    self.pending_unsubscribes[key] -= 1
                else:
                    if kind == "sunsubscribe":
                        self.owner.server_unsubscribed(key[1])
                    return
        self.replyQueue.put(reply)

    def connectionMade(self) -> Any:
        result = super().connectionMade()  # no AUTH/SELECT here (the owner does AUTH)
        self.owner.connection_made(self)
        return result

    def connectionLost(self, why: Failure) -> None:  # type: ignore[override]
        super().connectionLost(why)
        self.owner.connection_lost(self)

    def send(self, *args: Arg) -> Deferred[Any]:
        return cast("Deferred[Any]", self.execute_command(*args))


class _PubSubFactory(Factory):
    noisy = False

    def __init__(self, owner: PubSubConnection, charset: str | None) -> None:
        self.owner = owner
        self.charset = charset

    def buildProtocol(self, addr: object) -> Protocol:
        proto = _PubSubProtocol(self.owner, self.charset)
        proto.factory = self
        return cast(Protocol, proto)


Channel = tuple[str, bool]  # (name, sharded)


class PubSubConnection:
    """One subscriber connection to one node that reconnects by itself, re-subscribes
    its channels and then reports `on_reconnected(self, channels)` so callers can
    re-read what they may have missed."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: Address,
        settings: ConnectionSettings,
        *,
        on_message: Callable[[str, bool, Any], None],
        on_reconnected: Callable[[PubSubConnection, list[Channel]], None],
        on_lost: Callable[[PubSubConnection], None],
        on_channel_lost: Callable[[PubSubConnection, str, bool], None],
    ) -> None:
        self.address = address
        self.channels: set[Channel] = set()
        self._reactor = reactor
        self._settings = settings
        self._on_message = on_message
        self._on_reconnected = on_reconnected
        self._on_lost = on_lost
        self._on_channel_lost = on_channel_lost
        self._proto: _PubSubProtocol | None = None  # set once the handshake is done
        self._ready: Waiters[_PubSubProtocol] = Waiters()
        self._handshake_failures = 0
        self._connected_before = False
        self._running = False
        # No prepareConnection: ClientService neither closes a connection whose preparation
        # failed nor expects it to close before preparation ends (automat NoTransition). The
        # handshake runs from connectionMade instead and drops the connection if it fails.
        self._service = ClientService(
            make_endpoint(reactor, address, settings),
            _PubSubFactory(self, "utf-8" if settings.decode_responses else None),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )
        self._pinger: LoopingCall | None = None

    @property
    def connected(self) -> bool:
        return self._proto is not None

    def _retry_delay(self, attempt: int) -> float:
        # ClientService counts failed connects only; failed handshakes count too
        attempt += self._handshake_failures
        delay = min(self._settings.reconnect_max_delay, 0.05 * 2 ** min(attempt, 16))
        return delay * random.uniform(0.8, 1.2)

    def _start(self) -> None:
        if not self._running:
            self._running = True
            self._service.startService()
            if self._settings.ping_interval:
                self._pinger = LoopingCall(self._ping)
                self._pinger.clock = self._reactor
                self._pinger.start(self._settings.ping_interval, now=False)

    # -- called by the protocol

    def message_received(self, channel: str, sharded: bool, message: Any) -> None:
        if (channel, sharded) in self.channels:
            self._on_message(channel, sharded, message)

    def server_unsubscribed(self, channel: str) -> None:
        if (channel, True) in self.channels:
            self.channels.discard((channel, True))
            self._on_channel_lost(self, channel, True)

    def connection_lost(self, proto: _PubSubProtocol) -> None:
        if self._proto is proto:
            self._proto = None
            if self._running:
                self._log.info("Redis pub/sub connection to {address} lost", address=str(self.address))
                self._on_lost(self)

    # -- connection set-up

    def connection_made(self, proto: _PubSubProtocol) -> None:
        d = Deferred.fromCoroutine(self._handshake(proto))
        d.addTimeout(self._settings.connect_timeout, self._reactor)
        d.addErrback(self._handshake_failed, proto)

    def _handshake_failed(self, failure: Failure, proto: _PubSubProtocol) -> None:
        self._handshake_failures += 1
        transport = proto.transport
        if transport is not None and proto.connected:
            self._log.warn(
                "Redis pub/sub connection to {address} failed to set up: {error}; reconnecting",
                address=str(self.address),
                error=failure.getErrorMessage() or repr(failure.value),
            )
            cast(Any, transport).abortConnection()

    async def _handshake(self, proto: _PubSubProtocol) -> None:
        if self._settings.password is not None:
            auth: list[Arg] = ["AUTH", self._settings.password]
            if self._settings.username:
                auth.insert(1, self._settings.username)
            await proto.send(*auth)
        for channel, sharded in list(self.channels):
            try:
                await self._send_subscribe(proto, channel, sharded)
            except RedisResponseError as e:
                # e.g. MOVED: the slot is elsewhere now; the owner re-homes it
                self._log.info(
                    "Resubscribing {channel} at {address} failed: {error}",
                    channel=channel,
                    address=str(self.address),
                    error=e.message,
                )
                self.channels.discard((channel, sharded))
                self._on_channel_lost(self, channel, sharded)
        if not proto.connected:
            raise RedisUnavailable(f"Redis {self.address}: connection lost during the pub/sub set-up")
        self._proto = proto
        self._handshake_failures = 0
        self._ready.fire(proto)
        if self._connected_before:
            self._log.info("Redis pub/sub connection to {address} re-established", address=str(self.address))
            self._on_reconnected(self, sorted(self.channels))
        self._connected_before = True

    async def _send_subscribe(self, proto: _PubSubProtocol, channel: str, sharded: bool) -> None:
        try:
            await proto.send("SSUBSCRIBE" if sharded else "SUBSCRIBE", channel)
        except txredisapi.ResponseError as e:
            raise RedisResponseError(str(e)) from None
        except txredisapi.ConnectionError as e:
            raise RedisUnavailable(f"Redis {self.address}: {e}") from None

    def _ping(self) -> None:
        proto = self._proto
        if proto is None:
            return

        def failed(failure: Failure) -> None:
            if self._proto is proto and proto.transport is not None:
                self._log.warn(
                    "Redis pub/sub connection to {address} does not answer PING: dropping it", address=str(self.address)
                )
                cast(Any, proto.transport).abortConnection()

        try:
            d = proto.send("PING")
        except txredisapi.ConnectionError:
            return
        d.addTimeout(self._settings.connect_timeout, self._reactor)
        d.addErrback(failed)

    # -- API for the client

    async def subscribe(self, channel: str, sharded: bool) -> None:
        """Subscribe (no timeout here: callers wrap the call). On failure the channel
        is not kept."""
        self.channels.add((channel, sharded))
        self._start()
        try:
            proto = await self._when_ready()
            # the handshake may have subscribed it already: a second SUBSCRIBE is harmless
            await self._send_subscribe(proto, channel, sharded)
        except BaseException:
            self.channels.discard((channel, sharded))
            raise

    def _when_ready(self) -> Deferred[_PubSubProtocol]:
        """The connection once its handshake is done (waits across reconnects)."""
        if self._proto is not None:
            return succeed(self._proto)
        return self._ready.wait()

    async def unsubscribe(self, channel: str, sharded: bool) -> None:
        """Forget the channel and tell the server if connected (best effort)."""
        self.channels.discard((channel, sharded))
        proto = self._proto
        if proto is None:
            return
        kind = "sunsubscribe" if sharded else "unsubscribe"
        proto.pending_unsubscribes[(kind, channel)] += 1
        try:
            await proto.send(kind.upper(), channel)
        except (txredisapi.ResponseError, txredisapi.ConnectionError):
            pass

    def forget(self, channel: str, sharded: bool) -> None:
        """Drop a channel without telling the server (it has already dropped it)."""
        self.channels.discard((channel, sharded))

    async def close(self) -> None:
        self._running = False
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._proto = None
        self._ready.cancel()
        await self._service.stopService()
