"""PushService: policy around the providers (throttle, bounded concurrency, retries, counters)."""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from typing import Protocol

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .model import (
    InvalidTokenError,
    PermanentPushError,
    PushToken,
    TemporaryPushError,
    token_hash,
)
from .settings import PushSettings
from .throttle import Throttle

#: Outcomes of a push (second half of the counter keys); "retry" counts extra attempts.
OUTCOMES = ("sent", "invalid_token", "failed", "throttled", "disabled", "dropped", "skipped", "cancelled")


class Sender(Protocol):
    """One provider. ``send`` raises the ``model`` error taxonomy; anything else counts as temporary."""

    name: str

    async def send(self, token: str, message_id: str) -> None: ...

    def close(self) -> Deferred[None]: ...


def provider_for(token_type: str) -> str:
    """Tokens of type "fcm" go to FCM, every other type to APNs."""
    return "fcm" if token_type.strip().lower() == "fcm" else "apns"


class PushService(Service):
    """Fire-and-forget pushes. ``counters`` holds ``(provider, outcome)`` counts for /metrics."""

    name = "push"
    _log = Logger()

    def __init__(
        self,
        settings: PushSettings,
        clock: IReactorTime,
        throttle: Throttle,
        senders: dict[str, Sender | None],
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._throttle = throttle
        self._senders = senders
        self.counters: Counter[tuple[str, str]] = Counter()
        self._active = 0
        self._waiting: deque[Deferred[bool]] = deque()
        self._inflight: set[Deferred[str]] = set()
        self._stopping = False

    @property
    def in_flight(self) -> int:
        """Pushes holding a concurrency slot."""
        return self._active

    @property
    def queued(self) -> int:
        """Pushes waiting for a slot."""
        return len(self._waiting)

    def push(self, token: PushToken, message_id: str) -> None:
        """Start a push in the background; never raises, never waits."""
        try:
            self.push_and_wait(token, message_id).addErrback(self._log_crash)
        except Exception:
            self._log.failure("push could not be started")

    def push_and_wait(self, token: PushToken, message_id: str) -> Deferred[str]:
        """Like ``push``, returning a Deferred that fires with the outcome (never fails)."""
        d = Deferred.fromCoroutine(self._run(token, message_id))
        if not d.called:
            self._inflight.add(d)
            d.addBoth(self._forget, d)
        return d

    def _forget(self, result: object, d: Deferred[str]) -> object:
        self._inflight.discard(d)
        return result

    def _log_crash(self, failure: Failure) -> None:
        self._log.failure("push crashed", failure)

    async def _run(self, token: PushToken, message_id: str) -> str:
        provider = "unknown"
        try:
            provider = provider_for(token.type)
            outcome = await self._deliver(provider, token.token, message_id)
        except CancelledError:
            outcome = "cancelled"
        except Exception:
            self._log.failure("push to {provider} crashed", provider=provider)
            outcome = "failed"
        self.counters[(provider, outcome)] += 1
        return outcome

    async def _deliver(self, provider: str, token: str, message_id: str) -> str:
        sender = self._senders.get(provider)
        if sender is None:
            self._log.debug("{provider} push skipped: provider disabled", provider=provider)
            return "disabled"
        if self._stopping:
            return "dropped"
        if not token:
            self._log.info("{provider} push skipped: empty device token", provider=provider)
            return "skipped"
        label = token_hash(token)
        if not await self._throttle_allows(provider, token):
            self._log.debug("{provider} push to {token} throttled", provider=provider, token=label)
            return "throttled"
        if not await self._acquire_slot():
            self._log.warn(
                "{provider} push to {token} dropped: {queued} pushes already queued",
                provider=provider,
                token=label,
                queued=len(self._waiting),
            )
            return "dropped"
        try:
            return await self._attempts(provider, sender, token, label, message_id)
        finally:
            self._release_slot()

    async def _throttle_allows(self, provider: str, token: str) -> bool:
        key = f"{provider}:{hashlib.sha256(token.encode('utf-8')).hexdigest()}"
        try:
            return await self._throttle.acquire(key, self._settings.push_throttle_ms)
        except CancelledError:
            raise
        except Exception:
            self._log.failure("push throttle failed; sending anyway")
            return True

    async def _attempts(self, provider: str, sender: Sender, token: str, label: str, message_id: str) -> str:
        max_attempts = self._settings.push_max_attempts
        for attempt in range(1, max_attempts + 1):
            try:
                await sender.send(token, message_id)
            except InvalidTokenError as e:
                self._log.warn(
                    "{provider} rejected device token {token}: {error}", provider=provider, token=label, error=str(e)
                )
                return "invalid_token"
            except PermanentPushError as e:
                self._log.error(
                    "{provider} push to {token} failed: {error}", provider=provider, token=label, error=str(e)
                )
                return "failed"
            except TemporaryPushError as e:
                error = e
            except CancelledError:
                raise
            except Exception as e:
                error = TemporaryPushError(repr(e))
            else:
                self._log.debug(
                    "{provider} push to {token} sent (message {message_id})",
                    provider=provider,
                    token=label,
                    message_id=message_id,
                )
                return "sent"
            delay = self._retry_delay(attempt, error.retry_after)
            if attempt >= max_attempts or delay is None:
                self._log.warn(
                    "{provider} push to {token} failed after {attempts} attempt(s): {error}",
                    provider=provider,
                    token=label,
                    attempts=attempt,
                    error=str(error),
                )
                return "failed"
            self.counters[(provider, "retry")] += 1
            self._log.info(
                "{provider} push to {token} failed ({error}); retry {attempt} in {delay}s",
                provider=provider,
                token=label,
                error=str(error),
                attempt=attempt,
                delay=delay,
            )
            await task.deferLater(self._clock, delay)
        return "failed"  # not reached: the loop always returns

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds before the next attempt: ``Retry-After`` if given, else exponential backoff."""
        s = self._settings
        if retry_after is not None:
            return None if retry_after * 1000 > s.push_max_retry_after_ms else retry_after
        return min(s.push_backoff_ms << (attempt - 1), s.push_backoff_max_ms) / 1000.0

    def _acquire_slot(self) -> Deferred[bool]:
        if self._active < self._settings.push_concurrency:
            self._active += 1
            return succeed(True)
        if len(self._waiting) >= self._settings.push_queue_size:
            return succeed(False)
        d: Deferred[bool] = Deferred(self._leave_queue)
        self._waiting.append(d)
        return d

    def _leave_queue(self, d: Deferred[bool]) -> None:
        try:
            self._waiting.remove(d)
        except ValueError:
            pass

    def _release_slot(self) -> None:
        while self._waiting and not self._stopping:
            waiter = self._waiting.popleft()
            if not waiter.called:
                waiter.callback(True)  # the slot passes to the next push; _active is unchanged
                return
        self._active -= 1

    async def drain(self, timeout_s: float) -> None:
        """Give the pushes under way up to ``timeout_s`` to finish (at shutdown, before stopping:
        pushes sent while closing sessions would otherwise be cancelled at once). Cancels nothing."""
        pending = list(self._inflight)
        if not pending:
            return
        done: Deferred[None] = Deferred()

        def finish(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        DeferredList(pending, consumeErrors=True).addBoth(finish)
        timer = self._clock.callLater(timeout_s, finish)
        await done
        if timer.active():
            timer.cancel()
        elif self._inflight:
            self._log.info("stopping with {n} pushes unfinished", n=len(self._inflight))

    def stopService(self) -> Deferred[None]:
        """Cancel queued and running pushes, close provider connections."""
        super().stopService()
        self._stopping = True
        for d in list(self._inflight):
            d.cancel()
        closing = [s.close() for s in self._senders.values() if s is not None]
        done: Deferred[None] = DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)
        return done
