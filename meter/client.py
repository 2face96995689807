"""The synchronous Meter SDK: :class:`MeterClient`.

Every method is one SQL statement, one round trip, one transaction::

    SELECT * FROM meter.consume(p_user_id => %s::text, ...,
                                p_namespace => meter.ctx(%s, %s, %s, %s, %s))

``meter.ctx`` sets the tenant and the actor context transaction-locally and returns the
namespace, so PostgreSQL evaluates it before the function runs (``docs/internals.md``).
Without an actor context (:meth:`MeterClient.set_actor`) the statement passes the namespace
alone (``meter.ctx(%s)``). Each statement's text is constant, so psycopg prepares it after
a few executions. All arguments are validated in Python first (:mod:`meter.types`): bad
input raises :class:`~meter.errors.ValidationError` and never reaches the database. One
relation between arguments is left to the database: a read's time window whose
``start_time`` is after its ``end_time``, which it refuses, raised as the same
``ValidationError`` naming ``start_time``.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, cast

import psycopg
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import Loader
from psycopg.conninfo import make_conninfo
from psycopg.pq import Format, PipelineStatus, TransactionStatus
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from meter import session
from meter import types as t
from meter.errors import MeterConnectionError, MeterError, ValidationError, from_psycopg

__all__ = ["AUDIT_KINDS", "MeterClient"]

Row = dict[str, Any]

AUDIT_KINDS: Final = frozenset(
    {
        "ledger.allocation",
        "ledger.consumption",
        "ledger.adjustment",
        "ledger.expiration",
        "ledger.carry_over",
        "reservation.active",
        "reservation.committed",
        "reservation.released",
        "reservation.expired",
        "period.open",
        "period.close",
        "period.config",
    }
)
"""The event kinds :meth:`MeterClient.get_audit_events` can filter on."""

DEFAULT_TTL_SECONDS: Final = 300
DEFAULT_BATCH_SIZE: Final = 1000
MAX_BATCH_SIZE: Final = 100000

# invalid_datetime_format, datetime_field_overflow, interval_field_overflow
_INTERVAL_SYNTAX_ERRORS: Final = frozenset({"22007", "22008", "22015"})

_UNSET: Any = object()  # set_actor: "field not passed"
_NO_ACTOR: Final = (None, None, None, None)

# Per statement text: the names of its result's columns as received, and as str. Checked
# against every result: a migration may give a function its columns under other names or in
# another order, their number unchanged, and a result from before it may come on one
# connection and one from after it on the next.
_COLUMNS: dict[str, tuple[tuple[bytes | None, ...], tuple[str, ...]]] = {}

# serialization_failure (a key claimed concurrently), deadlock_detected: retried this often.
_RETRY_SQLSTATES: Final = frozenset({"40001", "40P01"})
_RETRIES: Final = 3


# psycopg prepares a statement run often enough on a connection, and PostgreSQL keeps what
# such a statement returns: once a migration changes the columns of a function it calls
# (sql/062 added get_audit_events' event_id), the server refuses it on that connection for
# as long as the connection lives, before running anything (0A000). Every get_audit_events
# of a client whose connections were open across `meter migrate` failed so, until its pool
# replaced them (max_lifetime: an hour). The call is run again once: on a connection idle
# after the failure at once, its prepared statements dropped first (DEALLOCATE ALL, which
# psycopg sees and forgets its own for); else as its own transaction again (MeterClient._run),
# psycopg having dropped them when it rolled the call's transaction back.
_STALE_PLAN: Final = "cached plan must not change result type"
# Where the server raises it (plancache.c), which it sends untranslated: the message is in
# the server's lc_messages, German on a server set up in a German locale.
_STALE_PLAN_ROUTINE: Final = "RevalidateCachedQuery"


def _stale_plan(exc: BaseException) -> bool:
    """Whether ``exc`` is the server refusing a statement prepared before a migration
    changed what it returns."""
    if not isinstance(exc, psycopg.errors.FeatureNotSupported):
        return False
    diag = exc.diag
    return diag.source_function == _STALE_PLAN_ROUTINE or (
        diag.message_primary is not None and diag.message_primary.startswith(_STALE_PLAN)
    )


def _retry_pause(sqlstate: str | None, retries: int) -> float | None:
    """Seconds to wait before running again a transaction that ``sqlstate`` rolled back
    whole, after ``retries`` retries; None when it is not to be run again."""
    if sqlstate not in _RETRY_SQLSTATES or retries >= _RETRIES:
        return None
    return 0.005 * 2**retries


# A call that is safe to run again (a read, a write carrying its key) and whose connection
# broke under it is run again this often, each time on another connection.
_RECONNECTS: Final = 2

_MAX_TIMEOUT: Final = 86400
"""The longest ``timeout`` a MeterClient takes, in seconds (a day)."""

_IN_DOUBT: Final = "; the call may have committed before the connection broke"
_ONLY_KEYED: Final = (
    ", so it is not run again: only a call with an idempotency key is safe to repeat "
    "(MeterClient(..., generate_keys=True) gives every allocate, consume and adjust one)"
)

_NONE_USABLE: Final = "no usable connection: each one the pool gave failed a round trip"

# The session ended for a transaction that sat idle or ran too long
# (idle_in_transaction_session_timeout, transaction_timeout): the connection is gone, and
# the transaction with it, rolled back. Not run again: it would take as long again.
_ROLLED_BACK_WITH_SESSION: Final = frozenset({"25P03", "25P04"})

# Raised by a pool before anything is sent: nothing can have run.
_NOTHING_SENT: Final = (PoolTimeout, PoolClosed, TooManyRequests)

# How long a call waits for a pooled connection before checking, with one direct connection
# attempt, whether the database is reachable at all (so that a down database fails fast
# instead of after the whole pool timeout).
_PROBE_AFTER: Final = 1.0

# psycopg.connect's keywords that are not connection parameters (a pool's kwargs hold them)
_CONNECT_ONLY: Final = frozenset(
    {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)

# How long a connection may stay out of the client's own pool, kept from one call to the
# next (see MeterClient._run_own_pool): the first call to end after that gives it back, and
# the pool then applies its max_lifetime to it.
_KEEP_FOR: Final = 60.0

# A connection of the client's own pool that has sat idle longer than this (seconds) is
# checked with one round trip before a call uses it: after a server restart, a failover or
# an idle-session timeout it is dead, and the call would fail. Checked, a dead one is
# replaced before anything is sent (HikariCP's aliveBypassWindow, 500 ms, is the model).
_CHECK_IDLE_AFTER: Final = 1.0


# ---------------------------------------------------------------------------- statements


class _FailedBeforeCommit(Exception):
    """``error`` ended a call on a caller's connection that cannot have committed: a
    statement run in a transaction the SDK opened, or its BEGIN, before its COMMIT was sent,
    or anything of a call inside the caller's own open transaction
    (``in_callers_transaction``), which only the caller commits."""

    def __init__(self, error: psycopg.Error, *, in_callers_transaction: bool) -> None:
        super().__init__(error)
        self.error = error
        self.in_callers_transaction = in_callers_transaction


class _Statement(NamedTuple):
    """One API call's SQL, in its two spellings of the ``meter.ctx`` argument."""

    function: str
    plain: str  # meter.ctx(namespace): no actor context
    with_actor: str  # meter.ctx(namespace, actor_id, request_id, on_behalf_of, reason)
    reads: bool  # changes nothing: running it again after a lost connection is safe
    counts: bool  # takes an idempotency key: run twice without one, it counts twice
    text_params: tuple[tuple[int, str], ...]  # (position, name) of each text parameter


def _statement(function: str, *params: str, reads: bool = False) -> _Statement:
    """``SELECT * FROM meter.<function>(p_<name> => %s::<type>, ..., p_namespace => ctx)``.

    ``params`` are ``"name type"`` pairs, in the order the values are passed.
    """
    args = ", ".join(
        f"p_{name} => %s::{type_}" for name, type_ in (p.split(" ", 1) for p in params)
    )
    head = f"SELECT * FROM meter.{function}({args}{', ' if args else ''}p_namespace => "
    return _Statement(
        function,
        head + "meter.ctx(%s))",
        head + "meter.ctx(%s, %s, %s, %s, %s))",
        reads,
        "idempotency_key text" in params,
        tuple((i, p.split(" ", 1)[0]) for i, p in enumerate(params) if p.endswith(" text")),
    )


# PostgreSQL's message when a row's identifiers together exceed what a B-tree index entry
# holds (about 2.7 kB): possible only with non-ASCII identifiers near their limits, which
# are bounded in characters (Appendix C), four bytes each at most.
_INDEX_ROW_TOO_BIG = re.compile(r"index row size \d+ exceeds")


def _oversized(
    stmt: _Statement, params: Sequence[Any], namespace: str, error: MeterError
) -> MeterError:
    """A ValidationError naming the call's largest identifier, for a row too big to index."""
    sizes = [("namespace", len(namespace.encode()))]
    sizes += [
        (name, len(params[i].encode()))
        for i, name in stmt.text_params
        if isinstance(params[i], str)
    ]
    name, size = max(sizes, key=lambda item: item[1])
    total = sum(n for _, n in sizes)
    return ValidationError(
        f"{name}: the identifiers of this call take {total} bytes in UTF-8 together, more "
        f"than one index entry holds; {name} is the largest ({size} bytes): shorten it "
        f"({error.message})",
        sqlstate="MT001",
        parameter=name,
    )


_ACCOUNT = ("user_id text", "event_type text", "unit text", "resource text")

_SQL_ALLOCATE = _statement(
    "allocate",
    "user_id text", "event_type text", "amount numeric", "unit text", "resource text",
    "idempotency_key text", "event_time timestamptz", "metadata jsonb",
)  # fmt: skip
_SQL_CONSUME = _statement(
    "consume",
    "user_id text", "event_type text", "amount numeric", "unit text", "resource text",
    "check_balance boolean", "idempotency_key text", "event_time timestamptz",
    "metadata jsonb",
)  # fmt: skip
_SQL_RESERVE = _statement(
    "reserve",
    "user_id text", "event_type text", "amount numeric", "unit text", "resource text",
    "ttl_seconds integer", "idempotency_key text", "metadata jsonb", "reservation_id text",
)  # fmt: skip
_SQL_COMMIT = _statement("commit", "reservation_id text", "actual_amount numeric", "metadata jsonb")
_SQL_RELEASE = _statement("release", "reservation_id text")
_SQL_ADJUST = _statement(
    "adjust",
    "user_id text", "event_type text", "amount numeric", "unit text", "resource text",
    "reference_id bigint", "idempotency_key text", "metadata jsonb",
)  # fmt: skip
_SQL_GET_BALANCE = _statement("get_balance", *_ACCOUNT, reads=True)
_SQL_GET_ACCOUNT = _statement("get_account", *_ACCOUNT, reads=True)
_SQL_GET_USER_BALANCES = _statement("get_user_balances", "user_id text", reads=True)
_LEDGER_PAGE = (*_ACCOUNT, "start_time timestamptz", "end_time timestamptz", "limit integer")
_SQL_GET_LEDGER = _statement("get_ledger", *_LEDGER_PAGE, reads=True)
# sql/062's cursor, named only when given: a page without one is the call a database
# migrated before 062 answers as well
_SQL_GET_LEDGER_AFTER = _statement("get_ledger", *_LEDGER_PAGE, "before_id bigint", reads=True)
_SQL_GET_USAGE = _statement(
    "get_usage", "user_id text", "start_time timestamptz", "end_time timestamptz", reads=True
)
_SQL_GET_NAMESPACE_USAGE = _statement(
    "get_namespace_usage", "start_time timestamptz", "end_time timestamptz", reads=True
)
_SQL_SET_PERIOD_CONFIG = _statement(
    "set_period_config",
    *_ACCOUNT, "period_start date", "period_allocation numeric", "carry_over_limit numeric",
    "period_interval interval",
)  # fmt: skip
_SQL_OPEN_PERIOD = _statement("open_period", *_ACCOUNT, "period_start date", "allocation numeric")
_SQL_CLOSE_PERIOD = _statement("close_period", *_ACCOUNT, "period_end date")
_SQL_GET_PERIODS = _statement("get_periods", *_ACCOUNT, "limit integer", reads=True)
_SQL_RELEASE_EXPIRED = _statement("release_expired_reservations", "batch_size integer")
_SQL_RECONCILE = _statement("reconcile", reads=True)
_SQL_GET_STATS = _statement("get_stats", reads=True)
_AUDIT_PAGE = (
    "user_id text", "actor_id text", "kinds text[]", "start_time timestamptz",
    "end_time timestamptz", "limit integer",
)  # fmt: skip
_SQL_GET_AUDIT_EVENTS = _statement("get_audit_events", *_AUDIT_PAGE, reads=True)
# sql/062's cursor, named only when given (as get_ledger's)
_SQL_GET_AUDIT_EVENTS_AFTER = _statement(
    "get_audit_events", *_AUDIT_PAGE, "before_event_id text", reads=True
)


# The settings meter.ctx sets transaction-locally (sql 002): what a call inside a caller's
# transaction reads first and puts back after (MeterClient._execute_keeping_context).
_CONTEXT_SETTINGS: Final = (
    "meter.tenant",
    "meter.actor_id",
    "meter.request_id",
    "meter.on_behalf_of",
    "meter.reason",
)
_READ_CONTEXT: Final = "SELECT " + ", ".join(
    f"pg_catalog.current_setting('{name}', true)" for name in _CONTEXT_SETTINGS
)
# An unset one (NULL) comes back as '', as it reads once meter.ctx has set it anyway.
_RESTORE_CONTEXT: Final = "SELECT " + ", ".join(
    f"pg_catalog.set_config('{name}', coalesce(%s, ''), true)" for name in _CONTEXT_SETTINGS
)


# ------------------------------------------------------------------------ adaptation


_NUMERIC_OID: Final = psycopg.adapters.types["numeric"].oid
# psycopg's default numeric loaders: the C ones when psycopg[binary] is installed (the
# classes in psycopg.types.numeric are the pure-Python fallbacks, several times slower).
_NUMERIC_LOADERS: Final = tuple(
    loader
    for fmt in (Format.TEXT, Format.BINARY)
    if (loader := psycopg.adapters.get_loader(_NUMERIC_OID, fmt)) is not None
)


_INTERVAL_OID: Final = psycopg.adapters.types["interval"].oid
_DAYS_LOADER: Final = psycopg.adapters.get_loader(_INTERVAL_OID, Format.TEXT)
_MONTHS = re.compile(r"\b(?:mons?|years?)\b")  # IntervalStyle postgres: '1 year 2 mons'


class _IntervalLoader(Loader):
    """``interval`` as a ``timedelta`` when it has no months, else as its text (``'1 mon'``).

    A timedelta makes a month 30 days: ``get_account``'s ``period_interval`` passed back to
    ``set_period_config`` would change monthly periods into 30-day ones. The text is what
    ``set_period_config`` takes, so every interval read round-trips.
    """

    def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
        super().__init__(oid, context)
        assert _DAYS_LOADER is not None
        self._days = _DAYS_LOADER(oid, context)

    def load(self, data: Buffer) -> timedelta | str:
        text = bytes(data).decode()
        if _MONTHS.search(text):
            return text
        return cast(timedelta, self._days.load(data))


def _configure_adapters(context: AdaptContext) -> None:
    """Load ``json``/``jsonb`` with exact Decimals, ``numeric`` as Decimal and ``interval``
    without turning months into days (:class:`_IntervalLoader`), whatever loaders the
    caller's connection may have registered."""
    set_json_loads(t.loads, context)
    for loader in _NUMERIC_LOADERS:
        context.adapters.register_loader(_NUMERIC_OID, loader)
    context.adapters.register_loader(_INTERVAL_OID, _IntervalLoader)


class _PooledConnection(psycopg.Connection[Any]):
    """A connection of a MeterClient's own pool: since when it has been idle, and until
    when a client may keep it from one call to the next (see MeterClient._run_own_pool)."""

    idle_since: float
    keep_until: float


def _configure_own(conn: _PooledConnection) -> None:
    _configure_adapters(conn)
    session.use_settings(conn)
    conn.idle_since = time.monotonic()


def _cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[tuple[Any, ...]]:
    """A cursor of ``conn`` that takes ``%s`` placeholders and gives tuples, whatever the
    ``cursor_factory`` and ``row_factory`` of a caller's connection: a ``RawCursor`` takes
    ``$1`` placeholders only (every statement of the SDK a syntax error)."""
    if issubclass(conn.cursor_factory, psycopg.RawCursor):
        return psycopg.Cursor(conn, row_factory=tuple_row)
    return conn.cursor(row_factory=tuple_row)


def _usable(conn: psycopg.Connection[Any], *, always: bool = False) -> bool:
    """False when ``conn`` fails a round trip; checked only when it has been idle past
    _CHECK_IDLE_AFTER, or ``always`` (after another connection was found broken)."""
    idle_since = getattr(conn, "idle_since", float("-inf"))  # a caller's pool: unknown
    if not always and time.monotonic() - idle_since <= _CHECK_IDLE_AFTER:
        return True
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return False
    return True


class _ConnectionLock:
    """Taken by a call on a caller's connection for the whole of it; a call of the thread
    holding it is refused. Such a call comes from the caller's psycopg loader, dumper or
    notice handler, run by psycopg inside a call: it would run under psycopg's own lock of
    the connection (a notice handler: hung for good), inside the call's transaction (its
    result undone if that rolls back), or on the call's cursor (whose rows it replaces)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        if self._owner == me:  # set by this thread only, so read without the lock
            raise ValidationError(
                "conn: a MeterClient call on this connection is under way in this thread "
                "(this one was made from a psycopg loader, dumper or notice handler it "
                "ran); call from outside it, or use another connection",
                sqlstate="MT001",
                parameter="conn",
            )
        self._lock.acquire()
        self._owner = me

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()


# One lock per caller's connection, shared by every client built on it: a call's BEGIN or
# SAVEPOINT ... COMMIT or RELEASE must not interleave with another client's on the same
# connection (psycopg then ends calls that committed with "transaction commit at the wrong
# nesting level", which a caller would retry, counting them twice).
_connection_locks: weakref.WeakKeyDictionary[psycopg.Connection[Any], _ConnectionLock] = (
    weakref.WeakKeyDictionary()
)
_connection_locks_guard = threading.Lock()


def _lock_of(conn: psycopg.Connection[Any]) -> _ConnectionLock:
    with _connection_locks_guard:
        lock = _connection_locks.get(conn)
        if lock is None:
            lock = _connection_locks[conn] = _ConnectionLock()
        return lock


def _replayed_by(**arguments: object) -> dict[str, object] | None:
    """The arguments by which the call replays, those given; ``None`` if none was (the call
    does not replay). Spelled out only for an error (:func:`_replay_hint`)."""
    return {name: value for name, value in arguments.items() if value is not None} or None


def _replay_hint(replay: dict[str, object]) -> str:
    named = ", ".join(f"{name}={str(value)!r}" for name, value in replay.items())
    return f": calling again with the same {named} replays it"


def _as_is(text: str) -> str:
    return text


def _jsonb(metadata: object) -> Jsonb | None:
    """Validate ``metadata`` and wrap its exact, compact JSON text for a ``jsonb`` parameter."""
    text = t.check_metadata(metadata, "metadata")
    # The text is already serialised exactly (Decimal-preserving): send it as it is.
    return None if text is None else Jsonb(text, dumps=_as_is)


# ------------------------------------------------------------------------ validators


def _ident(value: object, name: str, kind: str | None = None, *, nullable: bool = False) -> Any:
    lo, hi = t.LIMITS[kind or name]
    return t.check_identifier(value, name, min_len=lo, max_len=hi, nullable=nullable)


def _before_id(before_id: object, end_time: object) -> int | None:
    """get_ledger's cursor: an id is no place in a listing by event_time without one."""
    checked = t.check_int(
        before_id, "before_id", min_value=-t.INT8_MAX - 1, max_value=t.INT8_MAX, nullable=True
    )
    if checked is not None and end_time is None:
        raise t.invalid("before_id", "needs end_time: the event_time of the entry it names")
    return checked


def _account(
    user_id: object, event_type: object, unit: object, resource: object, *, pool: bool = True
) -> list[Any]:
    """Validate an account key; ``pool`` allows ``user_id=None`` (the namespace-wide pool)."""
    return [
        _ident(user_id, "user_id", nullable=pool),
        _ident(event_type, "event_type"),
        _ident(unit, "unit"),
        _ident(resource, "resource", nullable=True),
    ]


class MeterClient:
    """Synchronous client of a Meter database, scoped to one namespace (tenant).

    Parameters:
        conn: a conninfo string or URL (the client builds and owns a thread-safe
            ``ConnectionPool`` of autocommit connections, opened as calls need them), a
            ``psycopg_pool.ConnectionPool`` (borrowed per call; thread-safe) or a
            ``psycopg.Connection`` (each call runs inside ``conn.transaction()``: its own
            transaction, or a savepoint of the caller's open transaction, which keeps its
            own tenant and actor context after the call; the calls of every client on
            one connection take turns, so they are thread-safe, though the caller's own
            statements on it from other threads may land inside a call's transaction, and
            a call made while another thread has a transaction open on it is part of that
            transaction, and is rolled back with it). A call made while one is under way on
            the connection in the same thread (from the caller's psycopg loader, dumper or
            notice handler) is refused.
            Results need ``DateStyle`` ISO and ``IntervalStyle``
            postgres, and parameters the client encoding UTF8 (:mod:`meter.session`): the
            client's own connections are given them; on a caller's connection with others,
            each call sets them for its own (sub)transaction and restores the caller's (a
            statement or two more per call: give such a pool ISO and UTF8, e.g.
            ``options='-c DateStyle=ISO'``, to spare them).
        namespace: the tenant every call acts on.
        max_size: the maximum size of the pool built from a conninfo.
        timeout: seconds a call waits for a connection of the pool built from a conninfo
            before raising ``MeterConnectionError`` (a caller's pool uses its own timeout);
            above 0, at most a day.
            A database found unreachable fails the call after about a second; so does a
            conninfo holding a value libpq refuses (``sslmode=bogus``), with a
            ``ValidationError`` naming ``conn``.
        generate_keys: give every ``allocate``, ``consume`` and ``adjust`` called without
            an ``idempotency_key`` one generated for that call (a UUID), so that it too is
            run again when its connection breaks (below). Each such write then costs what a
            keyed write costs (a key row, a look-up; ~20% of a consume's rate at 8
            connections, docs/benchmarks.md); a call the caller makes again gets a new key.

    Raises:
        ValidationError: for an invalid namespace, a malformed conninfo, ``conn`` of another
            type, or a bad ``max_size``, ``timeout`` or ``generate_keys``.

    Built from a conninfo, a client checks a connection that has been idle for more than a
    second before using it, so a database restart does not fail the next call; and it may
    be built before ``fork`` and used on both sides: a forked child gets a pool of its own
    (the inherited connections are left to the parent).

    Each method is one statement in one transaction that sets the tenant and the actor
    context (:meth:`set_actor`) transaction-locally. Quantities are ``Decimal``. Errors:
    ``ValidationError`` (bad argument, raised before any database access but for a
    window whose start is after its end and a conninfo value libpq refuses, which the
    database and libpq judge; either way nothing is written),
    ``IdempotencyConflictError``, ``NotFoundError``, ``TenantError``,
    ``MeterConnectionError``, otherwise ``MeterError``.

    A call whose connection breaks under it (the reply lost, perhaps after the commit) is
    run again on another connection, checked first, up to twice, when that cannot count
    twice: reads, and writes carrying an idempotency key (with ``generate_keys``, every
    allocate, consume and adjust), every ``reserve`` (a hold without a key or an id of the
    caller's gets an id generated by the client), every ``commit`` and ``open_period`` and
    ``close_period`` (which replay by account and date). Those replay their first result (a
    replayed commit reports status ``replayed``), and when they cannot be run again their
    ``MeterConnectionError`` names the arguments that replay them. Other writes (keyless
    ones, ``release``, ``set_period_config``) raise ``MeterConnectionError`` saying they may
    have committed: only a call made again with an idempotency key is sure to count once.
    Nothing is run again inside a caller's open transaction, which the broken connection
    has lost whole, nor on a caller's ``psycopg.Connection``, nor after the pool raised
    (closed, timed out).

    A call the server refuses before running it because a migration changed the columns
    of a statement prepared on the connection before (``cached plan must not change result
    type``) is run again once, the connection's prepared statements dropped (a caller's
    own ``PREPARE`` too, as psycopg drops them at any rollback); inside a caller's open
    transaction it raises, and the next call goes through.
    """

    def __init__(
        self,
        conn: str | psycopg.Connection[Any] | ConnectionPool[Any],
        namespace: str = "default",
        *,
        max_size: int = 10,
        timeout: float = 30.0,
        generate_keys: bool = False,
    ) -> None:
        # Checked in the signature's order, so the first bad argument is the one named.
        if isinstance(conn, str):
            t.check_conninfo(conn, "conn")
        elif not isinstance(conn, (ConnectionPool, psycopg.Connection)):
            raise ValidationError(
                "conn: must be a conninfo string, a psycopg.Connection or a "
                f"psycopg_pool.ConnectionPool, got {type(conn).__name__}",
                sqlstate="MT001",
                parameter="conn",
            )
        self._namespace: str = _ident(namespace, "namespace")
        t.check_int(max_size, "max_size", min_value=1, max_value=10000)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout <= _MAX_TIMEOUT
        ):
            raise t.invalid(
                "timeout",
                f"must be a number of seconds above 0, at most {_MAX_TIMEOUT}, "
                f"got {t.shown(timeout)}",
            )
        self._generate_keys = t.check_bool(generate_keys, "generate_keys")
        self._timeout = float(timeout)
        self._actor: tuple[str | None, str | None, str | None, str | None] = _NO_ACTOR
        self._actor_lock = threading.Lock()
        self._closed = False
        self._pool: ConnectionPool[Any] | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._owns_pool = False
        self._conn_lock = _lock_of(conn) if isinstance(conn, psycopg.Connection) else None
        self._seen_connect_errors = 0
        # Own pool only: the connection kept from one call to the next (it carries until
        # when: keep_until) and how many calls are under way; guarded by _keep_lock.
        self._keep_lock = threading.Lock()
        self._kept: _PooledConnection | None = None
        self._busy = 0
        # Set in a forked child: the pool is the parent's (see _after_fork).
        self._pool_inherited = False
        # One cursor per connection, kept: a new cursor starts with empty adapter caches,
        # which costs more per call than the statement's own client-side work. Keyed by
        # id(connection); an entry is valid only while its cursor's connection is that one.
        self._cursors: dict[int, psycopg.Cursor[tuple[Any, ...]]] = {}
        if isinstance(conn, str):
            self._conninfo = conn
            self._max_size = max_size
            self._pool = self._new_pool()
            self._owns_pool = True
            _clients_with_own_pool.add(self)
        elif isinstance(conn, ConnectionPool):
            self._pool = conn
        else:
            self._conn = conn

    # -------------------------------------------------------------------- lifecycle

    @property
    def namespace(self) -> str:
        """The namespace (tenant) this client acts on."""
        return self._namespace

    def close(self) -> None:
        """Close the client; a pool it built is closed, a caller's pool or connection is not.

        Idempotent. Later calls raise ``MeterConnectionError``.
        """
        with self._keep_lock:  # read together with _renew_pool's changes
            self._closed = True
            kept, self._kept = self._kept, None
            pool, inherited = self._pool, self._pool_inherited
        self._cursors.clear()
        # An inherited pool is the parent's: closing it would end the parent's sessions.
        if self._owns_pool and pool is not None and not inherited:
            if kept is not None:
                pool.putconn(kept)
            pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "pool" if self._pool is not None else "connection"
        state = " closed" if self._closed else ""
        return f"<MeterClient namespace={self._namespace!r} {kind}{state}>"

    def _new_pool(self) -> ConnectionPool[Any]:
        # The pool starts empty and connects on first use. With a connection opening at
        # construction, a call made at once waits for it and, by waiting, makes the pool
        # open a second one; the pool hands its connections out first in, first out, so a
        # client used by one thread would then alternate between two server backends for
        # good (measured: about 12% fewer get_balance calls per second with eight such
        # clients). The pool closes what it has held idle for psycopg_pool's max_idle (10
        # minutes), not the connection the client keeps between calls (see _run_own_pool),
        # which stays open as min_size=1 kept one.
        return ConnectionPool(
            self._conninfo,
            min_size=0,
            max_size=self._max_size,
            connection_class=_PooledConnection,
            kwargs={"autocommit": True},
            configure=_configure_own,
            # No check= here: psycopg_pool waits 1, 2, 4... s between discarding dead
            # connections, so a pool full of them stalled a call for up to its timeout.
            # _run_own_pool checks, and discards dead ones without waiting.
            timeout=self._timeout,
            name=f"meter:{self._namespace[:64]}",
            open=True,
        )

    def _after_fork(self) -> None:
        """In a child forked after this client was built: forget the parent's connections.

        The inherited pool and kept connection share their sockets with the parent (and
        every sibling), and the pool's threads did not survive the fork: used here, they
        would mix up the processes' replies or wait for a connection forever. They are
        left alone, unclosed (closing would end the parent's sessions); the child's first
        call builds a pool of its own (_renew_pool).
        """
        if self._kept is not None:
            _inherited.append(self._kept)
            self._kept = None
        self._busy = 0
        self._pool_inherited = True
        self._cursors = {}
        self._seen_connect_errors = 0
        # Locks another thread held at the fork stay held in the child for good.
        self._keep_lock = threading.Lock()
        self._actor_lock = threading.Lock()

    def _renew_pool(self) -> None:
        """Replace the inherited pool with one of this process's own (see _after_fork)."""
        with self._keep_lock:
            if self._closed:  # close() ran after the call's own check: build nothing
                raise MeterConnectionError("the MeterClient is closed")
            if self._pool_inherited:
                try:
                    pool = self._new_pool()
                except RuntimeError as exc:  # no thread for the pool's workers
                    # The inherited pool stays in place: the next call tries again.
                    raise MeterConnectionError(
                        f"could not open a connection pool in this process: {exc}"
                    ) from exc
                _inherited.append(self._pool)
                self._pool, self._pool_inherited = pool, False

    # -------------------------------------------------------------------- execution

    def _run(
        self, stmt: _Statement, params: list[Any], *, replay: dict[str, object] | None = None
    ) -> list[Row]:
        """Execute ``stmt`` with ``params`` plus the ctx arguments; return the rows.

        ``replay``: the write replays its first result when run again, by these arguments
        (:func:`_replayed_by`). Such a write, and a read, whose connection broke under it
        runs again on another connection (not on a caller's connection, which is the
        caller's to recover). Other writes raise: they may have committed.
        """
        if self._closed:
            raise MeterConnectionError("the MeterClient is closed")
        actor = self._actor
        if actor == _NO_ACTOR:
            query = stmt.plain
            args = [*params, self._namespace]
        else:
            query = stmt.with_actor
            args = [*params, self._namespace, *actor]
        retries = reconnects = 0
        replanned = False  # run again once after a stale prepared statement (_STALE_PLAN)
        check = False  # after a lost connection the next one is checked before use
        in_doubt = False  # a write of its own transaction lost its connection
        while True:
            try:
                if self._conn is not None:
                    return self._run_on_callers_connection(self._conn, query, args)
                if self._owns_pool:
                    return self._run_own_pool(query, args, check=check)
                return self._run_borrowed(query, args, check=check)
            except (psycopg.Error, _FailedBeforeCommit) as raised:
                exc = raised.error if isinstance(raised, _FailedBeforeCommit) else raised
                # Inside a caller's open transaction a broken connection loses the whole of
                # it: the call cannot have committed on its own. Known only under the
                # connection's lock (_run_on_callers_connection): before it, another
                # client's call may have been under way on that connection.
                own_transaction = not (
                    isinstance(raised, _FailedBeforeCommit) and raised.in_callers_transaction
                )
                error = from_psycopg(exc)
                if error.sqlstate == "54000" and _INDEX_ROW_TOO_BIG.match(error.message):
                    raise _oversized(stmt, params, self._namespace, error) from exc
                # The connection broke under the call (not: the pool refused before sending
                # anything), which may have run and committed, the reply lost. Even an
                # idle-session timeout (57P05) may come after the statement ran: psycopg
                # can make a round trip of its own after the result. A read or a keyed
                # write is run again on another connection; a keyed write that committed
                # replays its first result. Any other write raises, saying so.
                lost = (
                    isinstance(error, MeterConnectionError)
                    and not isinstance(exc, _NOTHING_SENT)
                    and error.sqlstate not in _ROLLED_BACK_WITH_SESSION
                )
                in_doubt = in_doubt or (
                    lost
                    and own_transaction
                    and not stmt.reads
                    and not isinstance(raised, _FailedBeforeCommit)
                )
                if (
                    lost
                    and (stmt.reads or replay is not None)
                    and self._conn is None
                    and reconnects < _RECONNECTS
                ):
                    reconnects += 1
                    check = True
                    continue
                if in_doubt and isinstance(error, MeterConnectionError):
                    if replay is not None:
                        hint = _replay_hint(replay)
                    elif stmt.counts:
                        hint = _ONLY_KEYED
                    else:
                        hint = ""
                    raise MeterConnectionError(
                        error.message + _IN_DOUBT + hint, sqlstate=error.sqlstate
                    ) from exc
                # A deadlock, or an idempotency key or reservation id claimed concurrently
                # by another path (40001, meter.errors.from_psycopg): the call was its own
                # transaction and was rolled back whole, so
                # running it again is safe -- and replays the key. Not inside a caller's
                # transaction, which is theirs to retry.
                if _stale_plan(exc) and own_transaction and not replanned:
                    replanned = True  # refused before it ran, its transaction rolled back
                    continue
                pause = _retry_pause(error.sqlstate, retries) if own_transaction else None
                if pause is not None:
                    time.sleep(pause)
                    retries += 1
                    continue
                raise error from exc

    def _execute(self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]) -> list[Row]:
        # A caller's session may format dates or intervals in a style the loaders cannot
        # read, or use another client encoding (meter.session); the client's own
        # connections were given the settings at connect.
        if not self._owns_pool and session.needs_settings(conn):
            return self._execute_with_settings(conn, query, args)
        return self._fetch(conn, query, args)

    def _execute_with_settings(
        self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]
    ) -> list[Row]:
        """The call in a transaction (a savepoint in the caller's) with Meter's session
        settings, read before it commits. A transaction of its own drops the settings at its
        end; inside the caller's, the caller's are put back for the rest of it."""
        callers = conn.info.transaction_status != TransactionStatus.IDLE
        before = session.current(conn)
        tx: psycopg.Transaction | None = None
        try:
            with conn.transaction() as tx:
                try:
                    cur = _cursor(conn)
                    cur.execute(session.SET_FOR_TRANSACTION)
                    rows = self._fetch(conn, query, args)
                    if callers:
                        cur.execute(session.RESTORE_FOR_TRANSACTION, before)
                except psycopg.Error as exc:  # COMMIT comes after this block
                    raise _FailedBeforeCommit(exc, in_callers_transaction=callers) from exc
        except psycopg.Error as exc:
            if tx is None or tx.savepoint_name:  # BEGIN, SAVEPOINT or RELEASE: not committed
                raise _FailedBeforeCommit(exc, in_callers_transaction=callers) from exc
            raise  # its own COMMIT: in doubt
        return rows

    def _fetch(self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]) -> list[Row]:
        # Tuple rows turned into dicts here, by the names of the result received. They are
        # compared as the result's bytes: cur.description, which builds an object per
        # column, costs ~2.7 µs a call (of get_balance's ~40), comparing the bytes ~0.4 µs.
        cur = self._cursors.get(id(conn))
        if cur is None or cur.connection is not conn or cur.closed:
            cur = self._new_cursor(conn)
        try:
            cur.execute(query, args)
        except psycopg.Error as exc:
            # In a transaction (aborted now) the call is run again by _run, or not at all
            # in a caller's: the rollback of its (sub)transaction drops the statement.
            if not _stale_plan(exc) or conn.info.transaction_status != TransactionStatus.IDLE:
                raise
            conn.execute("DEALLOCATE ALL")
            cur.execute(query, args)  # nothing ran: the server refused it at its plan
        rows = cur.fetchall()
        result = cur.pgresult
        raw = () if result is None else tuple([result.fname(i) for i in range(result.nfields)])
        known = _COLUMNS.get(query)
        if known is None or known[0] != raw:
            known = _COLUMNS[query] = (raw, tuple(c.name for c in cur.description or ()))
        names = known[1]
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _new_cursor(self, conn: psycopg.Connection[Any]) -> psycopg.Cursor[tuple[Any, ...]]:
        cur = _cursor(conn)
        if not self._owns_pool:
            _configure_adapters(cur)
        # Forget the cursors of connections that were closed (discarded by the pool).
        for key, old in list(self._cursors.items()):
            if old.connection.closed:
                self._cursors.pop(key, None)
        self._cursors[id(conn)] = cur
        return cur

    def _run_borrowed(self, query: str, args: Sequence[Any], *, check: bool = False) -> list[Row]:
        """On a connection borrowed from the caller's pool for this call; ``check``: one
        found dead first (after a restart the pool may hold several) is given back and
        another taken, as long as the pool hands them out."""
        pool = self._pool
        assert pool is not None
        conn = self._getconn(pool)
        dead = 0
        while check and not _usable(conn, always=True):
            pool.putconn(conn)  # the pool discards a dead connection
            dead += 1
            if dead > pool.max_size:
                raise PoolTimeout(_NONE_USABLE)  # nothing sent
            conn = self._getconn(pool)
        try:
            return self._run_idle(conn, query, args)
        finally:
            pool.putconn(conn)  # resets (or discards) a connection left in a bad state

    def _run_own_pool(self, query: str, args: Sequence[Any], *, check: bool = False) -> list[Row]:
        """On the connection kept from the last call, else on one from the client's pool.

        Taking a connection from psycopg_pool and giving it back costs more client CPU per
        call than the rest of the SDK's own work (measured with eight busy clients on two
        CPUs: ~6 of get_balance's ~37 µs), so the connection of a call that went well is
        kept for the next call -- but only when no other call is under way: a call waiting
        for a connection is served only by one given back to the pool. A kept connection
        goes back at the end of its first call more than _KEEP_FOR after it left the pool;
        whatever failed goes back at once, and the pool resets or discards it. A connection
        idle past _CHECK_IDLE_AFTER is checked first, kept or from the pool (_usable); a dead
        one is discarded and the next taken at once, and a new connection needs no check.
        """
        if self._pool_inherited:
            self._renew_pool()
        pool = self._pool
        assert pool is not None
        conn: _PooledConnection | None = None
        counted = ok = keep = False
        try:
            with self._keep_lock:
                self._busy += 1
                counted = True
                conn, self._kept = self._kept, None
            # Ends: each dead connection is discarded, and a new one is fresh (checked
            # too after a lost connection: then as many as the pool holds, and one more).
            dead = 0
            while conn is None or not _usable(conn, always=check):
                if conn is not None:
                    pool.putconn(conn)  # the pool discards a dead connection
                    conn = None
                    dead += 1
                    if dead > pool.max_size:
                        raise PoolTimeout(_NONE_USABLE)  # nothing sent
                conn = cast(_PooledConnection, self._getconn(pool))
                conn.keep_until = time.monotonic() + _KEEP_FOR
            rows = self._run_idle(conn, query, args)
            ok = True
            return rows
        finally:
            # Nested so that an exception raised here by a signal handler (Ctrl-C) still
            # gives the connection back: a lost connection is a pool slot lost for good.
            try:
                now = time.monotonic()
                if conn is not None:
                    conn.idle_since = now
                with self._keep_lock:
                    if counted:
                        self._busy -= 1
                    if (
                        ok
                        and self._busy == 0
                        and self._kept is None
                        and not self._closed
                        and conn is not None
                        and conn.pgconn.transaction_status == TransactionStatus.IDLE
                        and now < conn.keep_until
                    ):
                        self._kept = conn
                        keep = True
            finally:
                if not keep and conn is not None:
                    pool.putconn(conn)  # resets (or discards) a connection in a bad state

    def _run_idle(
        self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]
    ) -> list[Row]:
        """On a pooled connection: the statement is its own (implicit) transaction."""
        if conn.autocommit:
            return self._execute(conn, query, args)
        if conn.info.transaction_status != TransactionStatus.IDLE:  # not from a sane pool
            with conn.transaction():
                return self._execute(conn, query, args)
        # A caller's pool of non-autocommit connections: switching to autocommit for the
        # call (a client-side setting) saves the BEGIN and COMMIT round trips.
        conn.autocommit = True
        try:
            return self._execute(conn, query, args)
        finally:
            if not conn.closed:
                conn.autocommit = False

    def _run_on_callers_connection(
        self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]
    ) -> list[Row]:
        assert self._conn_lock is not None
        with self._conn_lock:
            # Read under the lock: before it, another client's call may hold the connection.
            status = conn.info.transaction_status
            if (
                conn.autocommit
                and status == TransactionStatus.IDLE
                # In pipeline mode a statement's implicit transaction lasts until the
                # caller's next Sync: the call would return before it committed, and a
                # statement of the caller's failing before that Sync would roll it back.
                # conn.transaction() commits, and syncs, before the call returns.
                and conn.info.pipeline_status == PipelineStatus.OFF
                and not session.needs_settings(conn)
            ):
                return self._fetch(conn, query, args)  # its own implicit transaction
            tx: psycopg.Transaction | None = None
            try:
                with conn.transaction() as tx:  # BEGIN/COMMIT, or a savepoint in the caller's
                    # psycopg's own choice, made under its lock of the connection (after
                    # syncing what a pipeline held): the status read above may have been
                    # another thread's statement under way, or statements queued in a
                    # pipeline, neither a transaction of the caller's.
                    callers = bool(tx.savepoint_name)  # "" for a BEGIN
                    try:
                        if callers:
                            rows = self._execute_keeping_context(conn, query, args)
                        else:
                            if session.needs_settings(conn):  # dropped at the COMMIT below
                                _cursor(conn).execute(session.SET_FOR_TRANSACTION)
                            rows = self._fetch(conn, query, args)
                    except psycopg.Error as exc:  # COMMIT comes after this block
                        raise _FailedBeforeCommit(exc, in_callers_transaction=callers) from exc
            except psycopg.Error as exc:  # BEGIN, SAVEPOINT, a pipeline's Sync, COMMIT or RELEASE
                if tx is None:  # BEGIN or SAVEPOINT: nothing of the call was sent
                    opened = status != TransactionStatus.IDLE
                    raise _FailedBeforeCommit(exc, in_callers_transaction=opened) from exc
                if tx.savepoint_name:  # RELEASE: the caller's to commit
                    raise _FailedBeforeCommit(exc, in_callers_transaction=True) from exc
                # In pipeline mode psycopg syncs the block's statements before it sends
                # COMMIT (and marks the block committed just before it does): an error of
                # that Sync came before the COMMIT.
                if getattr(tx, "status", "committed") != "committed":
                    raise _FailedBeforeCommit(exc, in_callers_transaction=False) from exc
                raise  # the call's own COMMIT: in doubt
            # psycopg ends the block without a word, and sends no COMMIT or RELEASE, when the
            # connection was closed (by another thread) since the call's statement ran.
            if getattr(tx, "status", None) == "failed":
                closed = psycopg.OperationalError(
                    "the connection was closed before the call's "
                    + ("savepoint was released" if callers else "COMMIT was sent")
                )
                raise _FailedBeforeCommit(closed, in_callers_transaction=callers)
            return rows

    def _execute_keeping_context(
        self, conn: psycopg.Connection[Any], query: str, args: Sequence[Any]
    ) -> list[Row]:
        """The call in a savepoint of the caller's transaction, which then gets its own tenant
        and actor context back: ``meter.ctx`` sets them transaction-locally, and a released
        savepoint would leave them in force until the caller's COMMIT, for its own
        ``meter.*`` calls (refused in its own tenant, or recorded under the client's actor)
        and its reads under row-level security. Two round trips more per call, in a
        caller's transaction only."""
        cur = _cursor(conn)
        before = cur.execute(_READ_CONTEXT).fetchone()
        rows = self._execute(conn, query, args)
        cur.execute(_RESTORE_CONTEXT, before)
        return rows

    def _getconn(self, pool: ConnectionPool[Any]) -> psycopg.Connection[Any]:
        timeout = self._timeout if self._owns_pool else pool.timeout
        deadline = time.monotonic() + timeout
        try:
            return pool.getconn(timeout=min(_PROBE_AFTER, timeout))
        except PoolTimeout:
            if timeout <= _PROBE_AFTER:
                raise
        # No connection within a second: if the pool has been failing to connect, find out
        # directly whether the database can be reached, rather than wait the whole timeout.
        errors = pool.get_stats().get("connections_errors", 0)
        if errors > self._seen_connect_errors:
            self._probe(pool, deadline)
            self._seen_connect_errors = errors
        return pool.getconn(timeout=max(deadline - time.monotonic(), 0.001))

    @staticmethod
    def _probe(pool: ConnectionPool[Any], deadline: float) -> None:
        kwargs: dict[str, Any] = dict(pool.kwargs or {})
        if "connect_timeout" not in pool.conninfo and "connect_timeout" not in kwargs:
            kwargs["connect_timeout"] = max(2, int(deadline - time.monotonic()))
        try:
            psycopg.connect(pool.conninfo, **kwargs).close()
        except psycopg.OperationalError as exc:
            # a value libpq refuses (sslmode=bogus) is the caller's, not an outage; asked
            # of what was connected with: a pool's kwargs override its conninfo's values
            params = {k: v for k, v in kwargs.items() if k not in _CONNECT_ONLY}
            refused = t.refused_conninfo(make_conninfo(pool.conninfo, **params), "conn", exc)
            if refused is not None:
                raise refused from None
            raise MeterConnectionError(
                f"cannot connect to the database: {str(exc).strip()}"
            ) from exc

    def _one(
        self, stmt: _Statement, params: list[Any], *, replay: dict[str, object] | None = None
    ) -> Row:
        rows = self._run(stmt, params, replay=replay)
        if not rows:  # the API functions always return a row; be loud if one did not
            raise MeterError(f"meter.{stmt.function} returned no row")
        return rows[0]

    def _scalar(
        self, stmt: _Statement, params: list[Any], *, replay: dict[str, object] | None = None
    ) -> Any:
        return next(iter(self._one(stmt, params, replay=replay).values()))

    def _idempotency_key(self, idempotency_key: object) -> str | None:
        """The write's key: the caller's, checked; else one generated (``generate_keys``)."""
        key = _ident(idempotency_key, "idempotency_key", nullable=True)
        if key is None and self._generate_keys:
            return t.new_id()
        return key

    # -------------------------------------------------------------------- recording

    def allocate(
        self,
        user_id: str | None,
        event_type: str,
        amount: int | Decimal | str | float,
        unit: str,
        resource: str | None = None,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Row:
        """Add quota or credits to an account (``user_id=None``: the namespace pool).

        Parameters:
            user_id, event_type, unit, resource: the account key.
            amount: the quantity to add, > 0.
            idempotency_key: makes a retry replay the first result.
            event_time: when it happened (aware datetime; default now).
            metadata: a JSON object stored with the ledger row.

        Returns:
            ``{"balance": Decimal, "entry_id": int}``.

        Raises:
            ValidationError, IdempotencyConflictError, MeterConnectionError, MeterError.
        """
        return self._one(
            _SQL_ALLOCATE,
            [
                _ident(user_id, "user_id", nullable=True),
                _ident(event_type, "event_type"),
                t.to_amount(amount, "amount", sign="positive"),
                _ident(unit, "unit"),
                _ident(resource, "resource", nullable=True),
                key := self._idempotency_key(idempotency_key),
                t.check_timestamp(event_time, "event_time"),
                _jsonb(metadata),
            ],
            replay=_replayed_by(idempotency_key=key),
        )

    def consume(
        self,
        user_id: str,
        event_type: str,
        amount: int | Decimal | str | float,
        unit: str,
        resource: str | None = None,
        check_balance: bool = False,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Row:
        """Record consumption (a debit) on a user's account.

        Parameters:
            user_id, event_type, unit, resource: the account key.
            amount: the quantity consumed, > 0.
            check_balance: refuse (``success=False``, nothing written) when
                ``available < amount``; otherwise the balance may go negative.
            idempotency_key, event_time, metadata: as for :meth:`allocate`.

        Returns:
            ``{"success": bool, "balance", "available": Decimal, "entry_id": int | None}``;
            ``available`` leaves out holds past their TTL, swept or not.

        Raises:
            ValidationError, IdempotencyConflictError, MeterConnectionError, MeterError.
        """
        return self._one(
            _SQL_CONSUME,
            [
                _ident(user_id, "user_id"),
                _ident(event_type, "event_type"),
                t.to_amount(amount, "amount", sign="positive"),
                _ident(unit, "unit"),
                _ident(resource, "resource", nullable=True),
                t.check_bool(check_balance, "check_balance"),
                key := self._idempotency_key(idempotency_key),
                t.check_timestamp(event_time, "event_time"),
                _jsonb(metadata),
            ],
            replay=_replayed_by(idempotency_key=key),
        )

    def reserve(
        self,
        user_id: str,
        event_type: str,
        amount: int | Decimal | str | float,
        unit: str,
        resource: str | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        reservation_id: str | None = None,
    ) -> Row:
        """Hold quota for work whose size is known later; granted when available >= amount.

        Parameters:
            user_id, event_type, unit, resource: the account key.
            amount: the quantity held, > 0.
            ttl_seconds: lifetime of the hold, 1..86400.
            idempotency_key, metadata: as for :meth:`allocate`.
            reservation_id: a client-chosen id (1..128 characters), itself idempotent;
                made by the client when omitted, so that the call can be run again after
                a lost connection: derived from the namespace and ``idempotency_key``
                when one is given (:func:`meter.types.keyed_reservation_id`, as
                ``MeterProducer`` derives it, so that the same reserve replays through
                either), else a random UUID.

        Returns:
            ``{"granted": bool, "reservation_id": str | None, "balance", "available":
            Decimal, "expires_at": datetime | None}``; ``available`` leaves out holds past
            their TTL, swept or not.

        Raises:
            ValidationError, IdempotencyConflictError, MeterConnectionError, MeterError.
        """
        return self._one(
            _SQL_RESERVE,
            [
                _ident(user_id, "user_id"),
                _ident(event_type, "event_type"),
                t.to_amount(amount, "amount", sign="positive"),
                _ident(unit, "unit"),
                _ident(resource, "resource", nullable=True),
                t.check_int(ttl_seconds, "ttl_seconds", min_value=1, max_value=t.MAX_TTL_SECONDS),
                key := _ident(idempotency_key, "idempotency_key", nullable=True),
                _jsonb(metadata),
                # Without an id of the caller's, the hold gets one made here rather than
                # in the database, so that the call can be run again: with a key, the id
                # the producer derives from it too (the request's fingerprint covers it).
                rid := _ident(reservation_id, "reservation_id", nullable=True)
                or (t.new_id() if key is None else t.keyed_reservation_id(self._namespace, key)),
            ],
            replay=_replayed_by(idempotency_key=key, reservation_id=rid),
        )

    def commit(
        self,
        reservation_id: str,
        actual_amount: int | Decimal | str | float,
        metadata: dict[str, Any] | None = None,
    ) -> Row:
        """Consume the actual amount of a reservation and return its hold.

        Parameters:
            reservation_id: the reservation.
            actual_amount: what was really consumed, >= 0 (may exceed the hold).
            metadata: stored with the consumption row (default: the reservation's).

        Returns:
            ``{"success": bool, "consumed", "released", "reserved_amount", "balance":
            Decimal, "entry_id": int | None, "status": str}``; status is one of
            ``committed``, ``replayed``, ``late``, ``released``, ``not_found``.

        Raises:
            ValidationError, IdempotencyConflictError (committed before with another
            amount), MeterConnectionError, MeterError.
        """
        return self._one(
            _SQL_COMMIT,
            [
                rid := _ident(reservation_id, "reservation_id"),
                t.to_amount(actual_amount, "actual_amount", sign="nonnegative"),
                _jsonb(metadata),
            ],
            replay=_replayed_by(reservation_id=rid),
        )

    def release(self, reservation_id: str) -> bool:
        """Drop an active hold without consuming; the balance is unchanged.

        Parameters:
            reservation_id: the reservation.

        Returns:
            ``True`` if an active hold was released; ``False`` if it was not active
            (released, expired, committed or unknown).

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return bool(self._scalar(_SQL_RELEASE, [_ident(reservation_id, "reservation_id")]))

    def adjust(
        self,
        user_id: str | None,
        event_type: str,
        amount: int | Decimal | str | float,
        unit: str,
        resource: str | None = None,
        reference_id: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Row:
        """Write an adjustment (correction, refund): either sign, never 0.

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).
            amount: the signed correction, non-zero.
            reference_id: the ledger entry this corrects (must exist in the namespace).
            idempotency_key, metadata: as for :meth:`allocate`.

        Returns:
            ``{"balance": Decimal, "entry_id": int}``.

        Raises:
            ValidationError, NotFoundError (unknown ``reference_id``),
            IdempotencyConflictError, MeterConnectionError, MeterError.
        """
        return self._one(
            _SQL_ADJUST,
            [
                _ident(user_id, "user_id", nullable=True),
                _ident(event_type, "event_type"),
                t.to_amount(amount, "amount", sign="nonzero"),
                _ident(unit, "unit"),
                _ident(resource, "resource", nullable=True),
                t.check_int(
                    reference_id,
                    "reference_id",
                    min_value=-t.INT8_MAX - 1,
                    max_value=t.INT8_MAX,
                    nullable=True,
                ),
                key := self._idempotency_key(idempotency_key),
                _jsonb(metadata),
            ],
            replay=_replayed_by(idempotency_key=key),
        )

    # -------------------------------------------------------------------- queries

    def get_balance(
        self, user_id: str | None, event_type: str, unit: str, resource: str | None = None
    ) -> Row:
        """Current balance of an account (zeros for an unknown account).

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).

        Returns:
            ``{"balance", "reserved", "available": Decimal}``; ``reserved`` counts only
            holds not past their TTL, swept or not.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return self._one(_SQL_GET_BALANCE, _account(user_id, event_type, unit, resource))

    def get_account(
        self, user_id: str | None, event_type: str, unit: str, resource: str | None = None
    ) -> Row | None:
        """The full account row, or ``None`` for an unknown account.

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).

        Returns:
            The ``meter.accounts`` row as a dict (balance, reserved, totals, period
            settings, timestamps...), or ``None``. ``reserved`` counts only holds not
            past their TTL, swept or not. ``period_interval`` is a ``timedelta``, or its
            text when it has months (``'1 mon'``): either passes back to
            :meth:`set_period_config` unchanged.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        rows = self._run(_SQL_GET_ACCOUNT, _account(user_id, event_type, unit, resource))
        return rows[0] if rows else None

    def get_ledger(
        self,
        user_id: str | None,
        event_type: str,
        unit: str,
        resource: str | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int | None = 100,
        before_id: int | None = None,
    ) -> list[Row]:
        """Ledger entries of an account, newest first (by ``event_time``, then ``id``).

        To page, pass the last entry received as ``end_time=last["event_time"],
        before_id=last["id"]``: the next page starts just after it, entries of the same
        ``event_time`` included, none repeated. (``end_time`` alone is exclusive: entries
        of that time the page had no room for would be skipped.) Each page is read afresh:
        an entry written since that sorts before the cursor (dated within the pages
        already read) is in none of the pages that follow.

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).
            start_time, end_time: ``event_time`` in ``[start_time, end_time)``; ``None`` is
                unbounded. ``start_time`` after ``end_time`` is refused (``ValidationError``
                naming ``start_time``); equal, the window is empty (but for the entries of
                that time with an id below ``before_id``).
            limit: at most this many rows (``None``: 100; capped at 10000; >= 1).
            before_id: with ``end_time``, the id of the entry the page continues after:
                entries with ``event_time < end_time``, or ``== end_time`` and
                ``id < before_id``. Refused without ``end_time``.

        Returns:
            Dicts with ``id``, ``entry_type``, ``amount``, ``balance_after``,
            ``event_time``, ``reservation_id``, ``reference_id``, ``actor_id``, ``reason``,
            ``metadata``.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        args = [
            *_account(user_id, event_type, unit, resource),
            t.check_timestamp(start_time, "start_time"),
            t.check_timestamp(end_time, "end_time"),
            t.check_limit(limit, "limit"),
        ]
        cursor = _before_id(before_id, end_time)
        if cursor is None:
            return self._run(_SQL_GET_LEDGER, args)
        return self._run(_SQL_GET_LEDGER_AFTER, [*args, cursor])

    def get_usage(
        self, user_id: str | None, start_time: datetime | None, end_time: datetime | None
    ) -> list[Row]:
        """A user's consumption per event_type/resource/unit.

        Consumption is counted at its ``event_time``: a commit's when the commit was
        applied (not when the hold was made). Months dropped by retention
        (``METER_LEDGER_RETENTION_MONTHS``) are no longer counted.

        Parameters:
            user_id: the user.
            start_time, end_time: ``event_time`` in ``[start_time, end_time)``; ``None`` is
                unbounded. ``start_time`` after ``end_time`` is refused (``ValidationError``
                naming ``start_time``); equal, the window is empty.

        Returns:
            Dicts with ``event_type``, ``resource``, ``unit``, ``total_consumed``
            (Decimal), ``event_count`` (int).

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return self._run(
            _SQL_GET_USAGE,
            [
                _ident(user_id, "user_id", nullable=True),
                t.check_timestamp(start_time, "start_time"),
                t.check_timestamp(end_time, "end_time"),
            ],
        )

    def get_namespace_usage(
        self, start_time: datetime | None, end_time: datetime | None
    ) -> list[Row]:
        """The namespace's consumption per event_type/resource/unit (counted as
        :meth:`get_usage` counts it).

        Parameters:
            start_time, end_time: ``event_time`` in ``[start_time, end_time)``; ``None`` is
                unbounded. ``start_time`` after ``end_time`` is refused (``ValidationError``
                naming ``start_time``); equal, the window is empty.

        Returns:
            Dicts as :meth:`get_usage` plus ``unique_users`` (int).

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return self._run(
            _SQL_GET_NAMESPACE_USAGE,
            [
                t.check_timestamp(start_time, "start_time"),
                t.check_timestamp(end_time, "end_time"),
            ],
        )

    def get_user_balances(self, user_id: str | None) -> list[Row]:
        """Every account of a user (``None``: the namespace's pool accounts).

        Parameters:
            user_id: the user.

        Returns:
            Dicts with ``event_type``, ``resource``, ``unit``, ``balance``, ``reserved``,
            ``available``.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return self._run(_SQL_GET_USER_BALANCES, [_ident(user_id, "user_id", nullable=True)])

    # -------------------------------------------------------------------- periods

    def set_period_config(
        self,
        user_id: str | None,
        event_type: str,
        unit: str,
        resource: str | None,
        period_start: date,
        period_allocation: int | Decimal | str | float,
        carry_over_limit: int | Decimal | str | float | None = None,
        period_interval: str | timedelta | None = "1 month",
    ) -> None:
        """Configure an account's billing periods.

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).
            period_start: the first day of the current period. Beat's roll-over starts
                later periods this many intervals on, so monthly periods keep its day
                where a month has it (from Jan 31: Feb 28, Mar 31, Apr 30); restating
                the current start (Apr 30) keeps that day too. A period still open
                before a later start is closed the day before it; a start past that
                period's next start is refused (the periods between would never open);
                should the account's roll be behind (beat down), such a start first rolls
                its periods up to today, as beat would have, and is then judged again. So
                does any start while the configured start, set before it began, is due
                but not opened yet, so that its period opens before the change replaces
                it (a backdated start replaced before beat came round is taken as
                corrected). A start before the latest period opened (the first start,
                re-applied) leaves the current period as it is. Any other start does not
                roll first: made while the roll is behind, it acts on the periods as
                last rolled (beat down since Oct 1, a change restating the Sep 1 start
                gives its allocation to October and November too, and closes September
                under its limit; docs/internals.md, 026 and 029).
            period_allocation: what each period grants, >= 0.
            carry_over_limit: the most that rolls into the next period, >= 0 (``None``:
                everything carries over). A period closes under the limit of the latest
                configuration whose start is no later than its own: a change for a later
                start applies from that start on, while one restating the current
                period's start (or an earlier one) sets the limit that period closes
                under (its allocation, granted already, stays). What is available at the
                close expires above the limit whatever it came from (top-ups by
                :meth:`allocate` included); what an active hold holds at the end is not
                available: it does not expire, and what its commit does not consume
                returns to the next period.
            period_interval: whole days or whole months (``'1 month'``, ``'7 days'``, or a
                timedelta of whole days), at most 100 years (36000 days); ``None`` means
                ``'1 month'``.

        Returns:
            None.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        params = [
            *_account(user_id, event_type, unit, resource),
            t.check_date(period_start, "period_start"),
            t.to_amount(period_allocation, "period_allocation", sign="nonnegative"),
            t.to_amount(carry_over_limit, "carry_over_limit", nullable=True, sign="nonnegative"),
            None
            if period_interval is None
            else t.check_interval(period_interval, "period_interval"),
        ]
        try:
            self._run(_SQL_SET_PERIOD_CONFIG, params)
        except MeterError as exc:
            # Interval text is parsed by PostgreSQL when the argument is cast, before the
            # function runs; it is the only text argument that can fail that way.
            if isinstance(period_interval, str) and exc.sqlstate in _INTERVAL_SYNTAX_ERRORS:
                raise t.invalid("period_interval", exc.message) from exc
            raise

    def open_period(
        self,
        user_id: str | None,
        event_type: str,
        unit: str,
        resource: str | None,
        period_start: date,
        allocation: int | Decimal | str | float | None = None,
    ) -> Decimal:
        """Open a period: allocate ``allocation`` (or the configured one) at its start.

        Idempotent per account and ``period_start``. On an account with a period
        configuration (:meth:`set_period_config`), the period before, if still open and
        ended, is closed first, at the day before, as beat's roll would close it: opening
        the next period ahead of the roll does not carry its unused units past the
        carry-over limit. Opened before its day (up to 24 hours ahead), or past the next
        start of the period before (the roll is behind), the period before stays the
        current one: the roll closes it at its end, opens any periods between, and keeps
        this one.

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).
            period_start: the period's first day.
            allocation: the amount to grant, >= 0 (``None``: the configured allocation).

        Returns:
            The new balance.

        Raises:
            ValidationError, NotFoundError (unknown account), IdempotencyConflictError
            (opened before with another allocation), MeterConnectionError, MeterError.
        """
        value = self._scalar(
            _SQL_OPEN_PERIOD,
            [
                *_account(user_id, event_type, unit, resource),
                start := t.check_date(period_start, "period_start"),
                grant := t.to_amount(allocation, "allocation", nullable=True, sign="nonnegative"),
            ],
            replay=_replayed_by(period_start=start, allocation=grant),
        )
        return value if isinstance(value, Decimal) else Decimal(value)

    def close_period(
        self,
        user_id: str | None,
        event_type: str,
        unit: str,
        resource: str | None,
        period_end: date,
    ) -> Row:
        """Close a period: expire what is available above the carry-over limit.

        Idempotent per account and ``period_end``. "Available" is what the account has
        at the call; when a recorded period begins after ``period_end`` (the next one
        opened ahead, or a day between periods), it is what stood at the end of that day,
        as the period roll counts it (sql 041). A day inside a period already closed on a
        later day is refused (``ValidationError`` naming ``period_end``).

        Parameters:
            user_id, event_type, unit, resource: the account key (``user_id=None``: pool).
            period_end: the last day of the period being closed.

        Returns:
            ``{"expired", "carried_over", "new_balance": Decimal}``.

        Raises:
            ValidationError, NotFoundError (unknown account), MeterConnectionError,
            MeterError.
        """
        return self._one(
            _SQL_CLOSE_PERIOD,
            [
                *_account(user_id, event_type, unit, resource),
                end := t.check_date(period_end, "period_end"),
            ],
            replay=_replayed_by(period_end=end),
        )

    def get_periods(
        self,
        user_id: str | None,
        event_type: str | None = None,
        unit: str | None = None,
        resource: str | None = None,
        limit: int | None = 100,
    ) -> list[Row]:
        """The periods history of a user's accounts (``None``: the pool's), newest first.

        One row per period opened or closed (by :meth:`open_period`, :meth:`close_period`
        or the roll), as ``meter periods show`` prints them.

        Parameters:
            user_id: the user (``None``: the namespace's pool accounts).
            event_type, unit, resource: narrow to accounts with this value; ``None`` is
                any. Unlike the account key elsewhere, ``resource=None`` is any resource:
                pass ``""`` for the accounts without one.
            limit: at most this many rows (``None``: 100; capped at 10000; >= 1).

        Returns:
            Dicts with ``event_type``, ``resource``, ``unit``, ``period_start``,
            ``period_end`` (dates; ``period_start`` ``None`` for a close with no recorded
            opening), ``allocation``, ``open_balance``, ``expired``, ``carried_over``,
            ``close_balance`` (Decimal, ``None`` where the period was not opened or not
            closed), ``opened_at``, ``opened_by``, ``closed_at``, ``closed_by``. The roll
            records ``open_balance`` as the balance stood at the period's start (its
            allocation included) and ``close_balance`` as at its end, after the close; a
            period opened by hand records the balance at that call (what
            :meth:`open_period` returned), and one closed by hand what
            :meth:`close_period` returned (as at its end when a later period is recorded).

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        return self._run(
            _SQL_GET_PERIODS,
            [
                _ident(user_id, "user_id", nullable=True),
                _ident(event_type, "event_type", nullable=True),
                _ident(unit, "unit", nullable=True),
                _ident(resource, "resource", nullable=True),
                t.check_limit(limit, "limit"),
            ],
        )

    def release_expired_reservations(self, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """Expire this namespace's holds whose TTL has passed, in short batches.

        Parameters:
            batch_size: holds per transaction, 1..100000; calls repeat until a batch comes
                back short.

        Returns:
            How many holds were expired.

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        size = t.check_int(batch_size, "batch_size", min_value=1, max_value=MAX_BATCH_SIZE)
        total = 0
        while True:
            n = int(self._scalar(_SQL_RELEASE_EXPIRED, [size]))
            total += n
            if n < size:
                return total

    # -------------------------------------------------------------------- maintenance

    def reconcile(self) -> list[Row]:
        """Accounts whose stored figures disagree with the ledger or the active holds.

        Returns:
            Dicts with ``user_id``, ``event_type``, ``resource``, ``unit``, ``issue_type``
            (``balance_mismatch`` or ``reserved_mismatch``), ``expected``, ``actual``,
            ``discrepancy``; ``[]`` on a healthy ledger.

        Raises:
            MeterConnectionError, MeterError.
        """
        return self._run(_SQL_RECONCILE, [])

    def get_stats(self) -> Row:
        """Namespace totals.

        Returns:
            ``{"total_accounts", "total_ledger_entries", "active_reservations": int,
            "total_balance", "total_reserved": Decimal}``. ``total_ledger_entries`` counts
            every entry ever recorded, those retention folded into checkpoints included.

        Raises:
            MeterConnectionError, MeterError.
        """
        return self._one(_SQL_GET_STATS, [])

    # -------------------------------------------------------------------- actor and audit

    def set_actor(
        self,
        actor_id: str | None = _UNSET,
        request_id: str | None = _UNSET,
        on_behalf_of: str | None = _UNSET,
        reason: str | None = _UNSET,
    ) -> None:
        """Set who acts, for the audit trail of this client's later calls.

        Only the fields passed change (pass ``None`` to clear one); no SQL is run.

        Parameters:
            actor_id, request_id, on_behalf_of, reason: up to 256 characters each.

        Raises:
            ValidationError: for an invalid field (nothing changes).
        """
        given = {
            "actor_id": actor_id,
            "request_id": request_id,
            "on_behalf_of": on_behalf_of,
            "reason": reason,
        }
        checked = {
            name: _ident(value, name, "actor", nullable=True)
            for name, value in given.items()
            if value is not _UNSET
        }
        with self._actor_lock:
            a, r, o, why = self._actor
            self._actor = (
                checked.get("actor_id", a),
                checked.get("request_id", r),
                checked.get("on_behalf_of", o),
                checked.get("reason", why),
            )

    def clear_actor(self) -> None:
        """Forget the actor context: later calls carry none. No SQL is run."""
        with self._actor_lock:
            self._actor = _NO_ACTOR

    def get_audit_events(
        self,
        user_id: str | None = None,
        actor_id: str | None = None,
        kinds: Sequence[str] | None = None,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        limit: int | None = 100,
        before_event_id: str | None = None,
    ) -> list[Row]:
        """The namespace's audit trail, newest first (events recorded at one time, by one
        transaction such as a period roll catching up, by the times they are dated at).

        To page, pass the last event received as ``end_time=last["at"],
        before_event_id=last["event_id"]``: the next page starts just after it, events of
        the same ``at`` included (one transaction records several: a commit's ledger row
        and the hold's completion), none repeated. ``end_time`` alone is exclusive. Each
        page is read afresh: an event recorded since that sorts before the cursor (its
        ``at``, a transaction's start, within the pages already read) is in none of the
        pages that follow.

        Ledger entries (``ledger.<entry_type>``), reservation transitions
        (``reservation.<status>``), ``period.open``, ``period.close``, ``period.config``.

        Parameters:
            user_id: only this user's events.
            actor_id: only events by this actor.
            kinds: only these kinds (see :data:`AUDIT_KINDS`).
            start_time, end_time: ``at`` in ``[start_time, end_time)``; ``None`` is
                unbounded. ``start_time`` after ``end_time`` is refused (``ValidationError``
                naming ``start_time``); equal, the window is empty (but for the events of
                that time listed after ``before_event_id``).
            limit: at most this many (``None``: 100; capped at 10000; >= 1).
            before_event_id: with ``end_time`` (that event's ``at``), the ``event_id`` of
                the event the page continues after. Refused without ``end_time``, or when
                no event has that id at that time.

        Returns:
            Dicts with ``kind``, ``at``, ``user_id``, ``event_type``, ``resource``, ``unit``,
            ``amount``, ``reservation_id``, ``entry_id``, ``actor_id``, ``on_behalf_of``,
            ``reason``, ``request_id``, ``metadata``, ``event_id`` (the kind and its source
            row's key, e.g. ``ledger.consumption:42``: unique in the namespace, stable).

        Raises:
            ValidationError, MeterConnectionError, MeterError.
        """
        kind_list = t.check_identifier_list(kinds, "kinds", min_len=1, max_len=64, nullable=True)
        for i, kind in enumerate(kind_list or ()):
            if kind not in AUDIT_KINDS:
                raise t.invalid(
                    "kinds",
                    f"unknown kind {t.shown(kind)} at index {i}; one of {sorted(AUDIT_KINDS)}",
                )
        args = [
            _ident(user_id, "user_id", nullable=True),
            # a filter: unlike the actor context, it cannot be empty
            t.check_identifier(actor_id, "actor_id", min_len=1, max_len=256, nullable=True),
            kind_list,
            t.check_timestamp(start_time, "start_time"),
            t.check_timestamp(end_time, "end_time"),
            t.check_limit(limit, "limit"),
        ]
        # kind, ':', then a reservation id (up to 128 characters) or a number
        cursor = t.check_identifier(
            before_event_id, "before_event_id", min_len=1, max_len=200, nullable=True
        )
        if cursor is None:
            return self._run(_SQL_GET_AUDIT_EVENTS, args)
        if end_time is None:
            raise t.invalid("before_event_id", "needs end_time: the at of the event it names")
        return self._run(_SQL_GET_AUDIT_EVENTS_AFTER, [*args, cursor])


# ------------------------------------------------------------------------------- fork

# Clients that built their own pool; after a fork each forgets the parent's connections.
_clients_with_own_pool: weakref.WeakSet[MeterClient] = weakref.WeakSet()
# What they held when the process was forked: the parent's pools and connections, never
# used here. Referenced so that no finaliser touches them.
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    global _connection_locks_guard
    # Held by another thread at the fork (building a client), it would stay held for good.
    _connection_locks_guard = threading.Lock()
    for client in list(_clients_with_own_pool):
        client._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
