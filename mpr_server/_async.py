"""The small asynchronous mechanisms every layer uses, written once.

- :func:`background`: start a coroutine (or Deferred) nobody awaits, logging its failure;
- :func:`deadline`: await something for at most N seconds, raising an error of the caller's choice
  (:class:`Timeouts`: one timer for all the deadlines of one duration);
- :class:`Waiters`: one-shot waiters for an event (connected, closed, refreshed, ...);
- :class:`Batcher`: items gathered for a while (one reactor turn by default), then handed over at once;
- :func:`gather`: await several things started together, keeping each outcome.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

T = TypeVar("T")

_log = Logger()


def as_deferred(work: Coroutine[Any, Any, T] | Deferred[T]) -> Deferred[T]:
    return work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)


def background(
    work: Coroutine[Any, Any, Any] | Deferred[Any], log: Logger | None, message: str, **fields: Any
) -> Deferred[None]:
    """Run ``work`` without awaiting it; a failure is logged with ``message`` (a format string
    over ``fields``) instead of vanishing. Returns a Deferred that fires (with None) when done."""
    d = as_deferred(work)

    def failed(failure: Failure) -> None:
        if failure.check(CancelledError):
            return None
        (log or _log).failure(message, failure, **fields)
        return None

    return d.addCallbacks(lambda _: None, failed)


class Watch:
    """One Deferred under a deadline; ``expired`` once the deadline cancelled it."""

    __slots__ = ("deferred", "expired", "expires")

    def __init__(self, deferred: Deferred[Any], expires: float) -> None:
        self.deferred = deferred
        self.expires = expires
        self.expired = False


class Timeouts:
    """Deadlines of one duration on one clock, for any number of Deferreds, with one timer: they
    expire in the order they were set, so a queue and a single pending call suffice (a
    ``callLater`` per call, as ``Deferred.addTimeout`` does, costs more than the call it guards).
    An expired Deferred that has not fired yet is cancelled."""

    _shared: ClassVar[dict[tuple[int, float], Timeouts]] = {}

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self._queue: deque[Watch] = deque()
        self._timer: IDelayedCall | None = None

    @classmethod
    def of(cls, clock: IReactorTime, seconds: float) -> Timeouts:
        """The shared instance for this clock and duration."""
        key = (id(clock), seconds)
        found = cls._shared.get(key)
        if found is None or found.clock is not clock:
            found = cls._shared[key] = cls(clock, seconds)
        return found

    def watch(self, d: Deferred[Any]) -> Watch:
        watch = Watch(d, self.clock.seconds() + self.seconds)
        self._queue.append(watch)
        if self._timer is None:
            self._timer = self.clock.callLater(self.seconds, self._expire)
        return watch

    def _expire(self) -> None:
        queue, now = self._queue, self.clock.seconds()
        while queue and (queue[0].deferred.called or queue[0].expires <= now):
            watch = queue.popleft()
            if not watch.deferred.called:
                watch.expired = True
                watch.deferred.cancel()
        self._timer = self.clock.callLater(queue[0].expires - now, self._expire) if queue else None


async def deadline(
    work: Coroutine[Any, Any, T] | Deferred[T],
    seconds: float,
    clock: IReactorTime,
    timed_out: Callable[[], Exception],
) -> T:
    """Await ``work`` for at most ``seconds``; then cancel it and raise ``timed_out()``."""
    d = as_deferred(work)
    watch = Timeouts.of(clock, seconds).watch(d)
    try:
        return await d
    except CancelledError:
        if watch.expired:
            raise timed_out() from None
        raise


class Waiters(Generic[T]):
    """Deferreds waiting for the next occurrence of an event; each fires once."""

    def __init__(self) -> None:
        self._pending: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def wait(self) -> Deferred[T]:
        d: Deferred[T] = Deferred(self._forget)
        self._pending.append(d)
        return d

    def _forget(self, d: Deferred[T]) -> None:
        if d in self._pending:
            self._pending.remove(d)

    def fire(self, value: T) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.callback(value)

    def fail(self, error: Exception) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.errback(error)

    def cancel(self) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.cancel()


class Batcher(Generic[T]):
    """Gathers items and hands them to ``flush`` together, ``delay_s`` after the first one
    (0: at the end of the current reactor turn), so that work issued in one turn shares one
    round trip or one commit."""

    def __init__(self, clock: IReactorTime, delay_s: float, flush: Callable[[list[T]], object]) -> None:
        self._clock = clock
        self._delay_s = delay_s
        self._flush = flush
        self._items: list[T] = []
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        self._items.append(item)
        self._schedule()

    def extend(self, items: list[T]) -> None:
        if items:
            self._items.extend(items)
            self._schedule()

    def _schedule(self) -> None:
        if self._call is None:
            self._call = self._clock.callLater(self._delay_s, self.flush_now)

    def take(self) -> list[T]:
        """The items waiting (and forget them, and the scheduled flush)."""
        self.cancel()
        items, self._items = self._items, []
        return items

    def flush_now(self) -> object:
        items = self.take()
        return self._flush(items) if items else None

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


async def gather(works: Sequence[Coroutine[Any, Any, T] | Deferred[T]]) -> list[T | Failure]:
    """Run every one of ``works`` concurrently; each result or its Failure, in order."""
    deferreds = [as_deferred(w) for w in works]
    results: list[T | Failure] = []
    for d in deferreds:
        try:
            results.append(await d)
        except Exception:
            results.append(Failure())
    return results
