"""JSON logs, one object per line: ``twistd --logger mpr_server.jsonlog.observer -n mpr``."""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
