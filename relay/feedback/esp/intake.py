"""What an ESP event changes: the same suppressions, counters and events as DSN/ARF intake.

Each event is acted on once (the provider's event id in the store's ledger, kept
``SEEN_DAYS``); an event whose processing fails is forgotten again so that the
provider's retry is processed. Entries carry ``source=esp:<provider>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.feedback.esp.events import EspEvent
from relay.feedback.reasons import Classifier
from relay.feedback.record import Attribution, Feedback
from relay.mail.address import normalize_address
from relay.mail.tokens import TokenClaims, TokenError
from relay.metrics import Metrics
from relay.store.ledger import Ledger
from relay.suppression.report import DailyCounters
from relay.suppression.store import GLOBAL, SuppressionStore, group_scope
from relay.suppression.unsubscribe import Unsubscriber

log = EventLog(__name__)

SEEN_DAYS = 35
"""Longer than any provider retries a webhook (SendGrid 3 days, SNS up to 23 days)."""


@dataclass(frozen=True, slots=True)
class Applied:
    outcomes: Counter[str]

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())) or "none"


class EspIntake:
    def __init__(
        self,
        *,
        feedback: Feedback,
        store: SuppressionStore,
        unsubscriber: Unsubscriber,
        counters: DailyCounters,
        ledger: Ledger,
        metrics: Metrics,
        classifier: Classifier | None = None,
    ) -> None:
        """``classifier``: the reason table, so that a provider's "permanent" bounce that
        says ``550 5.7.1 … blocked`` counts as policy, as the same words in a DSN do."""
        self._classifier = classifier
        self._feedback = feedback
        self._store = store
        self._unsubscriber = unsubscriber
        self._counters = counters
        self._ledger = ledger
        self._metrics = metrics

    async def first_use(self, namespace: str, item: str, ttl: float) -> bool:
        """A single-use value (a Mailgun token) seen for the first time within ``ttl``."""
        return await self._ledger.first(namespace, item, ttl)

    async def apply(self, events: Iterable[EspEvent]) -> Applied:
        """Act on each event once; raises ``StoreUnavailable`` so the provider retries."""
        outcomes: Counter[str] = Counter()
        for event in events:
            namespace = f"esp:{event.provider}"
            if not await self._ledger.first(namespace, event.event_id, SEEN_DAYS * 86400):
                outcomes["duplicate"] += 1
                continue
            try:
                outcome = await self._one(event)
            except Exception:  # Redis went away, or a bug: the provider's retry is processed
                try:
                    await self._ledger.forget(namespace, event.event_id)
                except StoreUnavailable:
                    log.warning(
                        "esp event not forgotten",
                        id=event.event_id[:80],
                        effect="a retry counts as duplicate",
                    )
                raise
            outcomes[outcome] += 1
            self._metrics.esp_events.labels(event.provider, event.meaning, outcome).inc()
        return Applied(outcomes)

    def _claims(self, event: EspEvent, recipient: str) -> TokenClaims | None:
        if event.token is None:
            return None
        try:
            claims = self._unsubscriber.inspect(event.token)
        except TokenError:
            return None
        return claims if claims.recipient == recipient else None

    async def _one(self, event: EspEvent) -> str:
        recipient = normalize_address(event.recipient)
        if "@" not in recipient:
            return "no-recipient"
        source = f"esp:{event.provider}"
        claims = self._claims(event, recipient)
        group = event.group or (claims.group if claims else None)
        who = Attribution(recipient, group or "-", claims.issued if claims else None, "", "esp")
        detail = event.detail[:300]
        if event.meaning in ("hard", "soft", "unknown", "policy"):
            kind, reason, evidence = event.meaning, "", f"provider {event.provider}"
            if self._classifier is not None and event.meaning != "policy":
                why = self._classifier.classify(event.status, event.detail)
                if why.specific:  # the words or a specific code say more than the provider
                    kind, reason, evidence = why.kind, why.reason, why.evidence
            await self._feedback.failure(
                who,
                kind,
                event.status or "-",
                source,
                detail,
                reason,
                evidence,
                entry_source=source,
            )
        elif event.meaning == "suppressed":
            # the provider will not send to it again: suppress at once, whatever the threshold
            await self._store.add(recipient, GLOBAL, "hard-bounce", source, detail=detail)
            self._counters.add("hard-bounce", group)
        elif event.meaning == "complaint":
            await self._feedback.complaint(who, source, detail)
        else:  # unsubscribe: the mapped group, else every marketing group (never too few)
            scope = group_scope(group) if group else GLOBAL
            new = await self._store.add(recipient, scope, "unsubscribe", source, detail=detail)
            self._metrics.unsubscribes.labels(group or "*", source).inc()
            if new:
                self._counters.add("unsubscribe", group)
        log.info(
            "esp event",
            provider=event.provider,
            id=event.event_id[:80],
            meaning=event.meaning,
            rcpt=recipient,
            group=group or "-",
            status=event.status or "-",
        )
        return "processed"
