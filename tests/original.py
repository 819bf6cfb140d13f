"""What an original (NestJS 0.0.9) MPR deployment leaves in Redis and MongoDB, reproduced for the
upgrade tests: its Redis lists ``connectionId:<id>:queuemessages`` (``JSON.stringify`` of its
message object, oldest first), its mongoose documents in ``storequeuedmessages`` with the
non-unique ``messageId_1``/``connectionId_1`` indexes built with ``background: true``, its
``liveSession:<id>`` hashes and ``storelivesessions`` collection, and the duplicates its
persister race leaves (the same messageId twice in MongoDB, and in MongoDB and a list)."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import pymongo
from bson import ObjectId
from twisted.internet import threads

from mpr_server.redis import RedisClient
from tests.e2e.test_server import DID_A, DID_B, jwe

BASE = datetime.datetime(2025, 1, 27, 16, 20, 0, 123000, tzinfo=datetime.UTC)


def iso(when: datetime.datetime) -> str:
    """``Date.toISOString()``: milliseconds and Z."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def ms(when: datetime.datetime) -> int:
    return int(when.timestamp() * 1000)


def list_entry(message_id: str, connection_id: str, payload: dict[str, Any], when: datetime.datetime) -> bytes:
    """The original's list entry, as ``JSON.stringify(messageData)`` writes it."""
    return orjson.dumps(
        {
            "messageId": message_id,
            "connectionId": connection_id,
            "recipientDids": [DID_A],
            "encryptedMessage": payload,
            "state": "pending",
            "encryptedMessageByteCount": len(orjson.dumps(payload)),
            "receivedAt": iso(when),
        }
    )


def document(
    message_id: str, connection_id: str, payload: dict[str, Any], created: datetime.datetime
) -> dict[str, Any]:
    """A mongoose document of ``StoreQueuedMessage`` (``timestamps: true``)."""
    return {
        "_id": ObjectId(),
        "messageId": message_id,
        "connectionId": connection_id,
        "recipientKeys": [DID_A],
        "encryptedMessage": payload,
        "encryptedMessageByteCount": len(orjson.dumps(payload)),
        "state": "pending",
        "createdAt": created,
        "updatedAt": created,
        "__v": 0,
    }


@dataclass(frozen=True)
class Expected:
    message_id: str
    received_at: str
    payload: dict[str, Any]


@dataclass
class Original:
    """One original deployment's leftovers and what mediators must see after the upgrade."""

    a: str = field(default_factory=lambda: f"conn-a-{uuid.uuid4().hex[:8]}")
    b: str = field(default_factory=lambda: f"conn-b-{uuid.uuid4().hex[:8]}")
    c: str = field(default_factory=lambda: f"conn-c-{uuid.uuid4().hex[:8]}")
    lists: dict[str, list[bytes]] = field(default_factory=dict)
    documents: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, list[Expected]] = field(default_factory=dict)
    # what the import's report must say
    found: int = 0
    imported: int = 0
    duplicates: int = 0
    unreadable: int = 0

    def __post_init__(self) -> None:
        def mid() -> str:
            return str(ObjectId())

        t = [BASE + datetime.timedelta(seconds=s) for s in range(10)]
        a1, a2, a3, a4, a5 = mid(), mid(), mid(), mid(), mid()
        pa = {m: jwe(f"a{i}") for i, m in enumerate((a1, a2, a3, a4, a5), 1)}
        # A: persisted a1..a3 (a2 twice: the persister race), a3 also still in the list (moved to
        # MongoDB, not yet removed from Redis), then a4, an unreadable entry, a5 in the list.
        self.documents += [
            document(a1, self.a, pa[a1], t[5]),
            document(a2, self.a, pa[a2], t[6]),
            document(a2, self.a, pa[a2], t[7]),
            document(a3, self.a, pa[a3], t[8]),
        ]
        self.lists[self.a] = [
            list_entry(a3, self.a, pa[a3], t[2]),
            list_entry(a4, self.a, pa[a4], t[3]),
            b'{"messageId": "not json',
            list_entry(a5, self.a, pa[a5], t[4]),
        ]
        self.expected[self.a] = [
            Expected(a1, iso(t[5]), pa[a1]),
            Expected(a2, iso(t[6]), pa[a2]),
            Expected(a3, iso(t[2]), pa[a3]),  # the list's receivedAt, MongoDB's place
            Expected(a4, iso(t[3]), pa[a4]),
            Expected(a5, iso(t[4]), pa[a5]),
        ]
        # B: only a list; two messages received in the same millisecond keep the list order.
        b1, b2 = "ffffffffffffffffffffff01", "000000000000000000000002"
        pb = {b1: jwe("b1", filler=50), b2: jwe("b2")}
        self.lists[self.b] = [list_entry(b1, self.b, pb[b1], t[1]), list_entry(b2, self.b, pb[b2], t[1])]
        self.expected[self.b] = [Expected(b1, iso(t[1]), pb[b1]), Expected(b2, iso(t[1]), pb[b2])]
        # C: only MongoDB.
        c1 = mid()
        pc = jwe("c1")
        self.documents.append(document(c1, self.c, pc, t[9]))
        self.expected[self.c] = [Expected(c1, iso(t[9]), pc)]
        self.found = len(self.documents) + sum(len(v) for v in self.lists.values())
        self.imported = sum(len(v) for v in self.expected.values())
        self.duplicates = 2  # a2's second document, a3's list entry
        self.unreadable = 1

    @property
    def connections(self) -> list[str]:
        return [self.a, self.b, self.c]

    @staticmethod
    def list_key(connection_id: str) -> str:
        return f"connectionId:{connection_id}:queuemessages"

    async def write(self, redis: RedisClient, mongo_uri: str, database: str) -> None:
        """Write it all (after removing any import done-marker a previous test left)."""
        await redis.execute(["DEL", "mpr:import:done"], key="mpr:import:done")
        for connection_id, entries in self.lists.items():
            key = self.list_key(connection_id)
            await redis.execute(["RPUSH", key, *entries], key=key)
        live = f"liveSession:{self.a}"
        await redis.execute(["HSET", live, "sessionId", "stale-session", "socket_id", "gone"], key=live)
        await threads.deferToThread(self._write_mongo, mongo_uri, database)

    def _write_mongo(self, uri: str, database: str) -> None:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        try:
            db = client[database]
            messages = db["storequeuedmessages"]
            messages.create_index([("messageId", 1)], name="messageId_1", background=True)
            messages.create_index([("connectionId", 1)], name="connectionId_1", background=True)
            messages.insert_many([dict(d) for d in self.documents])
            db["storelivesessions"].insert_one({"sessionId": "stale-session", "connectionId": self.a})
        finally:
            client.close()


def read_mongo(uri: str, database: str) -> dict[str, Any]:
    """Indexes, documents (by messageId) and set-aside documents of the database (blocking)."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        db = client[database]
        return {
            "indexes": db["storequeuedmessages"].index_information(),
            "documents": list(db["storequeuedmessages"].find({}, {"_id": 0})),
            "aside": list(db["storequeuedmessages_aside"].find({}, {"_id": 0})),
            "livesessions": db["storelivesessions"].count_documents({}),
        }
    finally:
        client.close()


__all__ = ["DID_B", "Expected", "Original", "read_mongo"]
