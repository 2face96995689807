"""The ``meter`` command line.

One click group, one function per command. Commands that need a database take
``--database-url`` (default ``$METER_DATABASE_URL``); when neither is given they start, or
reuse, an embedded PostgreSQL whose data lives in ``./.meter/pg`` (``$METER_HOME/pg``), so
``meter migrate`` on a fresh machine just works (``status`` only when that folder exists:
a probe makes no server). New commands add a function decorated
with ``@main.command()`` and reuse the options (:func:`database_url_option`,
:func:`broker_url_option`, :func:`namespace_option`, :func:`json_option`), the resolvers
(:func:`resolve_database_url`, :func:`resolve_broker_url`) and :func:`_cli_errors`, which
turns errors into the documented exit statuses (:data:`EXIT_OK`, :data:`EXIT_PROBLEMS`,
:data:`EXIT_USAGE`, :data:`EXIT_UNREACHABLE`; docs/operations.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from decimal import Decimal
from typing import Any, Literal, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from meter.embedded import EmbeddedServerError
from meter.errors import MeterError, NotFoundError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


_EMBEDDED_PG = "the embedded server in $METER_HOME/pg (./.meter/pg)"


def database_url_option(func: F) -> F:
    """``--database-url``, defaulting to ``$METER_DATABASE_URL`` (then: embedded server)."""
    return click.option(
        "--database-url",
        envvar="METER_DATABASE_URL",
        default=None,
        metavar="URL",
        help=f"PostgreSQL conninfo/URL (default: $METER_DATABASE_URL, else {_EMBEDDED_PG}, "
        "started if it is not running).",
    )(func)


def resolve_database_url(database_url: str | None) -> str:
    """The URL to use: the one given, or that of a started/reused embedded PostgreSQL.

    The embedded server is left running on purpose: the next ``meter`` command (and the
    application under development) reuses it. It uses durable settings (not ``fast``).

    Raises:
        ValidationError: naming ``database_url``, for a malformed one (exit 2 under
            :func:`_cli_errors`), before anything is connected to or started.
    """
    if database_url:
        from meter.types import check_conninfo

        # Checked here, as the option the operator typed: the SDK and the migration runner
        # named it after their own parameters ("conn", "conninfo"), and `status` took a
        # malformed URL for an unreachable database (exit 3, not 2).
        check_conninfo(database_url, "database_url")
        return database_url
    from meter.embedded import EmbeddedPostgres, default_data_root

    server = EmbeddedPostgres(default_data_root() / "pg").start()
    err_console.print(
        escape(f"embedded PostgreSQL: {server.url()} (data in {server.data_dir})"), style="dim"
    )
    return server.url()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meter", prog_name="meter")
def main() -> None:
    """Meter: a usage-metering ledger on PostgreSQL.

    \b
    Exit status (every command):
      0  success; for a check (status, reconcile): nothing wrong
      1  a check found problems, or an operation failed
      2  usage error: bad options or arguments, invalid input, a database URL
         that is malformed or holds a value libpq refuses (sslmode=bogus)
      3  cannot connect to the database (status, up, demo: or the broker),
         or the connection was lost under the call
    """


@main.command()
@database_url_option
@click.option(
    "--with-roles",
    is_flag=True,
    help="Also create/refresh the group roles meter_app and meter_maintenance (sql/roles.sql).",
)
def migrate(database_url: str | None, with_roles: bool) -> None:
    """Apply pending sql/NNN_*.sql migrations, once each, in order.

    Exit status 3 when the database cannot be reached within the URL's connect_timeout (or
    PGCONNECT_TIMEOUT), else 10 s.
    """
    from meter.migrate import migrate as run_migrations
    from meter.migrate import schema_version

    with _cli_errors():
        url = resolve_database_url(database_url)
        applied = run_migrations(url, with_roles=with_roles)
        version = schema_version(url)
    for name in applied:
        console.print(f"applied {name}")
    if not applied:
        console.print("nothing to apply")
    console.print(
        f"schema version: {version or 'none'}" + ("; roles applied" if with_roles else "")
    )


# ------------------------------------------------------------------ reads and checks

EXIT_OK = 0
"""Success; for a check (``status``, ``reconcile``): nothing wrong found."""
EXIT_PROBLEMS = 1
"""A check found problems (unhealthy status, reconcile issues), or an operation failed."""
EXIT_USAGE = 2
"""Bad command line or bad input (click's usage errors, a ``ValidationError``)."""
EXIT_UNREACHABLE = 3
"""The database (or, for ``status``, ``up`` and ``demo``, the broker) could not be reached,
or the embedded server could not be started; or the connection was lost under the call,
which may then have been made."""


def broker_url_option(func: F) -> F:
    """``--broker-url``, defaulting to ``$METER_BROKER_URL`` (then: ``meter up``'s Redis)."""
    return click.option(
        "--broker-url",
        envvar="METER_BROKER_URL",
        default=None,
        metavar="URL",
        help="Redis broker URL (default: $METER_BROKER_URL, else the embedded Redis of "
        "`meter up` in ./.meter/redis if it runs, else redis://127.0.0.1:6379/0).",
    )(func)


def namespace_option(func: F) -> F:
    return click.option(
        "--namespace", default="default", show_default=True, help="The tenant to read."
    )(func)


def pool_option(func: F) -> F:
    return click.option(
        "--pool", is_flag=True, help="The namespace pool's accounts (user_id NULL), not USER's."
    )(func)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout, for scripts."
    )(func)


def resolve_broker_url(broker_url: str | None) -> str:
    """The broker to use: the one given, else the running embedded Redis of ``meter up``
    (never started for this), else the default ``redis://127.0.0.1:6379/0``."""
    from meter import wire

    if broker_url:
        return broker_url
    from meter.embedded import EmbeddedRedis, default_data_root

    running = EmbeddedRedis(default_data_root() / "redis")._running()
    if running is not None:
        return f"redis://127.0.0.1:{running[1]}/0"
    return wire.DEFAULT_BROKER_URL


class _Timestamp(click.ParamType):
    """An ISO 8601 date or date-time; without an offset it is UTC."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from datetime import datetime

        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or date-time", param, ctx)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


TIMESTAMP = _Timestamp()


def _check_window(start: Any, end: Any) -> None:
    """Refuse ``--from`` after ``--to`` by its option's name, before any connection: the
    database refuses it too, but naming ``start_time``, and ``meter ledger`` calls no read
    for a user without accounts."""
    if start is not None and end is not None and start > end:
        raise click.BadParameter(
            f"{start.isoformat()} is after --to {end.isoformat()}", param_hint="'--from'"
        )


@contextmanager
def _cli_errors() -> Iterator[None]:
    """Map errors to the documented exit statuses, with a one-line message on stderr."""
    from meter.errors import MeterConnectionError, ValidationError

    try:
        yield
    except (MeterConnectionError, EmbeddedServerError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc).strip())}")
        raise SystemExit(EXIT_UNREACHABLE) from exc
    except ValidationError as exc:
        err_console.print(f"[bold red]error:[/] {escape(_named_as_the_option(exc))}")
        raise SystemExit(EXIT_USAGE) from exc
    except MeterError as exc:
        err_console.print(f"[bold red]error:[/] {escape(_explained(exc))}")
        raise SystemExit(EXIT_PROBLEMS) from exc


def _named_as_the_option(exc: Exception) -> str:
    """``exc``'s message, a value of the URL that libpq refused at connect named after the
    option the operator typed rather than the SDK's or the runner's parameter ("conn",
    "conninfo"), which hold it."""
    parameter = getattr(exc, "parameter", None)
    message = str(exc)
    if parameter in ("conn", "conninfo") and message.startswith(f"{parameter}: "):
        return "database_url: " + message[len(parameter) + 2 :]
    return message


# What a database not migrated, or migrated by an older meter, answers a call of this one.
_SCHEMA_BEHIND = frozenset({"3F000", "42P01", "42883"})  # no schema, table, function


def _explained(exc: Exception) -> str:
    """``exc``'s message, with what to do when it says the schema is missing or behind
    (a plain MeterError from a call: a failed migration file says so itself)."""
    if type(exc) is MeterError and exc.sqlstate in _SCHEMA_BEHIND:
        return (
            f"{exc} (is the database migrated? `meter status` shows the migrations not "
            "applied, `meter migrate` applies them)"
        )
    return str(exc)


def _quiet_pool() -> None:
    """The pool logs each failed connection attempt; the command's error says it once."""
    import logging

    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


@contextmanager
def _client(database_url: str | None, namespace: str) -> Iterator[Any]:
    """A MeterClient on the resolved database; errors as :func:`_cli_errors`."""
    from meter.client import MeterClient

    _quiet_pool()
    with _cli_errors():
        client = MeterClient(resolve_database_url(database_url), namespace, max_size=2)
        try:
            yield client
        finally:
            client.close()


def _connect(database_url: str | None) -> Any:
    """One autocommit psycopg connection to the resolved database; ValidationError for a
    malformed URL or one with a value libpq refuses, MeterConnectionError when it cannot be
    reached (within the URL's connect_timeout or PGCONNECT_TIMEOUT, else 10 s)."""
    import psycopg

    from meter import session
    from meter import types as t
    from meter.errors import MeterConnectionError

    url = resolve_database_url(database_url)
    try:
        conn = t.connect(url, "database_url", autocommit=True)
        session.use_settings(conn)  # dates and intervals in the styles psycopg reads
        return conn
    except psycopg.ProgrammingError as exc:  # the URL's syntax, or one of its values
        raise t.invalid("database_url", f"invalid conninfo: {str(exc).strip()}") from None
    except psycopg.OperationalError as exc:
        raise MeterConnectionError(f"cannot connect to the database: {str(exc).strip()}") from exc


def _write_in_transaction(
    conn: Any, namespace: str, write: Callable[[Any], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Run ``write(client)`` in one transaction of its own on ``conn`` (from
    :func:`_connect`; closed after) and return its result and whether it replayed an
    earlier run rather than writing.

    ``meter._replay`` says so in the transaction-local setting ``meter.replayed``
    (sql/027), read before COMMIT: once committed, a call can no longer say. A database
    with migrations not applied is refused before anything is written, as it might not
    say. Raises MeterError, never psycopg's errors; a connection lost at COMMIT is a
    MeterConnectionError, and the write may then have been made.
    """
    import psycopg

    from meter.client import MeterClient, _retry_pause
    from meter.errors import MeterError, from_psycopg
    from meter.migrate import pending, recorded_versions

    try:
        behind = pending(recorded_versions(conn))
        if behind:
            raise MeterError(
                f"the database's schema is behind this meter ({len(behind)} migration(s) not "
                f"applied, from {behind[0]}): run `meter migrate` first; nothing was written"
            )
        retries = 0
        while True:
            try:
                with conn.transaction():  # BEGIN ... COMMIT; the call runs in a savepoint
                    conn.execute("SELECT set_config('meter.replayed', '', true)")
                    result = write(MeterClient(conn, namespace))
                    row = conn.execute(
                        "SELECT current_setting('meter.replayed', true) = 'on'"
                    ).fetchone()
                return result, bool(row and row[0])
            # A deadlock or a key claimed concurrently rolled it back whole: run it again,
            # as the SDK runs again a call that is its own transaction.
            except MeterError as exc:
                pause = _retry_pause(exc.sqlstate, retries)
                if pause is None:
                    raise
                time.sleep(pause)
                retries += 1
    except psycopg.Error as exc:  # BEGIN, COMMIT and the checks: the calls raise MeterError
        raise from_psycopg(exc) from exc
    finally:
        conn.close()


def _emit_json(value: Any) -> None:
    from meter import types as t

    with _deep_json():
        click.echo(t.dumps(_json_ready(value)))


# Metadata and event payloads written through SQL (or refused into the dead letters) nest as
# deep as PostgreSQL's stack lets them, some 10,000 levels with its default settings: deeper
# than Python's default recursion limit (1,000), which the JSON output's recursive walk
# would hit. Since Python 3.11 a call between Python functions takes no C stack, so a
# higher limit costs only frames on the heap.
_JSON_RECURSION_LIMIT = 100_000


@contextmanager
def _deep_json() -> Iterator[None]:
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _JSON_RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def _print_table(table: Any) -> None:
    # A terminal gets its own width; a pipe or file a wide table rather than one folded
    # into 80 columns.
    (console if console.is_terminal else Console(width=200, highlight=False)).print(table)


def _table(title: str | None, columns: str, rows: list[dict[str, Any]]) -> Any:
    """A table of ``rows`` (dicts): ``columns`` is ``"header=key, ..."``; a header that
    starts with ``#`` is a number column (right-aligned). Title and cells are printed as
    they are (escaped), not read as markup."""
    from rich.table import Table

    # the title holds the caller's names (a user '[/x]'): text, never rich markup
    table = Table(title=None if title is None else escape(title), header_style="bold")
    spec = [c.strip().split("=") for c in columns.split(",")]
    for header, _ in spec:
        numeric = header.startswith("#")
        table.add_column(header.lstrip("#"), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(escape("" if row[key] is None else _cell(row[key])) for _, key in spec))
    return table


def _cell(value: Any) -> str:
    if hasattr(value, "astimezone"):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, Decimal):
        # Plain digits: str() writes an exponent below 1e-6 (5E-7, or 0E-7 for a zero of
        # seven places), which reads as another number at a glance.
        return format(value, "f")
    return str(value)


def _whose(user: str | None, pool: bool) -> tuple[str | None, str]:
    """(the user_id to read, None for the namespace pool; how to name it to people)."""
    if (user is None) == (not pool):
        raise click.UsageError("give either USER or --pool")
    return user, "the pool" if pool else repr(user)


@main.command()
@database_url_option
@namespace_option
@click.argument("user", required=False)
@pool_option
@json_option
def balance(
    database_url: str | None, namespace: str, user: str | None, pool: bool, as_json: bool
) -> None:
    """Balances of every account of USER (or of the namespace pool, with --pool)."""
    user, who = _whose(user, pool)
    with _client(database_url, namespace) as client:
        rows = client.get_user_balances(user)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        console.print(f"no accounts for {escape(who)} in namespace {escape(repr(namespace))}")
        return
    _print_table(
        _table(
            f"{user if user is not None else 'the pool'} ({namespace})",
            "event type=event_type, resource=resource, unit=unit, #balance=balance, "
            "#reserved=reserved, #available=available",
            rows,
        )
    )


@main.command()
@database_url_option
@namespace_option
@click.argument("user")
@click.option("--from", "start", type=TIMESTAMP, help="From this time on (ISO 8601, UTC default).")
@click.option("--to", "end", type=TIMESTAMP, help="Before this time (exclusive).")
@json_option
def usage(
    database_url: str | None,
    namespace: str,
    user: str,
    start: Any,
    end: Any,
    as_json: bool,
) -> None:
    """Consumption of USER per event type, resource and unit, in [--from, --to)."""
    _check_window(start, end)
    with _client(database_url, namespace) as client:
        rows = client.get_usage(user, start, end)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        console.print(f"no usage for {escape(repr(user))} in namespace {escape(repr(namespace))}")
        return
    span = f"{_cell(start) if start else '…'} to {_cell(end) if end else '…'}"
    _print_table(
        _table(
            f"usage of {user} ({namespace}), {span}",
            "event type=event_type, resource=resource, unit=unit, #consumed=total_consumed, "
            "#events=event_count",
            rows,
        )
    )


@main.command()
@database_url_option
@namespace_option
@click.argument("user", required=False)
@pool_option
@click.option("--event-type", default=None, help="Only this event type.")
@click.option("--unit", default=None, help="Only this unit.")
@click.option("--resource", default=None, help="Only this resource.")
@click.option("--from", "start", type=TIMESTAMP, help="From this time on (ISO 8601).")
@click.option("--to", "end", type=TIMESTAMP, help="Before this time (exclusive).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
def ledger(
    database_url: str | None,
    namespace: str,
    user: str | None,
    pool: bool,
    event_type: str | None,
    unit: str | None,
    resource: str | None,
    start: Any,
    end: Any,
    limit: int,
    as_json: bool,
) -> None:
    """Ledger entries of USER (or of the pool, with --pool), newest first (every account,
    or those the options select)."""
    user, who = _whose(user, pool)
    _check_window(start, end)
    entries: list[dict[str, Any]] = []
    with _client(database_url, namespace) as client:
        accounts = [
            a
            for a in client.get_user_balances(user)
            if (event_type is None or a["event_type"] == event_type)
            and (unit is None or a["unit"] == unit)
            and (resource is None or (a["resource"] or "") == resource)
        ]
        for a in accounts:
            for row in client.get_ledger(
                user, a["event_type"], a["unit"], a["resource"], start, end, limit
            ):
                entries.append(
                    {"event_type": a["event_type"], "resource": a["resource"],
                     "unit": a["unit"], **row}
                )  # fmt: skip
    entries.sort(key=lambda e: (e["event_time"], e["id"]), reverse=True)
    entries = entries[:limit]
    if as_json:
        _emit_json(entries)
        return
    if not entries:
        console.print(f"no ledger entries for {escape(who)} in namespace {escape(repr(namespace))}")
        return
    _print_table(
        _table(
            f"ledger of {user if user is not None else 'the pool'} ({namespace}), newest first",
            "#id=id, time (UTC)=event_time, event type=event_type, resource=resource, "
            "unit=unit, entry=entry_type, #amount=amount, #balance after=balance_after, "
            "reservation=reservation_id, actor=actor_id",
            entries,
        )
    )


@main.command()
@database_url_option
@namespace_option
@json_option
def reconcile(database_url: str | None, namespace: str, as_json: bool) -> None:
    """Check that every account agrees with its ledger and its active holds.

    Exit status 1 when an account disagrees.
    """
    with _client(database_url, namespace) as client:
        issues = client.reconcile()
    if as_json:
        _emit_json(issues)
    elif not issues:
        console.print(f"namespace {escape(repr(namespace))}: every account reconciles")
    else:
        _print_table(
            _table(
                f"{len(issues)} issue(s) in namespace {namespace!r}",
                "user=user_id, event type=event_type, resource=resource, unit=unit, "
                "issue=issue_type, #expected=expected, #actual=actual, "
                "#discrepancy=discrepancy",
                [{**i, "user_id": i["user_id"] or "(pool)"} for i in issues],
            )
        )
    if issues:
        raise SystemExit(EXIT_PROBLEMS)


def _not_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty")
    return value


def _account_write_options(func: F) -> F:
    """The options of a hand-made ledger entry (``grant``, ``adjust``): the account, the
    amount, who and why (both required: the audit trail must say), and the key."""
    options = [
        database_url_option,
        click.option(
            "--namespace", default="default", show_default=True, help="The tenant to write in."
        ),
        click.option("--user", default=None, help="The user whose account it is."),
        click.option("--pool", is_flag=True, help="The namespace pool's account (not --user)."),
        click.option("--event-type", required=True, help="The account's event type."),
        click.option("--unit", required=True, help="The account's unit."),
        click.option("--resource", default=None, help="The account's resource, if any."),
        click.option(
            "--actor",
            "actor_id",
            required=True,
            callback=_not_empty,
            help="Who does this (audit trail).",
        ),
        click.option(
            "--reason",
            required=True,
            callback=_not_empty,
            help="Why: a ticket, a note (audit trail).",
        ),
        click.option("--on-behalf-of", default=None, help="Whom it is done for (audit trail)."),
        click.option(
            "--idempotency-key",
            default=None,
            help="Makes running the command again count once (default: a new one, printed on "
            "stderr before anything is written).",
        ),
        json_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _write_by_hand(
    what: Callable[[Any], str],
    amount: str,
    sign: Literal["positive", "nonzero"],
    write: Callable[[Any, str | None, Any, str], dict[str, Any]],
    *,
    database_url: str | None,
    namespace: str,
    user: str | None,
    pool: bool,
    actor_id: str,
    reason: str,
    on_behalf_of: str | None,
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Run ``write(client, user_id, amount, key)`` with the actor context set, and print
    the entry. A generated key is printed (stderr) before anything is written, so that a
    command whose outcome was not seen can be run again with it and count once."""
    from meter import types as t
    from meter.errors import MeterConnectionError

    if (user is None) == (not pool):
        raise click.UsageError("give either --user or --pool")
    with _cli_errors():
        quantity = t.to_amount(amount, "amount", sign=sign)
    key = idempotency_key
    if key is None:
        key = t.new_id()
        err_console.print(
            f"idempotency key {key} (to run this again without counting it twice: "
            f"--idempotency-key {key})",
            markup=False,
        )

    def write_as_actor(client: Any) -> dict[str, Any]:
        client.set_actor(actor_id=actor_id, reason=reason, on_behalf_of=on_behalf_of)
        return write(client, user, quantity, key)

    with _cli_errors():
        conn = _connect(database_url)  # not reached: nothing was written, no hint
        try:
            result, replayed = _write_in_transaction(conn, namespace, write_as_actor)
        except MeterConnectionError as exc:
            # lost at the COMMIT, it may have been written: the key makes a rerun safe
            raise MeterConnectionError(
                f"{str(exc).strip()} (if unsure whether it was written, run the command "
                f"again with --idempotency-key {key}: it counts once)",
                sqlstate=exc.sqlstate,
            ) from exc
    if as_json:
        _emit_json({**result, "idempotency_key": key, "replayed": replayed})
        return
    who = "the pool" if pool else repr(user)
    # markup=False: the names are the caller's, and may hold rich's [brackets]
    if replayed:
        console.print(
            f"nothing written: idempotency key {key} was used before, by an earlier run "
            f"that {what(quantity)} for {who} in namespace {namespace!r} as ledger entry "
            f"{result['entry_id']} (balance then {_cell(result['balance'])})",
            markup=False,
        )
        return
    console.print(
        f"{what(quantity)} for {who} in namespace {namespace!r}: balance "
        f"{_cell(result['balance'])}, ledger entry {result['entry_id']}, idempotency key {key}",
        markup=False,
    )


@main.command()
@_account_write_options
@click.option("--amount", required=True, help="How much to add (> 0).")
def grant(amount: str, event_type: str, unit: str, resource: str | None, **common: Any) -> None:
    """Add quota or credits to an account by hand (a ledger allocation).

    Every grant is recorded with --actor and --reason; its idempotency key is printed, so
    that a grant whose outcome you did not see can be run again and count once.
    """
    _write_by_hand(
        lambda quantity: f"granted {quantity:f} {unit} ({event_type})",
        amount,
        "positive",
        lambda client, user_id, quantity, key: client.allocate(
            user_id, event_type, quantity, unit, resource, idempotency_key=key
        ),
        **common,
    )


@main.command()
@_account_write_options
@click.option(
    "--amount", required=True, help="The signed correction: --amount=-5 takes 5 away; not 0."
)
@click.option(
    "--reference-id",
    type=click.IntRange(min=1),
    default=None,
    help="The ledger entry (of this namespace) this corrects, if any.",
)
def adjust(
    amount: str,
    event_type: str,
    unit: str,
    resource: str | None,
    reference_id: int | None,
    **common: Any,
) -> None:
    """Correct an account by hand (a ledger adjustment, either sign): a refund, a fix.

    Recorded with --actor and --reason; its idempotency key is printed, as for grant.
    """
    _write_by_hand(
        lambda quantity: f"adjusted by {quantity:f} {unit} ({event_type})",
        amount,
        "nonzero",
        lambda client, user_id, quantity, key: client.adjust(
            user_id, event_type, quantity, unit, resource, reference_id, idempotency_key=key
        ),
        **common,
    )


@main.command()
@click.option(
    "--database-url",
    envvar="METER_DATABASE_URL",
    default=None,
    metavar="URL",
    # not database_url_option: a probe starts no server that was never made
    help=f"PostgreSQL conninfo/URL (default: $METER_DATABASE_URL, else {_EMBEDDED_PG} if "
    "that folder exists, started if it is not running; else none: exit 3).",
)
@broker_url_option
@click.option(
    "--timeout", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
    help="Seconds to wait for Redis and for the workers' ping replies.",
)  # fmt: skip
@json_option
def status(database_url: str | None, broker_url: str | None, timeout: float, as_json: bool) -> None:
    """Health of the installation: database, schema, queue, dead letters, workers, beat.

    Exit status: 0 healthy; 1 a problem found (pending migrations, dead letters waiting, no
    worker answering, a periodic task whose last run failed); 2 a malformed --database-url,
    or one with a value libpq refuses (with --json: the report, the database not looked
    at); 3 the database or the broker cannot be reached.
    """
    from meter import status as st
    from meter.embedded import default_data_root
    from meter.errors import ValidationError

    url: str | None = None
    why: str | None = None  # no url: the embedded server's error, for the report too
    invalid: MeterError | None = None
    if database_url or (default_data_root() / "pg").is_dir():
        # given, or the embedded server of `meter up` (reused; started if it was stopped)
        try:
            url = resolve_database_url(database_url)
        except EmbeddedServerError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            why = f"the embedded server did not start: {' '.join(str(exc).split())[:500]}"
        except MeterError as exc:  # a malformed URL: a usage error
            invalid = exc
    broker = resolve_broker_url(broker_url)
    report: dict[str, Any] | None = None
    if invalid is None:
        try:
            report = st.collect(url, broker, timeout, database_error=why)
        except ValidationError as exc:  # a value libpq refused (sslmode=bogus)
            invalid = exc
    if invalid is not None:
        if not as_json:
            _fail(invalid)  # exit 2, nothing looked at
        # The document of every other outcome, the database not looked at (exit 2 all the
        # same): a probe's script reads JSON whatever happened.
        err_console.print(f"[bold red]error:[/] {escape(str(invalid))}")
        _emit_json(st.collect(None, broker, timeout, database_invalid=str(invalid)))
        raise SystemExit(EXIT_USAGE)
    assert report is not None
    if as_json:
        _emit_json(report)
    else:
        _print_status(report)
    if not (report["database"]["reachable"] and report["broker"]["reachable"]):
        raise SystemExit(EXIT_UNREACHABLE)
    if not report["healthy"]:
        raise SystemExit(EXIT_PROBLEMS)


def _print_status(report: dict[str, Any]) -> None:
    from datetime import datetime

    db, broker, workers = report["database"], report["broker"], report["workers"]

    def mark(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[bold red]FAIL[/]"

    def count(value: Any) -> str:
        return "?" if value is None else str(value)

    # unreachable parts: the reason is in the problems listed below the table
    rows = [("database", mark(db["reachable"]), escape(db.get("url") or "(none)"))]
    if db["reachable"]:
        pending = db["pending_migrations"]
        schema = "unknown" if pending is None else str(db["schema_version"] or "not migrated")
        rows.append(
            ("schema", mark(pending == []), escape(schema)
             + (f" ({len(pending)} pending)" if pending else ""))
        )  # fmt: skip
        # unknown on a migrated schema: not counted (the problems below say why)
        counted = db["dead_letters"] == 0 or not db["schema_version"]
        rows.append(("dead letters", mark(counted), count(db["dead_letters"])))
    rows.append(("broker", mark(broker["reachable"]), escape(broker["url"])))
    if broker["reachable"]:
        rows.append(("queue depth", "", count(broker["queue_depth"])))
        rows.append(("unacked", "", count(broker["unacked"])))
        alive = workers["alive"]
        rows.append(
            ("workers", mark(bool(alive)), "?" if alive is None else
             f"{len(alive)} alive" + (f": {escape(', '.join(alive))}" if alive else ""))
        )  # fmt: skip
    from rich.table import Table

    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    for _ in range(3):
        table.add_column()
    for row in rows:
        table.add_row(*row)
    console.print(table)

    if db["reachable"] and db["schema_version"]:
        runs = db["maintenance"]
        if runs is None:
            detail = db.get("maintenance_error") or "this schema records no runs"
            console.print(f"beat runs: unknown ({escape(str(detail))})")
        elif not runs:
            console.print("beat runs: none recorded yet")
        else:
            now = datetime.now(UTC)

            def ago(at: Any) -> str:
                return f"{(now - at).total_seconds():.0f} s ago" if at else "never"

            _print_table(
                _table(
                    "beat runs",
                    "task=task, last started=started, last ok=ok, #runs=runs, "
                    "last error=last_error",
                    [
                        {**r, "started": ago(r["last_started_at"]), "ok": ago(r["last_ok_at"])}
                        for r in runs
                    ],
                )
            )
    for problem in report["problems"]:
        console.print(f"[bold red]problem:[/] {escape(problem)}")
    if report["healthy"]:
        console.print("[green]healthy[/]")


@main.command()
@database_url_option
@broker_url_option
@click.option(
    "--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
    help="Seconds to wait for the worker to apply the events.",
)  # fmt: skip
def demo(database_url: str | None, broker_url: str | None, timeout: float) -> None:
    """Send the demo workload of `meter up` to a running stack (namespace 'demo').

    Needs a worker on that broker and database; exit status 1 if it does not apply the
    events within --timeout.
    """
    from meter.up import run_demo

    _quiet_pool()
    with _cli_errors():
        url = resolve_database_url(database_url)
        broker = resolve_broker_url(broker_url)
        try:
            run_demo(url, broker, console, timeout=timeout)
        except TimeoutError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise SystemExit(EXIT_PROBLEMS) from exc


# ------------------------------------------------------------------ dead letters


def _json_ready(value: Any) -> Any:
    """Dead-letter values as JSON can carry them: times in ISO 8601, amounts exact."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# (header, wraps?): the short columns keep their width, error and event fold to fit.
_DEAD_LETTER_COLUMNS = (
    ("id", False),
    ("namespace", True),
    ("op", False),
    ("status", False),
    ("tries", False),
    ("last failed (UTC)", False),
    ("error", True),
    ("event", True),
)


def _payload_summary(payload: Any) -> str:
    """The event's arguments (op and namespace have columns of their own), as JSON."""
    from meter import types as t

    with _deep_json():
        if isinstance(payload, dict) and isinstance(payload.get("args"), dict):
            return t.dumps(payload["args"])
        return t.dumps(payload)


def _dead_letter_conn(database_url: str | None) -> Any:
    """An autocommit connection for the dead-letter commands (:func:`_connect`): exit 2
    for a malformed URL, 3 when the database cannot be reached."""
    with _cli_errors():
        return _connect(database_url)


def _fail(exc: Exception) -> None:
    """Print ``exc`` and exit: 2 for invalid input (a ValidationError), 3 for a connection
    lost under the call (as every command: a retry or discard may then have been made, and
    is safe to run again), else 1."""
    from meter.errors import MeterConnectionError, ValidationError

    err_console.print(f"[bold red]error:[/] {escape(_explained(exc))}")
    if isinstance(exc, MeterConnectionError):
        raise SystemExit(EXIT_UNREACHABLE) from exc
    raise SystemExit(EXIT_USAGE if isinstance(exc, ValidationError) else EXIT_PROBLEMS) from exc


@main.group("dead-letters")
def dead_letters() -> None:
    """Events the pipeline could not apply: list, retry, discard.

    Exit status: 0 on success; 1 when a retry failed, an id is unknown (or no longer
    waiting) or the database refused the call; 2 for invalid input; 3 when it cannot be
    reached, or the connection was lost under a call (which may then have been made: run
    it again, it does nothing twice).
    """


@dead_letters.command("list")
@database_url_option
@click.option(
    "--status",
    type=click.Choice(["dead", "retried", "discarded", "all"]),
    default="dead",
    show_default=True,
    help="Which dead letters: waiting (dead), already retried or discarded, or all.",
)
@click.option("--namespace", default=None, help="Only this namespace (default: every one).")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array on stdout, for scripts.")
def dead_letters_list(
    database_url: str | None, status: str, namespace: str | None, limit: int, as_json: bool
) -> None:
    """List dead letters, newest first."""
    from rich.table import Table

    from meter import dead_letters as dl

    with _dead_letter_conn(database_url) as conn:
        try:
            rows = dl.list_dead_letters(conn, status, limit, namespace)
        except MeterError as exc:
            _fail(exc)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        console.print(f"no dead letters ({status})")
        return
    # The status column only says something when several statuses are listed.
    columns = [c for c in _DEAD_LETTER_COLUMNS if status == "all" or c[0] != "status"]
    table = Table(header_style="bold")
    for header, wraps in columns:
        table.add_column(header, overflow="fold", no_wrap=not wraps)
    for row in rows:
        cells = {
            "id": str(row["dead_letter_id"]),
            "namespace": escape(row["namespace"] or "-"),
            "op": escape(row["op"]),
            "status": row["status"],
            "tries": str(row["attempts"]),
            "last failed (UTC)": row["last_failed_at"]
            .astimezone(UTC)
            .strftime("%Y-%m-%d %H:%M:%S"),
            "error": escape(f"{row['error_sqlstate'] or ''} {row['error_message'] or ''}".strip()),
            "event": escape(_payload_summary(row["payload"])),
        }
        table.add_row(*(cells[header] for header, _ in columns))
    # A terminal gets its own width; a pipe or file a wide table rather than one folded
    # into 80 columns.
    (console if console.is_terminal else Console(width=200, highlight=False)).print(table)


@dead_letters.command("retry")
@database_url_option
@click.argument("dead_letter_id", type=click.IntRange(min=1), required=False)
@click.option(
    "--all",
    "retry_all",
    is_flag=True,
    help="Retry every waiting dead letter: reserves first, then oldest first.",
)
@click.option("--json", "as_json", is_flag=True, help="The outcomes as JSON on stdout.")
def dead_letters_retry(
    database_url: str | None, dead_letter_id: int | None, retry_all: bool, as_json: bool
) -> None:
    """Re-apply a dead letter (ID), or every waiting one (--all), once its cause is fixed."""
    from meter import dead_letters as dl

    if (dead_letter_id is None) == (not retry_all):
        raise click.UsageError("give either a dead letter ID or --all")
    outcomes: list[dict[str, Any]] = []
    failed = retried = 0
    with _dead_letter_conn(database_url) as conn:
        try:
            # --all: every waiting letter, reserves first (their retry settles the commits
            # and releases waiting for them), then oldest first
            ids = dl.to_retry(conn) if retry_all else [dead_letter_id]
            for id_ in ids:
                assert id_ is not None
                try:
                    outcome = dl.retry(conn, id_)
                    # ok: this call applied it and marked it retried (retry_dead_letter
                    # holds the waiting letter's row while it does)
                    retried += bool(outcome["ok"])
                except NotFoundError:
                    if not retry_all:
                        raise
                    # no longer waiting: settled by a reserve retried above (its trigger
                    # applies the commits and releases filed for it), or meanwhile by
                    # another operator's retry or discard; not counted as retried by this
                    # run, which did not retry it
                    outcome = {"ok": True, "status": "settled already"}
                outcomes.append({"dead_letter_id": id_, **outcome})
                failed += not outcome["ok"]
        except MeterError as exc:
            _print_retries(outcomes, as_json=as_json)
            _fail(exc)
    _print_retries(outcomes, as_json=as_json)
    if retry_all and not as_json:
        gone = len(outcomes) - retried - failed
        console.print(
            f"retried {retried} of {len(outcomes)}"
            + (
                f"; {gone} no longer waiting when reached (settled by a reserve retried "
                "above, or meanwhile by another run)"
                if gone
                else ""
            )
        )
    if failed:
        raise SystemExit(1)


def _print_retries(outcomes: list[dict[str, Any]], *, as_json: bool) -> None:
    """What each retry gave (those made before an error too)."""
    if as_json:
        _emit_json(outcomes)
        return
    for o in outcomes:
        if o["ok"]:
            console.print(f"{o['dead_letter_id']}: {o['status']}")
        else:
            if o["status"] == "not_found":
                detail = "the reservation does not exist (yet)"
            else:
                detail = f"{o['error_sqlstate'] or ''} {o['error_message'] or ''}".strip()
            console.print(f"{o['dead_letter_id']}: [red]still failing[/]: {escape(detail)}")


@dead_letters.command("discard")
@database_url_option
@click.argument("dead_letter_id", type=click.IntRange(min=1))
def dead_letters_discard(database_url: str | None, dead_letter_id: int) -> None:
    """Give up on a dead letter for good (it stays listed as discarded)."""
    from meter import dead_letters as dl

    with _dead_letter_conn(database_url) as conn:
        try:
            done = dl.discard(conn, dead_letter_id)
        except MeterError as exc:
            _fail(exc)
    if not done:
        err_console.print(f"[bold red]error:[/] no dead letter {dead_letter_id} is waiting")
        raise SystemExit(1)
    console.print(f"{dead_letter_id}: discarded")


def run() -> None:
    """Entry point for ``python -m meter`` (prog name ``meter`` rather than ``__main__``)."""
    main(prog_name="meter")


@main.command()
@click.option("--no-demo", is_flag=True, help="Start the stack without sending demo traffic.")
def up(no_demo: bool) -> None:
    """Run Meter locally: embedded PostgreSQL and Redis in ./.meter ($METER_HOME), a
    worker, beat and a demo workload; Ctrl-C stops everything it started.

    With $METER_DATABASE_URL or $METER_BROKER_URL set, that server is used instead of the
    embedded one: it is migrated, and the demo writes to its namespace 'demo'
    (--no-demo: nothing). Exit status: 2 for a malformed $METER_DATABASE_URL, 3 when a
    server cannot be reached or started, 1 for another failure.
    """
    from meter.up import serve

    try:
        # the statuses of every command: a bad URL 2, a server out of reach 3
        with _cli_errors():
            serve(console, demo=not no_demo)
    except (RuntimeError, TimeoutError) as exc:  # a child exited, the demo timed out
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(EXIT_PROBLEMS) from exc


@main.group("keys")
def keys() -> None:
    """Signing keys of the pipeline (docs/reliability.md, "Tenant isolation")."""


@keys.command("derive")
@click.argument("namespace")
@click.option(
    "--secret",
    envvar="METER_SIGNING_SECRET",
    required=True,
    help="The workers' secret (default: $METER_SIGNING_SECRET).",
)
def keys_derive(namespace: str, secret: str) -> None:
    """Print the signing key of NAMESPACE, for its producers ($METER_PRODUCER_KEY)."""
    from meter import signing
    from meter.types import LIMITS, check_identifier, invalid

    try:
        lo, hi = LIMITS["namespace"]
        check_identifier(namespace, "namespace", min_len=lo, max_len=hi, nullable=False)
    except MeterError as exc:
        _fail(exc)
    if not secret:
        _fail(invalid("secret", "must not be empty"))
    click.echo(signing.derive_key(secret, namespace))


@main.group("periods")
def periods() -> None:
    """Billing periods: what was opened, expired and carried over (beat rolls them)."""


@periods.command("show")
@database_url_option
@namespace_option
@click.argument("user", required=False)
@click.option("--pool", is_flag=True, help="The namespace pool's periods (instead of USER).")
@click.option("--event-type", default=None, help="Only this event type.")
@click.option("--unit", default=None, help="Only this unit.")
@click.option("--limit", type=click.IntRange(1, 10000), default=100, show_default=True)
@json_option
def periods_show(
    database_url: str | None,
    namespace: str,
    user: str | None,
    pool: bool,
    event_type: str | None,
    unit: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Period history of USER's accounts (or of the pool's, with --pool), newest first."""
    import psycopg
    from psycopg.rows import dict_row

    from meter.errors import from_psycopg

    if (user is None) == (not pool):
        raise click.UsageError("give either USER or --pool")
    with _cli_errors():
        try:
            with _connect(database_url) as conn:
                conn.row_factory = dict_row
                rows = conn.execute(
                    "SELECT * FROM meter.get_periods(%s, %s, %s, NULL, %s, meter.ctx(%s))",
                    (user, event_type, unit, limit, namespace),
                ).fetchall()
        except psycopg.Error as exc:
            raise from_psycopg(exc) from exc
    if as_json:
        _emit_json(rows)
        return
    who = "the pool" if pool else repr(user)
    if not rows:
        console.print(f"no periods for {escape(who)} in namespace {escape(repr(namespace))}")
        return
    _print_table(
        _table(
            f"periods of {who} ({namespace})",
            "event type=event_type, resource=resource, unit=unit, start=period_start, "
            "end=period_end, #allocation=allocation, #opened at=open_balance, "
            "#expired=expired, #carried over=carried_over, #closed at=close_balance, "
            "opened by=opened_by, closed by=closed_by",
            rows,
        )
    )
