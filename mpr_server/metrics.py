"""The server's Prometheus metrics (``prometheus_client``), one registry per server.

Every family exists from start-up, and every labelled family has its known label values
initialised to zero, so that dashboards and alerts see a series before its first event. Label
values come from small fixed sets (method names of the table, outcomes, providers, store
operations); never a connection id, socket id or token.

Hot-path code gets its label children bound once (``CallMetrics``, ``StoreMetrics``) rather than
looking labels up per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Outcomes of a JSON-RPC call: ``invalid`` = bad params, ``full`` = queue cap reached,
#: ``timeout`` = the store did not answer within CALL_TIMEOUT_MS, ``error`` = any other failure.
CALL_OUTCOMES = ("ok", "invalid", "full", "timeout", "error")
#: What made a message be handed to a live session again (a redelivery).
REDELIVERY_CAUSES = ("lease_expired", "socket_closed", "session_changed", "socket_returned")
STORE_OPERATIONS = (
    "add",
    "take",
    "count",
    "remove",
    "remove_all",
    "add_session",
    "remove_session",
    "has_session",
    "release_expired",
    "release_socket",
    "expire",
    "attach_socket",
    "ping",
)
PROVIDERS = ("fcm", "apns")

# Seconds; calls are answered in well under a millisecond to CALL_TIMEOUT_MS (1.5 s by default).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CallMetrics:
    """Counters and latency of one JSON-RPC method, bound once."""

    __slots__ = ("outcomes", "seconds")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.outcomes = {o: metrics.calls.labels(method, o) for o in CALL_OUTCOMES}
        self.seconds = metrics.call_seconds.labels(method)


class StoreMetrics:
    """Latency and errors of one store operation, bound once."""

    __slots__ = ("errors", "seconds")

    def __init__(self, metrics: Metrics, store: str, operation: str) -> None:
        self.seconds = metrics.store_seconds.labels(store, operation)
        self.errors = metrics.store_errors.labels(store, operation)


class _PushCollector(Collector):
    """``mpr_push_sends_total`` read at scrape time from the push service's own counts."""

    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]], outcomes: Iterable[str]) -> None:
        self._read = read
        self._outcomes = tuple(outcomes)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("mpr_push_sends", PUSH_HELP, labels=("provider", "outcome"))]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("mpr_push_sends", PUSH_HELP, labels=("provider", "outcome"))
        counts = dict(self._read())
        keys = {(p, o) for p in PROVIDERS for o in self._outcomes} | set(counts)
        for provider, outcome in sorted(keys):
            family.add_metric((provider, outcome), counts.get((provider, outcome), 0))
        yield family


class _ImportCollector(Collector):
    """``mpr_original_import_total``: what the import of an original deployment found and did, as
    its report says (whichever instance ran it), read at scrape time; zeros until there is one."""

    OUTCOMES = (("found", "found"), ("imported", "imported"), ("duplicate", "duplicates"), ("unreadable", "unreadable"))

    def __init__(self, read: Callable[[], Mapping[str, object] | None]) -> None:
        self._read = read

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "mpr_original_import",
            "Entries an original MPR deployment left behind, by outcome of their import (found, imported,"
            " duplicate, unreadable)",
            labels=("outcome",),
        )

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        report = self._read() or {}
        for outcome, field in self.OUTCOMES:
            value = report.get(field, 0)
            family.add_metric((outcome,), value if isinstance(value, int | float) else 0)
        yield family


PUSH_HELP = (
    "Pushes by provider and final outcome (sent, invalid_token, failed, throttled, disabled, dropped,"
    " skipped, cancelled); retry counts extra attempts"
)


class Metrics:
    """The registry of one server and its families."""

    def __init__(self, store: str = "embedded") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)

        self.calls = Counter("mpr_calls", "JSON-RPC calls by method and outcome", ("method", "outcome"), registry=r)
        self.call_seconds = Histogram(
            "mpr_call_duration_seconds",
            "Time from request to reply of JSON-RPC calls, by method",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.open_sockets = Gauge("mpr_open_sockets", "Open mediator WebSocket connections", registry=r)
        self.live_sessions = Gauge(
            "mpr_live_sessions",
            "Live sessions held by the sockets of this instance (as this instance knows them)",
            registry=r,
        )
        self.messages_added = Counter("mpr_messages_added", "Messages stored by addMessage", registry=r)
        self.messages_delivered = Counter(
            "mpr_messages_delivered",
            "Messages handed to mediators: taken by takeFromQueue, or notified to a live session",
            ("via",),
            registry=r,
        )
        self.messages_acknowledged = Counter(
            "mpr_messages_acknowledged", "Message ids acknowledged by removeMessages", registry=r
        )
        self.messages_expired = Counter(
            "mpr_messages_expired", "Messages deleted unacknowledged after MESSAGE_TTL_MS", registry=r
        )
        self.messages_redelivered = Counter(
            "mpr_messages_redelivered",
            "Messages whose lease was released and that were leased again to a live session, by cause",
            ("cause",),
            registry=r,
        )
        self.notifications_sent = Counter(
            "mpr_notifications_sent",
            "messagesReceived notifications sent to a socket of this instance (local) or published to the"
            " instance holding the socket (remote)",
            ("to",),
            registry=r,
        )
        self.notifications_dropped = Counter(
            "mpr_notifications_dropped",
            "Notifications not sent (the socket is gone, or the publish failed); the lease ends and the"
            " messages are redelivered",
            ("reason",),
            registry=r,
        )
        self.store_seconds = Histogram(
            "mpr_store_duration_seconds",
            "Round-trip time of store operations, by store and operation",
            ("store", "operation"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "mpr_store_errors",
            "Store operations that failed (store unavailable or not answering), by store and operation",
            ("store", "operation"),
            registry=r,
        )
        self.persister_moved = Counter(
            "mpr_persister_moved_messages", "Message payloads moved from Redis to MongoDB by this instance", registry=r
        )
        self.persister_lag = Gauge(
            "mpr_persister_lag_seconds",
            "Age beyond THRESHOLD_TIMESTAMP of the oldest message waiting to move to MongoDB (0: none waiting)",
            registry=r,
        )
        self.persister_errors = Counter("mpr_persister_errors", "Persister ticks that failed", registry=r)
        self.oldest_message_age = Gauge(
            "mpr_oldest_message_age_seconds",
            "Age of the oldest queued message (redis store: of those whose payload is still in Redis)",
            registry=r,
        )
        self.method_metrics: dict[str, CallMetrics] = {}
        self.store_ops = {op: StoreMetrics(self, store, op) for op in STORE_OPERATIONS}
        for via in ("taken", "notified"):
            self.messages_delivered.labels(via)
        for cause in REDELIVERY_CAUSES:
            self.messages_redelivered.labels(cause)
        self.sent_local = self.notifications_sent.labels("local")
        self.sent_remote = self.notifications_sent.labels("remote")
        self.dropped_no_socket = self.notifications_dropped.labels("no_socket")
        self.dropped_publish = self.notifications_dropped.labels("publish_failed")

    def for_method(self, method: str) -> CallMetrics:
        bound = self.method_metrics.get(method)
        if bound is None:
            bound = self.method_metrics[method] = CallMetrics(self, method)
        return bound

    def count_pushes(self, read: Callable[[], Mapping[tuple[str, str], int]], outcomes: Iterable[str]) -> None:
        self.registry.register(_PushCollector(read, outcomes))

    def count_import(self, read: Callable[[], Mapping[str, object] | None]) -> None:
        self.registry.register(_ImportCollector(read))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text (OpenMetrics if ``accept`` asks for it) and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
