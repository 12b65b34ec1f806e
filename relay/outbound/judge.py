"""Final failures of retried copies, judged as bounces are."""

from __future__ import annotations

from relay.errors import SmtpReply
from relay.feedback.bounces import Classifier
from relay.feedback.record import Attribution, Feedback
from relay.mail.verp import ForgedCode, Verp
from relay.outbound.retry import QueuedItem


class RetryJudge:
    """Final failures of copies in the retry queue, counted like bounces.

    Only refusals of the recipient itself count (a reply to RCPT): an upstream that
    was down for the whole ``retry.max_age`` says nothing about the address.
    """

    def __init__(self, feedback: Feedback, classifier: Classifier, verp: Verp | None) -> None:
        self._feedback = feedback
        self._classifier = classifier
        self._verp = verp

    async def __call__(self, item: QueuedItem, reply: SmtpReply) -> None:
        if reply.stage != "rcpt":
            return
        who = Attribution(item.rcpt, sent=item.first, via="relay")
        ref = self._verp.parse(item.mail_from) if self._verp is not None else None
        if ref is not None and self._verp is not None:
            try:
                claims = self._verp.verify(ref, [item.rcpt])
                who = Attribution(item.rcpt, claims.group, claims.sent, claims.message, "relay")
            except ForgedCode:
                pass
        why = self._classifier.classify(reply.enhanced, reply.text)
        await self._feedback.failure(
            who, why.kind, reply.enhanced, "retry", reply.text, why.reason, why.evidence
        )
