"""PostgreSQL access of the worker: one connection pool per process, the SQL it calls.

Celery's prefork pool forks its children after importing the app, so a pool created in the
parent would share sockets with every child. Pools are therefore created lazily, on first
use, in the process that uses them; :func:`forget_after_fork` (hooked to
``worker_process_init``) drops any inherited one. Connections are autocommit: every call
below is one statement, hence one transaction.
"""

from __future__ import annotations

import threading
from typing import Any, Final

from psycopg.abc import AdaptContext
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import ConnectionPool

from meter import types as t

__all__ = [
    "apply_events",
    "close_all",
    "forget_after_fork",
    "record_dead_letter",
    "release_expired_reservations",
]

POOL_TIMEOUT: Final = 10.0
"""Seconds to wait for a pooled connection; a PoolTimeout is retried like a lost connection."""

_pools: dict[str, ConnectionPool[Any]] = {}
_lock = threading.Lock()
# Pools inherited through fork: kept referenced and never closed here, because closing
# (or garbage-collecting) them would end the parent's sessions on the shared sockets.
_inherited: list[ConnectionPool[Any]] = []

_SQL_APPLY_EVENTS: Final = (
    "SELECT idx, ok, status, result, error_sqlstate, error_message"
    " FROM meter.apply_events(%s::jsonb, %s::text)"
)
_SQL_RECORD_DEAD_LETTER: Final = (
    "SELECT meter.record_dead_letter(%s::text, %s::jsonb, %s::text, %s::text, %s::text,"
    " %s::text) AS dead_letter_id"
)
_SQL_RELEASE_EXPIRED: Final = (
    "SELECT meter.release_expired_reservations(NULL, %s::integer) AS expired"
)


def _configure(conn: AdaptContext) -> None:
    # jsonb results keep fractions exact (Decimal), never float.
    set_json_loads(t.loads, conn)


def _as_is(text: str) -> str:
    return text


def _pool(url: str, size: int) -> ConnectionPool[Any]:
    pool = _pools.get(url)
    if pool is None:
        with _lock:
            pool = _pools.get(url)
            if pool is None:
                pool = ConnectionPool(
                    url,
                    min_size=1,
                    max_size=max(size, 1),
                    kwargs={"autocommit": True, "application_name": "meter-worker"},
                    configure=_configure,
                    timeout=POOL_TIMEOUT,
                    name="meter-worker",
                    open=True,
                )
                _pools[url] = pool
    return pool


def forget_after_fork() -> None:
    """In a freshly forked child: forget the parent's pools (never touching their sockets)."""
    with _lock:
        _inherited.extend(_pools.values())
        _pools.clear()


def close_all() -> None:
    """Close this process's pools (worker process shutdown)."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def _jsonb(value: Any) -> Jsonb:
    # meter.types.dumps is exact for Decimal and never goes through float.
    return Jsonb(t.dumps(value), dumps=_as_is)


def apply_events(
    url: str, pool_size: int, events: list[Any], source: str | None = None
) -> list[dict[str, Any]]:
    """``meter.apply_events(events, source)`` in one transaction; one row per event, by index.

    ``source`` (the task id) makes a redelivered batch's dead letters count attempts on the
    rows recorded the first time instead of adding new ones.

    Raises:
        psycopg.Error, PoolTimeout: the whole call failed (classify with
            :func:`worker.retry.is_transient`).
    """
    with _pool(url, pool_size).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_SQL_APPLY_EVENTS, (_jsonb(events), source))
        return cur.fetchall()


def record_dead_letter(
    url: str,
    pool_size: int,
    *,
    op: str,
    payload: Any,
    sqlstate: str | None,
    message: str,
    source: str | None,
    namespace: str,
) -> int:
    """``meter.record_dead_letter``: store an event that can never succeed; its id.

    The same ``source`` (the Celery task id) recorded again counts an attempt instead of
    adding a row, so a redelivered message does not duplicate its dead letter.
    """
    with _pool(url, pool_size).connection() as conn:
        row = conn.execute(
            _SQL_RECORD_DEAD_LETTER,
            (op, _jsonb(payload), sqlstate, message, source, namespace),
        ).fetchone()
    assert row is not None
    return int(row[0])


def release_expired_reservations(url: str, pool_size: int, batch_size: int) -> int:
    """One bounded round of the expiry sweep over every namespace; how many expired."""
    with _pool(url, pool_size).connection() as conn:
        row = conn.execute(_SQL_RELEASE_EXPIRED, (batch_size,)).fetchone()
    assert row is not None
    return int(row[0])
