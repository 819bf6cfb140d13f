"""Waiting on Redis client callbacks in tests: every wait is bounded."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredQueue

WAIT = 5.0  # bound on waiting for any event


async def wait(reactor: Any, d: Deferred[Any], timeout: float = WAIT) -> Any:
    d.addTimeout(timeout, reactor)
    return await d


class Inbox:
    """Collects (channel, message) deliveries; `next()` waits for one."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.queue: DeferredQueue[tuple[str, Any]] = DeferredQueue()

    def __call__(self, channel: str, message: Any) -> None:
        self.queue.put((channel, message))

    async def next(self, timeout: float = WAIT) -> tuple[str, Any]:
        return await wait(self.reactor, self.queue.get(), timeout)


class Event:
    """A hook that fires a Deferred every time it is called."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.calls = 0
        self._waiting: list[Deferred[None]] = []

    def __call__(self) -> None:
        self.calls += 1
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def wait(self, timeout: float = WAIT) -> Deferred[None]:
        """A Deferred for the next call (registered now, so call this before causing it)."""
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d.addTimeout(timeout, self.reactor)
