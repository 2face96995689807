"""The ``meter`` command line.

One click group, one function per command. Commands that need a database take
``--database-url`` (default ``$METER_DATABASE_URL``); when neither is given they start, or
reuse, an embedded PostgreSQL whose data lives in ``./.meter/pg`` (``$METER_HOME/pg``), so
``meter migrate`` on a fresh machine just works. New commands (``up``, ``status``,
``balance``, ``dead-letters`` ...) add a function decorated with ``@main.command()`` and
reuse :func:`database_url_option` / :func:`resolve_database_url`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from meter.embedded import EmbeddedServerError
from meter.errors import MeterError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def database_url_option(func: F) -> F:
    """``--database-url``, defaulting to ``$METER_DATABASE_URL`` (then: embedded server)."""
    return click.option(
        "--database-url",
        envvar="METER_DATABASE_URL",
        default=None,
        metavar="URL",
        help="PostgreSQL conninfo/URL (default: $METER_DATABASE_URL, else an embedded "
        "server in ./.meter/pg).",
    )(func)


def resolve_database_url(database_url: str | None) -> str:
    """The URL to use: the one given, or that of a started/reused embedded PostgreSQL.

    The embedded server is left running on purpose: the next ``meter`` command (and the
    application under development) reuses it. It uses durable settings (not ``fast``).
    """
    if database_url:
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
    """Meter: a usage-metering ledger on PostgreSQL."""


@main.command()
@database_url_option
@click.option(
    "--with-roles",
    is_flag=True,
    help="Also create/refresh the group roles meter_app and meter_maintenance (sql/roles.sql).",
)
def migrate(database_url: str | None, with_roles: bool) -> None:
    """Apply pending sql/NNN_*.sql migrations, once each, in order."""
    from meter.migrate import migrate as run_migrations
    from meter.migrate import schema_version

    try:
        url = resolve_database_url(database_url)
        applied = run_migrations(url, with_roles=with_roles)
        version = schema_version(url)
    except (MeterError, EmbeddedServerError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(1) from exc
    for name in applied:
        console.print(f"applied {name}")
    if not applied:
        console.print("nothing to apply")
    console.print(
        f"schema version: {version or 'none'}" + ("; roles applied" if with_roles else "")
    )


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

    if isinstance(payload, dict) and isinstance(payload.get("args"), dict):
        return t.dumps(payload["args"])
    return t.dumps(payload)


def _dead_letter_conn(database_url: str | None) -> Any:
    """An autocommit connection for the dead-letter commands; exit 1 when unreachable."""
    import psycopg

    try:
        return psycopg.connect(resolve_database_url(database_url), autocommit=True)
    except (psycopg.Error, EmbeddedServerError) as exc:
        err_console.print(f"[bold red]error:[/] cannot connect: {escape(str(exc).strip())}")
        raise SystemExit(1) from exc


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise SystemExit(1) from exc


@main.group("dead-letters")
def dead_letters() -> None:
    """Events the pipeline could not apply: list, retry, discard.

    Exit status: 0 on success; 1 when a retry failed, an id is unknown (or no longer
    waiting) or the database could not be used.
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
    from meter import types as t

    with _dead_letter_conn(database_url) as conn:
        try:
            rows = dl.list_dead_letters(conn, status, limit, namespace)
        except MeterError as exc:
            _fail(exc)
    if as_json:
        click.echo(t.dumps([_json_ready(row) for row in rows]))
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
@click.option("--all", "retry_all", is_flag=True, help="Retry every waiting dead letter.")
@click.option("--json", "as_json", is_flag=True, help="The outcomes as JSON on stdout.")
def dead_letters_retry(
    database_url: str | None, dead_letter_id: int | None, retry_all: bool, as_json: bool
) -> None:
    """Re-apply a dead letter (ID), or every waiting one (--all), once its cause is fixed."""
    from meter import dead_letters as dl
    from meter import types as t

    if (dead_letter_id is None) == (not retry_all):
        raise click.UsageError("give either a dead letter ID or --all")
    outcomes: list[dict[str, Any]] = []
    failed = 0
    with _dead_letter_conn(database_url) as conn:
        try:
            ids = (
                [row["dead_letter_id"] for row in dl.list_dead_letters(conn, "dead", 10000)]
                if retry_all
                else [dead_letter_id]
            )
            for id_ in ids:
                assert id_ is not None
                outcome = dl.retry(conn, id_)
                outcomes.append({"dead_letter_id": id_, **outcome})
                failed += not outcome["ok"]
        except MeterError as exc:
            _fail(exc)
    if as_json:
        click.echo(t.dumps([_json_ready(o) for o in outcomes]))
    else:
        for o in outcomes:
            if o["ok"]:
                console.print(f"{o['dead_letter_id']}: {o['status']}")
            else:
                if o["status"] == "not_found":
                    detail = "the reservation does not exist (yet)"
                else:
                    detail = f"{o['error_sqlstate'] or ''} {o['error_message'] or ''}".strip()
                console.print(f"{o['dead_letter_id']}: [red]still failing[/]: {escape(detail)}")
        if retry_all:
            console.print(f"retried {len(outcomes) - failed} of {len(outcomes)}")
    if failed:
        raise SystemExit(1)


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
    """Run Meter locally: embedded PostgreSQL and Redis in ./.meter, a worker, beat and a
    demo workload; Ctrl-C stops everything it started."""
    from meter.up import serve

    try:
        serve(console, demo=not no_demo)
    except (MeterError, EmbeddedServerError, RuntimeError, TimeoutError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(1) from exc
