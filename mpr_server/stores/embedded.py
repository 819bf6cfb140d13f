"""The embedded store: messages in a SQLite file (WAL), live sessions in memory.

All operations run on the reactor thread through one queue; the operations queued during one
reactor turn share a transaction (group commit), each inside its own savepoint so that one failing
operation does not undo the others. A call's Deferred fires only after its transaction commits, so
an acknowledged ``addMessage`` is in the WAL and survives ``kill -9`` of the process (with
``synchronous=FULL`` it also survives a power loss).

The live-session registry lives in memory (:class:`Registry`) and changes inside the same
operations; every change is journalled, so that an operation whose savepoint rolls back, or a
transaction that fails as a whole, leaves the registry exactly as the database: as if it never ran.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server._async import Batcher
from mpr_server.errors import QueueFull, StoreUnavailable
from mpr_server.model import (
    AddResult,
    Delivery,
    Lease,
    NewMessage,
    PushToken,
    QueuedMessage,
    SocketRef,
    SocketRelease,
    TakeQuery,
)

T = TypeVar("T")
COMMIT_DELAY_S = 0  # operations of this long share a commit (0: one reactor turn)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    connection_id TEXT NOT NULL,
    recipients TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    lease_holder TEXT,
    lease_until INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_connection ON messages (connection_id, seq);
CREATE INDEX IF NOT EXISTS messages_by_lease_end ON messages (lease_until);
CREATE INDEX IF NOT EXISTS messages_by_holder ON messages (lease_holder);
CREATE INDEX IF NOT EXISTS messages_by_age ON messages (received_at);
CREATE TABLE IF NOT EXISTS recipients (
    connection_id TEXT NOT NULL,
    did TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (connection_id, did, seq)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS recipients_cleanup AFTER DELETE ON messages BEGIN
    DELETE FROM recipients WHERE connection_id = OLD.connection_id AND seq = OLD.seq
        AND did IN (SELECT value FROM json_each(OLD.recipients));
END;
"""

PENDING = "(m.lease_until IS NULL OR m.lease_until <= :now)"
COLUMNS = "m.seq, m.id, m.received_at, m.payload, m.size"

# Rows as selected by COLUMNS / returned by RETURNING: (seq, id, received_at, payload, ...)
Row = tuple[Any, ...]


@dataclass
class _Session:
    session_id: str
    holder: SocketRef
    away: bool = False


class Registry:
    """The live sessions, by connection and by holding socket, and the pushes held back while a
    session's socket is away. Changed only through the methods below, each of which journals how
    to undo it until the transaction it ran in is over (:meth:`mark`, :meth:`undo_to`,
    :meth:`settle`)."""

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.by_holder: dict[SocketRef, set[str]] = {}
        self.held: dict[str, tuple[PushToken, str]] = {}
        self._undo: list[Callable[[], None]] = []

    def mark(self) -> int:
        return len(self._undo)

    def undo_to(self, mark: int) -> None:
        """Undo the changes made since ``mark``, newest first."""
        while len(self._undo) > mark:
            self._undo.pop()()

    def settle(self) -> None:
        """The transaction is over: its changes stay."""
        self._undo.clear()

    def _restore(self, table: dict[Any, Any], key: Any) -> None:
        if key in table:
            old = table[key]
            self._undo.append(lambda: table.__setitem__(key, old))
        else:
            self._undo.append(lambda: table.pop(key, None))

    def put(self, connection_id: str, session: _Session) -> None:
        self._restore(self.sessions, connection_id)
        self.sessions[connection_id] = session
        holder_set = self.by_holder.get(session.holder)
        if holder_set is None:
            self._restore(self.by_holder, session.holder)
            self.by_holder[session.holder] = {connection_id}
        elif connection_id not in holder_set:
            holder_set.add(connection_id)
            self._undo.append(lambda: holder_set.discard(connection_id))

    def drop(self, connection_id: str) -> _Session | None:
        self.drop_push(connection_id)
        if connection_id not in self.sessions:
            return None
        self._restore(self.sessions, connection_id)
        session = self.sessions.pop(connection_id)
        held = self.by_holder.get(session.holder)
        if held is not None and connection_id in held:
            held.discard(connection_id)
            self._undo.append(lambda: held.add(connection_id))
            if not held:
                self._restore(self.by_holder, session.holder)
                del self.by_holder[session.holder]
        return session

    def set_away(self, connection_id: str, away: bool) -> None:
        session = self.sessions[connection_id]
        before = session.away
        session.away = away
        self._undo.append(lambda: setattr(session, "away", before))

    def hold_push(self, connection_id: str, push: tuple[PushToken, str]) -> None:
        self._restore(self.held, connection_id)
        self.held[connection_id] = push

    def drop_push(self, connection_id: str) -> None:
        if connection_id in self.held:
            self._restore(self.held, connection_id)
            del self.held[connection_id]


def _queued(row: Row) -> QueuedMessage:
    return QueuedMessage(id=row[1], received_at_ms=row[2], payload=bytes(row[3]))


class EmbeddedStore:
    """Single-process store; see the module docstring."""

    name = "embedded"
    _log = Logger()

    def __init__(self, data_dir: str, reactor: IReactorTime, synchronous: str = "NORMAL") -> None:
        self._dir = data_dir
        self._reactor = reactor
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._batch: Batcher[tuple[Callable[[sqlite3.Connection], Any], Deferred[Any]]] = Batcher(
            reactor, COMMIT_DELAY_S, self._commit
        )
        self.registry = Registry()

    @property
    def path(self) -> str:
        return os.path.join(self._dir, "mpr.sqlite3")

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(self._dir, exist_ok=True)
        lock = open(os.path.join(self._dir, "mpr.lock"), "wb")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreUnavailable(
                f"{self._dir} is in use by another MPR process (MPR_DATA_DIR must not be shared)"
            ) from None
        self._lock = lock
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(SCHEMA)
        released = db.execute(
            "UPDATE messages SET lease_holder = NULL, lease_until = NULL WHERE lease_holder IS NOT NULL"
        ).rowcount
        self._db = db
        pending = db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        self._log.info(
            "embedded store {path}: {pending} queued messages, {released} leases released",
            path=self.path,
            pending=pending,
            released=released,
        )

    async def stop(self) -> None:
        self._batch.flush_now()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- the operation queue --------------------------------------------------------------------

    def _submit(self, op: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        if self._db is None:
            raise StoreUnavailable("embedded store is not open")
        d: Deferred[T] = Deferred()
        self._batch.add((op, d))
        return d

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Deferred[Any]]]) -> None:
        db = self._db
        if db is None:
            for _, d in batch:
                d.errback(StoreUnavailable("embedded store is closed"))
            return
        outcomes: list[tuple[Deferred[Any], bool, Any]] = []
        registry = self.registry
        try:
            db.execute("BEGIN IMMEDIATE")
            for op, d in batch:
                db.execute("SAVEPOINT op")
                mark = registry.mark()
                try:
                    result = op(db)
                except Exception as e:
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    registry.undo_to(mark)
                    outcomes.append((d, False, e))
                else:
                    db.execute("RELEASE op")
                    outcomes.append((d, True, result))
            self._finish(db)
        except sqlite3.Error as e:
            self._log.failure("embedded store transaction failed")
            if db.in_transaction:
                db.execute("ROLLBACK")
            registry.undo_to(0)
            for _, d in batch:
                d.errback(StoreUnavailable(f"embedded store failed: {e}"))
            return
        registry.settle()
        for d, ok, value in outcomes:
            if ok:
                d.callback(value)
            elif isinstance(value, sqlite3.Error):
                d.errback(StoreUnavailable(f"embedded store failed: {value}"))
            else:
                d.errback(value)

    def _finish(self, db: sqlite3.Connection) -> None:
        """COMMIT the group's transaction (a seam for tests that make it fail)."""
        db.execute("COMMIT")

    # -- helpers run inside operations -----------------------------------------------------------

    def _lease_to(self, db: sqlite3.Connection, rows: Iterable[Row], holder: SocketRef, until_ms: int) -> None:
        db.executemany(
            "UPDATE messages SET lease_holder = ?, lease_until = ? WHERE seq = ?",
            [(holder.key(), until_ms, row[0]) for row in rows],
        )

    def _redeliver(
        self, db: sqlite3.Connection, rows: Sequence[Row], lease: Lease, skip: SocketRef | None = None
    ) -> list[Delivery]:
        """Re-lease released rows (seq, connection_id, id, received_at, payload) of connections
        whose live session is present, and describe the deliveries."""
        by_connection: defaultdict[str, list[Row]] = defaultdict(list)
        for row in sorted(rows):
            by_connection[row[1]].append(row)
        deliveries = []
        for connection_id, group in by_connection.items():
            session = self.registry.sessions.get(connection_id)
            if session is None or session.away or session.holder == skip:
                continue
            self._lease_to(db, group, session.holder, lease.until_ms)
            messages = [QueuedMessage(id=r[2], received_at_ms=r[3], payload=bytes(r[4])) for r in group]
            deliveries.append(Delivery(session.holder, connection_id, messages))
        return deliveries

    # -- MessageStore ----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._submit(lambda db: db.execute("SELECT 1").fetchone())

    async def add(self, message: NewMessage, lease: Lease, max_queued: int = 0) -> AddResult:
        def op(db: sqlite3.Connection) -> AddResult:
            if max_queued:
                queued = db.execute(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE connection_id = ? LIMIT ?)",
                    (message.connection_id, max_queued),
                ).fetchone()[0]
                if queued >= max_queued:
                    raise QueueFull(f"the queue of connection {message.connection_id} is full ({max_queued} messages)")
            session = self.registry.sessions.get(message.connection_id)
            holder = session.holder if session is not None and not session.away else None
            cursor = db.execute(
                "INSERT INTO messages (id, connection_id, recipients, payload, size, received_at,"
                " lease_holder, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.connection_id,
                    orjson.dumps(message.recipient_dids).decode(),
                    message.payload,
                    message.size,
                    message.received_at_ms,
                    holder.key() if holder else None,
                    lease.until_ms if holder else None,
                ),
            )
            seq = cursor.lastrowid
            db.executemany(
                "INSERT OR IGNORE INTO recipients (connection_id, did, seq) VALUES (?, ?, ?)",
                [(message.connection_id, did, seq) for did in message.recipient_dids],
            )
            if holder is not None:
                queued = QueuedMessage(message.id, message.received_at_ms, message.payload)
                return AddResult(delivery=Delivery(holder, message.connection_id, (queued,)))
            if session is not None:
                if message.push_token is not None:
                    self.registry.hold_push(message.connection_id, (message.push_token, message.id))
                return AddResult(held_by=session.holder)
            return AddResult()

        return await self._submit(op)

    def _select_pending(
        self, db: sqlite3.Connection, connection_id: str, recipient_did: str | None, now_ms: int, limit: int
    ) -> sqlite3.Cursor:
        params: dict[str, Any] = {"cid": connection_id, "now": now_ms, "did": recipient_did}
        if recipient_did is None:
            sql = f"SELECT {COLUMNS} FROM messages m WHERE m.connection_id = :cid AND {PENDING} ORDER BY m.seq"
        else:
            sql = (
                f"SELECT {COLUMNS} FROM recipients r JOIN messages m ON m.seq = r.seq"
                f" WHERE r.connection_id = :cid AND r.did = :did AND {PENDING} ORDER BY r.seq"
            )
        if limit:
            sql += " LIMIT :limit"
            params["limit"] = limit
        return db.execute(sql, params)

    async def take(self, query: TakeQuery, holder: SocketRef | None, lease: Lease) -> list[QueuedMessage]:
        def op(db: sqlite3.Connection) -> list[QueuedMessage]:
            row_limit = query.limit if not query.limit_bytes else 0
            cursor = self._select_pending(db, query.connection_id, query.recipient_did, lease.now_ms, row_limit)
            taken: list[Row] = []
            total = 0
            for row in cursor:
                if query.limit_bytes:
                    size = row[4]
                    if size > query.limit_bytes:
                        continue  # never let one oversize message block the queue
                    if total + size > query.limit_bytes:
                        break
                    total += size
                taken.append(row)
                if query.limit and len(taken) >= query.limit:
                    break
            cursor.close()
            if query.delete:
                db.executemany("DELETE FROM messages WHERE seq = ?", [(row[0],) for row in taken])
            elif holder is not None:
                self._lease_to(db, taken, holder, lease.until_ms)
            return [_queued(row) for row in taken]

        return await self._submit(op)

    async def count(self, connection_id: str, recipient_did: str | None, now_ms: int) -> int:
        def op(db: sqlite3.Connection) -> int:
            params = {"cid": connection_id, "did": recipient_did, "now": now_ms}
            if recipient_did is None:
                sql = f"SELECT COUNT(*) FROM messages m WHERE m.connection_id = :cid AND {PENDING}"
            else:
                sql = (
                    "SELECT COUNT(*) FROM recipients r JOIN messages m ON m.seq = r.seq"
                    f" WHERE r.connection_id = :cid AND r.did = :did AND {PENDING}"
                )
            return int(db.execute(sql, params).fetchone()[0])

        return await self._submit(op)

    async def remove(self, connection_id: str, message_ids: Sequence[str]) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.executemany(
                "DELETE FROM messages WHERE id = ? AND connection_id = ?",
                [(message_id, connection_id) for message_id in message_ids],
            )

        await self._submit(op)

    async def remove_all(self, connection_id: str, recipient_did: str) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM recipients WHERE connection_id = ? AND did = ?)",
                (connection_id, recipient_did),
            )

        await self._submit(op)

    async def add_session(
        self, connection_id: str, session_id: str, holder: SocketRef, lease: Lease
    ) -> Delivery | None:
        def op(db: sqlite3.Connection) -> Delivery | None:
            self.registry.drop(connection_id)
            self.registry.put(connection_id, _Session(session_id, holder))
            rows = db.execute(
                "UPDATE messages SET lease_holder = ?, lease_until = ?"
                " WHERE connection_id = ? AND lease_holder IS NOT NULL RETURNING seq, id, received_at, payload",
                (holder.key(), lease.until_ms, connection_id),
            ).fetchall()
            if not rows:
                return None
            return Delivery(holder, connection_id, [_queued(row) for row in sorted(rows)])

        return await self._submit(op)

    async def remove_session(self, connection_id: str, holder: SocketRef, session_id: str | None) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            session = self.registry.sessions.get(connection_id)
            if session is None:
                return False
            if session_id is not None and session.session_id != session_id:
                return False
            if session_id is None and session.holder != holder:
                return False
            self.registry.drop(connection_id)
            db.execute(
                "UPDATE messages SET lease_holder = NULL, lease_until = NULL"
                " WHERE connection_id = ? AND lease_holder = ?",
                (connection_id, session.holder.key()),
            )
            return True

        return await self._submit(op)

    async def has_session(self, connection_id: str) -> bool:
        return await self._submit(lambda db: connection_id in self.registry.sessions)

    async def release_expired(self, lease: Lease) -> list[Delivery]:
        def op(db: sqlite3.Connection) -> list[Delivery]:
            rows = db.execute(
                "UPDATE messages SET lease_holder = NULL, lease_until = NULL WHERE lease_until <= ?"
                " RETURNING seq, connection_id, id, received_at, payload",
                (lease.now_ms,),
            ).fetchall()
            return self._redeliver(db, rows, lease)

        return await self._submit(op)

    async def release_socket(self, holder: SocketRef, keep_sessions: bool, lease: Lease) -> SocketRelease:
        def op(db: sqlite3.Connection) -> SocketRelease:
            rows = db.execute(
                "UPDATE messages SET lease_holder = NULL, lease_until = NULL WHERE lease_holder = ?"
                " RETURNING seq, connection_id, id, received_at, payload",
                (holder.key(),),
            ).fetchall()
            held = sorted(self.registry.by_holder.get(holder, ()))
            pushes = []
            if keep_sessions:
                for connection_id in held:
                    self.registry.set_away(connection_id, True)
                dropped: list[str] = []
            else:
                for connection_id in held:
                    push = self.registry.held.get(connection_id)
                    if push is not None:
                        pushes.append(push)
                    self.registry.drop(connection_id)
                dropped = held
            return SocketRelease(dropped, self._redeliver(db, rows, lease, skip=holder), pushes)

        return await self._submit(op)

    async def expire(self, received_before_ms: int) -> int:
        def op(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE received_at < ? LIMIT 10000)",
                (received_before_ms,),
            ).rowcount

        return await self._submit(op)

    async def attach_socket(self, holder: SocketRef, lease: Lease) -> list[Delivery]:
        def op(db: sqlite3.Connection) -> list[Delivery]:
            deliveries = []
            for connection_id in sorted(self.registry.by_holder.get(holder, ())):
                self.registry.set_away(connection_id, False)
                self.registry.drop_push(connection_id)
                rows = self._select_pending(db, connection_id, None, lease.now_ms, 0).fetchall()
                if rows:
                    self._lease_to(db, rows, holder, lease.until_ms)
                    deliveries.append(Delivery(holder, connection_id, [_queued(row) for row in rows]))
            return deliveries

        return await self._submit(op)

    # -- for /metrics ------------------------------------------------------------------------------

    def oldest_received_ms(self) -> int | None:
        """receivedAt of the oldest queued message (an index lookup; None when empty or closed)."""
        if self._db is None:
            return None
        oldest: int | None = self._db.execute("SELECT MIN(received_at) FROM messages").fetchone()[0]
        return oldest
