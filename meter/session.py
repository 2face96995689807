"""The output styles Meter's readers need from a PostgreSQL session.

psycopg reads ``timestamptz`` and ``date`` only in ``DateStyle`` ISO, and the SDK reads
``interval`` only in ``IntervalStyle`` postgres (:class:`meter.client._IntervalLoader`).
A server, database or role may default to others (``ALTER DATABASE ... SET datestyle``),
and so may a conninfo's ``options``: results then fail to load after the statement ran,
which for a write means after it committed. Both settings are reported to the client
(``ParameterStatus``), so checking them costs no round trip.

Connections Meter opens itself get the styles for the session when they lack them
(:func:`use_iso_output`); a caller's connection gets them for one call only, transaction-
locally, and keeps its own (``MeterClient``).
"""

from __future__ import annotations

from typing import Any, Final

# DateStyle "ISO" sets the output format only: the input order (DMY, MDY) stays as it was.
SET_FOR_SESSION: Final = (
    "SELECT set_config('DateStyle', 'ISO', false), set_config('IntervalStyle', 'postgres', false)"
)
SET_FOR_TRANSACTION: Final = (
    "SELECT set_config('DateStyle', 'ISO', true), set_config('IntervalStyle', 'postgres', true)"
)
RESTORE_FOR_TRANSACTION: Final = (
    "SELECT set_config('DateStyle', %s, true), set_config('IntervalStyle', %s, true)"
)


def styles(conn: Any) -> tuple[str, str]:
    """The session's ``DateStyle`` and ``IntervalStyle`` as last reported by the server."""
    info = conn.info
    return (
        info.parameter_status("DateStyle") or "ISO, MDY",
        info.parameter_status("IntervalStyle") or "postgres",
    )


def needs_iso_output(conn: Any) -> bool:
    """True when results of ``conn`` would come in a style Meter's readers cannot load."""
    date_style, interval_style = styles(conn)
    return not date_style.startswith("ISO") or interval_style != "postgres"


def use_iso_output(conn: Any) -> None:
    """Give a connection Meter opened itself (autocommit) the styles it needs, for good."""
    if needs_iso_output(conn):
        conn.execute(SET_FOR_SESSION)
