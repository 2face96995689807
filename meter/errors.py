"""Meter's exception tree and the mapping from database errors.

Every refusal raised by the ``meter.*`` SQL functions carries a SQLSTATE of class ``MT``
(see ``docs/internals.md``); :func:`from_psycopg` turns those, and connection failures,
into the classes below. The exceptions are picklable with their attributes, so they can
cross process boundaries (Celery results, multiprocessing).
"""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = [
    "IdempotencyConflictError",
    "MeterConnectionError",
    "MeterError",
    "NotFoundError",
    "PublishError",
    "TenantError",
    "ValidationError",
    "from_psycopg",
    "from_sqlstate",
]


class MeterError(Exception):
    """Meter operation failed."""

    sqlstate: str | None
    """The SQLSTATE the database raised, or ``None`` when there was none."""

    parameter: str | None
    """The offending parameter's name (without the ``p_`` prefix), when known."""

    def __init__(
        self,
        message: str | None = None,
        *,
        sqlstate: str | None = None,
        parameter: str | None = None,
    ) -> None:
        if message is None:
            message = (self.__class__.__doc__ or "").strip() or self.__class__.__name__
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.parameter = parameter

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k not in _INIT_ATTRS}
        return (
            _rebuild,
            (type(self), self.message, self.sqlstate, self.parameter),
            state or None,
        )

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={value!r}"
            for name, value in (("sqlstate", self.sqlstate), ("parameter", self.parameter))
            if value is not None
        )
        return f"{self.__class__.__name__}({self.message!r}{extra})"


_INIT_ATTRS = frozenset({"message", "sqlstate", "parameter"})


def _rebuild(
    cls: type[MeterError], message: str, sqlstate: str | None, parameter: str | None
) -> MeterError:
    # Bypass a subclass's own __init__ signature: restore exactly what was pickled.
    exc = cls.__new__(cls)
    MeterError.__init__(exc, message, sqlstate=sqlstate, parameter=parameter)
    return exc


class ValidationError(MeterError):
    """An argument is invalid."""


class IdempotencyConflictError(MeterError):
    """An idempotency key was reused for a different request."""


class NotFoundError(MeterError):
    """The referenced account or entry does not exist."""


class TenantError(MeterError):
    """The tenant context is missing or differs from the namespace."""


class MeterConnectionError(MeterError):
    """The database cannot be reached."""


class PublishError(MeterConnectionError):
    """The broker did not confirm a message: it may have been enqueued or not."""

    events: list[dict[str, Any]]
    """What is in doubt, as :meth:`meter.producer.MeterProducer.send_many` items, each with
    the idempotency key (and reservation id) it was sent with: sending them again through
    a producer of the same namespace applies each once, whether the broker took the first
    message or not. A new call without those keys would be a second event."""

    def __init__(
        self,
        message: str | None = None,
        *,
        events: list[dict[str, Any]] | None = None,
        sqlstate: str | None = None,
        parameter: str | None = None,
    ) -> None:
        super().__init__(message, sqlstate=sqlstate, parameter=parameter)
        self.events = [] if events is None else events


_BY_SQLSTATE: dict[str, type[MeterError]] = {
    "MT001": ValidationError,
    "MT002": IdempotencyConflictError,
    "MT003": NotFoundError,
    "MT004": TenantError,
}

# Errors meaning "the connection is gone", whatever the statement was:
# class 08 (connection exception), the server shutting down or starting up, and a session
# it ended for sitting idle (idle_session_timeout) or for a transaction that sat idle or ran
# too long (idle_in_transaction_session_timeout, transaction_timeout).
_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03", "25P04"})


def _is_connection_failure(exc: BaseException, sqlstate: str | None) -> bool:
    if sqlstate is None:
        # Client-side failures (no server response): a refused or lost connection, a pool
        # timeout (psycopg_pool.PoolTimeout is an OperationalError), a closed connection.
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith("08") or sqlstate in _CONNECTION_SQLSTATES


def from_sqlstate(
    sqlstate: str | None, message: str | None, parameter: str | None = None
) -> MeterError:
    """Build the :class:`MeterError` subclass for a SQLSTATE reported as data.

    For errors that crossed a boundary as text rather than as a raised exception: the
    outcome of a pipeline task, a dead letter. ``MT001``..``MT004`` map as in
    :func:`from_psycopg`; anything else is a plain ``MeterError``.
    """
    cls = _BY_SQLSTATE.get(sqlstate or "", MeterError)
    return cls(message or None, sqlstate=sqlstate, parameter=parameter)


def from_psycopg(exc: psycopg.Error) -> MeterError:
    """Convert a psycopg error into the matching :class:`MeterError`.

    Parameters:
        exc: the error raised by psycopg (or any object with ``sqlstate`` and ``diag``).

    Returns:
        ``ValidationError`` (MT001), ``IdempotencyConflictError`` (MT002),
        ``NotFoundError`` (MT003), ``TenantError`` (MT004), ``MeterConnectionError`` for
        connection failures and pool timeouts, a ``MeterError`` with SQLSTATE 40001
        naming ``reservation_id`` for a reserve that collided with a concurrent one of
        its id under REPEATABLE READ or SERIALIZABLE, otherwise a plain ``MeterError``; its
        message is the database's primary message, ``sqlstate`` and ``parameter``
        (the error's ``COLUMN`` field) are copied. Raise it ``from exc``.
    """
    sqlstate: str | None = getattr(exc, "sqlstate", None) or None
    diag = getattr(exc, "diag", None)
    message: str | None = getattr(diag, "message_primary", None) if diag else None
    parameter: str | None = getattr(diag, "column_name", None) if diag else None
    if not message:
        message = str(exc).strip() or type(exc).__name__
    if sqlstate == "23505" and getattr(diag, "constraint_name", None) == "reservations_pkey":
        # reserve locks its id, then looks it up: only a transaction whose snapshot
        # predates a concurrent reserve of that id (REPEATABLE READ, SERIALIZABLE) misses
        # its hold and collides with it. Like a key claimed concurrently, a serialization
        # failure: run again, the call replays that reserve or refuses another by name.
        return MeterError(
            "reservation_id: taken by a concurrent reserve committed after this "
            "transaction's snapshot; retry to replay it",
            sqlstate="40001",
            parameter="reservation_id",
        )
    cls = _BY_SQLSTATE.get(sqlstate or "")
    if cls is None:
        cls = MeterConnectionError if _is_connection_failure(exc, sqlstate) else MeterError
    return cls(message, sqlstate=sqlstate, parameter=parameter or None)
