"""The import of what an original (NestJS) MPR deployment left in Redis and MongoDB, run once,
before the server serves (``RedisStore.start`` awaits it), and again on an operator's demand
(``mpr-import-original``).

What the original leaves: per connection a Redis list ``connectionId:<id>:queuemessages`` of JSON
entries (oldest first), and documents in ``storequeuedmessages`` (the ones we did not write carry
no ``mpr`` field). Per connection, in one pass: read its documents (createdAt order) and its list
(list order), drop repeated messageIds, queue them (one script; the original's order: MongoDB
first, as it served them, then the list), write the indexes, and only then remove the sources
(list entries removed, documents marked ``mpr: 1``). Interrupted anywhere, a rerun imports nothing
twice: the script skips a messageId it knows. Unreadable entries are kept aside (the Redis list
``mpr:import:unreadable``, the collection ``storequeuedmessages_aside``), logged and counted.

Several instances: one claims the import (``mpr:lock:import:original``, renewed while it runs),
the others wait for ``mpr:import:done`` (which also holds the report), so that none serves before
the messages are there. A start finding ``mpr:import:done`` at the current version does nothing
else (one GET).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mpr_server.errors import StoreUnavailable
from mpr_server.redis import RedisClient, RedisError
from mpr_server.stores.mongo.cold import ColdStore, original_message
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.calls import execute, run_script
from mpr_server.stores.redis.indexes import IndexWriter
from mpr_server.stores.redis.keys import lock_key
from mpr_server.stores.redis.replies import as_text

VERSION = 1
DONE_KEY = "mpr:import:done"
UNREADABLE_KEY = "mpr:import:unreadable"
LOCK_KEY = lock_key("import:original")
LIST_PATTERN = "connectionId:*:queuemessages"
LIST_PREFIX, LIST_SUFFIX = "connectionId:", ":queuemessages"
CHUNK = 500  # messages per script call, entries per LRANGE
WAIT_POLL_S = 0.25

#: Test-only seam (documented in tests/e2e/test_upgrade.py): with this variable set to N, the
#: import stops for good after queuing the N-th connection's messages, before removing its
#: sources, and logs "import paused (test seam)", so that a test can kill the process there.
PAUSE_ENV = "MPR_TEST_IMPORT_PAUSE_AFTER"


@dataclass
class ImportReport:
    """What one run of the import saw and did. ``found`` counts every source entry (list entries
    and documents); each ends up ``imported``, a ``duplicate`` (of a message already queued or
    seen in this run; not queued again) or ``unreadable`` (kept aside)."""

    found: int = 0
    imported: int = 0
    duplicates: int = 0
    unreadable: int = 0
    connections: int = 0
    lists: int = 0
    documents: int = 0
    instance: str = ""
    skipped: bool = False  # the import was already done: nothing looked at
    started_at: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        if self.skipped:
            return "import of the original deployment: already done, nothing looked at"
        return (
            f"import of the original deployment: {self.found} entries found ({self.lists} Redis lists,"
            f" {self.documents} MongoDB documents, {self.connections} connections), {self.imported} messages"
            f" imported, {self.duplicates} duplicates dropped, {self.unreadable} unreadable kept aside"
            f" ({UNREADABLE_KEY} in Redis, storequeuedmessages_aside in MongoDB); {self.seconds:.1f} s"
            f" by {self.instance}"
        )


@dataclass
class _Message:
    message_id: str
    received_at_ms: int
    dids: list[str]
    size: int
    body: bytes | None  # None: the payload stays in MongoDB
    in_mongo: bool


@dataclass
class _Sources:
    """What one connection's import removes once its messages are queued."""

    list_key: str | None = None
    list_entries: list[Any] = field(default_factory=list)
    unreadable_entries: list[Any] = field(default_factory=list)
    documents: list[Any] = field(default_factory=list)  # ObjectIds to mark imported
    unreadable_documents: list[dict[str, Any]] = field(default_factory=list)


def connection_of(list_key: str) -> str | None:
    if list_key.startswith(LIST_PREFIX) and list_key.endswith(LIST_SUFFIX):
        return list_key[len(LIST_PREFIX) : -len(LIST_SUFFIX)] or None
    return None


def parse_entry(raw: Any) -> _Message | None:
    """An entry of the original's Redis list, None if unusable."""
    try:
        entry = orjson.loads(raw)
        message_id, payload, when = entry["messageId"], entry["encryptedMessage"], entry["receivedAt"]
        dids = entry.get("recipientDids") or []
        if not isinstance(message_id, str) or not message_id or not isinstance(payload, dict):
            return None
        if not isinstance(dids, list) or not isinstance(when, str):
            return None
        received = datetime.datetime.fromisoformat(when)
        if received.tzinfo is None:
            received = received.replace(tzinfo=datetime.UTC)
        body = orjson.dumps(payload)  # compact, key order kept: the bytes addMessage stores
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, KeyError, TypeError, ValueError):
        return None
    return _Message(message_id, int(received.timestamp() * 1000), [str(d) for d in dids], len(body), body, False)


class OriginalImport:
    _log = Logger()

    def __init__(
        self,
        redis: RedisClient,
        cold: ColdStore,
        indexes: IndexWriter,
        clock: IReactorTime,
        instance_id: str,
        lock_ttl_ms: int = 10_000,
    ) -> None:
        self._redis = redis
        self._cold = cold
        self._indexes = indexes
        self._clock = clock
        self._instance_id = instance_id
        self._lock_ttl_ms = max(lock_ttl_ms, 1000)
        self._token = f"{instance_id}/{os.urandom(6).hex()}"
        self._renewed_at = 0.0
        self.report = ImportReport(instance=instance_id, skipped=True)
        self.last_done: dict[str, Any] | None = None  # the report stored by whoever did the import

    # -- entry points ----------------------------------------------------------------------------

    async def run(self, force: bool = False) -> ImportReport:
        """Import unless done (``force``: look again anyway, e.g. the operator's command); waits
        while another instance imports. Raises StoreUnavailable if Redis or MongoDB fail."""
        waiting_logged = False
        while True:
            if not force and await self._done():
                self.report = ImportReport(instance=self._instance_id, skipped=True)
                return self.report
            if await self._claim():
                try:
                    self.report = await self._import_all()
                    record = orjson.dumps({"version": VERSION, **self.report.as_dict()})
                    await execute(self._redis, ["SET", DONE_KEY, record], DONE_KEY)
                    self.last_done = self.report.as_dict()
                    return self.report
                finally:
                    await self._release()
            if not waiting_logged:
                holder = await execute(self._redis, ["GET", LOCK_KEY], LOCK_KEY)
                self._log.info(
                    "waiting for {holder} to finish importing the original deployment's messages",
                    holder=as_text(holder).rpartition("/")[0] if holder else "another instance",
                )
                waiting_logged = True
            force = False  # the other instance's import is the one asked for
            await task.deferLater(self._clock, WAIT_POLL_S, lambda: None)

    async def _done(self) -> bool:
        raw = await execute(self._redis, ["GET", DONE_KEY], DONE_KEY)
        if not raw:
            return False
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(record, dict) or record.get("version") != VERSION:
            return False
        self.last_done = record
        return True

    # -- the claim ---------------------------------------------------------------------------------

    async def _claim(self) -> bool:
        got = await execute(self._redis, ["SET", LOCK_KEY, self._token, "NX", "PX", self._lock_ttl_ms], LOCK_KEY)
        self._renewed_at = self._clock.seconds()
        return bool(got)

    async def _renew(self) -> None:
        """Keep the claim while importing; losing it (stalled past its TTL) stops this run."""
        if self._clock.seconds() - self._renewed_at < self._lock_ttl_ms / 3000:
            return
        try:
            kept = await self._redis.eval_script(lua.RENEW, [LOCK_KEY], [self._token, self._lock_ttl_ms])
        except RedisError as e:
            raise StoreUnavailable(f"Redis: {e}") from e
        if not kept:
            raise StoreUnavailable("the import's claim expired (stalled?); another instance continues it")
        self._renewed_at = self._clock.seconds()

    async def _release(self) -> None:
        try:
            await self._redis.eval_script(lua.UNLOCK, [LOCK_KEY], [self._token])
        except RedisError:
            pass  # it expires by itself

    # -- the import ------------------------------------------------------------------------------

    async def _import_all(self) -> ImportReport:
        began = self._clock.seconds()
        report = ImportReport(
            instance=self._instance_id,
            started_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            unreadable=self._cold.set_aside_at_start_unreadable,
            duplicates=self._cold.set_aside_at_start_duplicates,
        )
        report.found = report.unreadable + report.duplicates
        report.documents = report.found
        self._cold.set_aside_at_start_unreadable = self._cold.set_aside_at_start_duplicates = 0
        try:
            list_keys = await self._redis.scan(LIST_PATTERN)
        except RedisError as e:
            raise StoreUnavailable(f"Redis: {e}") from e
        lists: dict[str, str] = {}
        for key in list_keys:
            connection_id = connection_of(key)
            if connection_id is not None:
                lists[connection_id] = key
        in_mongo = set(await self._cold.original_connections())
        connections = sorted(set(lists) | in_mongo)
        if connections:
            self._log.info(
                "importing the original deployment's messages: {lists} Redis lists, {docs} connections with"
                " MongoDB documents",
                lists=len(lists),
                docs=len(in_mongo),
            )
        for n, connection_id in enumerate(connections, 1):
            await self._renew()
            await self._import_connection(connection_id, lists.get(connection_id), connection_id in in_mongo, report)
            report.connections += 1
            if n % 1000 == 0:
                self._log.info("import: {n} of {total} connections done", n=n, total=len(connections))
        # Documents no connection led to (no usable connectionId): unreadable, kept aside.
        left = await self._cold.original_documents()
        if left:
            report.found += len(left)
            report.documents += len(left)
            report.unreadable += len(left)
            await self._cold.set_aside(left, "unreadable")
            self._log.warn("set aside {n} unreadable documents of the original deployment", n=len(left))
        report.seconds = round(self._clock.seconds() - began, 3)
        if report.found:
            self._log.info("{report}", report=report.text())
        return report

    async def _read_list(self, key: str) -> list[Any]:
        entries: list[Any] = []
        while True:
            chunk = await execute(self._redis, ["LRANGE", key, len(entries), len(entries) + CHUNK - 1], key)
            entries.extend(chunk)
            if len(chunk) < CHUNK:
                return entries

    async def _import_connection(
        self, connection_id: str, list_key: str | None, has_documents: bool, report: ImportReport
    ) -> None:
        messages: dict[str, _Message] = {}
        sources = _Sources(list_key)
        if has_documents:
            for doc in await self._cold.original_documents(connection_id):
                report.found += 1
                report.documents += 1
                cold = original_message(doc)
                if cold is None:
                    report.unreadable += 1
                    sources.unreadable_documents.append(doc)
                    continue
                sources.documents.append(doc["_id"])
                if cold.message_id in messages:  # the unique index makes this rare; kept safe
                    report.duplicates += 1
                    continue
                messages[cold.message_id] = _Message(
                    cold.message_id, cold.received_at_ms, list(cold.recipient_dids), len(cold.payload), None, True
                )
        if list_key is not None:
            report.lists += 1
            sources.list_entries = await self._read_list(list_key)
            for raw in sources.list_entries:
                report.found += 1
                entry = parse_entry(raw)
                if entry is None:
                    report.unreadable += 1
                    sources.unreadable_entries.append(raw)
                    continue
                known = messages.get(entry.message_id)
                if known is None:
                    messages[entry.message_id] = entry
                    continue
                report.duplicates += 1
                if known.in_mongo and known.body is None:
                    # In both tiers (the original's persister race): served once, where MongoDB
                    # put it, with the list's receivedAt and exact bytes; MongoDB keeps a copy.
                    known.received_at_ms, known.body, known.size = entry.received_at_ms, entry.body, entry.size
        ordered = list(messages.values())
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start : start + CHUNK]
            args: list[Any] = []
            for m in chunk:
                args += [
                    m.message_id,
                    m.received_at_ms,
                    m.size,
                    orjson.dumps(m.dids),
                    m.body or b"",
                    "1" if m.in_mongo and m.body is not None else "",
                ]
            queued = int(await run_script(self._redis, lua.IMPORT, connection_id, args))
            report.imported += queued
            report.duplicates += len(chunk) - queued  # queued by an earlier, interrupted run
            for m in chunk:
                self._indexes.message_imported(connection_id, m.message_id, m.received_at_ms, m.body is not None)
        await self._indexes.write()
        await self.before_sources_removed()
        await self._remove_sources(connection_id, sources)

    async def before_sources_removed(self) -> None:
        """Between queuing a connection's messages and removing their sources: the test seam."""
        pause_after = os.environ.get(PAUSE_ENV)
        if not pause_after:
            return
        self._seam_count = getattr(self, "_seam_count", 0) + 1
        if self._seam_count >= int(pause_after):
            self._log.warn("import paused (test seam {env})", env=PAUSE_ENV)
            await Deferred()  # never fires: the test kills the process here

    async def _remove_sources(self, connection_id: str, sources: _Sources) -> None:
        key = sources.list_key
        if key is not None:
            for raw in sources.unreadable_entries:
                text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
                record = orjson.dumps({"key": key, "entry": text})
                await execute(self._redis, ["RPUSH", UNREADABLE_KEY, record], UNREADABLE_KEY)
                self._log.warn(
                    "kept aside an unreadable entry of {key} in {aside}: {entry!r}",
                    key=key,
                    aside=UNREADABLE_KEY,
                    entry=text[:200],
                )
            entries = sources.list_entries
            for start in range(0, len(entries), CHUNK):
                try:
                    await self._redis.eval_script(lua.LIST_REMOVE, [key], entries[start : start + CHUNK])
                except RedisError as e:
                    raise StoreUnavailable(f"Redis: {e}") from e
        await self._cold.mark_imported(sources.documents)
        if sources.unreadable_documents:
            await self._cold.set_aside(sources.unreadable_documents, "unreadable")
            self._log.warn(
                "set aside {n} unreadable documents of connection {c}",
                n=len(sources.unreadable_documents),
                c=connection_id,
            )
