"""Notifications between instances: each instance subscribes to its own (sharded) channel; a
delivery to a socket on another instance is published there, one message per delivery. A
notification is a hint: if it is lost, the lease ends and the messages are redelivered.

On the channel: a JSON header ``[socket id, connection id, [[message id, receivedAt], ...]]``,
then one line per message payload (compact JSON never holds a raw newline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server._async import background
from mpr_server.errors import StoreUnavailable
from mpr_server.model import Delivery, QueuedMessage, SocketRef
from mpr_server.notify import LocalSockets
from mpr_server.redis import RedisClient, RedisError, Subscription
from mpr_server.stores.redis.holders import LocalHolders
from mpr_server.stores.redis.keys import notify_channel
from mpr_server.stores.redis.replies import as_bytes


def encode_delivery(socket_id: str, connection_id: str, messages: Sequence[QueuedMessage]) -> bytes:
    header = orjson.dumps([socket_id, connection_id, [[m.id, m.received_at_ms] for m in messages]])
    return b"\n".join([header, *(m.payload for m in messages)])


def decode_delivery(data: bytes) -> tuple[str, str, list[QueuedMessage]]:
    header, *payloads = data.split(b"\n")
    socket_id, connection_id, described = orjson.loads(header)
    if len(described) != len(payloads):
        raise ValueError("a notification's header and payloads do not match")
    messages = [QueuedMessage(str(i), int(t), p) for (i, t), p in zip(described, payloads, strict=True)]
    return str(socket_id), str(connection_id), messages


class RedisNotifier:
    """The notifier of the Redis store (see ``mpr_server.notify``)."""

    _log = Logger()

    def __init__(
        self,
        redis: RedisClient,
        clock: IReactorTime,
        instance_id: str,
        sockets: LocalSockets,
        holders: LocalHolders,
        lease_ms: int,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._instance_id = instance_id
        self._sockets = sockets
        self._holders = holders
        self._lease_ms = lease_ms
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        try:
            self._subscription = await self._redis.subscribe(
                notify_channel(self._instance_id), self._received, sharded=True
            )
        except RedisError as e:
            raise StoreUnavailable(f"Redis subscribe failed: {e}") from e

    async def stop(self) -> None:
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            try:
                await subscription.unsubscribe()
            except RedisError:
                pass

    def notify(self, delivery: Delivery) -> None:
        target = delivery.target
        if target.instance == self._instance_id:
            self._sockets.deliver(target.socket, delivery.connection_id, delivery.messages)
            return
        message = encode_delivery(target.socket, delivery.connection_id, delivery.messages)
        background(
            self._publish(target.instance, message),
            self._log,
            "notification publish to {instance} failed",
            instance=target.instance,
        )

    async def _publish(self, instance: str, message: bytes) -> None:
        try:
            await self._redis.publish(notify_channel(instance), message, sharded=True)
        except BaseException:
            self._sockets.metrics.dropped_publish.inc()
            raise
        self._sockets.metrics.sent_remote.inc()

    def _received(self, channel: str, data: Any) -> None:
        try:
            socket_id, connection_id, messages = decode_delivery(as_bytes(data))
        except (ValueError, TypeError):
            self._log.warn("ignoring a malformed notification on {channel}", channel=channel)
            return
        # Another instance leased these to our socket: remember it, to release them if it goes.
        until_ms = int(self._clock.seconds() * 1000) + self._lease_ms
        self._holders.track(SocketRef(self._instance_id, socket_id), connection_id, until_ms)
        self._sockets.deliver(socket_id, connection_id, messages)
