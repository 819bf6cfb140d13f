"""MongoDB cold storage (txmongo) behind a small typed façade.

Documents keep the original server's collection and field names (``storequeuedmessages``:
``messageId``, ``connectionId``, ``recipientKeys``, ``encryptedMessage``, ``state``, ``createdAt``,
``updatedAt``) so that operators can read them with the tools they know.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pymongo.write_concern import WriteConcern
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from txmongo.connection import ConnectionPool
from txmongo.filter import ASCENDING, sort

from mpr_server._async import deadline
from mpr_server.errors import StoreUnavailable
from mpr_server.stores.mongo.tls import MongoTLSConnector
from mpr_server.stores.mongo.uri import parse_mongodb_uri

COLLECTION = "storequeuedmessages"
ASIDE = "storequeuedmessages_aside"  # original documents we could not use, kept (see set_aside)
MARK = "mpr"  # set on the documents we write or imported, so that the original's others stand out
MESSAGE_ID_INDEX = "messageId_1"
_INDEX_RACES = ("E11000", "IndexBuildAborted", "IndexNotFound", "index not found", "IndexKeySpecsConflict")

_log = Logger()


@dataclass(frozen=True)
class ColdMessage:
    message_id: str
    connection_id: str
    recipient_dids: Sequence[str]
    payload: bytes
    received_at_ms: int


def write_concern_of(setting: str | None, replica_set: str | None) -> str | int:
    """MONGODB_WRITE_CONCERN's ``w``: as given, or by default ``majority`` when the URI names a
    replica set (an acknowledged write then survives the primary's failure) and 1 otherwise."""
    if not setting:
        return "majority" if replica_set else 1
    return int(setting) if setting.isdigit() else setting


class ColdStore:
    def __init__(
        self, uri: str, reactor: IReactorTime, timeout_s: float = 1.5, write_concern: str | None = None
    ) -> None:
        self._settings = parse_mongodb_uri(uri)
        self.write_concern = write_concern_of(write_concern, self._settings.replica_set)
        self._db_name = self._settings.database
        self._reactor = reactor
        self._timeout = timeout_s
        self._pool: Any = None
        self._collection: Any = None
        self._writes: Any = None  # the collection with our write concern
        self._tls: MongoTLSConnector | None = None
        # documents of an original deployment set aside by start(), for the import's report
        self.set_aside_at_start_duplicates = 0
        self.set_aside_at_start_unreadable = 0
        tls = self._settings.tls
        if tls is not None:
            self._tls = MongoTLSConnector(tls)
            if tls.allow_invalid_certificates:
                _log.warn("MONGODB_URI turns off TLS certificate verification: the connection is not authenticated")
            elif tls.allow_invalid_hostnames:
                _log.warn("MONGODB_URI turns off TLS host name verification: any certificate from the CA is accepted")

    @property
    def database(self) -> str:
        return self._db_name

    @property
    def tls(self) -> MongoTLSConnector | None:
        return self._tls

    async def _timed(self, d: Deferred[Any], what: str) -> Any:
        try:
            return await deadline(d, self._timeout, self._reactor, DeferredTimeoutError)
        except Exception as e:
            if isinstance(e, DeferredTimeoutError | TimeoutError | CancelledError):
                detail = f"MongoDB {what} failed: no answer within {self._timeout} s from {self._settings.hosts}"
                if self._settings.replica_set:
                    detail += f" (replicaSet {self._settings.replica_set!r})"
            else:
                detail = f"MongoDB {what} failed: {type(e).__name__}: {e}"
            why = self._tls.failure() if self._tls is not None else None
            if why:
                detail += f" [TLS: {why}]"
            raise StoreUnavailable(detail) from e

    async def start(self) -> None:
        if self._settings.tls is not None and self._tls is None:  # never let txmongo go plaintext
            raise StoreUnavailable("MongoDB TLS was asked for but is not set up")
        try:
            self._pool = ConnectionPool(self._settings.uri, pool_size=2, ssl_context_factory=self._tls)
        except Exception as e:  # mongodb+srv resolution, option validation
            raise StoreUnavailable(f"MongoDB connection setup failed: {type(e).__name__}: {e}") from e
        db = self._pool[self._db_name]
        self._collection = db[COLLECTION]
        # wtimeout below our own deadline: a write the replicas did not confirm in time fails
        wtimeout_ms = max(1, int(self._timeout * 900))
        self._writes = self._collection.with_options(
            write_concern=WriteConcern(w=self.write_concern, wtimeout=wtimeout_ms)
        )
        await self._check_connection(db)
        await self._adopt_message_id_index(db)
        await self._timed(
            self._collection.create_index(sort(ASCENDING("connectionId") + ASCENDING("createdAt"))), "index"
        )

    async def _adopt_message_id_index(self, db: Any) -> None:
        """Make ``messageId_1`` unique. An original deployment left it non-unique, and its
        persister race can leave the same messageId in two documents: those are de-duplicated
        first (one kept, the others set aside in ``storequeuedmessages_aside``), then its index is
        replaced by ours. Safe to run by several instances at once."""
        last = ""
        for _attempt in range(5):
            try:
                indexes = await self._timed(self._collection.index_information(), "index")
            except StoreUnavailable as e:
                if "NamespaceNotFound" not in str(e) and "ns does not exist" not in str(e):
                    raise
                indexes = {}  # a new database
            current = indexes.get(MESSAGE_ID_INDEX)
            if current is not None and current.get("unique"):
                return
            try:
                await self._set_aside_duplicates(db)
                if current is not None:
                    _log.info(
                        "replacing the non-unique MongoDB index {name} of an original deployment by a unique one",
                        name=MESSAGE_ID_INDEX,
                    )
                    await self._timed(self._collection.drop_index(MESSAGE_ID_INDEX), "index")
                await self._timed(
                    self._collection.create_index(sort(ASCENDING("messageId")), unique=True, name=MESSAGE_ID_INDEX),
                    "index",
                )
                return
            except StoreUnavailable as e:
                # Another instance replacing it at the same time (its build aborted by our drop,
                # or dropped already), or a duplicate written meanwhile: look again.
                last = str(e)
                if not any(code in last for code in _INDEX_RACES):
                    raise
        raise StoreUnavailable(
            f"MongoDB index failed: could not make {MESSAGE_ID_INDEX} unique in {COLLECTION} ({last});"
            " is the original server still writing? Stop it before starting mpr-server"
        )

    async def _set_aside_duplicates(self, db: Any) -> None:
        """Keep one document per messageId (the first with a payload, oldest createdAt, lowest
        _id); copy the others to the aside collection, then delete them."""
        reply = await self._timed(
            db.command(
                "aggregate",
                COLLECTION,
                pipeline=[
                    {"$group": {"_id": "$messageId", "n": {"$sum": 1}}},
                    {"$match": {"n": {"$gt": 1}}},
                ],
                cursor={"batchSize": 100_000},
                allowDiskUse=True,
            ),
            "de-duplication",
        )
        duplicated = [group["_id"] for group in reply["cursor"]["firstBatch"]]
        cursor_id = reply["cursor"]["id"]
        while cursor_id:
            more = await self._timed(db.command("getMore", cursor_id, collection=COLLECTION), "de-duplication")
            duplicated.extend(group["_id"] for group in more["cursor"]["nextBatch"])
            cursor_id = more["cursor"]["id"]
        for message_id in duplicated:
            docs = await self._timed(self._collection.find({"messageId": message_id}), "de-duplication")
            docs.sort(key=_keep_first)
            if isinstance(message_id, str) and message_id:
                extra = docs[1:]
                await self.set_aside(extra, "duplicate")
                self.set_aside_at_start_duplicates += len(extra)
            else:  # no usable id: none of them can be served
                extra = docs
                await self.set_aside(extra, "unreadable")
                self.set_aside_at_start_unreadable += len(extra)
            if extra:
                _log.warn(
                    "set aside {n} duplicate documents of messageId {id} left by an original deployment in {c}",
                    n=len(extra),
                    id=message_id,
                    c=ASIDE,
                )

    async def set_aside(self, docs: Sequence[dict[str, Any]], reason: str) -> None:
        """Move documents of an original deployment to the aside collection (copy, then delete):
        kept for an operator to look at, never served."""
        from pymongo import ReplaceOne

        if not docs:
            return
        aside = self._collection.database[ASIDE]
        await self._timed(
            aside.bulk_write(
                [ReplaceOne({"_id": d["_id"]}, {**d, "mprAsideReason": reason}, upsert=True) for d in docs],
                ordered=False,
            ),
            "write",
        )
        await self._timed(self._writes.delete_many({"_id": {"$in": [d["_id"] for d in docs]}}), "delete")

    async def _check_connection(self, db: Any) -> None:
        """Connect; txmongo logs and swallows authentication failures: ask the server who we are."""
        status = await self._timed(db.command("connectionStatus"), "connection")
        if self._settings.username is None:
            return
        users = status.get("authInfo", {}).get("authenticatedUsers", [])
        user, source = self._settings.username, self._settings.auth_source
        if not any(u.get("user") == user and u.get("db") == source for u in users):
            raise StoreUnavailable(
                f"MongoDB authentication failed for user {user!r} (authSource {source!r}, SCRAM-SHA-1):"
                " check the user name, password and authSource in MONGODB_URI"
            )

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None

    async def ping(self) -> None:
        await self._timed(self._pool[self._db_name].command("ping"), "ping")

    async def save(self, messages: Sequence[ColdMessage]) -> None:
        """Upsert by messageId: writing the same message again is harmless."""
        from pymongo import UpdateOne

        now = datetime.datetime.now(datetime.UTC)
        requests = [
            UpdateOne(
                {"messageId": m.message_id},
                {
                    "$setOnInsert": {
                        "messageId": m.message_id,
                        "connectionId": m.connection_id,
                        "recipientKeys": list(m.recipient_dids),
                        "encryptedMessage": orjson.loads(m.payload),
                        "state": "pending",
                        "createdAt": datetime.datetime.fromtimestamp(m.received_at_ms / 1000, datetime.UTC),
                        "updatedAt": now,
                        MARK: 1,
                    }
                },
                upsert=True,
            )
            for m in messages
        ]
        if requests:
            await self._timed(self._writes.bulk_write(requests, ordered=False), "write")

    async def payloads(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        if not message_ids:
            return {}
        docs = await self._timed(
            self._collection.find({"messageId": {"$in": list(message_ids)}}, {"messageId": 1, "encryptedMessage": 1}),
            "read",
        )
        return {doc["messageId"]: orjson.dumps(doc["encryptedMessage"]) for doc in docs}

    async def original_connections(self) -> list[str]:
        """The connections with documents an original deployment left (not marked by us)."""
        values = await self._timed(self._collection.distinct("connectionId", {MARK: {"$exists": False}}), "read")
        return sorted(v for v in values if isinstance(v, str))

    async def original_documents(self, connection_id: str | None = None) -> list[dict[str, Any]]:
        """The documents of an original deployment (of one connection, or all of them), oldest
        createdAt first (then insertion order): the order the original served them in."""
        query: dict[str, Any] = {MARK: {"$exists": False}}
        if connection_id is not None:
            query["connectionId"] = connection_id
        docs: list[dict[str, Any]] = await self._timed(
            self._collection.find(query, sort=sort(ASCENDING("createdAt") + ASCENDING("_id"))), "read"
        )
        return docs

    async def mark_imported(self, object_ids: Sequence[Any]) -> None:
        """Mark documents of an original deployment as imported (their messages are queued)."""
        if object_ids:
            await self._timed(
                self._writes.update_many({"_id": {"$in": list(object_ids)}}, {"$set": {MARK: 1}}), "write"
            )

    async def delete(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._timed(self._writes.delete_many({"messageId": {"$in": list(message_ids)}}), "delete")

    async def summary(self, connection_id: str | None = None) -> tuple[dict[str, tuple[int, int]], int]:
        """For mpr-admin: our documents by connection as (count, oldest receivedAt ms), and the
        number of documents of an original deployment (not yet imported or not importable)."""
        match: dict[str, Any] = {MARK: 1}
        if connection_id is not None:
            match["connectionId"] = connection_id
        groups = await self._timed(
            self._collection.aggregate(
                [{"$match": match}, {"$group": {"_id": "$connectionId", "n": {"$sum": 1}, "t": {"$min": "$createdAt"}}}]
            ),
            "read",
        )
        originals: dict[str, Any] = {MARK: {"$exists": False}}
        if connection_id is not None:
            originals["connectionId"] = connection_id
        others = await self._timed(self._collection.count_documents(originals), "read")
        by_connection = {
            str(g["_id"]): (int(g["n"]), int(g["t"].replace(tzinfo=datetime.UTC).timestamp() * 1000)) for g in groups
        }
        return by_connection, int(others)


def _keep_first(doc: dict[str, Any]) -> tuple[int, Any, str]:
    created = doc.get("createdAt")
    when = created if isinstance(created, datetime.datetime) else datetime.datetime.max
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return (0 if isinstance(doc.get("encryptedMessage"), dict) else 1, when, str(doc.get("_id")))


def original_message(doc: dict[str, Any]) -> ColdMessage | None:
    """An original deployment's document as a message, None if unusable. ``createdAt`` is the
    receivedAt the original served it with."""
    message_id, connection_id, payload = doc.get("messageId"), doc.get("connectionId"), doc.get("encryptedMessage")
    created, keys = doc.get("createdAt"), doc.get("recipientKeys") or []
    if not isinstance(message_id, str) or not message_id or not isinstance(connection_id, str):
        return None
    if not isinstance(payload, dict) or not isinstance(created, datetime.datetime) or not isinstance(keys, list):
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=datetime.UTC)
    try:
        body = orjson.dumps(payload)
    except orjson.JSONEncodeError:
        return None
    return ColdMessage(message_id, connection_id, [str(k) for k in keys], body, int(created.timestamp() * 1000))
