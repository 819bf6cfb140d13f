"""Telling a mediator socket about messages leased to its live session.

The domain hands every :class:`~mpr_server.model.Delivery` to a :class:`Notifier` ("tell socket S
on instance I these messages"). Sockets of this process are found in :class:`LocalSockets`; the
Redis store's notifier (``stores/redis/fanout.py``) carries the others to their instance.
Notifications are hints: a lost one is repaired by lease expiry and redelivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mpr_server.metrics import Metrics
from mpr_server.model import Delivery, QueuedMessage


class MessageSink(Protocol):
    """One open mediator socket (the wire layer renders the frames)."""

    def notify(self, connection_id: str, messages: Sequence[QueuedMessage]) -> None: ...


class Notifier(Protocol):
    def notify(self, delivery: Delivery) -> None:
        """Send the delivery's messages to its target socket, wherever it is; never raises."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class LocalSockets:
    """The open mediator sockets of this process, by socket id (several sockets may share one)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._sinks: dict[str, list[MessageSink]] = {}
        self.metrics = metrics if metrics is not None else Metrics()
        self._sent, self._dropped = self.metrics.sent_local, self.metrics.dropped_no_socket

    def __contains__(self, socket_id: object) -> bool:
        return socket_id in self._sinks

    def add(self, socket_id: str, sink: MessageSink) -> None:
        self._sinks.setdefault(socket_id, []).append(sink)

    def discard(self, socket_id: str, sink: MessageSink) -> bool:
        """Forget the sink; True if it was the last one with this id."""
        sinks = self._sinks.get(socket_id)
        if sinks is None or sink not in sinks:
            return False
        sinks.remove(sink)
        if sinks:
            return False
        del self._sinks[socket_id]
        return True

    def deliver(self, socket_id: str, connection_id: str, messages: Sequence[QueuedMessage]) -> None:
        """Give the messages to every open socket with this id. If none is open, the lease ends
        and the messages are redelivered or taken later."""
        sinks = self._sinks.get(socket_id)
        if not sinks:
            self._dropped.inc()
            return
        self._sent.inc()
        for sink in sinks:
            sink.notify(connection_id, messages)


class LocalNotifier:
    """The notifier of a single-process store: every target socket is in this process."""

    def __init__(self, sockets: LocalSockets) -> None:
        self._sockets = sockets

    def notify(self, delivery: Delivery) -> None:
        self._sockets.deliver(delivery.target.socket, delivery.connection_id, delivery.messages)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
