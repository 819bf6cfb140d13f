"""``mpr-admin``: where the messages are, for operators, with the server's own settings (the same
environment variables and options as ``twistd mpr``).

    mpr-admin [settings] [--json] stats | inspect CONNECTION | top [--by depth|age] [--limit N]
                                  | purge CONNECTION [--yes] | release CONNECTION | import-original

Embedded store: reads the SQLite file of MPR_DATA_DIR directly (read-only, except purge and
release). Its live sessions live in the server's memory: mpr-admin cannot list them; ``stats``
reports whether a server holds the data directory and, if its /metrics answers on APP_PORT, how
many live sessions it has.

Redis + MongoDB: uses the store's indexes, never KEYS: ``mpr:old:{n}`` (messages whose payload is
still in Redis), the MongoDB documents (moved payloads), ``mpr:instances`` (liveness), and each
connection's own keys. Live sessions of connections without messages are found with a bounded
``SCAN`` (single Redis only; on a cluster only connections with messages are seen).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson

from mpr_server.config import SETTINGS, Config, ConfigError, load

SCAN_LIMIT = 100_000  # keys looked at by a SCAN for sessions, at most
PROGRESS_EVERY = 10_000
ENTRY_PAGE = 1000


class AdminError(Exception):
    """A failure to report in one line (exit 2)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def age_s(received_ms: int | None, now: int) -> float | None:
    return None if received_ms is None else round(max(0, now - received_ms) / 1000, 3)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the embedded store ----------------------------------------------------------------------------


class EmbeddedAdmin:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.path = os.path.join(config.data_dir, "mpr.sqlite3")

    def _open(self, write: bool = False) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            raise AdminError(f"no embedded store at {self.path} (MPR_DATA_DIR={self.config.data_dir!r})")
        mode = "rw" if write else "ro"
        db = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, timeout=5.0, isolation_level=None)
        return db

    def server_running(self) -> bool:
        """Whether a server holds the data directory's lock."""
        try:
            with open(os.path.join(self.config.data_dir, "mpr.lock"), "rb") as lock:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    return True
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
                return False
        except FileNotFoundError:
            return False

    def _server_sessions(self) -> int | None:
        """mpr_live_sessions of the server on this host's APP_PORT, if it answers."""
        port = self.config.app_endpoint.split(":")[1] if self.config.app_endpoint.startswith("tcp:") else None
        if port is None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("mpr_live_sessions "):
                return int(float(line.split()[1]))
        return None

    async def stats(self) -> dict[str, Any]:
        now = now_ms()
        with self._open() as db:
            total, connections, oldest = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT connection_id), MIN(received_at) FROM messages"
            ).fetchone()
            leased = db.execute("SELECT COUNT(*) FROM messages WHERE lease_until > ?", (now,)).fetchone()[0]
        running = self.server_running()
        return {
            "store": "embedded",
            "path": os.path.abspath(self.path),
            "messages": total,
            "tiers": {"sqlite": total},
            "leased": leased,
            "connections_with_messages": connections,
            "oldest_message_age_s": age_s(oldest, now),
            "live_sessions": self._server_sessions() if running else 0,
            "instances": [{"instance": "embedded server", "alive": running}],
            "note": "live sessions are held in the server's memory: counted from its /metrics when it answers",
        }

    async def inspect(self, connection_id: str) -> dict[str, Any]:
        now = now_ms()
        with self._open() as db:
            total, oldest, newest = db.execute(
                "SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM messages WHERE connection_id = ?",
                (connection_id,),
            ).fetchone()
            leases = db.execute(
                "SELECT lease_holder, COUNT(*), MAX(lease_until) FROM messages"
                " WHERE connection_id = ? AND lease_until > ? GROUP BY lease_holder ORDER BY lease_holder",
                (connection_id, now),
            ).fetchall()
        leased = sum(n for _, n, _ in leases)
        return {
            "connection": connection_id,
            "messages": total,
            "pending": total - leased,
            "leased": leased,
            "tiers": {"sqlite": total},
            "oldest_message_age_s": age_s(oldest, now),
            "newest_message_age_s": age_s(newest, now),
            "leases": [{"holder": h, "messages": n, "ends_in_s": round((u - now) / 1000, 3)} for h, n, u in leases],
            "live_session": None,
            "note": "the live session of an embedded store is in the server's memory, not visible here",
        }

    async def top(self, by: str, limit: int) -> list[dict[str, Any]]:
        now = now_ms()
        order = "n DESC, oldest ASC" if by == "depth" else "oldest ASC, n DESC"
        with self._open() as db:
            rows = db.execute(
                "SELECT connection_id, COUNT(*) AS n, MIN(received_at) AS oldest FROM messages"
                f" GROUP BY connection_id ORDER BY {order} LIMIT ?",
                (limit,),
            ).fetchall()
        return [{"connection": c, "messages": n, "oldest_message_age_s": age_s(o, now)} for c, n, o in rows]

    async def purge(self, connection_id: str) -> int:
        with self._open(write=True) as db:
            removed: int = db.execute("DELETE FROM messages WHERE connection_id = ?", (connection_id,)).rowcount
        return removed

    async def release(self, connection_id: str) -> int:
        with self._open(write=True) as db:
            released: int = db.execute(
                "UPDATE messages SET lease_holder = NULL, lease_until = NULL"
                " WHERE connection_id = ? AND lease_holder IS NOT NULL",
                (connection_id,),
            ).rowcount
        return released

    async def import_original(self) -> dict[str, Any]:
        raise AdminError("import-original needs the redis store (the original server's data is in Redis + MongoDB)")

    async def close(self) -> None:
        pass


# -- Redis + MongoDB ---------------------------------------------------------------------------------

RELEASE_ALL = r"""
local ids = redis.call('ZRANGE', KL, 0, -1)
for _, id in ipairs(ids) do release(id) end
return #ids
"""


class DistributedAdmin:
    def __init__(self, config: Config, reactor: Any) -> None:
        from mpr_server.app import redis_client
        from mpr_server.stores.mongo.cold import ColdStore

        self.config = config
        self.reactor = reactor
        self.redis = redis_client(config, reactor)
        self.cold = ColdStore(config.mongodb_uri, reactor, max(config.call_timeout_ms / 1000, 10.0))
        self._started = False

    async def start(self) -> None:
        from mpr_server.errors import StoreUnavailable
        from mpr_server.redis import RedisError

        try:
            await self.redis.wait_ready(timeout=10)
            await self.cold.start()
        except (RedisError, StoreUnavailable) as e:
            raise AdminError(f"store unreachable: {e}") from None
        self._started = True

    async def close(self) -> None:
        await self.redis.close()
        await self.cold.stop()

    async def _x(self, args: Sequence[Any], key: str) -> Any:
        from mpr_server.stores.redis.calls import execute

        return await execute(self.redis, args, key)

    async def instances(self) -> list[dict[str, Any]]:
        from mpr_server.stores.redis.keys import INSTANCES
        from mpr_server.stores.redis.replies import as_text

        now = now_ms()
        reply = await self._x(["ZRANGE", INSTANCES, 0, -1, "WITHSCORES"], INSTANCES)
        out = []
        for i in range(0, len(reply), 2):
            deadline = int(float(as_text(reply[i + 1])))
            beat = deadline - self.config.instance_ttl_ms
            out.append(
                {"instance": as_text(reply[i]), "alive": deadline >= now, "last_heartbeat_age_s": age_s(beat, now)}
            )
        return out

    async def _hot_index(self) -> dict[str, int]:
        """Connection -> oldest receivedAt of its entries in ``mpr:old:{n}`` (paged, with progress)."""
        from mpr_server.stores.redis.keys import BUCKETS, old_key, split_entry
        from mpr_server.stores.redis.replies import as_text

        oldest: dict[str, int] = {}
        seen = 0
        for n in range(BUCKETS):
            key = old_key(n)
            start = 0
            while True:
                page = await self._x(["ZRANGE", key, start, start + ENTRY_PAGE - 1, "WITHSCORES"], key)
                for i in range(0, len(page), 2):
                    connection_id, _ = split_entry(as_text(page[i]))
                    score = int(float(as_text(page[i + 1])))
                    oldest[connection_id] = min(oldest.get(connection_id, score), score)
                seen += len(page) // 2
                if seen and seen % PROGRESS_EVERY == 0:
                    progress(f"... {seen} index entries read")
                if len(page) < 2 * ENTRY_PAGE:
                    break
                start += ENTRY_PAGE
        return oldest

    async def _connection(self, connection_id: str) -> dict[str, Any]:
        """Exact figures of one connection from its own keys."""
        from mpr_server.stores.redis.keys import connection_keys
        from mpr_server.stores.redis.replies import as_text

        p, lk, hk, m, b, s = connection_keys(connection_id)[:6]
        total = int(await self._x(["HLEN", m], m))
        pending = int(await self._x(["ZCARD", p], p))
        lease_reply = await self._x(["ZRANGE", lk, 0, -1, "WITHSCORES"], lk)
        holders = await self._x(["HGETALL", hk], hk)
        held = {as_text(holders[i]): as_text(holders[i + 1]) for i in range(0, len(holders), 2)}
        leases = [
            (as_text(lease_reply[i]), int(float(as_text(lease_reply[i + 1])))) for i in range(0, len(lease_reply), 2)
        ]
        body_keys = [as_text(k) for k in await self._x(["HKEYS", b], b)] if total else []
        hot = sum(1 for k in body_keys if not k.endswith("#"))
        metas = await self._x(["HVALS", m], m) if total else []
        received = [int(orjson.loads(v)[1]) for v in metas]
        session = await self._x(["HMGET", s, "sid", "inst", "sock", "away", "at"], s)
        return {
            "total": total,
            "pending": pending,
            "leases": [(mid, ends, held.get(mid)) for mid, ends in leases],
            "hot": hot,
            "oldest": min(received) if received else None,
            "newest": max(received) if received else None,
            "session": None if session[1] is None else [None if v is None else as_text(v) for v in session],
        }

    def _session(self, raw: list[str | None] | None, alive: set[str]) -> dict[str, Any] | None:
        if raw is None:
            return None
        sid, inst, sock, away, _ = raw
        return {"session": sid, "instance": inst, "socket": sock, "away": away == "1", "instance_alive": inst in alive}

    async def _sessions_by_scan(self) -> int | None:
        """Live-session keys (``mpr:{c}:s``) by a bounded SCAN; None on a cluster."""
        from mpr_server.redis import SingleRedisClient
        from mpr_server.stores.redis.keys import INSTANCES

        if not isinstance(self.redis, SingleRedisClient):
            return None
        cursor, found, looked = "0", 0, 0
        while True:
            reply = await self._x(["SCAN", cursor, "MATCH", "mpr:{*}:s", "COUNT", 1000], INSTANCES)
            cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            found += len(reply[1])
            looked += 1000
            if looked % PROGRESS_EVERY == 0:
                progress(f"... scanned about {looked} keys for live sessions")
            if cursor == "0":
                return found
            if looked >= SCAN_LIMIT:
                progress(f"stopped the session SCAN after about {SCAN_LIMIT} keys: the count is a lower bound")
                return found

    async def stats(self) -> dict[str, Any]:
        now = now_ms()
        instances = await self.instances()
        alive = {i["instance"] for i in instances if i["alive"]}
        hot_index = await self._hot_index()
        cold, originals = await self.cold.summary()
        candidates = sorted(set(hot_index) | set(cold))
        total = hot = leased = 0
        with_messages = 0
        sessions = 0
        oldest: int | None = None
        for connection_id in candidates:
            c = await self._connection(connection_id)
            if not c["total"]:
                continue
            with_messages += 1
            total += c["total"]
            hot += c["hot"]
            leased += sum(1 for _, ends, holder in c["leases"] if ends > now and holder)
            sessions += 1 if c["session"] is not None and c["session"][1] in alive else 0
            if c["oldest"] is not None:
                oldest = c["oldest"] if oldest is None else min(oldest, c["oldest"])
        scanned = await self._sessions_by_scan()
        return {
            "store": "redis",
            "messages": total,
            "tiers": {"redis": hot, "mongodb": total - hot},
            "leased": leased,
            "connections_with_messages": with_messages,
            "oldest_message_age_s": age_s(oldest, now),
            "live_sessions": scanned if scanned is not None else sessions,
            "original_documents_not_imported": originals,
            "instances": instances,
        }

    async def inspect(self, connection_id: str) -> dict[str, Any]:
        now = now_ms()
        alive = {i["instance"] for i in await self.instances() if i["alive"]}
        c = await self._connection(connection_id)
        leases: dict[str, dict[str, Any]] = {}
        for _, ends, holder in c["leases"]:
            if ends <= now or not holder:
                continue
            entry = leases.setdefault(holder, {"holder": holder, "messages": 0, "ends_in_s": 0.0})
            entry["messages"] += 1
            entry["ends_in_s"] = max(entry["ends_in_s"], round((ends - now) / 1000, 3))
        leased = sum(e["messages"] for e in leases.values())
        return {
            "connection": connection_id,
            "messages": c["total"],
            "pending": c["total"] - leased,
            "leased": leased,
            "tiers": {"redis": c["hot"], "mongodb": c["total"] - c["hot"]},
            "oldest_message_age_s": age_s(c["oldest"], now),
            "newest_message_age_s": age_s(c["newest"], now),
            "leases": sorted(leases.values(), key=lambda e: str(e["holder"])),
            "live_session": self._session(c["session"], alive),
        }

    async def top(self, by: str, limit: int) -> list[dict[str, Any]]:
        now = now_ms()
        hot_index = await self._hot_index()
        cold, _ = await self.cold.summary()
        rows = []
        for connection_id in sorted(set(hot_index) | set(cold)):
            c = await self._connection(connection_id)
            if c["total"]:
                rows.append({"connection": connection_id, "messages": c["total"], "oldest": c["oldest"]})
        if by == "depth":
            rows.sort(key=lambda r: (-r["messages"], r["oldest"] or now))
        else:
            rows.sort(key=lambda r: (r["oldest"] or now, -r["messages"]))
        return [
            {"connection": r["connection"], "messages": r["messages"], "oldest_message_age_s": age_s(r["oldest"], now)}
            for r in rows[:limit]
        ]

    async def purge(self, connection_id: str) -> int:
        from mpr_server.stores.redis import replies
        from mpr_server.stores.redis import scripts as lua
        from mpr_server.stores.redis.calls import run_script
        from mpr_server.stores.redis.keys import connection_keys
        from mpr_server.stores.redis.replies import as_text

        m = connection_keys(connection_id)[3]
        ids = [as_text(k) for k in await self._x(["HKEYS", m], m)]
        removed = 0
        for start in range(0, len(ids), 1000):
            reply = replies.remove(await run_script(self.redis, lua.REMOVE, connection_id, ids[start : start + 1000]))
            removed += reply.removed
            await self.cold.delete(reply.offloaded)
        return removed

    async def release(self, connection_id: str) -> int:
        from mpr_server.redis import Script
        from mpr_server.stores.redis import scripts as lua
        from mpr_server.stores.redis.calls import run_script

        return int(await run_script(self.redis, Script(lua.PRELUDE + RELEASE_ALL), connection_id, []))

    async def import_original(self) -> dict[str, Any]:
        from mpr_server.upgrade_cli import import_original

        report = await import_original(self.config, self.reactor)
        return {**report.as_dict(), "summary": report.text()}


# -- output ---------------------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def human(command: str, result: Any) -> str:
    if command == "top":
        return table(result, ("connection", "messages", "oldest_message_age_s"))
    if command in ("purge", "release", "import-original"):
        return str(result["summary"])
    lines = []
    for key, value in result.items():
        if key == "instances":
            lines.append("instances:\n" + _indent(table(value, ("instance", "alive", "last_heartbeat_age_s"))))
        elif key == "leases":
            lines.append("leases:\n" + _indent(table(value, ("holder", "messages", "ends_in_s"))))
        elif key == "live_session" and isinstance(value, dict):
            lines.append("live session: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        elif key == "tiers":
            lines.append("tiers: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            lines.append(f"{key.replace('_', ' ')}: {'-' if value is None else value}")
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# -- command line --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpr-admin",
        description="Inspect and repair the MPR store, with the server's settings (environment or options).",
    )
    for s in SETTINGS:
        p.add_argument(f"--{s.option}", dest=s.env, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("stats", help="messages in total and per tier, connections, oldest age, sessions, instances")
    sub.add_parser("inspect", help="one connection: count, oldest, leases and holders, live session").add_argument(
        "connection"
    )
    top = sub.add_parser("top", help="connections by queue depth or by age of their oldest message")
    top.add_argument("--by", choices=("depth", "age"), default="depth")
    top.add_argument("--limit", type=int, default=20)
    purge = sub.add_parser("purge", help="delete every message of a connection")
    purge.add_argument("connection")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_parser("release", help="end the leases of a connection (its messages are pending again)").add_argument(
        "connection"
    )
    sub.add_parser("import-original", help="queue the messages an original MPR deployment left in MongoDB")
    return p


async def run(reactor: Any, args: argparse.Namespace, config: Config) -> Any:
    admin: EmbeddedAdmin | DistributedAdmin
    if config.store == "redis":
        admin = DistributedAdmin(config, reactor)
        await admin.start()
    else:
        admin = EmbeddedAdmin(config)
    try:
        if args.command == "stats":
            return await admin.stats()
        if args.command == "inspect":
            return await admin.inspect(args.connection)
        if args.command == "top":
            return await admin.top(args.by, max(1, args.limit))
        if args.command == "purge":
            n = await admin.purge(args.connection)
            return {"connection": args.connection, "removed": n, "summary": f"removed {n} messages"}
        if args.command == "release":
            n = await admin.release(args.connection)
            return {"connection": args.connection, "released": n, "summary": f"released {n} leases"}
        return await admin.import_original()
    finally:
        await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {s.env: getattr(args, s.env) for s in SETTINGS}
    try:
        config = load(values, os.environ)
    except ConfigError as e:
        print(f"mpr-admin: {e}", file=sys.stderr)
        return 1
    if args.command == "purge" and not args.yes:
        if not sys.stdin.isatty():
            print("mpr-admin: purge asks for confirmation on a terminal; pass --yes in scripts", file=sys.stderr)
            return 1
        answer = input(f"Delete every message of connection {args.connection!r}? Type the connection id to confirm: ")
        if answer.strip() != args.connection:
            print("mpr-admin: not confirmed, nothing deleted", file=sys.stderr)
            return 1
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred

    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        outcome["result"] = result

    def failed(failure: Any) -> None:
        outcome["error"] = failure.value

    def start() -> None:
        d = Deferred.fromCoroutine(run(global_reactor, args, config))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: global_reactor.stop())

    global_reactor.callWhenRunning(start)
    global_reactor.run()
    error = outcome.get("error")
    if error is not None:
        message = str(error) if isinstance(error, AdminError) else f"{type(error).__name__}: {error}"
        print(f"mpr-admin: {message}", file=sys.stderr)
        return 2
    result = outcome["result"]
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(human(args.command, result))
    return 0


def console() -> None:
    sys.exit(main())
