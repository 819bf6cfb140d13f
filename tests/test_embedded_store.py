"""The store contract against the embedded SQLite store, and what only that store does."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mpr_server.errors import StoreUnavailable
from mpr_server.model import NewMessage, TakeQuery
from mpr_server.stores.embedded import EmbeddedStore
from tests.store_contract import LEASE_MS, T0, A, B, StoreContract, add, add_many, cid, ids, lease


class TestEmbeddedStoreContract(StoreContract):
    @pytest_twisted.async_yield_fixture
    async def store(self, tmp_path: Path, reactor: Any) -> AsyncIterator[EmbeddedStore]:
        store = EmbeddedStore(str(tmp_path), reactor)
        await store.start()
        yield store
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_restart_keeps_messages_and_releases_leases(tmp_path: Path, reactor: Any) -> None:
    store = EmbeddedStore(str(tmp_path), reactor)
    await store.start()
    c = cid()
    sent = await add_many(store, c, 5)
    await store.take(TakeQuery(c, limit=2), A, lease())
    await store.remove(c, [sent[4].id])
    await store.stop()

    reopened = EmbeddedStore(str(tmp_path), reactor)
    await reopened.start()
    try:
        assert await reopened.count(c, None, T0) == 4
        assert ids(await reopened.take(TakeQuery(c), A, lease())) == ids(sent[:4])
    finally:
        await reopened.stop()


@pytest_twisted.ensureDeferred
async def test_a_data_dir_serves_one_process_only(tmp_path: Path, reactor: Any) -> None:
    first = EmbeddedStore(str(tmp_path), reactor)
    await first.start()
    try:
        with pytest.raises(StoreUnavailable, match="in use"):
            await EmbeddedStore(str(tmp_path), reactor).start()
    finally:
        await first.stop()


@pytest_twisted.ensureDeferred
async def test_operations_of_one_turn_share_a_commit_and_fail_alone(tmp_path: Path, reactor: Any) -> None:
    store = EmbeddedStore(str(tmp_path), reactor)
    await store.start()
    try:
        c = cid()
        message = await add(store, c, 1)
        # Queued in one reactor turn: a duplicate id fails inside its own savepoint without undoing
        # the operation committed with it.
        dup = Deferred.fromCoroutine(store.add(NewMessage(message.id, c, ("did:key:alice",), b"{}", T0), lease()))
        after = Deferred.fromCoroutine(add(store, c, 2))
        assert not dup.called and not after.called
        with pytest.raises(StoreUnavailable):
            await dup
        second = await after
        assert ids(await store.take(TakeQuery(c), A, lease())) == [message.id, second.id]
    finally:
        await store.stop()


# -- memory and database in step: a rolled-back operation leaves no trace in the registry ---------


def _fail_updates_leasing_to(store: EmbeddedStore, holder: Any) -> None:
    """Make SQLite itself refuse (RAISE in a trigger) any update that leases a row to ``holder``."""
    assert store._db is not None
    store._db.execute(
        "CREATE TEMP TRIGGER refuse_lease BEFORE UPDATE OF lease_holder ON messages"
        f" WHEN NEW.lease_holder = '{holder.key()}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )


def _registry_state(store: EmbeddedStore) -> tuple[Any, ...]:
    r = store.registry
    return (
        {c: (s.session_id, s.holder, s.away) for c, s in r.sessions.items()},
        {h: set(cs) for h, cs in r.by_holder.items()},
        dict(r.held),
    )


def _leases_in_db(store: EmbeddedStore, connection_id: str) -> list[str | None]:
    assert store._db is not None
    rows = store._db.execute(
        "SELECT lease_holder FROM messages WHERE connection_id = ? ORDER BY seq", (connection_id,)
    ).fetchall()
    return [row[0] for row in rows]


@pytest_twisted.ensureDeferred
async def test_a_session_change_rolled_back_in_its_savepoint_leaves_the_registry_unchanged(
    tmp_path: Path, reactor: Any
) -> None:
    store = EmbeddedStore(str(tmp_path), reactor)
    await store.start()
    try:
        c = cid()
        await store.add_session(c, "s-a", A, lease())
        await add(store, c, 1)  # leased to A's session
        before = _registry_state(store)
        _fail_updates_leasing_to(store, B)
        # in one group commit: B's addLiveSession fails after changing the registry, a plain add
        # committed with it succeeds
        failing = Deferred.fromCoroutine(store.add_session(c, "s-b", B, lease()))
        other = cid()
        alongside = Deferred.fromCoroutine(add(store, other, 2))
        with pytest.raises(StoreUnavailable, match="injected failure"):
            await failing
        await alongside
        assert _registry_state(store) == before
        assert _leases_in_db(store, c) == [A.key()]
        assert await store.count(other, None, T0) == 1
        # A still holds the session, in memory and in the database
        assert await store.remove_session(c, A, None) is True
        assert _leases_in_db(store, c) == [None]
        assert await store.has_session(c) is False
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_socket_release_rolled_back_keeps_its_sessions(tmp_path: Path, reactor: Any) -> None:
    store = EmbeddedStore(str(tmp_path), reactor)
    await store.start()
    try:
        c_a, c_b = cid(), cid()
        await store.add_session(c_a, "s-a", A, lease())
        await store.add_session(c_b, "s-b", B, lease())
        await add(store, c_b, 1)
        # once B's lease has run out, socket A takes c_b's message (polling), so releasing A
        # redelivers it to B's session
        taken = await store.take(TakeQuery(c_b), A, lease(T0 + LEASE_MS))
        assert len(taken) == 1
        before = _registry_state(store)
        _fail_updates_leasing_to(store, B)
        for keep in (False, True):
            with pytest.raises(StoreUnavailable, match="injected failure"):
                await store.release_socket(A, keep, lease())
            assert _registry_state(store) == before
            assert _leases_in_db(store, c_b) == [A.key()]
        assert await store.has_session(c_a) is True
    finally:
        await store.stop()


class _CommitFailsOnce(EmbeddedStore):
    """The seam: the group's COMMIT fails once, as SQLite reports a full disk."""

    fail_next = False

    def _finish(self, db: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        super()._finish(db)


@pytest_twisted.ensureDeferred
async def test_a_failed_group_commit_undoes_every_registry_change_of_the_group(tmp_path: Path, reactor: Any) -> None:
    store = _CommitFailsOnce(str(tmp_path), reactor)
    await store.start()
    try:
        c1, c2, c3 = cid(), cid(), cid()
        await store.add_session(c1, "s1", A, lease())
        await add(store, c1, 1)
        before = _registry_state(store)
        store.fail_next = True
        group: list[Deferred[Any]] = [
            Deferred.fromCoroutine(store.add_session(c2, "s2", A, lease())),
            Deferred.fromCoroutine(store.add_session(c1, "s1b", B, lease())),
            Deferred.fromCoroutine(store.remove_session(c3, A, None)),
            Deferred.fromCoroutine(store.release_socket(A, True, lease())),
        ]
        for d in group:
            with pytest.raises(StoreUnavailable, match="disk is full"):
                await d
        assert _registry_state(store) == before
        assert _leases_in_db(store, c1) == [A.key()]
        # and the store goes on from the state the database has
        assert await store.has_session(c2) is False
        assert await store.remove_session(c1, A, None) is True
        assert _leases_in_db(store, c1) == [None]
    finally:
        await store.stop()
