"""The one retry schedule of the relay: exponential backoff with a ceiling.

Both things that retry use it: the retry queue (copies the upstream deferred) and
the event consumers (webhook and notification mail). ``failures`` counts the
attempts that have failed so far, the first included, so the waits are::

    failures   1      2        3        ...  n
    wait       first  2·first  4·first  ...  first·2^(n-1), never above maximum

A copy the upstream deferred while the client was still connected has failed once
and waits ``retry.first_delay``; an event whose first delivery failed waits
``events.retry_first_delay``.
"""

from __future__ import annotations

_MAX_EXPONENT = 64
"""2**64 times any delay is past every ceiling; a larger power would overflow a float."""


def backoff(failures: int, first: float, maximum: float) -> float:
    """Seconds to wait after the ``failures``-th failed attempt (1 or more)."""
    exponent = min(max(0, failures - 1), _MAX_EXPONENT)
    return float(min(first * 2**exponent, maximum))
