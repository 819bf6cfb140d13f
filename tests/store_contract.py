"""The store contract: every MessageStore implementation runs these tests unchanged.

A concrete test class inherits ``StoreContract`` and provides a ``store`` fixture yielding a
started store. Tests use fresh connection ids, so one store may serve many tests.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import pytest_twisted
from bson import ObjectId

from mpr_server.errors import QueueFull
from mpr_server.model import Lease, NewMessage, PushToken, SocketRef, TakeQuery
from mpr_server.stores.base import MessageStore

T0 = 1_764_000_000_000  # an arbitrary "now", epoch ms
LEASE_MS = 60_000

A = SocketRef("instance-1", "socket-a")
B = SocketRef("instance-1", "socket-b")


def lease(now: int = T0) -> Lease:
    return Lease(now, now + LEASE_MS)


def cid() -> str:
    return "conn-" + uuid.uuid4().hex


def payload(n: int, pad: int = 0) -> bytes:
    return orjson.dumps({"protected": f"p{n}", "iv": "aa", "ciphertext": "x" * pad, "tag": str(n)})


async def add(
    store: MessageStore,
    connection_id: str,
    n: int,
    dids: tuple[str, ...] = ("did:key:alice",),
    pad: int = 0,
    now: int = T0,
) -> NewMessage:
    message = NewMessage(str(ObjectId()), connection_id, dids, payload(n, pad), now + n)
    await store.add(message, lease(now))
    return message


async def add_many(store: MessageStore, connection_id: str, count: int, **kw: Any) -> list[NewMessage]:
    return [await add(store, connection_id, n, **kw) for n in range(count)]


def ids(messages: Any) -> list[str]:
    return [m.id for m in messages]


class StoreContract:
    """Behaviour every store must have (docs/protocol.rst: message lifecycle, live sessions)."""

    @pytest_twisted.ensureDeferred
    async def test_added_message_is_taken_once_with_its_exact_bytes(self, store: MessageStore) -> None:
        c = cid()
        sent = await add(store, c, 1)
        taken = await store.take(TakeQuery(c), A, lease())
        assert [(m.id, m.received_at_ms, m.payload) for m in taken] == [(sent.id, sent.received_at_ms, sent.payload)]
        assert await store.take(TakeQuery(c), A, lease()) == []

    @pytest_twisted.ensureDeferred
    async def test_take_is_oldest_first_with_exact_limit(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 25)
        first = await store.take(TakeQuery(c, limit=10), A, lease())
        second = await store.take(TakeQuery(c, limit=10), A, lease())
        rest = await store.take(TakeQuery(c, limit=0), A, lease())
        assert ids(first) == ids(sent[:10])
        assert ids(second) == ids(sent[10:20])
        assert ids(rest) == ids(sent[20:])

    @pytest_twisted.ensureDeferred
    async def test_leased_messages_are_not_counted_until_the_lease_ends(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 3)
        assert await store.count(c, None, T0) == 3
        await store.take(TakeQuery(c, limit=2), A, lease())
        assert await store.count(c, None, T0) == 1
        later = T0 + LEASE_MS
        assert await store.count(c, None, later) == 3
        again = await store.take(TakeQuery(c), B, lease(later))
        assert ids(again) == ids(sent)

    @pytest_twisted.ensureDeferred
    async def test_limit_bytes_stops_before_exceeding_and_skips_oversize(self, store: MessageStore) -> None:
        c = cid()
        small1 = await add(store, c, 1, pad=10)
        big = await add(store, c, 2, pad=5000)
        small2 = await add(store, c, 3, pad=10)
        small3 = await add(store, c, 4, pad=10)
        budget = small1.size + small2.size + small3.size - 1
        taken = await store.take(TakeQuery(c, limit_bytes=budget), A, lease())
        assert ids(taken) == [small1.id, small2.id]
        taken = await store.take(TakeQuery(c, limit_bytes=budget), A, lease())
        assert ids(taken) == [small3.id]
        # The oversize message is still there for a take that can hold it.
        assert ids(await store.take(TakeQuery(c), A, lease())) == [big.id]

    @pytest_twisted.ensureDeferred
    async def test_limit_and_limit_bytes_together(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 5, pad=10)
        taken = await store.take(TakeQuery(c, limit=2, limit_bytes=10**6), A, lease())
        assert ids(taken) == ids(sent[:2])

    @pytest_twisted.ensureDeferred
    async def test_delete_messages_removes_what_is_taken(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 4)
        taken = await store.take(TakeQuery(c, limit=3, delete=True), None, lease())
        assert ids(taken) == ids(sent[:3])
        later = T0 + 10 * LEASE_MS
        assert await store.count(c, None, later) == 1
        assert ids(await store.take(TakeQuery(c), A, lease(later))) == [sent[3].id]

    @pytest_twisted.ensureDeferred
    async def test_recipient_filter_is_connection_and_recipient(self, store: MessageStore) -> None:
        c, other = cid(), cid()
        to_alice = await add(store, c, 1, dids=("did:key:alice",))
        await add(store, c, 2, dids=("did:key:bob",))
        both = await add(store, c, 3, dids=("did:key:bob", "did:key:alice"))
        await add(store, other, 4, dids=("did:key:alice",))
        assert await store.count(c, "did:key:alice", T0) == 2
        assert await store.count(c, "did:key:carol", T0) == 0
        taken = await store.take(TakeQuery(c, recipient_did="did:key:alice"), A, lease())
        assert ids(taken) == [to_alice.id, both.id]
        assert await store.count(c, None, T0) == 1

    @pytest_twisted.ensureDeferred
    async def test_remove_deletes_in_any_state_and_ignores_unknown_ids(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 4)
        await store.take(TakeQuery(c, limit=2), A, lease())  # leased
        await store.remove(c, [sent[0].id, sent[2].id, "ffffffffffffffffffffffff", "not-an-id"])
        later = T0 + LEASE_MS
        assert ids(await store.take(TakeQuery(c), A, lease(later))) == [sent[1].id, sent[3].id]

    @pytest_twisted.ensureDeferred
    async def test_remove_of_deep_lists_removes_everything(self, store: MessageStore) -> None:
        c = cid()
        sent = await add_many(store, c, 60)
        await store.remove(c, ids(sent[:50]))
        assert ids(await store.take(TakeQuery(c), A, lease())) == ids(sent[50:])

    @pytest_twisted.ensureDeferred
    async def test_remove_aimed_at_another_connection_touches_nothing(self, store: MessageStore) -> None:
        c, attacker = cid(), cid()
        sent = await add_many(store, c, 2)
        await store.remove(attacker, ids(sent))
        await store.remove_all(attacker, "did:key:alice")
        assert await store.count(c, None, T0) == 2

    @pytest_twisted.ensureDeferred
    async def test_remove_all_deletes_the_recipients_messages(self, store: MessageStore) -> None:
        c = cid()
        await add(store, c, 1, dids=("did:key:alice",))
        bob = await add(store, c, 2, dids=("did:key:bob",))
        await add(store, c, 3, dids=("did:key:alice", "did:key:bob"))
        await store.remove_all(c, "did:key:alice")
        assert ids(await store.take(TakeQuery(c), A, lease())) == [bob.id]

    @pytest_twisted.ensureDeferred
    async def test_add_to_a_live_session_leases_and_delivers(self, store: MessageStore) -> None:
        c = cid()
        assert await store.add_session(c, "s1", A, lease()) is None
        assert await store.has_session(c)
        message = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(1), T0)
        result = await store.add(message, lease())
        assert result.delivery is not None
        assert result.delivery.target == A
        assert result.delivery.connection_id == c
        assert ids(result.delivery.messages) == [message.id]
        assert result.delivery.messages[0].payload == message.payload
        assert await store.count(c, None, T0) == 0
        assert await store.count(c, None, T0 + LEASE_MS) == 1

    @pytest_twisted.ensureDeferred
    async def test_new_session_takes_over_the_leases(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        sent = await add_many(store, c, 2)
        pending = await add(store, cid(), 9)  # another connection, untouched
        delivery = await store.add_session(c, "s2", B, lease())
        assert delivery is not None and delivery.target == B
        assert ids(delivery.messages) == ids(sent)
        # The old holder can no longer remove the session; the new one holds it.
        assert not await store.remove_session(c, A, None)
        assert await store.remove_session(c, B, None)
        assert not await store.has_session(c)
        # Removing the session released its leases.
        assert ids(await store.take(TakeQuery(c), A, lease())) == ids(sent)
        assert pending.connection_id != c

    @pytest_twisted.ensureDeferred
    async def test_remove_session_is_scoped(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        assert not await store.remove_session(c, B, None)
        assert not await store.remove_session(c, B, "other-session")
        assert await store.has_session(c)
        assert await store.remove_session(c, B, "s1")
        assert not await store.has_session(c)
        assert not await store.remove_session(c, A, None)

    @pytest_twisted.ensureDeferred
    async def test_expired_leases_are_redelivered_to_the_live_session(self, store: MessageStore) -> None:
        c, quiet = cid(), cid()
        await store.add_session(c, "s1", A, lease())
        sent = await add_many(store, c, 2)
        taken_quiet = await add(store, quiet, 1)
        await store.take(TakeQuery(quiet), B, lease())
        later = T0 + LEASE_MS + 1
        deliveries = await store.release_expired(lease(later))
        mine = [d for d in deliveries if d.connection_id == c]
        assert len(mine) == 1 and mine[0].target == A
        assert ids(mine[0].messages) == ids(sent)
        assert not [d for d in deliveries if d.connection_id == quiet]
        # Re-leased to the session until later + LEASE_MS; the quiet one is pending again.
        assert await store.count(c, None, later) == 0
        assert ids(await store.take(TakeQuery(quiet), B, lease(later))) == [taken_quiet.id]

    @pytest_twisted.ensureDeferred
    async def test_counting_an_expired_delivery_does_not_cancel_its_redelivery(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        sent = await add(store, c, 1)  # delivered to A, never acknowledged
        later = T0 + LEASE_MS + 1
        assert await store.count(c, None, later) == 1  # Credo counts after every ack
        deliveries = [d for d in await store.release_expired(lease(later)) if d.connection_id == c]
        assert [(d.target, ids(d.messages)) for d in deliveries] == [(A, [sent.id])]

    @pytest_twisted.ensureDeferred
    async def test_socket_gone_drops_its_sessions_and_releases_its_leases(self, store: MessageStore) -> None:
        c, other = cid(), cid()
        await store.add_session(c, "s1", A, lease())
        await store.add_session(other, "s2", B, lease())
        sent = await add_many(store, c, 2)
        released = await store.release_socket(A, False, lease())
        assert list(released.dropped_connections) == [c]
        assert list(released.deliveries) == []
        assert not await store.has_session(c)
        assert await store.has_session(other)
        assert ids(await store.take(TakeQuery(c), B, lease())) == ids(sent)

    @pytest_twisted.ensureDeferred
    async def test_socket_gone_redelivers_its_leases_to_other_sessions(self, store: MessageStore) -> None:
        c = cid()
        sent = await add(store, c, 1)
        assert await store.add_session(c, "s1", B, lease()) is None  # pending, not leased: no takeover
        assert ids(await store.take(TakeQuery(c), A, lease())) == [sent.id]  # a pickup through A
        released = await store.release_socket(A, False, lease())
        assert list(released.dropped_connections) == []
        assert [(d.target, d.connection_id, ids(d.messages)) for d in released.deliveries] == [(B, c, [sent.id])]
        assert await store.count(c, None, T0) == 0  # now leased to B

    @pytest_twisted.ensureDeferred
    async def test_grace_period_holds_messages_until_the_socket_returns(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        leased = await add(store, c, 1)
        released = await store.release_socket(A, True, lease())
        assert list(released.dropped_connections) == []
        assert await store.has_session(c)
        message = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(2), T0 + 5)
        result = await store.add(message, lease())
        assert result.delivery is None and result.held_by == A
        assert await store.count(c, None, T0) == 2
        deliveries = await store.attach_socket(A, lease())
        assert [(d.target, d.connection_id, ids(d.messages)) for d in deliveries] == [(A, c, [leased.id, message.id])]
        assert await store.count(c, None, T0) == 0

    @pytest_twisted.ensureDeferred
    async def test_no_redelivery_to_a_session_whose_socket_is_away(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        await store.release_socket(A, True, lease())
        sent = await add(store, c, 1)
        await store.take(TakeQuery(c), B, lease())
        later = T0 + LEASE_MS + 1
        assert [d for d in await store.release_expired(lease(later)) if d.connection_id == c] == []
        assert ids(await store.take(TakeQuery(c), B, lease(later))) == [sent.id]

    @pytest_twisted.ensureDeferred
    async def test_grace_period_end_drops_the_sessions_and_hands_back_the_held_push(self, store: MessageStore) -> None:
        c, quiet = cid(), cid()
        await store.add_session(c, "s1", A, lease())
        await store.add_session(quiet, "s2", A, lease())
        await store.release_socket(A, True, lease())
        for n in (1, 2):  # the last held push of a connection wins
            token = PushToken("fcm", f"device-{n}")
            message = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(n), T0 + n, token)
            assert (await store.add(message, lease())).held_by == A
        await add(store, quiet, 3)  # no token: nothing to push
        released = await store.release_socket(A, False, lease())
        assert sorted(released.dropped_connections) == sorted([c, quiet])
        assert list(released.held_pushes) == [(PushToken("fcm", "device-2"), message.id)]
        assert not await store.has_session(c)

    @pytest_twisted.ensureDeferred
    async def test_a_returning_socket_cancels_the_held_push(self, store: MessageStore) -> None:
        c = cid()
        await store.add_session(c, "s1", A, lease())
        await store.release_socket(A, True, lease())
        message = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(1), T0, PushToken("apns", "d"))
        await store.add(message, lease())
        assert [ids(d.messages) for d in await store.attach_socket(A, lease())] == [[message.id]]
        await store.release_socket(A, True, lease())
        assert list((await store.release_socket(A, False, lease())).held_pushes) == []

    @pytest_twisted.ensureDeferred
    async def test_queue_cap_refuses_adds_beyond_it_and_counts_leased_messages(self, store: MessageStore) -> None:
        c = cid()
        for n in range(3):
            message = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(n), T0 + n)
            await store.add(message, lease(), max_queued=3)
        await store.take(TakeQuery(c, limit=1), A, lease())  # leased messages still count
        refused = NewMessage(str(ObjectId()), c, ("did:key:alice",), payload(9), T0 + 9)
        with pytest.raises(QueueFull):
            await store.add(refused, lease(), max_queued=3)
        assert await store.count(c, None, T0) == 2
        await store.remove(c, ids(await store.take(TakeQuery(c, limit=1), A, lease())))
        await store.add(refused, lease(), max_queued=3)  # room again
        assert await store.count(c, None, T0) == 2

    @pytest_twisted.ensureDeferred
    async def test_expire_deletes_messages_older_than_the_ttl_in_any_state(self, store: MessageStore) -> None:
        c = cid()
        for n in range(3):
            await add(store, c, n, now=T0 - 100_000)
        await store.take(TakeQuery(c, limit=1), A, lease())  # a leased one expires too
        fresh = await add(store, c, 9)
        assert await store.expire(T0 - 50_000) >= 3  # (a shared store may hold other old ones)
        later = T0 + LEASE_MS
        assert ids(await store.take(TakeQuery(c), A, lease(later))) == [fresh.id]
        assert await store.expire(T0 - 50_000) == 0

    @pytest_twisted.ensureDeferred
    async def test_ping_answers(self, store: MessageStore) -> None:
        await store.ping()
