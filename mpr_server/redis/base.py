"""The typed Redis client the stores use: the interface, and what the single-server
(single.py) and cluster (cluster.py) clients share. txredisapi stays behind it."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from twisted.logger import Logger

from mpr_server._async import Timeouts, deadline

from .connection import Arg, ConnectionSettings, command_name
from .errors import RedisNotReplicated, RedisResponseError, RedisUnavailable
from .pubsub import Channel, PubSubConnection
from .script import Script
from .url import Address

#: the share of a call's time left that WAIT may use, and the least time it leaves, so that its
#: reply beats the deadline (Redis notices a WAIT timeout on its next event-loop turn, up to
#: 100 ms late at the default hz 10)
WAIT_SHARE = 0.75
WAIT_MARGIN_MS = 150

#: called with (channel, message) for every message on a subscribed channel
MessageCallback = Callable[[str, Any], object]
#: called after a lost subscription is back: messages may have been missed
ReconnectCallback = Callable[[], object]


class Subscription:
    """A live subscription; `unsubscribe()` ends it."""

    def __init__(
        self,
        client: ClientBase,
        channel: str,
        sharded: bool,
        callback: MessageCallback,
        on_reconnect: ReconnectCallback | None,
    ) -> None:
        self.channel = channel
        self.sharded = sharded
        self._client = client
        self.callback = callback
        self.on_reconnect = on_reconnect
        self.active = True

    async def unsubscribe(self, *, timeout: float | None = None) -> None:
        if self.active:
            self.active = False
            await self._client._unsubscribe(self, timeout)


class RedisClient(Protocol):
    """What the Redis store needs from Redis (single server or cluster).

    Every call has a timeout (the client's default unless given) and raises
    RedisUnavailable when Redis does not answer in time or the connection is lost,
    RedisResponseError for error replies. Replies are txredisapi's RESP values with
    numbers left alone: bulk strings are str when valid UTF-8 (bytes otherwise)
    with ``decode_responses=True`` (the default), always bytes with False.
    """

    async def execute(
        self, args: Sequence[Arg], *, key: str | bytes | None = None, timeout: float | None = None
    ) -> Any:
        """Run one command. In a cluster it goes to the node owning `key`'s slot
        (any node when key is None); pass the command's (first) key."""

    async def eval_script(
        self,
        script: Script,
        keys: Sequence[str | bytes],
        args: Sequence[Arg] = (),
        *,
        timeout: float | None = None,
        replicas: int = 0,
    ) -> Any:
        """EVALSHA, falling back to EVAL when the node does not know the script
        (NOSCRIPT); routed by keys[0]. Keys must share a slot in a cluster.

        With ``replicas`` > 0, ``WAIT replicas <time left>`` follows on the same connection,
        and RedisNotReplicated is raised (the script did run) unless that many replicas
        acknowledged the write before the call's timeout."""

    async def publish(self, channel: str, message: Arg, *, sharded: bool = False, timeout: float | None = None) -> int:
        """PUBLISH, or SPUBLISH routed by the channel's slot when sharded (a single
        server uses PUBLISH for both). Returns the receivers counted by the node."""

    async def subscribe(
        self,
        channel: str,
        callback: MessageCallback,
        *,
        sharded: bool = False,
        on_reconnect: ReconnectCallback | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Subscribe; returns once the server confirmed. The subscription survives
        reconnects (re-subscribed automatically) and slot moves (sharded); after each
        such gap `on_reconnect()` is called: messages sent meanwhile are lost."""

    async def execute_on_all_nodes(self, args: Sequence[Arg], *, timeout: float | None = None) -> dict[str, Any]:
        """Run a command on the server (single) or on every master (cluster);
        returns replies by node address ``host:port``."""

    async def get_config(self, name: str, *, timeout: float | None = None) -> dict[str, str | None]:
        """CONFIG GET `name` on every master: {node address: value or None}."""

    async def scan(self, match: str, *, count: int = 1000, timeout: float | None = None) -> list[str]:
        """Every key matching `match` (SCAN to the end on the server, or on every master of a
        cluster, each call with the timeout). A keyspace scan: only for one-off work such as the
        import of an original deployment, never on a request's path."""

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until Redis is reachable (the cluster map is loaded)."""

    async def close(self) -> None:
        """Close every connection; the client is unusable afterwards."""


class ClientBase:
    """Timeouts, scripts, config and subscription bookkeeping shared by both clients."""

    _log = Logger()

    def __init__(self, reactor: Any, settings: ConnectionSettings, timeout: float) -> None:
        self._reactor = reactor
        self._settings = settings
        self.timeout = timeout
        self._subscriptions: dict[Channel, list[Subscription]] = {}
        self._closed = False

    # -- to implement

    async def _execute(self, args: Sequence[Arg], key: str | bytes | None) -> Any:
        raise NotImplementedError

    async def _execute_then(
        self, args: Sequence[Arg], then: Callable[[], Sequence[Arg]], key: str | bytes | None
    ) -> tuple[Any, Any]:
        """``args`` and then ``then()`` (made at the moment they are sent) back to back on one
        connection to the node for ``key``."""
        raise NotImplementedError

    async def _execute_all(self, args: Sequence[Arg]) -> dict[str, Any]:
        raise NotImplementedError

    async def _node_commands(self) -> list[Callable[[Sequence[Arg]], Coroutine[Any, Any, Any]]]:
        """One command runner per node holding keys (the server, or each master)."""
        raise NotImplementedError

    async def _pubsub_subscribe(self, channel: str, sharded: bool) -> None:
        raise NotImplementedError

    async def _pubsub_unsubscribe(self, channel: str, sharded: bool) -> None:
        raise NotImplementedError

    def _wire_sharded(self, sharded: bool) -> bool:
        return sharded

    # -- helpers

    def _timeouts(self, timeout: float | None) -> Timeouts:
        return Timeouts.of(self._reactor, self.timeout if timeout is None else timeout)

    async def _timed(self, coro: Coroutine[Any, Any, Any], timeout: float | None, what: str) -> Any:
        seconds = self.timeout if timeout is None else timeout
        return await deadline(
            coro,
            seconds,
            self._reactor,
            lambda: RedisUnavailable(f"no answer from Redis within {seconds:g} s ({what})"),
        )

    async def _eval(self, script: Script, keys: Sequence[str | bytes], args: Sequence[Arg]) -> Any:
        key = keys[0] if keys else None
        tail: list[Arg] = [len(keys), *keys, *args]
        try:
            return await self._execute(["EVALSHA", script.sha1, *tail], key)
        except RedisResponseError as e:
            if e.code != "NOSCRIPT":
                raise
        # EVAL also caches the script on that node for the next EVALSHA
        return await self._execute(["EVAL", script.source, *tail], key)

    async def _eval_replicated(
        self, script: Script, keys: Sequence[str | bytes], args: Sequence[Arg], replicas: int, ends_at: float
    ) -> Any:
        key = keys[0] if keys else None
        tail: list[Arg] = [len(keys), *keys, *args]
        try:
            return await self._replicated(["EVALSHA", script.sha1, *tail], key, replicas, ends_at)
        except RedisResponseError as e:
            if e.code != "NOSCRIPT":
                raise
        return await self._replicated(["EVAL", script.source, *tail], key, replicas, ends_at)

    async def _replicated(self, args: Sequence[Arg], key: str | bytes | None, replicas: int, ends_at: float) -> Any:
        waited = [0]

        def wait() -> list[Arg]:
            # WAIT must answer before the call's own deadline fires (redirects and reconnects
            # may have used some of it); WAIT 0 would block for ever
            left_ms = (ends_at - self._reactor.seconds()) * 1000
            waited[0] = max(1, int(left_ms - max(WAIT_MARGIN_MS, left_ms * (1 - WAIT_SHARE))))
            return ["WAIT", replicas, waited[0]]

        reply, acked = await self._execute_then(args, wait, key)
        if int(acked) < replicas:
            raise RedisNotReplicated(
                f"{command_name(args)} ran on the master, but only {acked} of {replicas} replicas acknowledged it"
                f" within {waited[0]} ms"
            )
        return reply

    # -- public API

    async def execute(
        self, args: Sequence[Arg], *, key: str | bytes | None = None, timeout: float | None = None
    ) -> Any:
        return await self._timed(self._execute(args, key), timeout, command_name(args))

    async def eval_script(
        self,
        script: Script,
        keys: Sequence[str | bytes],
        args: Sequence[Arg] = (),
        *,
        timeout: float | None = None,
        replicas: int = 0,
    ) -> Any:
        if replicas <= 0:
            return await self._timed(self._eval(script, keys, args), timeout, "EVALSHA")
        seconds = self.timeout if timeout is None else timeout
        ends_at = self._reactor.seconds() + seconds
        return await self._timed(self._eval_replicated(script, keys, args, replicas, ends_at), seconds, "EVALSHA+WAIT")

    async def publish(self, channel: str, message: Arg, *, sharded: bool = False, timeout: float | None = None) -> int:
        if self._wire_sharded(sharded):
            coro = self._execute(["SPUBLISH", channel, message], channel)
        else:
            coro = self._execute(["PUBLISH", channel, message], None)
        return int(await self._timed(coro, timeout, "PUBLISH"))

    async def execute_on_all_nodes(self, args: Sequence[Arg], *, timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._timed(self._execute_all(args), timeout, command_name(args))
        return result

    async def get_config(self, name: str, *, timeout: float | None = None) -> dict[str, str | None]:
        replies = await self.execute_on_all_nodes(["CONFIG", "GET", name], timeout=timeout)
        result: dict[str, str | None] = {}
        for node, reply in replies.items():
            value = None
            if isinstance(reply, dict):  # RESP3 map (not used today)
                reply = [item for pair in reply.items() for item in pair]
            if isinstance(reply, list):
                pairs = dict(zip(reply[::2], reply[1::2], strict=False))
                raw = pairs.get(name, pairs.get(name.encode()))
                value = raw.decode() if isinstance(raw, bytes) else raw
            result[node] = value
        return result

    async def scan(self, match: str, *, count: int = 1000, timeout: float | None = None) -> list[str]:
        keys: list[str] = []
        for run in await self._timed(self._node_commands(), timeout, "SCAN"):
            cursor = "0"
            while True:
                reply = await self._timed(run(["SCAN", cursor, "MATCH", match, "COUNT", count]), timeout, "SCAN")
                cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                keys.extend(k.decode() if isinstance(k, bytes) else str(k) for k in reply[1])
                if cursor == "0":
                    break
        return list(dict.fromkeys(keys))

    async def subscribe(
        self,
        channel: str,
        callback: MessageCallback,
        *,
        sharded: bool = False,
        on_reconnect: ReconnectCallback | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        wire = (channel, self._wire_sharded(sharded))
        sub = Subscription(self, channel, wire[1], callback, on_reconnect)
        subs = self._subscriptions.setdefault(wire, [])
        subs.append(sub)
        if len(subs) == 1:
            try:
                await self._timed(self._pubsub_subscribe(*wire), timeout, "SUBSCRIBE")
            except BaseException:
                sub.active = False
                subs.remove(sub)
                if not subs:
                    del self._subscriptions[wire]
                raise
        return sub

    async def _unsubscribe(self, sub: Subscription, timeout: float | None) -> None:
        wire = (sub.channel, sub.sharded)
        subs = self._subscriptions.get(wire, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subscriptions.pop(wire, None)
            await self._timed(self._pubsub_unsubscribe(*wire), timeout, "UNSUBSCRIBE")

    # -- called by pub/sub connections

    def _message(self, channel: str, sharded: bool, message: Any) -> None:
        for sub in list(self._subscriptions.get((channel, sharded), ())):
            try:
                sub.callback(channel, message)
            except Exception:
                self._log.failure("Subscriber callback for {channel} failed", channel=channel)

    def _reconnected(self, channels: Sequence[Channel]) -> None:
        for wire in channels:
            for sub in list(self._subscriptions.get(wire, ())):
                if sub.on_reconnect is not None:
                    try:
                        sub.on_reconnect()
                    except Exception:
                        self._log.failure("on_reconnect hook for {channel} failed", channel=wire[0])

    def _new_pubsub(self, address: Address) -> PubSubConnection:
        return PubSubConnection(
            self._reactor,
            address,
            self._settings,
            on_message=self._message,
            on_reconnected=lambda conn, channels: self._reconnected(channels),
            on_lost=self._pubsub_lost,
            on_channel_lost=self._pubsub_channel_lost,
        )

    def _pubsub_lost(self, conn: PubSubConnection) -> None:
        """A pub/sub connection dropped (it reconnects by itself)."""

    def _pubsub_channel_lost(self, conn: PubSubConnection, channel: str, sharded: bool) -> None:
        """The server dropped a subscription (slot moved)."""


def _no_answer(seconds: float, what: str) -> RedisUnavailable:
    return RedisUnavailable(f"no answer from Redis within {seconds:g} s ({what})")
