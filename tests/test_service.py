"""The domain on a task.Clock: leases, timeouts, redelivery, sessions, grace periods, push policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from twisted.internet.task import Clock

from mpr_server.model import PushToken, QueuedMessage, TakeQuery
from mpr_server.service import DomainSettings, PickupService
from mpr_server.stores.embedded import EmbeddedStore
from mpr_server.wire.frames import notification_frames
from tests.drive import drive

T = TypeVar("T")
LEASE_S = 60
GRACE_S = 10
TOKEN = PushToken("fcm", "device-1")


class Sink:
    """A mediator socket as the domain sees it: records the notification frames the wire would send."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def notify(self, connection_id: str, messages: Sequence[QueuedMessage]) -> None:
        self.frames.extend(orjson.loads(frame) for frame in notification_frames(connection_id, messages))

    def message_ids(self) -> list[str]:
        return [m["id"] for f in self.frames for m in f["params"]["messages"]]


class Pusher:
    def __init__(self) -> None:
        self.pushes: list[tuple[PushToken, str]] = []

    def push(self, token: PushToken, message_id: str) -> None:
        self.pushes.append((token, message_id))


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_000_000)
        self.store = EmbeddedStore(str(tmp_path), self.clock)
        self.pusher = Pusher()
        self.service = PickupService(
            self.store,
            self.clock,
            DomainSettings("i1", lease_ms=LEASE_S * 1000, session_grace_ms=GRACE_S * 1000),
            self.pusher,
        )
        self.run(self.store.start())
        self.service.startService()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Drive a coroutine to completion without reactor time."""
        return drive(coro, lambda: self.clock.advance(0))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(10):
            self.clock.advance(0)

    def add(self, connection_id: str = "c1", token: PushToken | None = None) -> str:
        payload = orjson.dumps({"protected": "p", "ciphertext": connection_id})
        return self.run(self.service.add_message(connection_id, ["did:key:alice"], payload, token))

    def open(self, socket_id: str) -> Sink:
        sink = Sink()
        self.service.socket_opened(socket_id, sink)
        self.advance(0)
        return sink


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.service.stopService()
    w.run(w.store.stop())


def test_add_without_session_pushes_once_and_notifies_nobody(world: World) -> None:
    sink = world.open("m1")
    message_id = world.add(token=TOKEN)
    assert world.pusher.pushes == [(TOKEN, message_id)]
    assert sink.frames == []
    world.add()  # no token, no push
    assert len(world.pusher.pushes) == 1


def test_add_to_live_session_notifies_its_socket_and_does_not_push(world: World) -> None:
    m1, m2 = world.open("m1"), world.open("m2")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    message_id = world.add(token=TOKEN)
    assert world.pusher.pushes == []
    assert m2.frames == []
    assert len(m1.frames) == 1
    frame = m1.frames[0]
    assert frame["jsonrpc"] == "2.0" and frame["method"] == "messagesReceived" and "id" not in frame
    assert frame["params"]["connectionId"] == "c1" and frame["params"]["id"] == ""
    (message,) = frame["params"]["messages"]
    assert message["id"] == message_id
    assert message["encryptedMessage"] == {"protected": "p", "ciphertext": "c1"}
    assert message["receivedAt"].endswith("Z") and len(message["receivedAt"]) == 24
    # Leased to the session: not counted, not taken by others.
    assert world.run(world.service.count("c1", None)) == 0


def test_every_socket_with_the_session_id_is_notified(world: World) -> None:
    first, second = world.open("m1"), world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    message_id = world.add()
    assert first.message_ids() == [message_id] and second.message_ids() == [message_id]


def test_unacknowledged_delivery_is_redelivered_after_the_lease(world: World) -> None:
    sink = world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    message_id = world.add()
    world.advance(LEASE_S - 2)
    assert sink.message_ids() == [message_id]
    world.advance(3)
    assert sink.message_ids() == [message_id, message_id]


def test_acknowledged_delivery_is_not_redelivered(world: World) -> None:
    sink = world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    message_id = world.add()
    world.run(world.service.remove("c1", [message_id]))
    world.advance(3 * LEASE_S)
    assert sink.message_ids() == [message_id]
    assert world.run(world.service.count("c1", None)) == 0


def test_taken_message_returns_to_the_queue_when_its_lease_ends(world: World) -> None:
    world.open("m1")
    message_id = world.add()
    taken = world.run(world.service.take(TakeQuery("c1"), "m1"))
    assert [m.id for m in taken] == [message_id]
    assert world.run(world.service.count("c1", None)) == 0
    world.advance(LEASE_S + 1)
    assert world.run(world.service.count("c1", None)) == 1


def test_session_replacement_moves_deliveries_to_the_new_socket(world: World) -> None:
    old, new = world.open("m1"), world.open("m2")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    message_id = world.add()
    world.run(world.service.add_live_session("c1", "s2", "m2"))
    assert old.message_ids() == [message_id]
    assert new.message_ids() == [message_id]
    # A late remove from the old socket does not kill the new session.
    assert world.run(world.service.remove_live_session("c1", "m1", None)) is False
    assert world.run(world.service.has_live_session("c1")) is True
    second = world.add(token=TOKEN)
    assert new.message_ids() == [message_id, second] and world.pusher.pushes == []


def test_socket_close_ends_its_sessions_and_pushes_resume(world: World) -> None:
    sink = world.open("generated-uuid")
    world.run(world.service.add_live_session("c1", "s1", "generated-uuid"))
    delivered = world.add()
    world.service.socket_closed("generated-uuid", sink, explicit_id=False)
    world.advance(0)
    assert world.run(world.service.has_live_session("c1")) is False
    assert world.run(world.service.count("c1", None)) == 1  # the unacknowledged delivery is pending again
    pushed = world.add(token=TOKEN)
    assert world.pusher.pushes == [(TOKEN, pushed)]
    assert delivered != pushed


def test_named_socket_keeps_sessions_through_a_quick_reconnect(world: World) -> None:
    sink = world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    world.service.socket_closed("m1", sink, explicit_id=True)
    world.advance(1)
    held = world.add(token=TOKEN)
    assert world.pusher.pushes == []  # the session is only away
    back = world.open("m1")
    assert back.message_ids() == [held]
    world.advance(2 * GRACE_S)
    assert world.run(world.service.has_live_session("c1")) is True
    assert world.pusher.pushes == []


def test_named_socket_that_does_not_return_loses_its_sessions_and_held_adds_are_pushed(world: World) -> None:
    sink = world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    world.service.socket_closed("m1", sink, explicit_id=True)
    world.advance(1)
    held = world.add(token=TOKEN)
    assert world.pusher.pushes == []
    world.advance(GRACE_S)
    assert world.pusher.pushes == [(TOKEN, held)]
    assert world.run(world.service.has_live_session("c1")) is False
    assert world.run(world.service.count("c1", None)) == 1


def test_remove_live_session_by_session_id(world: World) -> None:
    world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    assert world.run(world.service.remove_live_session("c1", "m2", "wrong")) is False
    assert world.run(world.service.remove_live_session("c1", "m2", "s1")) is True
    assert world.run(world.service.has_live_session("c1")) is False


def test_large_redelivery_is_split_into_bounded_frames(world: World) -> None:
    sink = world.open("m1")
    sent = [world.add() for _ in range(250)]
    world.run(world.service.take(TakeQuery("c1"), "m2"))  # leased to a socket that then vanishes
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    assert [len(f["params"]["messages"]) for f in sink.frames] == [100, 100, 50]
    assert sink.message_ids() == sent


def test_release_of_a_gone_socket_is_retried_until_the_store_answers(world: World) -> None:
    sink = world.open("generated")
    world.run(world.service.add_live_session("c1", "s1", "generated"))
    world.run(world.store.stop())  # the store is down when the socket goes
    world.service.socket_closed("generated", sink, explicit_id=False)
    world.advance(0)
    world.run(world.store.start())
    assert world.run(world.service.has_live_session("c1")) is True  # not released yet
    world.advance(6)  # the retry
    assert world.run(world.service.has_live_session("c1")) is False
    pushed = world.add(token=TOKEN)
    assert world.pusher.pushes == [(TOKEN, pushed)]


def test_messages_past_their_ttl_are_deleted_by_the_sweep(world: World) -> None:
    world.service.settings = dataclasses.replace(world.service.settings, message_ttl_ms=30_000)
    old = world.add()
    world.advance(20)
    young = world.add()
    world.advance(11)  # old is 31 s old, young 11 s
    taken = world.run(world.service.take(TakeQuery("c1"), "m1"))
    assert [m.id for m in taken] == [young]
    assert old != young


def test_shutdown_ends_grace_periods_and_sends_the_held_pushes(world: World) -> None:
    sink = world.open("m1")
    world.run(world.service.add_live_session("c1", "s1", "m1"))
    world.service.socket_closed("m1", sink, explicit_id=True)
    world.advance(1)
    held = world.add(token=TOKEN)
    assert world.pusher.pushes == []
    world.run(world.service.end_grace_periods())
    assert world.pusher.pushes == [(TOKEN, held)]
    assert world.run(world.service.has_live_session("c1")) is False
