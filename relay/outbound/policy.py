"""From address → Route: is this marketing (and which unsubscribe group) or transactional?

Rules are tried in order and the first match wins. A rule's ``match`` is an exact
address, ``*@domain``, or any shell-style glob (``news-*@example.com``); matching is
case-insensitive. Unmatched senders get ``policy.default_class``.

Senders and rules are compared in the one canonical form of
``relay.mail.address.canonical_address`` (no trailing dot, quoted local parts
unquoted, IDNA 2008), the same form the signer picks keys by and the suppression
list stores: ``news@example.com.`` is ``news@example.com``. A From that has no
canonical form is refused ``550 5.1.7`` rather than guessed at.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from relay.config import PolicyConfig, SenderRule
from relay.errors import PermFail
from relay.mail.address import AddressError, canonical_address, canonical_domain, normalize_address
from relay.model import Route


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: SenderRule
    exact: str | None
    pattern: re.Pattern[str] | None


def _ascii_domain(match: str) -> str:
    """A glob rule with its domain in canonical form (when the domain has no wildcard)."""
    local, at, domain = match.rpartition("@")
    if not at or any(ch in domain for ch in "*?["):
        return match
    try:
        return f"{local}@{canonical_domain(domain)}"
    except AddressError:
        return match


class Policy:
    def __init__(self, config: PolicyConfig) -> None:
        self._config = config
        self._rules: list[_Compiled] = []
        for rule in config.senders:
            if any(ch in rule.match for ch in "*?["):
                pattern = re.compile(fnmatch.translate(_ascii_domain(rule.match)), re.IGNORECASE)
                self._rules.append(_Compiled(rule, None, pattern))
            else:
                exact = normalize_address(rule.match)
                self._rules.append(_Compiled(rule, exact, None))

    @property
    def config(self) -> PolicyConfig:
        return self._config

    def classify(self, from_address: str) -> Route:
        """The route of ``from_address``; ``PermFail`` 550 5.1.7 if it has no canonical form."""
        try:
            sender = canonical_address(from_address)
        except AddressError as exc:
            raise PermFail("5.1.7", f"From address cannot be normalised: {exc}") from None
        for compiled in self._rules:
            if compiled.exact is not None:
                matched = compiled.exact == sender
            else:
                assert compiled.pattern is not None
                matched = compiled.pattern.match(sender) is not None
            if matched:
                rule = compiled.rule
                return Route(
                    message_class=rule.message_class,
                    group=rule.group,
                    sender=sender,
                    unsubscribe_scope=rule.unsubscribe_scope,
                    keep_app_unsubscribe=rule.keep_app_unsubscribe,
                    rule=rule.match,
                )
        default = self._config.default_class
        group = self._config.default_group if default == "marketing" else None
        return Route(message_class=default, group=group, sender=sender)

    def describe(self) -> list[str]:
        """One line per rule, as ``check-config`` prints them."""
        lines = []
        for rule in self._config.senders:
            target: str = rule.message_class
            if rule.group:
                target += f" group={rule.group} scope={rule.unsubscribe_scope}"
            lines.append(f"{rule.match:<32} -> {target}")
        lines.append(f"{'(any other sender)':<32} -> {self._config.default_class}")
        return lines
