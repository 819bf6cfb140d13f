"""``twistd mpr``: the options and the service maker (see ``app.py`` for what is built, and
``workers.py`` for ``MPR_WORKERS``)."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.logger import Logger

from mpr_server.app import build
from mpr_server.config import Options

__all__ = ["Options", "makeService"]

_log = Logger()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    config = options.config
    if config.workers > 1:
        if config.store == "redis":
            from mpr_server.workers import Supervisor

            return Supervisor(config, options.given, reactor)
        _log.warn(
            "MPR_WORKERS={n} is ignored: the embedded store runs in one process (use the redis store for workers)",
            n=config.workers,
        )
    return build(config, reactor)
