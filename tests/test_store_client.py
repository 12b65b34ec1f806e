"""The Redis error boundary, class by class (as httpx tests its transport mapping).

Every exception class redis-py defines, standalone or Cluster, must become
``StoreUnavailable`` (a ``RelayError``) in ``relay.store.client.unavailable``; the
front ends face a real outage in ``tests/e2e/test_store_errors_e2e.py``.
"""

from __future__ import annotations

import inspect

import pytest
import redis.exceptions

from relay.errors import RelayError, StoreUnavailable
from relay.store.client import REDIS_ERRORS, unavailable

NOT_OUTAGES = {
    redis.exceptions.IncorrectPolicyType: "raised while a command is built from a wrong"
    " request policy: a bug in the caller, never an answer of the server",
}


def _redis_exceptions() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(redis.exceptions, inspect.isclass)
        if issubclass(cls, BaseException)
        and cls.__module__ == "redis.exceptions"
        and cls not in NOT_OUTAGES
    ]


@pytest.mark.parametrize("cls", _redis_exceptions(), ids=lambda c: c.__name__)
def test_every_redis_exception_is_mapped(cls: type[BaseException]) -> None:
    assert issubclass(cls, REDIS_ERRORS), f"{cls.__name__} would escape the boundary"
    try:
        instance = cls("boom")
    except (TypeError, ValueError):  # the Cluster redirections parse "<slot> <host:port>"
        instance = cls("1 127.0.0.1:7000")
    with pytest.raises(StoreUnavailable) as raised, unavailable("probe"):
        raise instance
    assert isinstance(raised.value, RelayError)
    assert str(raised.value) == f"probe: {cls.__name__}"
    assert raised.value.__cause__ is instance


def test_other_errors_are_not_swallowed() -> None:
    with pytest.raises(KeyError), unavailable("probe"):
        raise KeyError("a bug is not an outage")
