"""What one inbound message means and what it changes: bounces, complaints, mailto requests.

Two doors, one path (``Intake.process``):

* the listener (``bounces.listen``, SMTP or LMTP) in the relay's event loop. It
  takes mail only for the relay's own addresses — the return path (``bounces@`` and
  every ``bounces+…@`` at ``bounces.return_path_domain``), ``bounces.feedback_addresses``,
  the mailto address (``unsubscribe@`` and ``unsubscribe+…@`` at
  ``unsubscribe.mailto_domain``) and the groups' own mailto addresses. Any other
  recipient gets ``550 5.7.1``: it is never a relay.
* ``oneclick-relay ingest < message`` for an MTA that pipes mail to a command.

Each message is kept once, under its Message-ID, in the store's inbound log
(``relay.store.inbound``). Its id is the first 16 bytes of SHA-256 of the Message-ID
(of the whole message when it has none), hex. The same DSN delivered twice is
processed and counted once; a message that could not be processed (Redis went away)
is forgotten again so that the sender's retry is processed.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Literal

from relay.config import Config
from relay.errors import StoreUnavailable
from relay.eventlog import EventLog
from relay.feedback.bounces import (
    Classification,
    Classifier,
    Inbound,
    RecipientReport,
    Verdict,
    parse,
    token_in_subject,
)
from relay.feedback.record import Attribution, Feedback
from relay.mail.address import normalize_address
from relay.mail.mailto import code_in
from relay.mail.tokens import TokenClaims, TokenError
from relay.mail.verp import ForgedCode, Verp, VerpClaims, VerpRef
from relay.metrics import Metrics
from relay.store.inbound import InboundLog
from relay.suppression.store import SuppressionStore
from relay.suppression.unsubscribe import Unsubscriber

log = EventLog(__name__)

Role = Literal["bounce", "unsubscribe"]

_TOKEN_LOCAL = re.compile(r"^[^+@]+\+([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})@")
MAX_TOKENS = 16
"""Unsubscribe tokens read from one bounce's text (each costs a decryption)."""
_CFBL_FEEDBACK_ID = re.compile(
    r"^CFBL-Feedback-ID:[ \t]*([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,1024})(?![\w.-])",
    re.IGNORECASE | re.MULTILINE,
)
COMPLAINT_TYPES = frozenset({"abuse", "fraud"})
"""ARF Feedback-Types that are a person's complaint; not-spam, virus, auth-failure are not."""


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    kind: str
    """What the message was: dsn, bounce, complaint, auto-reply, unrecognised, mailto."""
    outcome: str
    """processed, duplicate, ignored, unattributed, forged, invalid-token, no-token."""
    detail: str = ""


class Addresses:
    """Which addresses the listener takes mail for, and what each is for."""

    def __init__(self, config: Config, verp: Verp | None) -> None:
        self._verp = verp
        feedback = list(config.bounces.feedback_addresses)
        if config.compliance.cfbl_address:  # RFC 9477 reports come back to it
            feedback.append(config.compliance.cfbl_address)
        self._feedback = {normalize_address(a) for a in feedback}
        unsub = [config.unsubscribe.mailto_address]
        unsub += [g.mailto for g in config.policy.groups.values()]
        self._unsubscribe = {normalize_address(a) for a in unsub if a}

    def role(self, address: str) -> Role | None:
        normalized = normalize_address(address)
        local, _, domain = normalized.rpartition("@")
        plain = f"{local.split('+', 1)[0]}@{domain}"
        coded = f"{local.rsplit('+', 1)[0]}@{domain}"
        if {normalized, plain, coded} & self._unsubscribe:
            return "unsubscribe"
        if normalized in self._feedback or (self._verp is not None and self._verp.is_own(address)):
            return "bounce"
        return None

    def __bool__(self) -> bool:
        return bool(self._feedback or self._unsubscribe or self._verp)


class Intake:
    """What one inbound message means, and what it changes (shared by listener and ingest)."""

    def __init__(
        self,
        *,
        config: Config,
        records: InboundLog,
        store: SuppressionStore,
        unsubscriber: Unsubscriber,
        feedback: Feedback,
        verp: Verp | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bounces = config.bounces
        self._records = records
        self._store = store
        self._unsubscriber = unsubscriber
        self._feedback = feedback
        self._verp = verp
        self._metrics = metrics
        self._clock = clock
        self._classifier = Classifier.from_config(config.bounces)
        self.addresses = Addresses(config, verp)
        self._token_url = re.compile(
            re.escape(config.http.public_url) + r"/u/([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})"
        )

    async def process(self, data: bytes, recipients: Sequence[str], source: str) -> Result:
        """Read, remember (once), act. Raises ``StoreUnavailable`` so the sender retries."""
        report, quoted = await asyncio.to_thread(self._read, data)
        inbound_id = hashlib.sha256(
            report.message_id.encode("utf-8", "replace") if report.message_id else data
        ).hexdigest()[:32]
        role = self._role(recipients, report)
        kind = "mailto" if role == "unsubscribe" else report.kind
        digest = data[: self._bounces.digest_bytes]
        try:
            remembered = await self._remember(inbound_id, digest, source, report.message_id)
        except StoreUnavailable:
            if role != "unsubscribe":
                raise
            # Redis is down: the unsubscriber keeps the request in the local journal
            # (or raises StoreUnavailable, so the sender retries); a duplicate is harmless
            remembered = None
        if remembered is None:
            result = await self._mailto(inbound_id, report, recipients)
        elif not remembered:
            result = Result(inbound_id, kind, "duplicate")
        else:
            try:
                if role == "unsubscribe":
                    result = await self._mailto(inbound_id, report, recipients)
                else:
                    result = await self._bounce(inbound_id, report, recipients, quoted)
            except Exception:  # Redis went away, or a bug: the sender's retry is processed
                await self._forget(inbound_id)
                raise
            await self._note_outcome(inbound_id, result)
            await self._keep_copy(inbound_id, data, result)
        self._metrics.inbound.labels(result.kind, result.outcome).inc()
        log.info(
            "inbound",
            id=result.id,
            source=source,
            kind=result.kind,
            detector=report.detector or None,
            outcome=result.outcome,
            **{"from": report.sender or None},
            msgid=report.message_id[:200] or None,
            detail=result.detail or None,
        )
        return result

    def _read(self, data: bytes) -> tuple[Inbound, list[VerpRef]]:
        """Parse and search the text in a worker thread: nothing scans a bounce on the loop.

        The return paths (``Verp.find``, bounded) and at most ``MAX_TOKENS``
        unsubscribe tokens quoted in the text are collected here, once: those of
        ``CFBL-Feedback-ID`` fields first (they survive a report that redacts addresses
        and URLs), then those of unsubscribe URLs.
        """
        report = parse(data)
        quoted = self._verp.find(report.text) if self._verp is not None else []
        cfbl = (m.group(1) for m in _CFBL_FEEDBACK_ID.finditer(report.text))
        urls = (m.group(1) for m in self._token_url.finditer(report.text))
        tokens = [*islice(cfbl, MAX_TOKENS), *islice(urls, MAX_TOKENS)][:MAX_TOKENS]
        return replace(report, text="", tokens=tuple(dict.fromkeys(tokens))), quoted

    def explain(self, block: RecipientReport) -> Classification:
        """The reason of one recipient's failure and the field or phrase that decided."""
        return self._classifier.classify(block.status, block.diagnostic, final=block.final)

    def _is_own(self, block: RecipientReport) -> bool:
        """A report naming one of our own addresses as the failed recipient is not believed."""
        return any(
            self.addresses.role(a) is not None for a in (block.recipient, block.original) if a
        )

    def _role(self, recipients: Sequence[str], report: Inbound) -> Role:
        """By the envelope; for a piped message without one, by where it says it went."""
        roles = [self.addresses.role(r) for r in (*recipients, *report.addressed_to)]
        if "unsubscribe" in roles[: len(recipients)] or (
            not recipients and "unsubscribe" in roles and "bounce" not in roles
        ):
            return "unsubscribe"
        return "bounce"

    # -- storage ---------------------------------------------------------------

    async def _remember(self, inbound_id: str, data: bytes, source: str, message_id: str) -> bool:
        keep = max(1, int(self._bounces.keep_days * 86400))
        return await self._records.remember(
            inbound_id, data, self._clock(), source, message_id, keep
        )

    async def _keep_copy(self, inbound_id: str, data: bytes, result: Result) -> None:
        """The full copy for the audit log only for what was acted on, within the budget."""
        kept = "digest"
        if result.outcome == "processed" and len(data) > self._bounces.digest_bytes:
            keep = max(1, int(self._bounces.keep_days * 86400))
            try:
                full = await self._records.keep_full(
                    inbound_id, data, self._clock(), keep, self._bounces.audit_max_bytes
                )
            except StoreUnavailable as exc:
                log.warning("inbound audit copy not stored", id=inbound_id, error=str(exc))
                return
            kept = "full" if full else "over-budget"
            if not full:
                log.warning("inbound audit copy not kept", id=inbound_id, reason="audit_max_bytes")
        elif result.outcome == "processed":
            kept = "full"
        self._metrics.inbound_audit.labels(kept).inc()

    async def _forget(self, inbound_id: str) -> None:
        try:
            await self._records.forget(inbound_id)
        except StoreUnavailable:
            log.warning(
                "inbound not forgotten", id=inbound_id, effect="a retry counts as duplicate"
            )

    async def _note_outcome(self, inbound_id: str, result: Result) -> None:
        try:
            await self._records.note_outcome(
                inbound_id, result.kind, f"{result.outcome} {result.detail}"
            )
        except StoreUnavailable as exc:
            log.warning("inbound outcome not stored", id=inbound_id, error=exc)

    # -- mailto unsubscribe ----------------------------------------------------

    async def _mailto(self, inbound_id: str, report: Inbound, recipients: Sequence[str]) -> Result:
        """By the code in the address (any Subject, body, From or Auto-Submitted), else a token.

        Apple Mail's request has an empty Subject, a stock body and ``Auto-Submitted:
        auto-replied``: the address it was sent to is all there is to go by.
        """
        addresses = (*recipients, *report.addressed_to)
        code = next((c for a in addresses if (c := code_in(a)) is not None), None)
        token = token_in_subject(report.subject)
        for address in addresses:
            m = _TOKEN_LOCAL.match(address)
            if token is None and m is not None:
                token = m.group(1)
        if code is None and token is None:
            return Result(inbound_id, "mailto", "no-token")
        via = "code" if code is not None else "token"
        try:
            if code is not None:
                done = await self._unsubscriber.unsubscribe_code(code, "mailto")
            else:
                assert token is not None
                done = await self._unsubscriber.unsubscribe(token, "mailto")
        except TokenError as exc:
            if token is None or code is None:
                return Result(inbound_id, "mailto", "invalid-token", f"error={exc}")
            try:  # a code that expired, beside a token in the Subject that did not
                done = await self._unsubscriber.unsubscribe(token, "mailto")
                via = "token"
            except TokenError:
                return Result(inbound_id, "mailto", "invalid-token", f"error={exc}")
        claims = done.claims
        return Result(
            inbound_id,
            "mailto",
            "journaled" if done.journaled else "processed",
            f"rcpt={claims.recipient} group={claims.group} via={via}",
        )

    # -- bounces and complaints ------------------------------------------------

    async def _bounce(
        self,
        inbound_id: str,
        report: Inbound,
        recipients: Sequence[str],
        quoted: list[VerpRef],
    ) -> Result:
        if report.kind in ("auto-reply", "unrecognised"):
            return Result(inbound_id, report.kind, "ignored")
        blocks = tuple(r for r in report.recipients if not self._is_own(r))
        stated = [a for r in blocks for a in (r.recipient, r.original) if a]
        if report.complaint is not None:
            stated += list(report.complaint.original_rcpt_to)
            stated += [a for a in report.complaint.original_to if self.addresses.role(a) is None]
        try:
            claims = self._verp_claims(recipients, quoted, stated)
        except ForgedCode as exc:
            log.warning("inbound forged return path", id=inbound_id, error=exc)
            return Result(inbound_id, report.kind, "forged", f"error={exc}")
        token = self._token_claims(report) if claims is None else None
        if report.complaint is not None:
            return await self._complaint(inbound_id, report, claims, token)
        done: list[str] = []
        for who, block, verdict in self._attribute(blocks, claims, token):
            why = self.explain(block)
            if verdict == "success":
                await self._store.end_streak(who.recipient)
                decision = "success"
            elif verdict == "delayed":
                self._metrics.deferrals.labels(why.kind).inc()
                decision = "delayed"
            else:
                detail = f"mta={block.remote_mta or '-'}"
                counted = await self._feedback.failure(
                    who, verdict, block.status, report.kind, detail, why.reason, why.evidence
                )
                decision = counted.decision
            done.append(f"{who.recipient}:{verdict}:{block.status}:{why.reason}:{decision}")
        if not done:
            outcome = "forged" if self._verp_refs(recipients, quoted) else "unattributed"
            return Result(inbound_id, report.kind, outcome)
        return Result(inbound_id, report.kind, "processed", " ".join(done))

    async def _complaint(
        self,
        inbound_id: str,
        report: Inbound,
        claims: VerpClaims | None,
        token: TokenClaims | None,
    ) -> Result:
        assert report.complaint is not None
        complaint = report.complaint
        if complaint.feedback_type not in COMPLAINT_TYPES:  # e.g. DMARC's auth-failure
            return Result(inbound_id, "complaint", "ignored", f"type={complaint.feedback_type}")
        if claims is not None:
            people = [
                Attribution(claims.recipient, claims.group, claims.sent, claims.message, "verp")
            ]
        elif token is not None:
            people = [Attribution(token.recipient, token.group, token.issued, "", "token")]
        elif self._bounces.accept_unsigned:
            stated = complaint.original_rcpt_to or tuple(
                a for a in complaint.original_to if self.addresses.role(a) is None
            )
            people = [Attribution(normalize_address(a), via="report") for a in stated[:1]]
        else:
            people = []
        if not people:
            return Result(inbound_id, "complaint", "unattributed")
        detail = f"type={complaint.feedback_type} ua={complaint.user_agent[:60]!r}"
        for who in people:
            await self._feedback.complaint(who, "arf", detail)
        names = " ".join(f"{w.recipient}:{w.via}" for w in people)
        return Result(inbound_id, "complaint", "processed", names)

    def _verp_refs(self, recipients: Sequence[str], quoted: list[VerpRef]) -> list[VerpRef]:
        if self._verp is None:
            return []
        verp = self._verp
        envelope = [ref for r in recipients if (ref := verp.parse(r)) is not None]
        return envelope or quoted

    def _verp_claims(
        self, recipients: Sequence[str], quoted: list[VerpRef], stated: list[str]
    ) -> VerpClaims | None:
        """From the envelope recipient (must verify), else any return path the text quotes."""
        if self._verp is None:
            return None
        for address in recipients:
            ref = self._verp.parse(address)
            if ref is not None:
                return self._verp.verify(ref, stated)
        for ref in quoted:
            try:
                return self._verp.verify(ref, stated)
            except ForgedCode:
                continue
        return None

    def _token_claims(self, report: Inbound) -> TokenClaims | None:
        """The recipient and group of the token in the returned original: its
        ``CFBL-Feedback-ID``, else its unsubscribe URL (collected by ``_read``)."""
        for token in report.tokens:
            try:
                return self._unsubscriber.inspect(token)
            except TokenError:
                continue
        return None

    def _attribute(
        self,
        blocks: tuple[RecipientReport, ...],
        claims: VerpClaims | None,
        token: TokenClaims | None,
    ) -> list[tuple[Attribution, RecipientReport, Verdict]]:
        """One (whom, block, verdict) per recipient; a final failure outranks the rest."""
        rank = {"success": 1, "delayed": 0}
        chosen: dict[str, tuple[Attribution, RecipientReport, Verdict]] = {}
        for block in blocks:
            verdict = self._verdict(block)
            who = self._whom(block, claims, token, len(blocks))
            if who is None:
                continue
            old = chosen.get(who.recipient)
            if old is None or rank.get(verdict, 2) > rank.get(old[2], 2):
                chosen[who.recipient] = (who, block, verdict)
        return list(chosen.values())

    def _verdict(self, block: RecipientReport) -> Verdict:
        """A block's meaning: a success, a delay, or a final failure of some kind."""
        if block.action in ("delivered", "relayed", "expanded") or block.status.startswith("2."):
            return "success"
        if block.action == "delayed":
            return "delayed"
        return self.explain(block).kind

    def _whom(
        self,
        block: RecipientReport,
        claims: VerpClaims | None,
        token: TokenClaims | None,
        blocks: int,
    ) -> Attribution | None:
        if claims is not None:
            return Attribution(claims.recipient, claims.group, claims.sent, claims.message, "verp")
        named = {normalize_address(a) for a in (block.recipient, block.original) if a}
        if token is not None and (blocks == 1 or token.recipient in named):
            return Attribution(token.recipient, token.group, token.issued, "", "token")
        if self._bounces.accept_unsigned:
            return Attribution(normalize_address(block.original or block.recipient))
        return None
