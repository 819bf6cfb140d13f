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
MARK = "mpr"  # set on the documents we write, so that documents of the original server stand out

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
        await self._timed(self._collection.create_index(sort(ASCENDING("messageId")), unique=True), "index")
        await self._timed(
            self._collection.create_index(sort(ASCENDING("connectionId") + ASCENDING("createdAt"))), "index"
        )

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

    async def originals(self, after: str | None, limit: int) -> list[tuple[str, ColdMessage | None]]:
        """Documents written by the original server (not by us), in insertion order after the
        ObjectId ``after``: what an upgraded deployment must put back in the queue. An unreadable
        document comes as None (logged), so that the caller moves past it."""
        from bson import ObjectId

        query: dict[str, Any] = {MARK: {"$exists": False}}
        if after:
            query["_id"] = {"$gt": ObjectId(after)}
        docs = await self._timed(self._collection.find(query, sort=sort(ASCENDING("_id")), limit=limit), "read")
        found: list[tuple[str, ColdMessage | None]] = []
        for doc in docs:
            try:
                created = doc["createdAt"]
                message = ColdMessage(
                    message_id=str(doc["messageId"]),
                    connection_id=str(doc["connectionId"]),
                    recipient_dids=[str(k) for k in doc.get("recipientKeys") or []],
                    payload=orjson.dumps(doc["encryptedMessage"]),
                    received_at_ms=int(created.timestamp() * 1000)
                    if isinstance(created, datetime.datetime)
                    else int(created),
                )
            except (KeyError, TypeError, ValueError, orjson.JSONEncodeError) as e:
                _log.warn("skipping unreadable document {id} in {c}: {e}", id=str(doc.get("_id")), c=COLLECTION, e=e)
                found.append((str(doc["_id"]), None))
                continue
            found.append((str(doc["_id"]), message))
        return found

    async def delete(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._timed(self._writes.delete_many({"messageId": {"$in": list(message_ids)}}), "delete")
