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


def run() -> None:
    """Entry point for ``python -m meter`` (prog name ``meter`` rather than ``__main__``)."""
    main(prog_name="meter")
