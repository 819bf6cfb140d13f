"""The store contract against the embedded SQLite store, and what only that store does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from mpr_server.errors import StoreUnavailable
from mpr_server.model import NewMessage, TakeQuery
from mpr_server.stores.embedded import EmbeddedStore
from tests.store_contract import T0, A, StoreContract, add, add_many, cid, ids, lease


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
