"""MemoryThrottle with task.Clock."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task

from mpr_server.push import MemoryThrottle


@pytest_twisted.ensureDeferred
async def test_one_per_window_per_key() -> None:
    clock = task.Clock()
    throttle = MemoryThrottle(clock)

    assert await throttle.acquire("a", 5000) is True
    assert await throttle.acquire("a", 5000) is False
    assert await throttle.acquire("b", 5000) is True
    clock.advance(4.999)
    assert await throttle.acquire("a", 5000) is False
    clock.advance(0.001)
    assert await throttle.acquire("a", 5000) is True
    assert await throttle.acquire("a", 5000) is False


@pytest_twisted.ensureDeferred
async def test_zero_window_never_throttles() -> None:
    throttle = MemoryThrottle(task.Clock())

    assert await throttle.acquire("a", 0) is True
    assert await throttle.acquire("a", 0) is True
    assert len(throttle) == 0


@pytest_twisted.ensureDeferred
async def test_expired_entries_are_pruned() -> None:
    clock = task.Clock()
    throttle = MemoryThrottle(clock)
    for i in range(100):
        await throttle.acquire(f"k{i}", 1000)
    clock.advance(0.5)
    await throttle.acquire("late", 1000)
    assert len(throttle) == 101

    clock.advance(0.6)
    await throttle.acquire("x", 1000)

    assert len(throttle) == 2  # "late" and "x"
