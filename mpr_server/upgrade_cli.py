"""``mpr-import-original``: run the import of an original deployment's messages once, now, and
print its report (``--json`` for JSON). It reads the server's settings (environment variables and
the same ``--options`` as ``twistd mpr``) and needs ``MPR_STORE=redis``.

The server imports at start-up by itself (see ``mpr_server/stores/redis/upgrade.py``); this
command looks again regardless of the done-marker: an operator's way to check that nothing was
left behind (``found`` 0) or to import what an original instance wrote after the upgrade.
Other tools call ``import_original(config, reactor)``.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

from mpr_server.config import Config, Options
from mpr_server.errors import StoreUnavailable
from mpr_server.stores.mongo.cold import ColdStore
from mpr_server.stores.redis.store import RedisStore
from mpr_server.stores.redis.upgrade import ImportReport


class ImportOptions(Options):
    synopsis = "mpr-import-original [--json] [server options]"
    optFlags = [["json", None, "print the report as JSON"]]


async def import_original(config: Config, reactor: Any) -> ImportReport:
    """Import what an original deployment left in the configured Redis and MongoDB, now (even if
    an import was done before: nothing is imported twice). Raises StoreUnavailable."""
    from mpr_server.app import redis_client

    if config.store != "redis":
        raise StoreUnavailable("the import needs the Redis store: set MPR_STORE=redis (and REDIS_*, MONGODB_URI)")
    store = RedisStore(
        redis_client(config, reactor),
        ColdStore(config.mongodb_uri, reactor, config.call_timeout_ms / 1000),
        reactor,
        config.instance_id,
        instance_ttl_ms=config.instance_ttl_ms,
        allow_evicting=config.allow_evicting_redis,
        message_ttl=config.message_ttl_ms > 0,
    )
    store.import_original = False  # run below, forced
    await store.start()
    try:
        return await store.originals.run(force=True)
    finally:
        await store.stop()


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import task

    options = ImportOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"mpr-import-original: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    async def run(reactor: Any) -> None:
        try:
            report = await import_original(options.config, reactor)
        except StoreUnavailable as e:
            print(f"mpr-import-original: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        if options["json"]:
            print(orjson.dumps(report.as_dict()).decode())
        else:
            print(report.text())

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
