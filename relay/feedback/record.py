"""What a delivery failure or a complaint does to the suppression list, and how it is counted.

Shared by the inbound listener, ``oneclick-relay ingest`` and the pipeline (the
upstream's own refusals while relaying), so a failure is judged the same wherever
it is seen. Failures of each kind are counted in a row per address; at the
threshold (``bounces.thresholds``) the address is suppressed globally:

========== ================ ===============================================================
kind       daily counter    at the threshold
========== ================ ===============================================================
hard       hard-bounce      ``hard-bounce`` entry (``suppression.hard_bounce_days``, 180)
soft       soft-bounce      ``soft-bounce`` entry, graduated 7 → 14 → 30 → 180 days
unknown    unknown-bounce   ``soft-bounce`` entry, graduated (the cause is not known)
policy     policy-bounce    nothing by default: 5.7.x is about the sender, not the address
complaint  complaint        ``complaint`` entry: never expires, removable only with force
========== ================ ===============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import BounceThresholds
from relay.eventlog import EventLog
from relay.metrics import Metrics
from relay.model import BounceKind
from relay.suppression.report import DailyCounters
from relay.suppression.store import GLOBAL, SuppressionStore

log = EventLog(__name__)


@dataclass(frozen=True, slots=True)
class Attribution:
    """Whom a failure or complaint is about, and how we know."""

    recipient: str
    group: str = "-"
    sent: float | None = None
    """When the failed copy was relayed, if known (ends a streak a later success broke)."""
    message: str = ""
    via: str = "report"
    """``verp`` (return-path code), ``token`` (the original's unsubscribe token),
    ``report`` (an address the report states, ``bounces.accept_unsigned``), ``relay``."""


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    kind: BounceKind
    count: int
    threshold: int
    suppressed: bool

    @property
    def decision(self) -> str:
        """``suppressed``, ``counted-2of5``, or ``counted-never`` (never suppresses)."""
        if self.suppressed:
            return "suppressed"
        return f"counted-{self.count}of{self.threshold}" if self.threshold else "counted-never"


class Feedback:
    def __init__(
        self,
        store: SuppressionStore,
        thresholds: BounceThresholds,
        counters: DailyCounters,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._thresholds = thresholds
        self._counters = counters
        self._metrics = metrics

    async def failure(
        self,
        who: Attribution,
        kind: BounceKind,
        status: str,
        source: str,
        detail: str = "",
        reason: str = "",
        evidence: str = "",
        *,
        entry_source: str = "bounce",
    ) -> FailureOutcome:
        """A final delivery failure: count it; suppress at the kind's threshold.

        ``source`` is where the failure was seen (for logs and metrics), ``entry_source``
        what the suppression entry records.
        """
        count = await self._store.record_failure(who.recipient, kind, who.sent, who.message)
        threshold = self._thresholds.of(kind)
        suppressed = bool(threshold) and count >= threshold
        why = f"reason={reason} " if reason else ""
        note = (
            f"{status} {kind} {why}{count}x via={who.via} msg={who.message or '-'} {detail}"
        ).strip()
        if suppressed:
            if kind == "hard":
                await self._store.add(
                    who.recipient, GLOBAL, "hard-bounce", entry_source, detail=note
                )
            else:
                await self._store.record_soft_bounce(who.recipient, entry_source, note)
            await self._store.reset_streak(who.recipient, kind)
        self._counters.add(f"{kind}-bounce", who.group)
        self._metrics.bounces.labels(kind, source).inc()
        log.info(
            "bounce",
            rcpt=who.recipient,
            kind=kind,
            reason=reason or "-",
            status=status,
            evidence=evidence[:120] or "-",
            count=count,
            threshold=threshold or "never",
            suppressed=suppressed,
            group=who.group,
            msg=who.message or "-",
            via=who.via,
            source=source,
        )
        return FailureOutcome(kind, count, threshold, suppressed)

    async def complaint(self, who: Attribution, source: str, detail: str = "") -> bool:
        """A spam complaint: suppressed for good, at once; answers whether it was new."""
        new = await self._store.add(who.recipient, GLOBAL, "complaint", source, detail=detail)
        self._counters.add("complaint", who.group)
        self._metrics.complaints.labels(who.group).inc()
        log.info(
            "complaint",
            rcpt=who.recipient,
            group=who.group,
            new=new,
            msg=who.message or "-",
            via=who.via,
            source=source,
        )
        return new
