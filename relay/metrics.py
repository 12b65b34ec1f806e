"""Prometheus metrics, in a registry owned by the app (no module-level state).

With ``smtp.workers`` > 1 the supervising process sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts; each worker then writes its values to files there and
``/metrics``, whichever worker answers it, reports the sum over all workers.
"""

from __future__ import annotations

import math
import os
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RecentDurations:
    """The last ``size`` durations, for exact percentiles on the admin dashboard.

    A Prometheus histogram only knows its buckets; a person looking at the page wants
    "p99 = 14 ms" for recent requests. Per process, like every in-memory value.
    """

    def __init__(self, size: int = 1000) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> list[float]:
        return list(self._values)

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (``q`` in 0..100); None before the first value."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            "oneclick_messages",
            "Messages received over SMTP, by class and outcome.",
            ["message_class", "outcome"],
            registry=r,
        )
        self.recipients = Counter(
            "oneclick_recipients",
            "Recipients handled, by class and outcome (delivered, queued, refused, suppressed).",
            ["message_class", "outcome"],
            registry=r,
        )
        self.dropped = Counter(
            "oneclick_recipients_suppressed",
            "Recipients dropped by the suppression list, by reason.",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "oneclick_rejected",
            "SMTP commands or messages refused, by reply code and enhanced status.",
            ["code", "enhanced"],
            registry=r,
        )
        self.esp_events = Counter(
            "oneclick_esp_events",
            "ESP webhook events, by provider, meaning and outcome (processed, duplicate).",
            ["provider", "meaning", "outcome"],
            registry=r,
        )
        self.esp_requests = Counter(
            "oneclick_esp_requests",
            "ESP webhook requests, by provider and outcome (accepted, unauthenticated, ...).",
            ["provider", "outcome"],
            registry=r,
        )
        self.upstream_replies = Counter(
            "oneclick_upstream_replies",
            "Replies from the upstream MTA per recipient, by code class.",
            ["code_class"],
            registry=r,
        )
        self.unsigned = Counter(
            "oneclick_unsigned_messages",
            "Messages relayed without a DKIM signature (no key for the From domain).",
            ["message_class"],
            registry=r,
        )
        self.redis_errors = Counter(
            "oneclick_redis_errors",
            "Redis calls on the send path that failed, by what was done (tempfail, deliver,"
            " mailto-without-code).",
            ["action"],
            registry=r,
        )
        self.body_links = Counter(
            "oneclick_body_links",
            "Marketing messages by where each recipient's unsubscribe URL went in the body"
            " (placeholder, footer, none).",
            ["outcome"],
            registry=r,
        )
        self.compliance = Counter(
            "oneclick_compliance_findings",
            "Marketing messages that miss something mailbox providers ask for, by finding"
            " (no-body-link: neither the placeholder nor an https link in the body).",
            ["finding"],
            registry=r,
        )
        self.unsubscribes = Counter(
            "oneclick_unsubscribes",
            "Unsubscribe requests honoured, by group and channel.",
            ["group", "channel"],
            registry=r,
        )
        self.unsubscribe_seconds = Histogram(
            "oneclick_unsubscribe_seconds",
            "From an unsubscribe request reaching its handler to the suppression being written.",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.unsubscribe_recent = RecentDurations()
        self.journal = Counter(
            "oneclick_unsubscribe_journal",
            "Unsubscribe requests kept in the local journal while Redis was unreachable"
            " (written), replayed into Redis (replayed), or lost to an unwritable journal"
            " (write-failed: answered 503).",
            ["event"],
            registry=r,
        )
        self.inbound = Counter(
            "oneclick_inbound_messages",
            "Messages to the bounce and unsubscribe addresses (listener or ingest),"
            " by what they were and what was done.",
            ["kind", "outcome"],
            registry=r,
        )
        self.bounces = Counter(
            "oneclick_bounces",
            "Final delivery failures counted, by kind and where they were seen.",
            ["kind", "source"],
            registry=r,
        )
        self.deferrals = Counter(
            "oneclick_upstream_deferrals",
            "Temporary refusals of recipients by the upstream, classified (not failures yet).",
            ["kind"],
            registry=r,
        )
        self.complaints = Counter(
            "oneclick_complaints",
            "Spam complaints (ARF feedback reports) attributed, by group.",
            ["group"],
            registry=r,
        )
        self.http_rejected = Counter(
            "oneclick_http_rejected",
            "HTTP unsubscribe requests refused, by status.",
            ["status"],
            registry=r,
        )
        self.retry = Counter(
            "oneclick_retry_queue_events",
            "Retry queue events (queued, delivered, deferred, expired, refused).",
            ["event"],
            registry=r,
        )
        self.event_deliveries = Counter(
            "oneclick_event_deliveries",
            "Suppression events handed to the application (webhook, notify-mail) or deferred.",
            ["consumer", "outcome"],
            registry=r,
        )
        self.retry_length = Gauge(
            "oneclick_retry_queue_length",
            "Messages waiting in the retry queue.",
            registry=r,
            multiprocess_mode="max",
        )
        self.stage = Histogram(
            "oneclick_stage_seconds",
            "Time spent per pipeline stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )

        self.loop_lag = Histogram(
            "oneclick_event_loop_lag_seconds",
            "How late the event loop ran a timer (a stalled loop delays every client).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "oneclick_event_loop_lag_max_seconds",
            "Worst event-loop lag seen since the process started.",
            registry=r,
            multiprocess_mode="max",
        )
        self.connections_refused = Counter(
            "oneclick_connections_refused",
            "Connections refused at once by a cap (listener: smtp, http, inbound; cap:"
            " listener, client, network, rate).",
            ["listener", "cap"],
            registry=r,
        )
        self.auth_failures = Counter(
            "oneclick_auth_failures",
            "Failed SMTP AUTH attempts (outcome: failed; disconnected after too many).",
            ["outcome"],
            registry=r,
        )
        self.inbound_audit = Counter(
            "oneclick_inbound_audit",
            "Inbound messages by what the audit log kept (full, digest, over-budget).",
            ["kept"],
            registry=r,
        )

    def observe_unsubscribe(self, seconds: float) -> None:
        """Time from click to suppression: the histogram and the dashboard's recent ring."""
        self.unsubscribe_seconds.observe(seconds)
        self.unsubscribe_recent.add(seconds)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
