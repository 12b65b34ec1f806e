"""The start checks shared by ``serve`` and ``check-config``: refusals and warnings.

Kept apart from ``commands`` so that ``serve`` runs them without importing the metrics
(``prometheus_client`` must first see the multi-process folder the workers set up).
"""

from __future__ import annotations

from relay.config import Config
from relay.config import audit as config_audit
from relay.config.audit import Finding
from relay.mail.dkim import Signer

ED25519 = "ed25519-sha256"


def audit(config: Config, *, insecure_permissions: bool) -> tuple[list[Finding], list[Finding]]:
    """(refusals, warnings) for ``serve`` and ``check-config``; loads the DKIM keys."""
    signer = Signer.from_config(config.dkim)
    no_key: list[Finding] = []
    ed25519_only: list[tuple[str, str]] = []
    for index, rule in enumerate(config.policy.senders):
        domain = rule.match.rpartition("@")[2]
        if rule.message_class != "marketing" or any(ch in domain for ch in "*?["):
            continue
        keys = signer.keys_for(domain)
        if not keys:
            no_key.append(
                Finding(
                    f"policy.senders[{index}]",
                    f"marketing sender {rule.match!r} has no DKIM key for {domain}:"
                    " mailbox providers will not offer one-click unsubscribe",
                )
            )
        elif all(key.algorithm == ED25519 for key in keys):
            ed25519_only.append((f"policy.senders[{index}]", domain))
    warnings = no_key + config_audit.warnings(config, ed25519_only)
    files = config_audit.permission_refusals(config)
    if insecure_permissions:
        override = " (ignored: --insecure-permissions)"
        return [], warnings + [Finding(f.key, f.message + override) for f in files]
    override = "; --insecure-permissions skips this check"
    return [Finding(f.key, f.message + override) for f in files], warnings
