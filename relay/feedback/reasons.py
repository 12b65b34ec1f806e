"""Why a delivery failed: the reason table, and the classifier that applies it.

A failure is described three times, and the three often disagree: the RFC 3463
enhanced code of the DSN's ``Status`` field (often written by *our* side's MTA),
the reply the receiving server gave (``Diagnostic-Code``: a basic code, perhaps an
enhanced one, and its words), and those words alone in a non-standard bounce. The
words are the most specific, so they are read first, from a table of the phrasings
of the major MTAs and mailbox providers (``PHRASES``). Precedence, first that says
anything wins:

1. an operator's phrase (``bounces.classify`` key that is not a code), longest first;
2. an operator's code prefix (``bounces.classify``), longest first, against the
   effective code (4 and 5 below);
3. a built-in phrase naming a specific reason. A DNS lookup that failed *for now*
   ("Host not found, try again") comes first: it says nothing about the domain. Then a
   phrase about *our* mail (blocked / reputation, policy / authentication, filtered /
   content, rate-limited, too big) outranks one about the address: suppressing a good
   address loses a customer, missing a bad one only costs another try. Within each
   group the longest phrase wins;
4. the enhanced code of the ``Diagnostic-Code`` unless it is only ``x.0.0``: the
   receiving server's own code (``550 5.7.1 … blacklisted``) outranks the ``Status``
   (``5.1.1``) the reporting MTA derived from it;
5. the ``Status`` field's code (``DEFAULT_CODES``, longest prefix, when more specific
   than its class);
6. a generic phrase of a condition (system error, network error, expiry: "service
   unavailable", "timed out"), which never outranks a specific code;
7. the basic reply code (``552`` mailbox full, ``421``/``451``/``452`` system);
8. the class: ``unknown`` for 5, ``expired`` for a final failure of class 4.

Each reason maps to one of the four kinds the thresholds count (``KIND_OF``).
Only ``user-unknown`` and ``host-unknown`` are ``hard`` (suppressed at once);
``suspended`` is ``hard`` only with ``bounces.suppress_suspended``; every reason
about our own mail is ``policy`` and never suppresses the recipient by default.

Everything here is linear in the text and bounded: at most ``MAX_TEXT`` characters
of a diagnostic are read, by substring search, never by a backtracking pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from relay.config import BouncesConfig
from relay.model import BOUNCE_KINDS, REASONS, BounceKind, Reason

_V = TypeVar("_V")

MAX_TEXT = 4096
"""Characters of a diagnostic read for phrases; real ones are a few hundred."""

ABOUT_US: frozenset[Reason] = frozenset(
    {"blocked", "policy", "filtered", "rate-limited", "too-big"}
)
"""Reasons that say something about our mail or our reputation, not about the address."""

CONDITIONS: frozenset[Reason] = frozenset({"system-error", "network-error", "expired"})
"""Reasons whose phrases are generic ("service unavailable", "timed out"): they decide
only when no enhanced code more specific than its class does."""

TEMPORARY_DNS = frozenset(
    {"host not found, try again", "temporary failure in name resolution", "dns lookup timed out"}
)
"""Condition phrases that do outrank the rest: a DNS lookup that failed for now says
nothing about whether the domain exists (it must not read as "host not found")."""

KIND_OF: dict[Reason, BounceKind] = {
    "user-unknown": "hard",
    "host-unknown": "hard",
    "suspended": "soft",  # "hard" with bounces.suppress_suspended
    "mailbox-full": "soft",
    "expired": "soft",
    "system-error": "soft",
    "network-error": "soft",
    "too-big": "policy",
    "filtered": "policy",
    "blocked": "policy",
    "policy": "policy",
    "rate-limited": "policy",
    "unknown": "unknown",
    "auto-reply": "unknown",
    "complaint": "unknown",
}

DEFAULT_CODES: tuple[tuple[str, Reason], ...] = (
    ("5", "unknown"),
    ("4", "expired"),  # a final failure of class 4: the MTA gave up retrying
    ("5.1.1", "user-unknown"),  # bad destination mailbox address
    ("5.1.2", "host-unknown"),  # bad destination system address
    ("5.1.3", "user-unknown"),  # bad destination mailbox address syntax
    ("5.1.6", "user-unknown"),  # mailbox has moved, no forwarding address
    ("5.1.7", "policy"),  # bad *sender* mailbox syntax: ours
    ("5.1.8", "policy"),  # bad *sender* system address: ours
    ("5.1.10", "host-unknown"),  # recipient domain has a null MX (RFC 7505)
    ("5.1.90", "rate-limited"),  # Microsoft: sender's daily limit
    ("5.2.1", "suspended"),  # mailbox disabled, not accepting messages
    ("5.2.2", "mailbox-full"),
    ("5.2.3", "too-big"),  # message length exceeds administrative limit
    ("5.2.4", "system-error"),  # mailing list expansion problem
    ("5.3", "system-error"),
    ("5.3.4", "too-big"),
    ("5.4", "network-error"),
    ("5.4.310", "host-unknown"),  # Microsoft: DNS domain does not exist
    ("5.4.7", "expired"),  # delivery time expired
    ("5.7", "policy"),
    ("5.7.1", "blocked"),  # delivery not authorised: in practice mostly block lists
    ("5.7.13", "suspended"),  # user account disabled
    ("5.7.17", "user-unknown"),  # mailbox owner has changed (RFC 7293)
    ("5.7.18", "host-unknown"),  # domain owner has changed (RFC 7293)
    ("5.7.606", "blocked"),  # Microsoft: banned sending IP
    ("5.7.708", "blocked"),  # Microsoft: IP reputation
    ("5.7.750", "blocked"),  # Microsoft: unregistered domain tenant
    ("4.1.1", "user-unknown"),  # a final failure after "450 4.1.1 user unknown" retries
    ("4.1.2", "host-unknown"),
    ("4.2.1", "rate-limited"),  # mailbox receiving at too high a rate
    ("4.2.2", "mailbox-full"),
    ("4.3", "system-error"),
    ("4.4", "network-error"),
    ("4.4.7", "expired"),
    ("4.7", "policy"),
)
"""Enhanced code prefix → reason; longest prefix wins; anything else is ``unknown``."""

PHRASES: tuple[tuple[str, Reason], ...] = (
    # user unknown: Postfix, Exim, sendmail, qmail/vpopmail, Exchange, Domino, providers
    ("user unknown", "user-unknown"),
    ("unknown user", "user-unknown"),
    ("unknown recipient", "user-unknown"),
    ("recipient unknown", "user-unknown"),
    ("unknown local part", "user-unknown"),
    ("unknown mailbox", "user-unknown"),
    ("mailbox unknown", "user-unknown"),
    ("unknown address", "user-unknown"),
    ("address unknown", "user-unknown"),
    ("addressee unknown", "user-unknown"),
    ("unknown or illegal alias", "user-unknown"),
    ("no such user", "user-unknown"),
    ("no such mailbox", "user-unknown"),
    ("no such recipient", "user-unknown"),
    ("no such address", "user-unknown"),
    ("no such account", "user-unknown"),
    ("no such person", "user-unknown"),
    ("nosuchuser", "user-unknown"),
    ("user not found", "user-unknown"),
    ("recipient not found", "user-unknown"),
    ("recipientnotfound", "user-unknown"),
    ("mailbox not found", "user-unknown"),
    ("address not found", "user-unknown"),
    ("couldn't be found", "user-unknown"),
    ("could not be found", "user-unknown"),
    ("user does not exist", "user-unknown"),
    ("user doesn't exist", "user-unknown"),
    ("mailbox does not exist", "user-unknown"),
    ("address does not exist", "user-unknown"),
    ("recipient does not exist", "user-unknown"),
    ("account does not exist", "user-unknown"),
    ("tried to reach does not exist", "user-unknown"),
    ("e-mail account does not exist", "user-unknown"),
    ("invalid recipient", "user-unknown"),
    ("invalid mailbox", "user-unknown"),
    ("not a valid mailbox", "user-unknown"),
    ("not a valid recipient", "user-unknown"),
    ("is not a registered", "user-unknown"),
    ("recipient name is not recognized", "user-unknown"),
    ("recipient address rejected: access denied", "user-unknown"),  # Microsoft edge block
    ("requested action not taken: mailbox unavailable", "user-unknown"),
    ("not listed in domino directory", "user-unknown"),
    ("not listed in public name & address book", "user-unknown"),
    ("no mailbox here by that name", "user-unknown"),
    ("doesn't have a yahoo.com account", "user-unknown"),
    ("this user doesn't have a", "user-unknown"),
    ("unrouteable address", "user-unknown"),
    ("not our customer", "user-unknown"),
    ("may not exist", "user-unknown"),
    ("does not exist here", "user-unknown"),
    ("no account by that name", "user-unknown"),
    ("not a known user", "user-unknown"),
    ("unknown account", "user-unknown"),
    ("user is unknown", "user-unknown"),
    ("no such local user", "user-unknown"),
    ("unknown e-mail address", "user-unknown"),
    ("unknown email address", "user-unknown"),
    ("mailbox doesn't exist", "user-unknown"),
    ("address doesn't exist", "user-unknown"),
    ("account doesn't exist", "user-unknown"),
    ("no longer accepts mail", "user-unknown"),
    ("no longer exists", "user-unknown"),
    ("is not a valid user", "user-unknown"),
    ("destination addresses were unknown", "user-unknown"),
    ("no such user here", "user-unknown"),
    ("user not known", "user-unknown"),
    ("recipnotfound", "user-unknown"),
    ("account has been deleted", "user-unknown"),
    ("mailbox has been deleted", "user-unknown"),
    ("bad destination mailbox address", "user-unknown"),
    # host unknown / null MX
    ("host or domain name not found", "host-unknown"),
    ("domain name not found", "host-unknown"),
    ("domain not found", "host-unknown"),
    ("domain does not exist", "host-unknown"),
    ("no such domain", "host-unknown"),
    ("unknown domain", "host-unknown"),
    ("unknown host", "host-unknown"),
    ("host not found", "host-unknown"),
    ("nxdomain", "host-unknown"),
    ("null mx", "host-unknown"),
    ("nullmx", "host-unknown"),
    ("does not accept mail", "host-unknown"),
    ("does not accept email", "host-unknown"),
    ("no mx record", "host-unknown"),
    ("no mail exchanger", "host-unknown"),
    ("couldn't find any host", "host-unknown"),
    ("unrouteable mail domain", "host-unknown"),
    ("no mx or a", "host-unknown"),
    ("could not find any host", "host-unknown"),
    ("mx records point to non-existent hosts", "host-unknown"),
    ("infodomainnonexistent", "host-unknown"),
    ("bad destination system address", "host-unknown"),
    # suspended / disabled
    ("account disabled", "suspended"),
    ("account is disabled", "suspended"),
    ("account has been disabled", "suspended"),
    ("mailbox disabled", "suspended"),
    ("mailbox is disabled", "suspended"),
    ("mailbox has been disabled", "suspended"),
    ("account suspended", "suspended"),
    ("account has been suspended", "suspended"),
    ("account is suspended", "suspended"),
    ("account is inactive", "suspended"),
    ("inactive account", "suspended"),
    ("mailbox is inactive", "suspended"),
    ("mailbox inactive", "suspended"),
    ("account expired", "suspended"),
    ("account is locked", "suspended"),
    ("account has been locked", "suspended"),
    ("deactivated", "suspended"),
    ("no longer active", "suspended"),
    ("account is frozen", "suspended"),
    ("account inactive", "suspended"),
    ("mailbox is suspended", "suspended"),
    ("mail receiving disabled", "suspended"),
    # mailbox full
    ("mailbox full", "mailbox-full"),
    ("mailbox is full", "mailbox-full"),
    ("inbox is full", "mailbox-full"),
    ("account is full", "mailbox-full"),
    ("full mailbox", "mailbox-full"),
    ("over quota", "mailbox-full"),
    ("overquota", "mailbox-full"),
    ("quota exceeded", "mailbox-full"),
    ("exceeds quota", "mailbox-full"),
    ("exceeded quota", "mailbox-full"),
    ("exceed mailbox quota", "mailbox-full"),
    ("disk quota", "mailbox-full"),
    ("mailbox size limit exceeded", "mailbox-full"),
    ("mailbox has exceeded", "mailbox-full"),
    ("mailbox exceeded", "mailbox-full"),
    ("exceeded the local limit", "mailbox-full"),
    ("allowed quota", "mailbox-full"),
    ("not enough storage", "mailbox-full"),
    ("quota", "mailbox-full"),
    ("exceeded storage allocation", "mailbox-full"),
    ("out of storage", "mailbox-full"),
    ("insufficient storage", "mailbox-full"),
    ("storage limit", "mailbox-full"),
    # expired
    ("delivery time expired", "expired"),
    ("message expired", "expired"),
    ("delivery expired", "expired"),
    ("too long in queue", "expired"),
    ("retry timeout exceeded", "expired"),
    ("retry time not reached", "expired"),
    ("message timed out", "expired"),
    ("could not be delivered within", "expired"),
    # network
    ("host not found, try again", "network-error"),
    ("temporary failure in name resolution", "network-error"),
    ("dns lookup timed out", "network-error"),
    ("name service error", "network-error"),
    ("connection refused", "network-error"),
    ("connection timed out", "network-error"),
    ("connection reset", "network-error"),
    ("no route to host", "network-error"),
    ("network is unreachable", "network-error"),
    ("lost connection", "network-error"),
    ("unable to connect", "network-error"),
    ("could not connect", "network-error"),
    ("timed out", "network-error"),
    # system
    ("system error", "system-error"),
    ("local delivery failed", "system-error"),
    ("internal error", "system-error"),
    ("local error", "system-error"),
    ("temporary local problem", "system-error"),
    ("insufficient system storage", "system-error"),
    ("mail system full", "system-error"),
    ("server busy", "system-error"),
    ("service unavailable", "system-error"),
    ("system not accepting", "system-error"),
    ("routing loop", "system-error"),
    ("mail loop", "system-error"),
    ("loops back to myself", "system-error"),
    ("too many hops", "system-error"),
    ("hop count exceeded", "system-error"),
    ("resources temporarily unavailable", "system-error"),
    # about our mail: too big
    ("message too big", "too-big"),
    ("message too large", "too-big"),
    ("message is too large", "too-big"),
    ("message is too big", "too-big"),
    ("message size exceeds", "too-big"),
    ("message length exceeds", "too-big"),
    ("message exceeds maximum", "too-big"),
    ("exceeds size limit", "too-big"),
    ("exceeds the maximum message size", "too-big"),
    ("exceeded the maximum message size", "too-big"),
    ("message file too big", "too-big"),
    ("too big for system", "too-big"),
    # about our mail: content filters
    ("recipient preferences", "filtered"),
    ("refused due to recipient", "filtered"),
    ("content rejected", "filtered"),
    ("message content", "filtered"),
    ("content filter", "filtered"),
    ("spam detected", "filtered"),
    ("identified as spam", "filtered"),
    ("considered spam", "filtered"),
    ("looks like spam", "filtered"),
    ("rejected as spam", "filtered"),
    ("spam message", "filtered"),
    ("likely unsolicited", "filtered"),
    ("unsolicited mail", "filtered"),
    ("virus", "filtered"),
    ("malware", "filtered"),
    ("phishing", "filtered"),
    ("spam filter", "filtered"),
    ("rejected by the recipient", "filtered"),
    ("blocked by the recipient", "filtered"),
    ("not accepting mail from", "filtered"),
    ("not accepting messages from", "filtered"),
    ("rejected due to content", "filtered"),
    # about our mail: blocks and reputation
    ("blacklisted", "blocked"),
    ("blocklisted", "blocked"),
    ("blacklist", "blocked"),
    ("blocklist", "blocked"),
    ("block list", "blocked"),
    ("black list", "blocked"),
    ("spamhaus", "blocked"),
    ("spamcop", "blocked"),
    ("barracuda", "blocked"),
    ("dnsbl", "blocked"),
    ("sorbs", "blocked"),
    ("blocked using", "blocked"),
    ("client host rejected", "blocked"),
    ("client host blocked", "blocked"),
    ("has been blocked", "blocked"),
    ("reputation", "blocked"),
    ("banned sender", "blocked"),
    ("banned ip", "blocked"),
    ("user complaints", "blocked"),
    ("traffic not accepted", "blocked"),
    ("listed at", "blocked"),
    ("is listed on", "blocked"),
    ("listed by", "blocked"),
    ("ip blocked", "blocked"),
    ("blocked ip", "blocked"),
    ("ip address blocked", "blocked"),
    ("too many complaints", "blocked"),
    ("ip address is on", "blocked"),
    # about our mail: policy and authentication
    ("relay access denied", "policy"),
    ("relaying denied", "policy"),
    ("relay not permitted", "policy"),
    ("not permitted to relay", "policy"),
    ("relaying not allowed", "policy"),
    ("list of allowed rcpthosts", "policy"),
    ("unauthenticated", "policy"),
    ("authentication required", "policy"),
    ("not authenticated", "policy"),
    ("authentication failed", "policy"),
    ("authrequired", "policy"),
    ("dmarc", "policy"),
    ("dkim", "policy"),
    ("spf check", "policy"),
    ("spf validation", "policy"),
    ("spf fail", "policy"),
    ("sender policy framework", "policy"),
    ("sender address rejected", "policy"),
    ("sender verify failed", "policy"),
    ("sender rejected", "policy"),
    ("policy violation", "policy"),
    ("policy reasons", "policy"),
    ("rejected by policy", "policy"),
    ("not authorized", "policy"),
    ("do not have permission", "policy"),
    ("not allowed to send", "policy"),
    ("reverse dns", "policy"),
    ("ptr record", "policy"),
    ("helo command rejected", "policy"),
    ("tls required", "policy"),
    ("must use tls", "policy"),
    ("requires tls", "policy"),
    ("does not meet ipv6 sending guidelines", "policy"),
    # about our mail: rate limits
    ("rate limit", "rate-limited"),
    ("unusual rate of unsolicited mail", "rate-limited"),
    ("ratelimit", "rate-limited"),
    ("rate that prevents", "rate-limited"),
    ("unusual rate", "rate-limited"),
    ("sending rate", "rate-limited"),
    ("throttl", "rate-limited"),
    ("too many messages", "rate-limited"),
    ("too many connections", "rate-limited"),
    ("too many recipients", "rate-limited"),
    ("too many emails", "rate-limited"),
    ("temporarily deferred", "rate-limited"),
    ("unexpected volume", "rate-limited"),
    ("sending limit", "rate-limited"),
    ("sending quota", "rate-limited"),
    ("greylist", "rate-limited"),
)
"""Lower-case phrases of the diagnostic (whitespace collapsed) → reason."""

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY = re.compile(r"(?<![\d.#])([245][0-5]\d)(?=[ \-:;,]|$)")
_BASIC: dict[str, Reason] = {
    "552": "mailbox-full",
    "421": "system-error",
    "451": "system-error",
    "452": "system-error",
}


def enhanced_code(text: str, klass: str = "") -> str | None:
    """The first RFC 3463 code in ``text`` (of class ``klass`` when given)."""
    for m in _ENHANCED.finditer(text[:MAX_TEXT]):
        if not klass or m.group(1) == klass:
            return ".".join(m.groups())
    return None


def reply_code(text: str) -> str:
    """The first basic SMTP reply code (``550``) in a diagnostic, or ``""``."""
    m = _REPLY.search(text[:MAX_TEXT])
    return m.group(1) if m else ""


def normalize_phrase(text: str) -> str:
    """Lower case, whitespace collapsed: how phrases and diagnostics are compared."""
    return " ".join(text[:MAX_TEXT].lower().split())


def is_code_prefix(text: str) -> bool:
    parts = text.split(".")
    return (
        1 <= len(parts) <= 3
        and parts[0] in ("2", "4", "5")
        and all(p.isdigit() and len(p) <= 3 for p in parts)
    )


@dataclass(frozen=True, slots=True)
class Classification:
    """The reason of one failure, the kind the thresholds count, and what decided."""

    reason: Reason
    kind: BounceKind
    evidence: str
    """e.g. ``phrase "user unknown"``, ``Diagnostic-Code 5.7.1``, ``Status 5.1.1``."""
    code: str = ""
    """The effective enhanced code (``5.1.1``)."""

    specific: bool = True
    """Decided by a phrase, an override, a basic reply code or a code finer than its
    class; False when only the class (``5.x.x``) or nothing spoke."""


Override = tuple[str, str]
"""(code prefix or phrase, reason or kind), as in ``bounces.classify``."""


class Classifier:
    """Applies the precedence above; built once from ``bounces`` config."""

    def __init__(self, overrides: Sequence[Override] = (), *, suppress_suspended: bool = False):
        self._codes: dict[str, Reason] = dict(DEFAULT_CODES)
        self._code_overrides: dict[str, str] = {}
        self._phrase_overrides: list[tuple[str, str]] = []
        for key, value in overrides:
            if is_code_prefix(key):
                self._code_overrides[key] = value
            else:
                self._phrase_overrides.append((normalize_phrase(key), value))
        self._phrase_overrides.sort(key=lambda kv: -len(kv[0]))
        self._kinds = dict(KIND_OF)
        if suppress_suspended:
            self._kinds["suspended"] = "hard"
        # longest first inside each tier, so the first hit is the one that decides
        ranked = sorted(PHRASES, key=lambda pr: (pr[1] not in ABOUT_US, -len(pr[0])))
        strong = [pr for pr in ranked if pr[0] in TEMPORARY_DNS]
        self._phrases = strong + [pr for pr in ranked if pr[1] not in CONDITIONS]
        self._conditions = [pr for pr in ranked if pr[1] in CONDITIONS and pr not in strong]
        self._plain = Classifier(suppress_suspended=suppress_suspended) if overrides else None

    @classmethod
    def from_config(cls, bounces: BouncesConfig) -> Classifier:
        return cls(bounces.classify, suppress_suspended=bounces.suppress_suspended)

    def kind_of(self, reason: Reason) -> BounceKind:
        return self._kinds[reason]

    def kind(self, status: str, text: str = "") -> BounceKind:
        """The kind of failure a reply (enhanced code, its text) stands for."""
        return self.classify(status, text).kind

    def classify(self, status: str, diagnostic: str = "", *, final: bool = True) -> Classification:
        """Reason, kind and evidence of one failure (``status``: the Status field's code)."""
        text = normalize_phrase(diagnostic)
        status_code = enhanced_code(status) or ""
        klass = status_code[:1] or ("5" if final else "4")
        diag_code = enhanced_code(text) or ""
        if diag_code and not diag_code.endswith(".0.0"):
            code, where = diag_code, "Diagnostic-Code"
        elif status_code:
            code, where = status_code, "Status"
        else:
            code, where = diag_code, "Diagnostic-Code"
        effective = code or f"{klass}.0.0"
        for phrase, value in self._phrase_overrides:
            if phrase in text:
                return self._made(value, effective, f'override phrase "{phrase}"', text, code)
        if code:
            found = _longest(self._code_overrides, code)
            if found is not None:
                prefix, value = found
                return self._made(value, effective, f'override code "{prefix}"', text, code)
        for phrase, reason in self._phrases:
            if phrase in text:
                return self._of(reason, f'phrase "{phrase}"', effective)
        hit = _longest(self._codes, code) if code else None
        if hit is not None and len(hit[0]) > 1:
            return self._of(hit[1], f"{where} {code}", effective)
        for phrase, reason in self._conditions:
            if phrase in text:
                return self._of(reason, f'phrase "{phrase}"', effective)
        basic = reply_code(text)
        if basic in _BASIC:
            return self._of(_BASIC[basic], f"reply {basic}", effective)
        if hit is not None:
            return self._of(hit[1], f"{where} {code}", effective, specific=False)
        last: Reason = "expired" if klass == "4" else "unknown"
        return self._of(last, "no code or phrase", effective, specific=False)

    def _of(
        self, reason: Reason, evidence: str, code: str, *, specific: bool = True
    ) -> Classification:
        return Classification(reason, self._kinds[reason], evidence, code, specific)

    def _made(
        self, value: str, effective: str, evidence: str, text: str, code: str
    ) -> Classification:
        """An override names a reason, or only a kind (then the reason is still read)."""
        if value in REASONS:
            return self._of(value, evidence, effective)
        assert value in BOUNCE_KINDS
        kind = value
        base = self._plain.classify(effective, text) if self._plain else self.classify(effective)
        return Classification(base.reason, kind, evidence, effective)


def _longest(table: Mapping[str, _V], code: str) -> tuple[str, _V] | None:
    parts = code.split(".")
    for n in (3, 2, 1):
        prefix = ".".join(parts[:n])
        value = table.get(prefix)
        if value is not None:
            return prefix, value
    return None
