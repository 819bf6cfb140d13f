"""Per-token push throttles: at most one push per key per window."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime


class Throttle(Protocol):
    """Shared by the embedded (memory) and Redis (``SET NX PX``) implementations."""

    async def acquire(self, key: str, window_ms: int) -> bool:
        """Claim ``key`` for ``window_ms``; True if allowed (not claimed within the window)."""
        ...


class MemoryThrottle:
    """In-process throttle for the embedded store; expired entries are pruned as time goes on."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # key -> expiry time; re-inserted on each claim, so insertion order is expiry order when
        # the window is constant (always the case here), which makes pruning from the front cheap.
        self._until: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    async def acquire(self, key: str, window_ms: int) -> bool:
        now = self._clock.seconds()
        self._prune(now)
        if window_ms <= 0:
            return True
        until = self._until.get(key)
        if until is not None and until > now:
            return False
        self._until.pop(key, None)
        self._until[key] = now + window_ms / 1000.0
        return True

    def _prune(self, now: float) -> None:
        until = self._until
        while until:
            key = next(iter(until))
            if until[key] > now:
                return
            del until[key]
