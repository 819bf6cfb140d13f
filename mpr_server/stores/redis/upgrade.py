"""Messages an original MPR deployment left behind, put back in their queues."""

from __future__ import annotations

import orjson
from twisted.logger import Logger

from mpr_server.redis import RedisClient
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis import replies
from mpr_server.stores.redis import scripts as lua
from mpr_server.stores.redis.calls import execute, run_script
from mpr_server.stores.redis.claims import Claims
from mpr_server.stores.redis.replies import as_text

IMPORT_CURSOR = "mpr:import:last"


class OriginalImport:
    _log = Logger()

    def __init__(self, redis: RedisClient, cold: ColdStore, claims: Claims) -> None:
        self._redis = redis
        self._cold = cold
        self._claims = claims

    async def import_once(self, batch: int = 500) -> int:
        """Queue again the messages an original deployment left in MongoDB (documents we did
        not write), resuming after the last one imported; returns how many were seen. Safe to
        repeat and to run on every instance (claimed, idempotent per message)."""
        async with self._claims.claimed("import", 120_000) as claimed:
            if not claimed:
                return 0
            after = await execute(self._redis, ["GET", IMPORT_CURSOR], IMPORT_CURSOR)
            documents = await self._cold.originals(as_text(after) if after else None, batch)
            imported = 0
            for _, message in documents:
                if message is None:
                    continue
                dids = orjson.dumps(list(message.recipient_dids))
                reply = await run_script(
                    self._redis,
                    lua.IMPORT,
                    message.connection_id,
                    [message.message_id, message.received_at_ms, len(message.payload), dids],
                )
                imported += replies.flag(reply)
            if documents:
                await execute(self._redis, ["SET", IMPORT_CURSOR, documents[-1][0]], IMPORT_CURSOR)
            if imported:
                self._log.info("queued {n} messages left in MongoDB by an earlier deployment", n=imported)
            return len(documents)
