"""The Redis key names of the store.

Per connection (sharing the hash tag ``{<connection>}``, see ``scripts.py`` for what each holds):
``mpr:{c}:p`` … ``mpr:{c}:t``. Shared indexes, spread over ``BUCKETS`` keys each so that a
cluster spreads them too: ``mpr:due:{n}`` (lease ends), ``mpr:old:{n}`` (for the persister),
``mpr:age:{n}`` (for the message TTL); ``mpr:instances`` (liveness), ``mpr:notify:{instance}``
(each instance's notification channel), ``mpr:lock:<work>`` (claims), ``mpr:push:<key>``
(push throttle).
"""

from __future__ import annotations

import functools
import zlib

BUCKETS = 16
INSTANCES = "mpr:instances"
CONNECTION_PARTS = "plhmbsnt"


def tag(connection_id: str) -> str:
    """The hash tag of a connection: itself unless braces (or our escape) would break tagging."""
    if "{" in connection_id or "}" in connection_id or connection_id.startswith("~"):
        return "~" + connection_id.encode().hex()
    return connection_id


@functools.lru_cache(maxsize=65_536)
def connection_keys(connection_id: str) -> tuple[str, ...]:
    """The keys of a connection, in the order the scripts take them (cached: every call needs them)."""
    t = tag(connection_id)
    return tuple(f"mpr:{{{t}}}:{part}" for part in CONNECTION_PARTS)


def bucket(connection_id: str) -> int:
    return zlib.crc32(connection_id.encode()) % BUCKETS


def due_key(n: int) -> str:
    return f"mpr:due:{{{n}}}"


def old_key(n: int) -> str:
    return f"mpr:old:{{{n}}}"


def age_key(n: int) -> str:
    return f"mpr:age:{{{n}}}"


def lock_key(work: str) -> str:
    return f"mpr:lock:{work}"


def notify_channel(instance_id: str) -> str:
    return f"mpr:notify:{{{instance_id}}}"


def push_key(key: str) -> str:
    return f"mpr:push:{key}"


def index_entry(connection_id: str, message_id: str) -> str:
    """A message in the persister and TTL indexes."""
    return f"{connection_id}\n{message_id}"


def split_entry(entry: str) -> tuple[str, str]:
    connection_id, _, message_id = entry.rpartition("\n")
    return connection_id, message_id
