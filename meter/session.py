"""The session settings Meter's readers and writers need from a PostgreSQL connection.

psycopg reads ``timestamptz`` and ``date`` only in ``DateStyle`` ISO, and the SDK reads
``interval`` only in ``IntervalStyle`` postgres (:class:`meter.client._IntervalLoader`).
A server, database or role may default to others (``ALTER DATABASE ... SET datestyle``),
and so may a conninfo's ``options``: results then fail to load after the statement ran,
which for a write means after it committed.

The client encoding must be UTF8: ``jsonb`` parameters (metadata, events) are sent as
UTF-8 bytes, which a server in another client encoding decodes as that encoding (``é``
stored as ``Ã©``), and an identifier or result the encoding cannot hold fails in psycopg's
own encoding, outside Meter's errors. ``PGCLIENTENCODING`` or a conninfo's
``client_encoding`` may set another.

All three settings are reported to the client (``ParameterStatus``), so checking them
costs no round trip. Connections Meter opens itself get them for the session when they
lack them (:func:`use_settings`); a caller's connection gets them for one call only,
transaction-locally, and keeps its own (``MeterClient``).
"""

from __future__ import annotations

from typing import Any, Final

# DateStyle "ISO" sets the output format only: the input order (DMY, MDY) stays as it was.
SET_FOR_SESSION: Final = (
    "SELECT set_config('DateStyle', 'ISO', false), set_config('IntervalStyle', 'postgres', false),"
    " set_config('client_encoding', 'UTF8', false)"
)
SET_FOR_TRANSACTION: Final = (
    "SELECT set_config('DateStyle', 'ISO', true), set_config('IntervalStyle', 'postgres', true),"
    " set_config('client_encoding', 'UTF8', true)"
)
RESTORE_FOR_TRANSACTION: Final = (
    "SELECT set_config('DateStyle', %s, true), set_config('IntervalStyle', %s, true),"
    " set_config('client_encoding', %s, true)"
)


def current(conn: Any) -> tuple[str, str, str]:
    """The session's ``DateStyle``, ``IntervalStyle`` and ``client_encoding`` as last
    reported by the server."""
    info = conn.info
    return (
        info.parameter_status("DateStyle") or "ISO, MDY",
        info.parameter_status("IntervalStyle") or "postgres",
        info.parameter_status("client_encoding") or "UTF8",
    )


def needs_settings(conn: Any) -> bool:
    """True when ``conn`` would give results Meter cannot load, or garble what it sends."""
    date_style, interval_style, encoding = current(conn)
    return (
        not date_style.startswith("ISO")
        or interval_style != "postgres"
        or encoding.upper() not in ("UTF8", "UNICODE")
    )


def use_settings(conn: Any) -> None:
    """Give a connection Meter opened itself (autocommit) the settings it needs, for good."""
    if needs_settings(conn):
        conn.execute(SET_FOR_SESSION)
