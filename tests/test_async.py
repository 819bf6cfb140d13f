"""The shared asynchronous mechanisms (mpr_server._async) and the dispatcher's call deadline,
on a task.Clock."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mpr_server._async import Batcher, Timeouts, Waiters, background, deadline, gather
from mpr_server.wire.jsonrpc import CallContext, Dispatcher
from tests.drive import drive


class Late(Exception):
    pass


def test_timeouts_cancel_in_order_and_spare_what_fired() -> None:
    clock = Clock()
    timeouts = Timeouts(clock, 1.0)
    first, second, third = Deferred[None](), Deferred[None](), Deferred[None]()
    watches = [timeouts.watch(first)]
    clock.advance(0.4)
    watches.append(timeouts.watch(second))
    watches.append(timeouts.watch(third))
    second.callback(None)
    assert len(clock.getDelayedCalls()) == 1  # one timer, whatever the number watched
    clock.advance(0.6)
    assert first.called and not third.called
    assert [w.expired for w in watches] == [True, False, False]
    clock.advance(0.4)
    assert third.called and [w.expired for w in watches] == [True, False, True]
    assert clock.getDelayedCalls() == []
    for d in (first, third):
        d.addErrback(lambda f: f.trap(CancelledError))


def test_deadline_raises_the_callers_error_only_when_it_expires() -> None:
    clock = Clock()
    hanging: Deferred[int] = Deferred()
    result = Deferred.fromCoroutine(deadline(hanging, 2.0, clock, lambda: Late("too late")))
    clock.advance(1.9)
    assert not result.called
    clock.advance(0.1)
    failure: list[Failure] = []
    result.addErrback(failure.append)
    assert failure and failure[0].check(Late)

    answered: Deferred[int] = Deferred()
    quick = Deferred.fromCoroutine(deadline(answered, 2.0, clock, lambda: Late("too late")))
    answered.callback(7)
    assert quick.result == 7

    cancelled: Deferred[int] = Deferred()
    other = Deferred.fromCoroutine(deadline(cancelled, 2.0, clock, lambda: Late("too late")))
    other.cancel()  # not the deadline: stays a cancellation
    seen: list[Failure] = []
    other.addErrback(seen.append)
    assert seen and seen[0].check(CancelledError)


def test_waiters_fire_once_and_forget_the_cancelled() -> None:
    waiters: Waiters[str] = Waiters()
    a, b = waiters.wait(), waiters.wait()
    b.addErrback(lambda f: f.trap(CancelledError))
    b.cancel()
    assert len(waiters) == 1
    waiters.fire("up")
    assert a.result == "up" and len(waiters) == 0
    waiters.fire("again")  # nobody waits any more


def test_batcher_hands_over_one_turns_items_together() -> None:
    clock = Clock()
    batches: list[list[int]] = []
    batcher: Batcher[int] = Batcher(clock, 0, batches.append)
    batcher.add(1)
    batcher.extend([2, 3])
    assert batches == []
    clock.advance(0)
    assert batches == [[1, 2, 3]]
    batcher.add(4)
    assert batcher.take() == [4]
    clock.advance(0)
    assert batches == [[1, 2, 3]]


def test_background_logs_a_failure_and_gather_keeps_each_outcome() -> None:
    from twisted.logger import LogLevel, capturedLogs

    async def boom() -> None:
        raise ValueError("boom")

    with capturedLogs() as events:
        done = background(boom(), None, "work {n} failed", n=3)
    assert done.called
    assert [e["log_level"] for e in events] == [LogLevel.critical]

    async def value() -> int:
        return 5

    results = drive(gather([value(), boom()]), lambda: None)
    assert results[0] == 5 and isinstance(results[1], Failure) and results[1].check(ValueError)


def test_a_call_past_its_deadline_is_answered_with_an_error() -> None:
    clock = Clock()
    hanging: Deferred[Any] = Deferred()

    async def hang(params: Any, ctx: CallContext) -> Any:
        return await hanging

    async def ping(params: Any, ctx: CallContext) -> Any:
        return "pong"

    dispatcher = Dispatcher({"hang": hang, "ping": ping}, clock, call_timeout_s=1.5)
    ctx = CallContext("s1")
    replies: list[bytes | None] = []
    dispatcher.handle(b'{"jsonrpc":"2.0","method":"hang","params":{},"id":1}', ctx).addCallback(replies.append)
    clock.advance(1.4)
    assert replies == []
    clock.advance(0.1)
    assert [orjson.loads(r or b"") for r in replies] == [
        {
            "jsonrpc": "2.0",
            "error": {
                "code": 500,
                "message": "Internal server error",
                "data": {"details": "the store did not answer in time"},
            },
            "id": 1,
        }
    ]
    assert hanging.called  # the call under way was cancelled, not left to run on
    dispatcher.handle(b'{"jsonrpc":"2.0","method":"ping","id":2}', ctx).addCallback(replies.append)
    assert orjson.loads(replies[-1] or b"")["result"] == "pong"


@pytest.mark.parametrize("seconds", [0.5, 1.5])
def test_timeouts_are_shared_per_clock_and_duration(seconds: float) -> None:
    clock = Clock()
    assert Timeouts.of(clock, seconds) is Timeouts.of(clock, seconds)
    assert Timeouts.of(clock, seconds) is not Timeouts.of(Clock(), seconds)
