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
from urllib.parse import parse_qs, urlsplit

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from txmongo.connection import ConnectionPool
from txmongo.filter import ASCENDING, sort

from mpr_server.stores.base import StoreUnavailable

COLLECTION = "storequeuedmessages"
DEFAULT_DB = "MessagePickupRepository"


class MongoConfigError(ValueError):
    pass


def database_of(uri: str) -> str:
    """The database named in the URI path. txmongo authenticates only when the URI names a
    database, so credentials without one are refused rather than silently unauthenticated; and
    it ignores ``tls=true``, so TLS URIs are refused rather than silently in plaintext."""
    parts = urlsplit(uri)
    if parts.scheme not in ("mongodb", "mongodb+srv"):
        raise MongoConfigError("MONGODB_URI must start with mongodb://")
    options = {k.lower(): v for k, v in parse_qs(parts.query).items()}
    if any(options.get(name, ["false"])[0].lower() == "true" for name in ("tls", "ssl")):
        raise MongoConfigError("MONGODB_URI asks for TLS, which this version cannot verify; use a TLS proxy")
    db = parts.path.lstrip("/")
    if parts.username and not db:
        raise MongoConfigError("MONGODB_URI has credentials but no database path (e.g. /MessagePickupRepository)")
    return db or DEFAULT_DB


@dataclass(frozen=True)
class ColdMessage:
    message_id: str
    connection_id: str
    recipient_dids: Sequence[str]
    payload: bytes
    received_at_ms: int


class ColdStore:
    def __init__(self, uri: str, reactor: IReactorTime, timeout_s: float = 1.5) -> None:
        self._uri = uri
        self._db_name = database_of(uri)
        self._reactor = reactor
        self._timeout = timeout_s
        self._pool: Any = None
        self._collection: Any = None

    async def _timed(self, d: Deferred[Any], what: str) -> Any:
        d.addTimeout(self._timeout, self._reactor)
        try:
            return await d
        except Exception as e:
            raise StoreUnavailable(f"MongoDB {what} failed: {type(e).__name__}: {e}") from e

    async def start(self) -> None:
        self._pool = ConnectionPool(self._uri, pool_size=2)
        self._collection = self._pool[self._db_name][COLLECTION]
        await self._timed(self._collection.create_index(sort(ASCENDING("messageId")), unique=True), "index")
        await self._timed(
            self._collection.create_index(sort(ASCENDING("connectionId") + ASCENDING("createdAt"))), "index"
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
                    }
                },
                upsert=True,
            )
            for m in messages
        ]
        if requests:
            await self._timed(self._collection.bulk_write(requests, ordered=False), "write")

    async def payloads(self, message_ids: Sequence[str]) -> dict[str, bytes]:
        if not message_ids:
            return {}
        docs = await self._timed(
            self._collection.find({"messageId": {"$in": list(message_ids)}}, {"messageId": 1, "encryptedMessage": 1}),
            "read",
        )
        return {doc["messageId"]: orjson.dumps(doc["encryptedMessage"]) for doc in docs}

    async def delete(self, message_ids: Sequence[str]) -> None:
        if message_ids:
            await self._timed(self._collection.delete_many({"messageId": {"$in": list(message_ids)}}), "delete")
