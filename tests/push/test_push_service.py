"""PushService policy with an in-memory sender and task.Clock: throttle, backoff, bounds, stop."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs, formatEvent

from mpr_server.push import (
    InvalidTokenError,
    MemoryThrottle,
    PermanentPushError,
    PushService,
    PushSettings,
    PushToken,
    TemporaryPushError,
)
from mpr_server.push.model import token_hash

TIMEOUT = 10


class FakeSender:
    """Records sends; each send takes the next scripted result (an exception, a Deferred or None)."""

    name = "fcm"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.script: deque[Exception | Deferred[None] | None] = deque()
        self.closed = False

    async def send(self, token: str, message_id: str) -> None:
        self.sent.append((token, message_id))
        step = self.script.popleft() if self.script else None
        if isinstance(step, Exception):
            raise step
        if isinstance(step, Deferred):
            await step

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def make(clock: task.Clock, sender: FakeSender | None = None, **overrides: Any) -> PushService:
    settings = PushSettings(**overrides)
    service = PushService(settings, clock, MemoryThrottle(clock), {"fcm": sender, "apns": None})
    service.startService()
    return service


def outcome_of(d: Deferred[str]) -> str | None:
    """The outcome if the push has finished (the Deferred keeps its result)."""
    results: list[str] = []

    def keep(outcome: str) -> str:
        results.append(outcome)
        return outcome

    d.addCallback(keep)
    return results[0] if results else None


TOKEN = PushToken("fcm", "tok-1")


def test_throttle_one_push_per_window() -> None:
    clock, sender = task.Clock(), FakeSender()
    service = make(clock, sender, push_throttle_ms=5000)

    assert outcome_of(service.push_and_wait(TOKEN, "m1")) == "sent"
    assert outcome_of(service.push_and_wait(TOKEN, "m2")) == "throttled"
    assert outcome_of(service.push_and_wait(PushToken("fcm", "other"), "m3")) == "sent"
    clock.advance(4.999)
    assert outcome_of(service.push_and_wait(TOKEN, "m4")) == "throttled"
    clock.advance(0.001)
    assert outcome_of(service.push_and_wait(TOKEN, "m5")) == "sent"

    assert sender.sent == [("tok-1", "m1"), ("other", "m3"), ("tok-1", "m5")]
    assert service.counters[("fcm", "throttled")] == 2
    assert service.counters[("fcm", "sent")] == 3


def test_exponential_backoff_then_success() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.extend([TemporaryPushError("503"), TemporaryPushError("503")])
    service = make(clock, sender, push_backoff_ms=1000, push_max_attempts=3)

    d = service.push_and_wait(TOKEN, "m")
    assert len(sender.sent) == 1
    clock.advance(0.999)
    assert len(sender.sent) == 1
    clock.advance(0.001)
    assert len(sender.sent) == 2
    clock.advance(1.999)
    assert len(sender.sent) == 2
    clock.advance(0.001)

    assert outcome_of(d) == "sent"
    assert len(sender.sent) == 3
    assert service.counters[("fcm", "retry")] == 2
    assert service.counters[("fcm", "sent")] == 1


def test_backoff_is_capped() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.extend([TemporaryPushError("x")] * 3)
    service = make(clock, sender, push_backoff_ms=1000, push_backoff_max_ms=1500, push_max_attempts=4)

    d = service.push_and_wait(TOKEN, "m")
    clock.pump([1.0, 1.5, 1.5])

    assert outcome_of(d) == "sent"
    assert len(sender.sent) == 4


def test_retry_after_is_honoured() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.append(TemporaryPushError("429", retry_after=30))
    service = make(clock, sender, push_backoff_ms=1000)

    d = service.push_and_wait(TOKEN, "m")
    clock.advance(29.9)
    assert len(sender.sent) == 1
    clock.advance(0.1)

    assert outcome_of(d) == "sent"
    assert len(sender.sent) == 2


def test_retry_after_beyond_limit_gives_up() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.append(TemporaryPushError("429", retry_after=3600))
    service = make(clock, sender, push_max_retry_after_ms=600_000)

    assert outcome_of(service.push_and_wait(TOKEN, "m")) == "failed"
    assert len(sender.sent) == 1
    assert clock.getDelayedCalls() == []


def test_gives_up_after_max_attempts() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.extend([TemporaryPushError("down")] * 5)
    service = make(clock, sender, push_max_attempts=3, push_backoff_ms=100)

    d = service.push_and_wait(TOKEN, "m")
    clock.pump([0.1, 0.2, 10])

    assert outcome_of(d) == "failed"
    assert len(sender.sent) == 3
    assert service.counters[("fcm", "retry")] == 2
    assert service.counters[("fcm", "failed")] == 1


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(InvalidTokenError("FCM 404 UNREGISTERED"), "invalid_token"), (PermanentPushError("FCM 403"), "failed")],
)
def test_permanent_errors_not_retried(error: Exception, outcome: str) -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.append(error)
    service = make(clock, sender)

    with capturedLogs() as events:
        result = outcome_of(service.push_and_wait(PushToken("fcm", "very-secret"), "m"))

    assert result == outcome
    assert len(sender.sent) == 1
    assert service.counters[("fcm", outcome)] == 1
    assert clock.getDelayedCalls() == []
    texts = [formatEvent(e) for e in events]
    assert any(token_hash("very-secret") in t for t in texts)
    assert not any("very-secret" in t for t in texts)


def test_unexpected_sender_error_is_treated_as_temporary() -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.append(RuntimeError("boom"))
    service = make(clock, sender, push_backoff_ms=10)

    d = service.push_and_wait(TOKEN, "m")
    clock.advance(0.01)

    assert outcome_of(d) == "sent"
    assert service.counters[("fcm", "retry")] == 1


def test_bounded_concurrency_and_queue() -> None:
    clock, sender = task.Clock(), FakeSender()
    gates: list[Deferred[None]] = [Deferred() for _ in range(3)]
    sender.script.extend(gates)
    service = make(clock, sender, push_concurrency=2, push_queue_size=1)

    results = [service.push_and_wait(PushToken("fcm", f"t{i}"), "m") for i in range(4)]

    assert [token for token, _ in sender.sent] == ["t0", "t1"]
    assert (service.in_flight, service.queued) == (2, 1)
    assert outcome_of(results[3]) == "dropped"
    gates[0].callback(None)
    assert outcome_of(results[0]) == "sent"
    assert [token for token, _ in sender.sent] == ["t0", "t1", "t2"]
    assert (service.in_flight, service.queued) == (2, 0)
    gates[1].callback(None)
    gates[2].callback(None)
    assert [outcome_of(d) for d in results] == ["sent", "sent", "sent", "dropped"]
    assert (service.in_flight, service.queued) == (0, 0)
    assert service.counters[("fcm", "dropped")] == 1


def test_push_never_raises() -> None:
    clock = task.Clock()
    service = make(clock, FakeSender())

    service.push(None, "m")  # type: ignore[arg-type]
    service.push(PushToken("fcm", ""), "m")

    assert service.counters[("unknown", "failed")] == 1
    assert service.counters[("fcm", "skipped")] == 1


def test_disabled_provider_is_counted() -> None:
    clock = task.Clock()
    service = make(clock, FakeSender())

    assert outcome_of(service.push_and_wait(PushToken("apns", "t"), "m")) == "disabled"
    assert outcome_of(service.push_and_wait(PushToken("voip", "t"), "m")) == "disabled"
    assert service.counters[("apns", "disabled")] == 2


def test_throttle_failure_fails_open() -> None:
    class BrokenThrottle:
        async def acquire(self, key: str, window_ms: int) -> bool:
            raise ConnectionError("redis down")

    clock, sender = task.Clock(), FakeSender()
    service = PushService(PushSettings(), clock, BrokenThrottle(), {"fcm": sender})

    assert outcome_of(service.push_and_wait(TOKEN, "m")) == "sent"


@pytest_twisted.ensureDeferred
async def test_stop_cancels_pending_pushes_and_closes_senders(reactor: Any) -> None:
    clock, sender = task.Clock(), FakeSender()
    sender.script.extend([Deferred(), TemporaryPushError("x")])
    service = make(clock, sender, push_concurrency=1)
    running = service.push_and_wait(PushToken("fcm", "a"), "m")
    queued = service.push_and_wait(PushToken("fcm", "b"), "m")

    await service.stopService().addTimeout(TIMEOUT, reactor)

    assert outcome_of(running) == "cancelled"
    assert outcome_of(queued) == "cancelled"
    assert sender.sent == [("a", "m")]  # the queued push never started
    assert sender.closed
    assert outcome_of(service.push_and_wait(PushToken("fcm", "c"), "m")) == "dropped"
    assert clock.getDelayedCalls() == []


def test_drain_waits_for_pushes_under_way_then_gives_up() -> None:
    clock, sender = task.Clock(), FakeSender()
    gates: list[Deferred[None]] = [Deferred(), Deferred()]
    sender.script.extend(gates)
    service = make(clock, sender)
    finished = service.push_and_wait(PushToken("fcm", "a"), "m1")
    stuck = service.push_and_wait(PushToken("fcm", "b"), "m2")
    draining = Deferred.fromCoroutine(service.drain(2.0))
    gates[0].callback(None)
    assert outcome_of(finished) == "sent" and not draining.called
    clock.advance(2.0)  # "b" never finishes: the drain gives up
    assert draining.called and outcome_of(stuck) is None
    service.stopService()
    assert outcome_of(stuck) == "cancelled"
