"""Which failures are worth retrying, and how long to wait before the next attempt.

A task meets three kinds of failure:

- *transient*: the database or the broker is briefly unavailable or a transaction lost a
  race (connection lost, deadlock ``40P01``, serialization failure ``40001``, lock or
  statement timeout, a session ended by a transaction timeout, too many connections,
  server shutting down, pool timeout). Trying
  again later succeeds, and idempotency keys make the repeat harmless;
- *waiting*: a commit or release whose reserve has not been applied yet (SQL status
  ``not_found``); trying again later succeeds once the reserve arrives;
- *permanent*: anything else (``MT001``..``MT004`` refusals, malformed messages, bugs).
  Trying again cannot help: the event goes to the dead letters.
"""

from __future__ import annotations

import random
from typing import Final

import psycopg
import redis.exceptions
from kombu.exceptions import OperationalError as KombuOperationalError
from psycopg_pool import PoolTimeout

__all__ = ["backoff", "is_transient", "sqlstate_of"]

# Same list as meter.apply_events re-raises for the whole batch (test_pipeline.py compares
# the two on every SQLSTATE): the transaction may succeed when tried again. 55P03
# lock_not_available, 57014 query_canceled (statement timeout); classes 08 connection,
# 53 insufficient resources, 57P operator intervention (shutdown), 58 system error (I/O).
# 25P03 and 25P04: the session ended by idle_in_transaction_session_timeout or
# transaction_timeout, its transaction rolled back with it.
_TRANSIENT_STATES: Final = frozenset({"40001", "40P01", "55P03", "57014", "25P03", "25P04"})
_TRANSIENT_CLASSES: Final = ("08", "53", "57P", "58")


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg error (``None`` for other errors or client-side ones)."""
    return getattr(exc, "sqlstate", None) or None


def is_transient(exc: BaseException) -> bool:
    """True if trying the same work again later may succeed."""
    if isinstance(exc, PoolTimeout):  # every pooled connection busy or the server down
        return True
    if isinstance(exc, psycopg.Error):
        state = sqlstate_of(exc)
        if state is None:
            # No server answer at all: a refused, dropped or closed connection.
            return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
        return state in _TRANSIENT_STATES or state.startswith(_TRANSIENT_CLASSES)
    # The broker, while re-enqueueing (retries, deferred batch events).
    return isinstance(exc, (KombuOperationalError, redis.exceptions.ConnectionError, OSError))


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, jittered.

    ``base * 2**attempt`` capped at ``cap``, then drawn uniformly from its upper half
    ("equal jitter"): retries of many tasks that failed together (a database restart)
    spread out instead of hammering the server in waves, yet none comes back too early.
    """
    ceiling = min(cap, base * (2 ** min(attempt, 32)))
    return random.uniform(ceiling / 2, ceiling)
