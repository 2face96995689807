"""The exception tree and the mapping from database errors (meter.errors), no database."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import psycopg
import psycopg.errors
import pytest
from psycopg_pool import PoolClosed, PoolTimeout

from meter.errors import (
    IdempotencyConflictError,
    MeterConnectionError,
    MeterError,
    NotFoundError,
    PublishError,
    TenantError,
    ValidationError,
    from_psycopg,
    from_sqlstate,
)

SUBCLASSES = [
    ValidationError,
    IdempotencyConflictError,
    NotFoundError,
    TenantError,
    MeterConnectionError,
]
ALL = [MeterError, *SUBCLASSES, PublishError]


@dataclass
class FakeDiag:
    message_primary: str | None = None
    column_name: str | None = None


@dataclass
class FakeError:
    """What from_psycopg reads of a psycopg error: ``sqlstate`` and ``diag``."""

    sqlstate: str | None
    diag: FakeDiag

    def __str__(self) -> str:
        return f"ERROR: {self.diag.message_primary}\nCONTEXT: PL/pgSQL function ..."


def fake(sqlstate, message="amount: must be a finite number", column="amount"):
    return FakeError(sqlstate, FakeDiag(message, column))


# --------------------------------------------------------------------------- classes


def test_hierarchy():
    assert issubclass(MeterError, Exception)
    for cls in SUBCLASSES:
        assert issubclass(cls, MeterError)
        assert cls.__bases__ == (MeterError,)
    # distinct classes: catching one does not catch another
    assert len(set(SUBCLASSES)) == len(SUBCLASSES)
    assert not issubclass(MeterConnectionError, ValidationError)
    # a broker that did not confirm is a connection failure, caught as one
    assert PublishError.__bases__ == (MeterConnectionError,)


@pytest.mark.parametrize("cls", ALL)
def test_one_line_docstring_is_the_default_message(cls):
    doc = cls.__doc__
    assert doc and "\n" not in doc.strip()
    err = cls()
    assert str(err) == doc.strip()
    assert err.message == doc.strip()
    assert (err.sqlstate, err.parameter) == (None, None)


def test_attributes_and_str():
    err = ValidationError("amount: must be a finite number", sqlstate="MT001", parameter="amount")
    assert str(err) == "amount: must be a finite number"
    assert err.args == ("amount: must be a finite number",)
    assert (err.sqlstate, err.parameter) == ("MT001", "amount")
    assert repr(err) == (
        "ValidationError('amount: must be a finite number', sqlstate='MT001', parameter='amount')"
    )
    assert repr(MeterError("boom")) == "MeterError('boom')"


def test_sqlstate_and_parameter_are_keyword_only():
    with pytest.raises(TypeError):
        MeterError("x", "MT001")  # type: ignore[misc]


@pytest.mark.parametrize("cls", ALL)
def test_pickle_round_trip_keeps_class_message_and_attributes(cls):
    err = cls("unit: must not be empty", sqlstate="MT001", parameter="unit")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(err, protocol=protocol))
        assert type(back) is cls
        assert str(back) == "unit: must not be empty"
        assert back.message == err.message
        assert (back.sqlstate, back.parameter) == ("MT001", "unit")
        assert back.args == err.args


def test_pickle_round_trip_of_defaults_and_raised_errors():
    back = pickle.loads(pickle.dumps(TenantError()))
    assert (str(back), back.sqlstate, back.parameter) == (TenantError.__doc__, None, None)
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise IdempotencyConflictError("k reused", sqlstate="MT002") from inner
    except IdempotencyConflictError as raised:
        back = pickle.loads(pickle.dumps(raised))
    assert type(back) is IdempotencyConflictError
    assert (str(back), back.sqlstate) == ("k reused", "MT002")


def test_pickle_keeps_extra_state():
    err = NotFoundError("user_id: no such account", sqlstate="MT003", parameter="user_id")
    err.add_note("while opening a period")
    err.extra = 42  # type: ignore[attr-defined]
    back = pickle.loads(pickle.dumps(err))
    assert back.__notes__ == ["while opening a period"]
    assert back.extra == 42
    assert back.parameter == "user_id"


def test_pickle_of_a_subclass_with_its_own_signature():
    class Custom(MeterError):
        """Custom failure."""

        def __init__(self, code: int) -> None:
            super().__init__(f"code {code}", sqlstate="XX000")
            self.code = code

    globals()["Custom"] = Custom  # picklable by reference
    Custom.__qualname__ = "Custom"
    try:
        back = pickle.loads(pickle.dumps(Custom(7)))
        assert type(back) is Custom
        assert (str(back), back.sqlstate, back.code) == ("code 7", "XX000", 7)
    finally:
        del globals()["Custom"]


# ------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [
        ("MT001", ValidationError),
        ("MT002", IdempotencyConflictError),
        ("MT003", NotFoundError),
        ("MT004", TenantError),
    ],
)
def test_meter_sqlstates(sqlstate, cls):
    err = from_psycopg(fake(sqlstate, "amount: must be a finite number, got NaN", "amount"))
    assert type(err) is cls
    assert err.sqlstate == sqlstate
    assert err.parameter == "amount"
    assert str(err) == "amount: must be a finite number, got NaN"  # primary message only


def test_unknown_sqlstate_is_a_plain_meter_error():
    err = from_psycopg(fake("MT999", "something new", None))
    assert type(err) is MeterError
    assert (err.sqlstate, err.parameter, str(err)) == ("MT999", None, "something new")


def test_empty_column_name_is_no_parameter():
    assert from_psycopg(fake("MT004", "namespace: no tenant", "")).parameter is None


def test_message_falls_back_to_str_without_a_primary_message():
    err = from_psycopg(FakeError("MT001", FakeDiag(None, None)))
    assert str(err).startswith("ERROR: None")
    err = from_psycopg(psycopg.DataError("bad data"))
    assert str(err) == "bad data"


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [
        ("23505", MeterError),  # unique_violation
        ("40001", MeterError),  # serialization_failure
        ("40P01", MeterError),  # deadlock_detected
        ("22012", MeterError),  # division_by_zero
        ("42883", MeterError),  # undefined_function
        ("25P02", MeterError),  # in_failed_sql_transaction
        ("08000", MeterConnectionError),
        ("08001", MeterConnectionError),
        ("08006", MeterConnectionError),
        ("57P01", MeterConnectionError),  # admin_shutdown
        ("57P02", MeterConnectionError),  # crash_shutdown
        ("57P03", MeterConnectionError),  # cannot_connect_now
        ("57P05", MeterConnectionError),  # idle_session_timeout
        ("25P03", MeterConnectionError),  # idle_in_transaction_session_timeout
        ("25P04", MeterConnectionError),  # transaction_timeout
        ("57014", MeterError),  # query_canceled: the server is fine
    ],
)
def test_real_psycopg_error_classes(sqlstate, cls):
    exc_class = psycopg.errors.lookup(sqlstate)
    err = from_psycopg(exc_class("server said no"))
    assert type(err) is cls
    assert err.sqlstate == sqlstate
    assert str(err) == "server said no"


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection failed: Connection refused"),
        psycopg.OperationalError("the connection is closed"),
        PoolTimeout("couldn't get a connection after 30.00 sec"),
        PoolClosed("the pool 'meter' is already closed"),
    ],
    ids=["refused", "closed", "pool-timeout", "pool-closed"],
)
def test_connection_failures(exc):
    err = from_psycopg(exc)
    assert type(err) is MeterConnectionError
    assert err.sqlstate is None
    assert str(err) == str(exc)


@pytest.mark.parametrize(
    "exc",
    [psycopg.InterfaceError("cursor already closed"), psycopg.ProgrammingError("bad query")],
)
def test_client_side_errors_are_not_connection_errors(exc):
    assert type(from_psycopg(exc)) is MeterError


def test_mapped_error_pickles():
    err = from_psycopg(fake("MT002", "idempotency_key: 'k' was already used", "idempotency_key"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is IdempotencyConflictError
    assert (back.sqlstate, back.parameter) == ("MT002", "idempotency_key")


@pytest.mark.parametrize(
    ("sqlstate", "cls"),
    [
        ("MT001", ValidationError),
        ("MT002", IdempotencyConflictError),
        ("MT003", NotFoundError),
        ("MT004", TenantError),
        ("40001", MeterError),
        (None, MeterError),
    ],
)
def test_from_sqlstate_reported_as_data(sqlstate, cls):
    err = from_sqlstate(sqlstate, "unit: must not be empty", "unit")
    assert type(err) is cls
    assert (err.sqlstate, err.parameter, str(err)) == (sqlstate, "unit", "unit: must not be empty")
    assert str(from_sqlstate(sqlstate, None)) == cls.__doc__  # the default message


def test_publish_error_carries_its_events_across_pickling():
    events = [{"op": "consume", "user_id": "u1", "amount": "5", "idempotency_key": "k"}]
    err = PublishError("the broker did not confirm the message", events=events)
    assert err.events == events and PublishError().events == []
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is PublishError
    assert (str(back), back.events) == ("the broker did not confirm the message", events)


def _server_error(cls: type[psycopg.Error], sqlstate: str, message: str, routine: str = ""):
    """A psycopg error carrying the fields a PostgreSQL ErrorResponse has."""
    fields = {"S": "FEHLER", "V": "ERROR", "C": sqlstate, "M": message}
    if routine:
        fields |= {"F": "plancache.c", "L": "722", "R": routine}
    info = {psycopg.pq.DiagnosticField(ord(k)): v.encode() for k, v in fields.items()}
    return cls(message, info=info)


def test_a_stale_prepared_statement_is_told_in_any_language_of_the_server():
    # Review R4a: told by its English message only, a stale statement on a server whose
    # lc_messages is not English ('gecachter Plan ...') was never run again: every call
    # of the statement kept failing on that connection, as before the fix.
    from meter.client import _stale_plan

    stale = psycopg.errors.FeatureNotSupported
    german = "gecachter Plan darf den Ergebnistyp nicht ändern"
    assert _stale_plan(_server_error(stale, "0A000", german, "RevalidateCachedQuery"))
    english = "cached plan must not change result type"
    assert _stale_plan(_server_error(stale, "0A000", english, "RevalidateCachedQuery"))
    assert _stale_plan(_server_error(stale, "0A000", english))  # no routine sent
    other = "FOR UPDATE kann nicht mit DISTINCT verwendet werden"
    assert not _stale_plan(_server_error(stale, "0A000", other, "CheckSelectLocking"))
    assert not _stale_plan(
        _server_error(psycopg.errors.SyntaxError, "42601", german, "RevalidateCachedQuery")
    )
