"""Run coroutines to completion without reactor time: for tests on task.Clock and in-memory I/O."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T], step: Callable[[], None], rounds: int = 100) -> T:
    """Start ``coro`` and call ``step`` (advance a Clock by 0, pump transports) until it finishes;
    return its result or raise its exception. Fails if it does not finish within ``rounds`` steps."""
    d: Deferred[T] = Deferred.fromCoroutine(coro)
    results: list[Any] = []
    d.addBoth(results.append)
    for _ in range(rounds):
        if results:
            break
        step()
    assert results, "the operation did not complete"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
