"""Lua scripts identified by their SHA1 (EVALSHA with an EVAL fallback)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Script:
    """A Lua script; ``sha1`` is what EVALSHA needs and is computed from ``source``."""

    source: str
    sha1: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode("utf-8")).hexdigest())
