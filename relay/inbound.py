"""Mail that comes back: bounces, complaints and mailto unsubscribes, by SMTP/LMTP or a pipe.

Two doors, one path (``Intake.process``):

* the listener (``bounces.listen``, SMTP or LMTP) in the relay's event loop. It
  takes mail only for the relay's own addresses — the return path (``bounces@`` and
  every ``bounces+…@`` at ``bounces.return_path_domain``), ``bounces.feedback_addresses``,
  the mailto address (``unsubscribe@`` and ``unsubscribe+…@`` at
  ``unsubscribe.mailto_domain``) and the groups' own mailto addresses. Any other
  recipient gets ``550 5.7.1``: it is never a relay.
* ``oneclick-relay ingest < message`` for an MTA that pipes mail to a command.

Each message is kept once, under its Message-ID::

    {prefix}:inbound:{<id>}   HASH  data, received, source, message_id, outcome
                                    (expires after bounces.keep_days)
    {prefix}:inbound          ZSET  <id> → received time: the audit index

``<id>`` is the first 16 bytes of SHA-256 of the Message-ID (of the whole message
when it has none), hex. The hash is written only if absent, so the same DSN
delivered twice is processed and counted once; a message that could not be
processed (Redis went away) is forgotten again so that the retry is processed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session
from redis.exceptions import RedisError

from relay.bounces import Classifier, Inbound, RecipientReport, Verdict, parse, token_in_subject
from relay.config import BouncesConfig, Config
from relay.errors import StoreUnavailable
from relay.feedback import Attribution, Feedback
from relay.metrics import Metrics
from relay.model import normalize_address
from relay.redis_client import RedisClient
from relay.smtp import ShieldedTransactions, with_enhanced_code
from relay.suppression import SuppressionStore
from relay.tokens import TokenClaims, TokenError
from relay.unsubscribe import Unsubscriber
from relay.verp import ForgedCode, Verp, VerpClaims, VerpRef

log = logging.getLogger(__name__)

Role = Literal["bounce", "unsubscribe"]

_REMEMBER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'received', ARGV[2], 'source', ARGV[3],
           'message_id', ARGV[4], 'outcome', 'processing')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_TOKEN_LOCAL = re.compile(r"^[^+@]+\+([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})@")
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
        self._feedback = {normalize_address(a) for a in config.bounces.feedback_addresses}
        unsub = [config.unsubscribe.mailto_address]
        unsub += [g.mailto for g in config.policy.groups.values()]
        self._unsubscribe = {normalize_address(a) for a in unsub if a}

    def role(self, address: str) -> Role | None:
        normalized = normalize_address(address)
        local, _, domain = normalized.rpartition("@")
        plain = f"{local.split('+', 1)[0]}@{domain}"
        if normalized in self._unsubscribe or plain in self._unsubscribe:
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
        redis: RedisClient,
        store: SuppressionStore,
        unsubscriber: Unsubscriber,
        feedback: Feedback,
        verp: Verp | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bounces = config.bounces
        self._prefix = config.redis.key_prefix
        self._redis = redis
        self._store = store
        self._unsubscriber = unsubscriber
        self._feedback = feedback
        self._verp = verp
        self._metrics = metrics
        self._clock = clock
        self._classifier = Classifier(config.bounces.classify)
        self.addresses = Addresses(config, verp)
        self._remember_script = redis.register_script(_REMEMBER)
        self._token_url = re.compile(
            re.escape(config.http.public_url) + r"/u/([A-Za-z0-9_-]{1,16}\.[A-Za-z0-9_-]{16,})"
        )

    def key(self, inbound_id: str) -> str:
        return f"{self._prefix}:inbound:{{{inbound_id}}}"

    @property
    def index_key(self) -> str:
        return f"{self._prefix}:inbound"

    async def process(self, data: bytes, recipients: Sequence[str], source: str) -> Result:
        """Read, remember (once), act. Raises ``StoreUnavailable`` so the sender retries."""
        report = await asyncio.to_thread(parse, data)
        inbound_id = hashlib.sha256(
            report.message_id.encode("utf-8", "replace") if report.message_id else data
        ).hexdigest()[:32]
        role = self._role(recipients, report)
        kind = "mailto" if role == "unsubscribe" else report.kind
        if not await self._remember(inbound_id, data, source, report.message_id):
            result = Result(inbound_id, kind, "duplicate")
        else:
            try:
                if role == "unsubscribe":
                    result = await self._mailto(inbound_id, report, recipients)
                else:
                    result = await self._bounce(inbound_id, report, recipients)
            except Exception:  # Redis went away, or a bug: the sender's retry is processed
                await self._forget(inbound_id)
                raise
            await self._note_outcome(inbound_id, result)
        self._metrics.inbound.labels(result.kind, result.outcome).inc()
        log.info(
            "inbound id=%s source=%s kind=%s detector=%s outcome=%s from=%s msgid=%s %s",
            result.id,
            source,
            result.kind,
            report.detector or "-",
            result.outcome,
            report.sender or "-",
            report.message_id[:200] or "-",
            result.detail,
        )
        return result

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
        now = self._clock()
        keep = max(1, int(self._bounces.keep_days * 86400))
        try:
            new = await self._remember_script(
                keys=[self.key(inbound_id)], args=[data, int(now), source, message_id[:998], keep]
            )
            if new:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.index_key, {inbound_id: now})
                    pipe.zremrangebyscore(self.index_key, "-inf", now - keep)
                    await pipe.execute()
        except RedisError as exc:
            raise StoreUnavailable(f"inbound store failed: {type(exc).__name__}") from exc
        return bool(new)

    async def _forget(self, inbound_id: str) -> None:
        try:
            await self._redis.delete(self.key(inbound_id))
        except RedisError:
            log.warning(
                "inbound id=%s could not be forgotten; a retry counts as duplicate", inbound_id
            )

    async def _note_outcome(self, inbound_id: str, result: Result) -> None:
        try:
            await self._redis.hset(
                self.key(inbound_id),
                mapping={"kind": result.kind, "outcome": f"{result.outcome} {result.detail}"},
            )
        except RedisError as exc:
            log.warning("inbound id=%s outcome not stored error=%s", inbound_id, type(exc).__name__)

    # -- mailto unsubscribe ----------------------------------------------------

    async def _mailto(self, inbound_id: str, report: Inbound, recipients: Sequence[str]) -> Result:
        token = token_in_subject(report.subject)
        for address in (*recipients, *report.addressed_to):
            m = _TOKEN_LOCAL.match(address)
            if token is None and m is not None:
                token = m.group(1)
        if token is None:
            return Result(inbound_id, "mailto", "no-token")
        try:
            done = await self._unsubscriber.unsubscribe(token, "mailto")
        except TokenError as exc:
            return Result(inbound_id, "mailto", "invalid-token", f"error={exc}")
        claims = done.claims
        return Result(
            inbound_id, "mailto", "processed", f"rcpt={claims.recipient} group={claims.group}"
        )

    # -- bounces and complaints ------------------------------------------------

    async def _bounce(self, inbound_id: str, report: Inbound, recipients: Sequence[str]) -> Result:
        if report.kind in ("auto-reply", "unrecognised"):
            return Result(inbound_id, report.kind, "ignored")
        stated = [a for r in report.recipients for a in (r.recipient, r.original) if a]
        if report.complaint is not None:
            stated += list(report.complaint.original_rcpt_to)
        try:
            claims = self._verp_claims(recipients, report, stated)
        except ForgedCode as exc:
            log.warning("inbound id=%s forged return path: %s", inbound_id, exc)
            return Result(inbound_id, report.kind, "forged", f"error={exc}")
        token = self._token_claims(report) if claims is None else None
        if report.complaint is not None:
            return await self._complaint(inbound_id, report, claims, token)
        done: list[str] = []
        for who, block, verdict in self._attribute(report.recipients, claims, token):
            done.append(f"{who.recipient}:{verdict}:{block.status}")
            if verdict == "success":
                await self._store.end_streak(who.recipient)
            elif verdict == "delayed":
                self._metrics.deferrals.labels(self._classifier.kind(block.status)).inc()
            else:
                detail = f"mta={block.remote_mta or '-'}"
                await self._feedback.failure(who, verdict, block.status, report.kind, detail)
        if not done:
            outcome = "forged" if self._verp_refs(recipients, report) else "unattributed"
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
            people = [Attribution(normalize_address(a)) for a in complaint.original_rcpt_to]
        else:
            people = []
        if not people:
            return Result(inbound_id, "complaint", "unattributed")
        detail = f"type={complaint.feedback_type} ua={complaint.user_agent[:60]!r}"
        for who in people:
            await self._feedback.complaint(who, "arf", detail)
        names = " ".join(f"{w.recipient}:{w.via}" for w in people)
        return Result(inbound_id, "complaint", "processed", names)

    def _verp_refs(self, recipients: Sequence[str], report: Inbound) -> list[VerpRef]:
        if self._verp is None:
            return []
        verp = self._verp
        envelope = [ref for r in recipients if (ref := verp.parse(r)) is not None]
        return envelope or verp.find(report.text)

    def _verp_claims(
        self, recipients: Sequence[str], report: Inbound, stated: list[str]
    ) -> VerpClaims | None:
        """From the envelope recipient (must verify), else any return path the text quotes."""
        if self._verp is None:
            return None
        for address in recipients:
            ref = self._verp.parse(address)
            if ref is not None:
                return self._verp.verify(ref, stated)
        for ref in self._verp.find(report.text):
            try:
                return self._verp.verify(ref, stated)
            except ForgedCode:
                continue
        return None

    def _token_claims(self, report: Inbound) -> TokenClaims | None:
        """The recipient and group of the unsubscribe token in the returned original."""
        for m in self._token_url.finditer(report.text):
            try:
                return self._unsubscriber.inspect(m.group(1))
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
            verdict = self._classifier.verdict(block.action, block.status)
            who = self._whom(block, claims, token, len(blocks))
            if who is None:
                continue
            old = chosen.get(who.recipient)
            if old is None or rank.get(verdict, 2) > rank.get(old[2], 2):
                chosen[who.recipient] = (who, block, verdict)
        return list(chosen.values())

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


# -- the listener ---------------------------------------------------------------


class _EnhancedReplies:
    """Every reply line carries an RFC 3463 code, as on the relay's own port."""

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = "\r\n".join(with_enhanced_code(line) for line in status.split("\r\n"))
        await super().push(status)  # type: ignore[misc]


class InboundSMTP(_EnhancedReplies, SMTP):
    pass


class InboundLMTP(_EnhancedReplies, LMTP):
    pass


class InboundHandler(ShieldedTransactions):
    """aiosmtpd hooks for the listener; an unknown recipient is refused at RCPT."""

    def __init__(self, intake: Intake, lmtp: bool) -> None:
        self.intake = intake
        self._lmtp = lmtp
        super().__init__()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.intake.addresses.role(address) is None:
            log.info("inbound refused rcpt=%s reason=not-our-address", address[:254])
            return "550 5.7.1 this host only takes bounces and unsubscribe requests: relay denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rcpts = tuple(envelope.rcpt_tos)
        protocol = "lmtp" if self._lmtp else "smtp"
        try:
            result = await self.run_shielded(
                self.intake.process(envelope.original_content or b"", rcpts, protocol)
            )
        except StoreUnavailable:
            reply = "451 4.3.0 temporary failure, try again later"
        else:
            reply = f"250 2.0.0 Ok: {result.outcome} id={result.id}"
        return "\r\n".join([reply] * len(rcpts)) if self._lmtp else reply


async def start_listener(
    handler: InboundHandler, config: BouncesConfig, hostname: str, *, reuse_port: bool = False
) -> asyncio.Server:
    assert config.listen is not None
    protocol = InboundLMTP if config.protocol == "lmtp" else InboundSMTP

    def factory() -> Any:
        return protocol(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="oneclick-relay bounces",
            timeout=config.timeout,
        )

    return await asyncio.get_running_loop().create_server(
        factory, config.listen.host, config.listen.port, reuse_port=reuse_port or None
    )
