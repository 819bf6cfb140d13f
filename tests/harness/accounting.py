"""The accounting harness: simulated mediators add unique, marked messages and recipients consume
them (a live session answering ``messagesReceived``, Pickup v2 polling with take + remove, Pickup
v1 polling with ``deleteMessages``), while a test does something nasty to the servers. Every call
may fail (the fault is the point): a failed add is retried as a *new* message, as a mediator
would, and a failed consume is tried again on the next round.

What is checked at the end (:meth:`Ledger.check`), the promise of docs/guarantees.rst:

- every acknowledged add was delivered at least once, with its exact payload;
- nothing acknowledged comes back: no delivery of a message after its removal was acknowledged;
- after the last ack the queues are empty (``getAvailableMessageCount`` 0 and an empty take);
- duplicates (deliveries of one message before its ack beyond the first) are counted, and the
  caller bounds them by the redelivery rule (a message is delivered again only when its lease
  was released: a lease timeout, a new session, a lost socket or instance).

Observations are numbered by one counter: the reactor is single-threaded, so they are ordered.
"""

from __future__ import annotations

import itertools
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from tests.wsclient import RpcClient

DID = "did:key:z6MkharnessRecipient"
CALL_TIMEOUT_S = 5.0


def marked_payload(marker: str) -> dict[str, Any]:
    """A JWE-shaped payload (keys deliberately unsorted) carrying the message's marker."""
    return {"protected": "eyJlbmMiOiJYQzIwUCJ9", "iv": "iv-" + marker, "ciphertext": "ct-" + marker, "tag": marker}


@dataclass
class Ledger:
    """What the mediators were told and what they saw."""

    clock: itertools.count[int] = field(default_factory=itertools.count)
    added: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (connection, payload json)
    failed_adds: int = 0
    failed_calls: int = 0
    acks_retried: int = 0  # delivered, their ack failed, not delivered again: acknowledged again at the end
    deliveries: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    acked_at: dict[str, int] = field(default_factory=dict)
    wrong_payloads: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    def add_acknowledged(self, message_id: str, connection_id: str, payload: dict[str, Any]) -> None:
        self.added[message_id] = (connection_id, orjson.dumps(payload))

    def delivered(self, messages: Sequence[dict[str, Any]]) -> list[str]:
        ids = []
        for m in messages:
            message_id = m["id"]
            self.deliveries[message_id].append(next(self.clock))
            ids.append(message_id)
            sent = self.added.get(message_id)
            if sent is None:
                # an add whose reply was an error (or never came) may still have been applied
                self.unknown.append(message_id)
            elif orjson.dumps(m["encryptedMessage"]) != sent[1]:
                self.wrong_payloads.append(message_id)
        return ids

    def acknowledged(self, message_ids: Sequence[str]) -> None:
        at = next(self.clock)
        for message_id in message_ids:
            self.acked_at.setdefault(message_id, at)

    @property
    def duplicates(self) -> int:
        return sum(
            len([t for t in times if t < self.acked_at.get(i, 1 << 62)]) - 1
            for i, times in self.deliveries.items()
            if times
        )

    def check(self, max_duplicates: int) -> str:
        """Assert the promise; returns a one-line summary for the test's output."""
        never = sorted(set(self.added) - set(self.deliveries))
        assert never == [], f"{len(never)} acknowledged adds never delivered, e.g. {never[:3]}"
        unacked = sorted(set(self.added) - set(self.acked_at))
        assert unacked == [], f"{len(unacked)} acknowledged adds delivered but never acknowledged: {unacked[:3]}"
        assert self.wrong_payloads == [], f"payloads not byte-exact: {self.wrong_payloads[:3]}"
        back = [i for i, times in self.deliveries.items() if i in self.acked_at and max(times) > self.acked_at[i]]
        assert back == [], f"{len(back)} messages delivered again after their acknowledgement: {back[:3]}"
        assert self.duplicates <= max_duplicates, f"{self.duplicates} duplicate deliveries > {max_duplicates}"
        applied = len(set(self.unknown) - set(self.added))
        return (
            f"{len(self.added)} acknowledged adds, {self.failed_adds} failed adds ({applied} applied anyway),"
            f" {self.failed_calls} failed consume calls, {self.duplicates} duplicates,"
            f" {self.acks_retried} acks retried at the end"
        )


class Mediators:
    """Producers and consumers over mediator sockets; see the module docstring.

    ``count`` connections of each kind: live (a session on the socket given to
    :meth:`attach_live`), Pickup v2 and Pickup v1 (polled by :meth:`poll`).
    """

    def __init__(self, reactor: Any, ledger: Ledger, count: int = 6, poll_s: float = 0.05) -> None:
        self.reactor = reactor
        self.ledger = ledger
        tag = uuid.uuid4().hex[:8]
        self.live = [f"live-{tag}-{i}" for i in range(count)]
        self.v2 = [f"v2-{tag}-{i}" for i in range(count)]
        self.v1 = [f"v1-{tag}-{i}" for i in range(count)]
        self.poll_s = poll_s
        self.retry_acks_after_s = 6.0  # three leases of the fault rows
        self._seq = itertools.count()
        self.running = True

    @property
    def connections(self) -> list[str]:
        return [*self.live, *self.v2, *self.v1]

    async def attach_live(self, client: RpcClient) -> None:
        """Open the live sessions on ``client`` (retried until they succeed)."""
        await client.call("rpc.on", ["messagesReceived"])
        for c in self.live:
            while not await self._try(client.call("addLiveSession", {"connectionId": c, "sessionId": "s-" + c})):
                await deferLater(self.reactor, self.poll_s, lambda: None)

    async def _try(self, call: Any) -> Any:
        """A consumer's call: its error is counted, and None returned."""
        try:
            return await call
        except AssertionError:
            raise
        except Exception:
            self.ledger.failed_calls += 1
            return None

    async def produce(self, clients: Sequence[RpcClient], total: int, in_flight: int = 4) -> None:
        """Add until ``total`` adds were acknowledged (a failed add is retried as a new message)."""
        targets = self.connections

        async def worker(w: int) -> None:
            while len(self.ledger.added) < total:
                n = next(self._seq)
                c = targets[n % len(targets)]
                payload = marked_payload(f"m{n}")
                client = clients[n % len(clients)]
                try:
                    reply = await client.call(
                        "addMessage",
                        {"connectionId": c, "recipientDids": [DID], "payload": payload},
                        timeout=CALL_TIMEOUT_S,
                    )
                except Exception:
                    self.ledger.failed_adds += 1
                    await deferLater(self.reactor, self.poll_s, lambda: None)
                    continue
                self.ledger.add_acknowledged(reply["messageId"], c, payload)

        await DeferredList([Deferred.fromCoroutine(worker(w)) for w in range(in_flight)], fireOnOneErrback=True)

    async def consume_live(self, client: RpcClient) -> None:
        """Acknowledge every ``messagesReceived`` (removeMessages) until stopped or ``client`` is
        closed (a mediator then opens a new socket and consumes there)."""
        while self.running and not client.closed.called:
            try:
                note = await client.next_notification(timeout=self.poll_s * 4)
            except Exception:
                continue
            params = note["params"]
            ids = self.ledger.delivered(params["messages"])
            reply = await self._try(
                client.call("removeMessages", {"connectionId": params["connectionId"], "messageIds": ids})
            )
            if reply is True:
                self.ledger.acknowledged(ids)

    async def poll(self, client: RpcClient, live_too: bool = False) -> None:
        """Pickup v2 (take + remove) and v1 (take with deleteMessages) rounds until stopped;
        with ``live_too`` also the live connections (what a wallet does after a reconnect); ends
        when ``client`` is closed."""
        while self.running and not client.closed.called:
            await self.poll_once(client, live_too)
            await deferLater(self.reactor, self.poll_s, lambda: None)

    async def poll_once(self, client: RpcClient, live_too: bool = False) -> None:
        for c in [*self.v2, *(self.live if live_too else [])]:
            taken = await self._try(client.call("takeFromQueue", {"connectionId": c, "limit": 10}))
            if taken:
                ids = self.ledger.delivered(taken)
                if await self._try(client.call("removeMessages", {"connectionId": c, "messageIds": ids})) is True:
                    self.ledger.acknowledged(ids)
        for c in self.v1:
            taken = await self._try(
                client.call("takeFromQueue", {"connectionId": c, "limit": 10, "deleteMessages": True})
            )
            if taken:
                self.ledger.acknowledged(self.ledger.delivered(taken))

    async def _retry_failed_acks(self, client: RpcClient) -> None:
        """Acknowledge again what was delivered but whose removeMessages failed. An ack that timed
        out may still have been applied (Redis runs a command it received before it froze), so
        the message may be gone and never delivered again; removing is idempotent, so a mediator
        that retries its ack learns which (docs/guarantees.rst)."""
        pending: defaultdict[str, list[str]] = defaultdict(list)
        for message_id in self.ledger.deliveries:
            if message_id not in self.ledger.acked_at and message_id in self.ledger.added:
                pending[self.ledger.added[message_id][0]].append(message_id)
        for connection_id, ids in pending.items():
            if await self._try(client.call("removeMessages", {"connectionId": connection_id, "messageIds": ids})):
                self.ledger.acknowledged(ids)
                self.ledger.acks_retried += len(ids)

    async def drained(self, client: RpcClient, timeout: float) -> None:
        """Every acknowledged add acknowledged, and nothing left queued (waits up to ``timeout``)."""
        deadline = self.reactor.seconds() + timeout
        # first give redelivery its chance: a delivery whose ack was lost comes again after its lease
        retry_acks_at = self.reactor.seconds() + self.retry_acks_after_s
        while True:
            if self.reactor.seconds() >= retry_acks_at:
                await self._retry_failed_acks(client)
            missing = set(self.ledger.added) - set(self.ledger.acked_at)
            if not missing:
                counts = [
                    await self._try(client.call("getAvailableMessageCount", {"connectionId": c}))
                    for c in self.connections
                ]
                if all(n == 0 for n in counts):
                    return
            assert self.reactor.seconds() < deadline, f"not drained: {len(missing)} unacknowledged, e.g. " + str(
                [(i, self.ledger.added[i][0], self.ledger.deliveries.get(i)) for i in sorted(missing)[:3]]
            )
            await deferLater(self.reactor, self.poll_s * 2, lambda: None)
