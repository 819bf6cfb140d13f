"""``twistd mpr``: the options and the service maker (see ``app.py`` for what is built)."""

from __future__ import annotations

from twisted.application.service import IService

from mpr_server.app import build
from mpr_server.config import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build(options.config, reactor)
