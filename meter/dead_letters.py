"""Dead letters: events the pipeline could never apply, kept in ``meter.dead_letters``.

An event lands there when it can never succeed as sent (invalid, idempotency conflict,
unknown reference, wrong tenant: recorded by ``meter.apply_events`` itself), when a worker
gives up on it (a commit or release whose reserve never arrived within the orphan horizon,
``MT003``; a message that killed its worker again and again, ``MTW01``; a transient error
that outlasted every retry), or when a message could not even be read. Nothing is dropped:
each can be listed, re-applied once its cause is fixed, or discarded. These functions are
what ``meter dead-letters`` runs; they take an open connection of a privileged role
(superuser or a ``meter_maintenance`` member), or a tenant's with ``meter.tenant`` set.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg.types.json import set_json_loads

from meter import types as t
from meter.errors import from_psycopg

__all__ = ["STATUSES", "discard", "list_dead_letters", "retry", "to_retry"]

STATUSES: Final = ("dead", "retried", "discarded", "all")
"""What :func:`list_dead_letters` can filter on (``all``: every status)."""

Row = dict[str, Any]


# The `SELECT *` statements are never prepared: psycopg prepares one on its fifth run on a
# connection, and once a migration changed the function's columns (or the table's whose rows
# it returns) the prepared one failed "cached plan must not change result type", or lacked
# the new column, for as long as a caller's autocommit connection lived.


def _cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Row]:
    cur = conn.cursor(row_factory=dict_row)
    set_json_loads(t.loads, cur)  # payload amounts and results stay exact
    return cur


def list_dead_letters(
    conn: psycopg.Connection[Any],
    status: str = "dead",
    limit: int = 100,
    namespace: str | None = None,
) -> list[Row]:
    """Dead letters, newest first.

    Parameters:
        conn: an open connection.
        status: ``dead`` (waiting), ``retried``, ``discarded`` or ``all``.
        limit: at most this many (1..10000).
        namespace: only this namespace (``None``: every namespace, privileged roles only).

    Returns:
        ``meter.dead_letters`` rows as dicts: ``dead_letter_id``, ``namespace``, ``op``,
        ``payload`` (the event as sent), ``error_sqlstate``, ``error_message``,
        ``attempts``, ``first_failed_at``, ``last_failed_at``, ``status``, ``resolved_at``,
        ``source``.

    Raises:
        ValidationError, TenantError, MeterConnectionError, MeterError.
    """
    if status not in STATUSES:
        raise t.invalid("status", f"must be one of {', '.join(STATUSES)}, got {t.shown(status)}")
    t.check_int(limit, "limit", min_value=1, max_value=t.MAX_LIMIT)
    try:
        with _cursor(conn) as cur:
            cur.execute(
                "SELECT * FROM meter.list_dead_letters(%s::text, %s::integer, %s::text)",
                (status, limit, namespace),
                prepare=False,
            )
            return cur.fetchall()
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc


def to_retry(conn: psycopg.Connection[Any]) -> list[int]:
    """The ids of every waiting dead letter in the caller's scope (its tenant, or every
    namespace for a privileged role with none), in the order to retry them: reserves first
    (a reserve's retry settles the commits and releases waiting for it), then oldest first.

    Raises:
        TenantError, MeterConnectionError, MeterError.
    """
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            cur.execute("SELECT * FROM meter.dead_letters_to_retry()")
            return [int(row[0]) for row in cur.fetchall()]
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc


def retry(conn: psycopg.Connection[Any], dead_letter_id: int) -> Row:
    """Re-apply a dead letter's event (``meter.retry_dead_letter``).

    On success it is marked ``retried``; otherwise it stays ``dead`` with one more attempt
    and the new error. Idempotency keys make a retry of an event that was in fact applied
    meanwhile a harmless replay.

    Returns:
        ``{"ok", "status", "result", "error_sqlstate", "error_message"}``: ``status`` is
        ``applied``, ``replayed`` or ``refused`` on success, ``not_found`` (the reservation
        still does not exist) or ``error`` otherwise.

    Raises:
        NotFoundError: no dead letter with this id is waiting (unknown, retried or
            discarded).
        ValidationError: the connection's actor context (``meter.actor_id``, ...) was set
            directly to a value ``set_actor`` refuses; the letter is left as it was.
        MeterConnectionError, MeterError.
    """
    t.check_int(dead_letter_id, "dead_letter_id", min_value=1, max_value=t.INT8_MAX)
    try:
        with _cursor(conn) as cur:
            cur.execute(
                "SELECT * FROM meter.retry_dead_letter(%s::bigint)",
                (dead_letter_id,),
                prepare=False,
            )
            row = cur.fetchone()
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc
    assert row is not None
    return row


def discard(conn: psycopg.Connection[Any], dead_letter_id: int) -> bool:
    """Mark a waiting dead letter ``discarded``; ``False`` if none with this id is waiting."""
    t.check_int(dead_letter_id, "dead_letter_id", min_value=1, max_value=t.INT8_MAX)
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(
                "SELECT meter.discard_dead_letter(%s::bigint)", (dead_letter_id,)
            ).fetchone()
    except psycopg.Error as exc:
        raise from_psycopg(exc) from exc
    return bool(row and row[0])
