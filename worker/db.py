"""PostgreSQL access of the worker: one connection pool per process, the SQL it calls.

Celery's prefork pool forks its children after importing the app, so a pool created in the
parent would share sockets with every child. Pools are therefore created lazily, on first
use, in the process that uses them; :func:`forget_after_fork` (hooked to
``worker_process_init``) drops any inherited one. Connections are autocommit: every call
below is one statement, hence one transaction.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg.errors import Diagnostic
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import ConnectionPool

from meter import session, wire
from meter import types as t

__all__ = [
    "apply_events",
    "close_all",
    "drop_old_partitions",
    "ensure_partitions",
    "forget_after_fork",
    "prune_idempotency_keys",
    "record_dead_letter",
    "record_maintenance_run",
    "record_orphan",
    "release_expired_reservations",
    "roll_periods",
]

logger = logging.getLogger(__name__)

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
# The same call when nobody waits for the results: each event's result document is not
# built, sent or parsed (parsing them was the largest part of a worker's own CPU per batch,
# building them ~6% of the backend's). Two constant texts, not one built: no SQL text here
# is assembled at run time (tests/integration/test_hostile.py checks it).
_SQL_APPLY_EVENTS_NO_RESULTS: Final = (
    "SELECT idx, ok, status, result, error_sqlstate, error_message"
    " FROM meter.apply_events(%s::jsonb, %s::text, false)"
)
_SQL_RECORD_DEAD_LETTER: Final = (
    "SELECT meter.record_dead_letter(%s::text, %s::jsonb, %s::text, %s::text, %s::text,"
    " %s::text) AS dead_letter_id"
)
_SQL_RECORD_ORPHAN: Final = (
    "SELECT applied, status, result, dead_letter_id"
    " FROM meter.record_orphan(%s::jsonb, %s::text, %s::text)"
)
_SQL_RELEASE_EXPIRED: Final = (
    "SELECT meter.release_expired_reservations(NULL, %s::integer) AS expired"
)
_SQL_ROLL_PERIODS: Final = (
    "SELECT * FROM meter.roll_periods(NULL, coalesce(%s::timestamptz, now()), %s::integer)"
)
_SQL_ENSURE_PARTITIONS: Final = "SELECT meter.ensure_partitions(%s::integer) AS name"
_SQL_DROP_OLD_PARTITIONS: Final = "SELECT meter.drop_old_partitions(%s::integer) AS name"
# The calls of drop_old_partitions that drop a backlog one month at a time, oldest first.
_SQL_RETENTION_BACKLOG: Final = "SELECT months FROM meter.retention_backlog(%s::integer)"
_SQL_PRUNE_KEYS: Final = (
    "SELECT meter.prune_idempotency_keys(%s::integer, %s::integer,"
    " coalesce(%s::timestamptz, now())) AS pruned"
)
_SQL_RECORD_RUN: Final = (
    "SELECT meter.record_maintenance_run(%s::text, %s::boolean, %s::jsonb, %s::text,"
    " %s::timestamptz)"
)


def _log_warning(diag: Diagnostic) -> None:
    if diag.severity_nonlocalized == "WARNING":
        logger.warning("%s", diag.message_primary)


def _configure(conn: psycopg.Connection[Any]) -> None:
    # jsonb results keep fractions exact (Decimal), never float; times in the style
    # psycopg reads, whatever the database's default (meter.session).
    set_json_loads(t.loads, conn)
    session.use_settings(conn)
    conn.add_notice_handler(_log_warning)  # e.g. drop_old_partitions keeping months


def _as_is(text: str) -> str:
    return text


def _pool(url: str, size: int) -> ConnectionPool[Any]:
    pool = _pools.get(url)
    if pool is None:
        with _lock:
            pool = _pools.get(url)
            if pool is None:
                # Empty at first, as MeterClient's pool (see there): the first task would
                # otherwise wait for an opening connection and so open a second one, and
                # a process running one task at a time would alternate between the two.
                pool = ConnectionPool(
                    url,
                    min_size=0,
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
    return Jsonb(wire.dumps(value), dumps=_as_is)


def apply_events(
    url: str,
    pool_size: int,
    events: list[Any] | str,
    source: str | None = None,
    *,
    results: bool = True,
) -> list[dict[str, Any]]:
    """``meter.apply_events(events, source)`` in one transaction; one row per event, by index.

    ``events``: the events, or the JSON text of their array, sent to the server as it is.
    ``source`` (the task id) makes a redelivered batch's dead letters count attempts on the
    rows recorded the first time instead of adding new ones. ``results=False``: every
    row's ``result`` is ``None`` (the events apply the same; only the documents that would
    report their balances are not built).

    Raises:
        psycopg.Error, PoolTimeout: the whole call failed (classify with
            :func:`worker.retry.is_transient`).
    """
    with _pool(url, pool_size).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        sql = _SQL_APPLY_EVENTS if results else _SQL_APPLY_EVENTS_NO_RESULTS
        param = Jsonb(events, dumps=_as_is) if isinstance(events, str) else _jsonb(events)
        cur.execute(sql, (param, source))
        return cur.fetchall()


def _unstorable(payload: Any) -> Jsonb:
    """``payload`` kept as its ``ascii()`` text, which ``jsonb`` always stores."""
    try:
        shown = ascii(payload)
    except RecursionError:
        shown = "<nested too deeply to show>"
    return Jsonb({"unstorable": shown[:100_000]}, dumps=wire.dumps)


def _storable(payload: Any) -> Jsonb:
    """A dead letter's payload as ``jsonb``, whatever it holds.

    What ``jsonb`` cannot store (a NUL character, a lone surrogate, a value JSON has no
    form for), only a crafted message can carry; it is kept as its ``ascii()`` text under
    ``"unstorable"``, so that the dead letter is recorded rather than retried until the
    message is dropped. Such an event can never be applied anyway.
    """
    try:
        text = wire.dumps(payload)
        text.encode("utf-8")  # a lone surrogate: psycopg could not send it
    except (TypeError, ValueError, RecursionError):
        return _unstorable(payload)
    return Jsonb(text, dumps=_as_is)


def _text(value: str | None) -> str | None:
    """``value`` as text PostgreSQL can store: a NUL character or a lone surrogate (which
    only a crafted message carries) is written as its backslash escape."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _sqlstate(sqlstate: str | None) -> str | None:
    """A SQLSTATE as stored: five characters, as every real one has; a crafted verdict's
    longer text is cut and its NUL escaped."""
    text = _text(sqlstate)
    return None if text is None else text[:5]


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

    Whatever a crafted message holds, the dead letter is recorded; else it would fail
    every time, and the message loop or be dropped. A NUL or a lone surrogate in the text
    is escaped (a source longer than 200 characters is stored as its hash, by the SQL),
    the SQLSTATE stored as its first five characters. What PostgreSQL still refuses to
    store (a data exception, class 22: a number beyond ``numeric``'s range; a program limit, class 54: a namespace
    too long for an index key) is filed with the operators (``''``) with the reason
    appended, and if need be the payload kept as its ``ascii()`` text under
    ``"unstorable"``. Other errors (the database down or read-only) are raised.
    """
    if _text(namespace) != namespace:  # no tenant's: a crafted message's; the operators'
        namespace = ""
    # a crafted message's task id (the source) or op may be no text at all
    source = None if source is None else str(source)

    def record(namespace: str, stored: Jsonb, message: str) -> int:
        with _pool(url, pool_size).connection() as conn:
            row = conn.execute(
                _SQL_RECORD_DEAD_LETTER,
                (
                    _text(str(op)),
                    stored,
                    _sqlstate(sqlstate),
                    _text(message),
                    _text(source),  # hashed by the SQL when too long to index (049)
                    namespace,
                ),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def unstorable(exc: psycopg.Error) -> bool:
        return (getattr(exc, "sqlstate", None) or "").startswith(("22", "54"))

    stored = _storable(payload)
    try:
        return record(namespace, stored, message)
    except psycopg.Error as exc:
        if not unstorable(exc):
            raise
        logger.error("cannot store the dead letter of %s as it is: %r", source, exc)
        reason = (str(exc).strip().splitlines() or [exc.sqlstate])[0]
        message = f"{message} (filed with the operators: not storable as it is: {reason})"
    if namespace:  # its namespace may be what cannot be stored
        try:
            return record("", stored, message)
        except psycopg.Error as exc:
            if not unstorable(exc):
                raise
    return record("", _unstorable(payload), message)  # then its payload is


def record_orphan(
    url: str, pool_size: int, *, payload: Any, message: str, source: str | None
) -> dict[str, Any]:
    """``meter.record_orphan``: file a commit or release whose reservation never came as a
    dead letter (MT003), or apply it if the reservation exists by now.

    Returns ``{"applied", "status", "result", "dead_letter_id"}``.
    """
    with _pool(url, pool_size).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_SQL_RECORD_ORPHAN, (_jsonb(payload), message, source))
        row = cur.fetchone()
    assert row is not None
    return dict(row)


def release_expired_reservations(url: str, pool_size: int, batch_size: int) -> int:
    """One bounded round of the expiry sweep over every namespace; how many expired."""
    with _pool(url, pool_size).connection() as conn:
        row = conn.execute(_SQL_RELEASE_EXPIRED, (batch_size,)).fetchone()
    assert row is not None
    return int(row[0])


def roll_periods(
    url: str, pool_size: int, batch_size: int, now: datetime | None = None
) -> list[dict[str, Any]]:
    """One bounded round of ``meter.roll_periods`` over every namespace, as of ``now``
    (default: the database clock); one dict per step (see the SQL function)."""
    with _pool(url, pool_size).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        # Never prepared: a statement `SELECT *` prepared on a pooled connection (psycopg
        # does on its fifth run there) fails "cached plan must not change result type"
        # (0A000, not retried) at every run on that connection once a migration changes
        # roll_periods' columns, up to the pool's max_lifetime. Once a minute, its planning
        # costs nothing that counts. The other statements here name the columns they read.
        cur.execute(_SQL_ROLL_PERIODS, (now, batch_size), prepare=False)
        return cur.fetchall()


def ensure_partitions(url: str, pool_size: int, months_ahead: int) -> list[str]:
    """``meter.ensure_partitions``: this month's ledger partition and the next
    ``months_ahead``; the names created."""
    with _pool(url, pool_size).connection() as conn:
        return [str(row[0]) for row in conn.execute(_SQL_ENSURE_PARTITIONS, (months_ahead,))]


def drop_old_partitions(url: str, pool_size: int, older_than_months: int) -> list[str]:
    """``meter.drop_old_partitions``: fold the months older than ``older_than_months`` into
    the retention checkpoints and drop them; the names dropped. Its warning (months kept
    for a period roll that is behind) is logged, as every WARNING of the worker's SQL.

    One month per call and transaction, oldest first (045): each call holds the ledger's
    ACCESS EXCLUSIVE lock, which every read and write of the ledger waits for, from its
    month's lock to its commit; a call dropping a backlog of months would hold it across
    all of their folds. The last call is ``drop_old_partitions(older_than_months)`` itself,
    which alone says what it kept for the roll; the calls before it say nothing, and the
    first that drops nothing (a month the roll keeps, or another worker's) ends them."""
    dropped: list[str] = []
    with _pool(url, pool_size).connection() as conn:
        ages = [int(row[0]) for row in conn.execute(_SQL_RETENTION_BACKLOG, (older_than_months,))]
        for age in ages:
            names = _drop_old_partitions(conn, age, quiet=True)
            dropped += names
            if not names:
                break
        dropped += _drop_old_partitions(conn, older_than_months, quiet=False)
    return dropped


def _drop_old_partitions(conn: psycopg.Connection[Any], months: int, *, quiet: bool) -> list[str]:
    with conn.transaction():
        # The SQL refuses any other level (its fold must see what it drops), whatever the
        # database's default_transaction_isolation says.
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        if quiet:  # its warning, if any, is the last call's to give
            conn.execute("SET LOCAL client_min_messages = error")
        return [str(row[0]) for row in conn.execute(_SQL_DROP_OLD_PARTITIONS, (months,))]


def prune_idempotency_keys(
    url: str, pool_size: int, older_than_days: int, batch_size: int, now: datetime | None = None
) -> int:
    """One bounded round of ``meter.prune_idempotency_keys``; how many keys were deleted."""
    with _pool(url, pool_size).connection() as conn:
        row = conn.execute(_SQL_PRUNE_KEYS, (older_than_days, batch_size, now)).fetchone()
    assert row is not None
    return int(row[0])


def record_maintenance_run(
    url: str,
    pool_size: int,
    *,
    task: str,
    ok: bool,
    result: Any = None,
    error: str | None = None,
    started_at: datetime | None = None,
) -> None:
    """``meter.record_maintenance_run``: the outcome of one run of a periodic task."""
    with _pool(url, pool_size).connection() as conn:
        conn.execute(
            _SQL_RECORD_RUN,
            (task, ok, None if result is None else _jsonb(result), error, started_at),
        )
