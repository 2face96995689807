"""Apply ``sql/NNN_*.sql`` to a database, once each, in order.

Contract (SPEC section 4, ``docs/internals.md``):

* Each migration file runs in its own transaction together with the row that records it in
  ``meter.schema_migrations``, so a file is either wholly applied and recorded, or neither.
* Re-running is a no-op. A recorded file whose content changed since is refused
  (:class:`MigrationError`): silently diverging schemas are worse than a loud stop.
* Two processes migrating one database at once are safe: the whole run holds a
  session-level advisory lock on a fixed key, so the second waits, then finds nothing to do.
* The files run as the owner of the schema's objects (in a new database, of schema
  ``meter`` when that role may create in the database) when the runner is another role
  that may become it (a superuser migrating a schema its application's role owns), so
  every object has one owner (``meter.schema_migrations`` included, so that role may go
  on migrating it itself); the run is recorded as the runner. A runner that may not
  become the owner of the schema's objects is refused before any file.
* ``with_roles`` re-applies ``sql/roles.sql`` (idempotent grants for ``meter_app`` and
  ``meter_maintenance``) after the migrations, every time, so a grant added to that file
  reaches existing databases.

The SQL directory is ``meter/sql`` inside an installed wheel (``pyproject.toml``
force-includes it), else ``sql/`` at the root of a source checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import tuple_row

from meter.errors import MeterConnectionError, MeterError
from meter.types import check_conninfo, connect

__all__ = [
    "Migration",
    "MigrationError",
    "default_sql_dir",
    "discover",
    "migrate",
    "schema_version",
]

LOCK_KEY = 0x6D65746572_0001
"""Advisory lock key of the migration runner (``'meter'`` in ASCII, then 1)."""

_FILE_RE = re.compile(r"^(?P<number>\d{3,})_(?P<name>[A-Za-z0-9_]+)\.sql$")
# What a migration's name starts and ends like: such a file that _FILE_RE does not match
# is a mistake to report, not a note to skip (it would never be applied, silently).
_LOOKS_LIKE_MIGRATION_RE = re.compile(r"^\d.*\.sql$", re.IGNORECASE)

_BOOTSTRAP_SCHEMA = "CREATE SCHEMA IF NOT EXISTS meter"

# As the role the files run as (when the runner becomes one), so that role may go on
# migrating its schema itself.
_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS meter.schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class MigrationError(MeterError):
    """The database schema could not be migrated."""


@dataclass(frozen=True)
class Migration:
    """One ``sql/NNN_name.sql`` file; ``version`` is its name without ``.sql``."""

    version: str
    number: int
    path: Path
    checksum: str

    @property
    def sql(self) -> bytes:
        return self.path.read_bytes()


def default_sql_dir() -> Path:
    """Where the SQL files live: ``meter/sql`` when installed from a wheel, else ``<repo>/sql``."""
    packaged = Path(__file__).resolve().parent / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default :func:`default_sql_dir`), ordered by number.

    Files that do not look like ``NNN_name.sql`` (``roles.sql``, notes) are not
    migrations; a ``.sql`` file whose name starts with a digit but breaks that pattern
    (``050_fix-it.sql``, ``50_x.sql``) is refused rather than skipped. Two files with
    the same number are refused: their order would be a coin toss, and two engineers
    picking the same number is exactly how that happens.
    """
    directory = directory if directory is not None else default_sql_dir()
    if not directory.is_dir():
        raise MigrationError(f"SQL directory not found: {directory}")
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        match = _FILE_RE.match(path.name)
        if match is None and _LOOKS_LIKE_MIGRATION_RE.match(path.name) and path.is_file():
            raise MigrationError(
                f"{path.name} looks like a migration but is not named NNN_name.sql (three "
                "or more digits, '_', then letters, digits and '_' only): rename it"
            )
        if match is None or not path.is_file():
            continue
        number = int(match["number"])
        if number in found:
            raise MigrationError(
                f"two migrations share number {number}: {found[number].path.name} and {path.name}"
            )
        found[number] = Migration(path.stem, number, path, _checksum(path))
    return [found[n] for n in sorted(found)]


def migrate(
    conninfo: str,
    with_roles: bool = False,
    *,
    sql_dir: Path | None = None,
) -> list[str]:
    """Apply pending migrations to the database at ``conninfo``.

    Parameters:
        conninfo: libpq connection string or URL of a role that may create the schema
            (and, with ``with_roles``, roles).
        with_roles: also apply ``roles.sql`` (group roles and grants) after migrating.
        sql_dir: directory of the SQL files; default :func:`default_sql_dir`.

    Returns:
        The versions (file names without ``.sql``) applied by this call, in order; ``[]``
        when the database was already up to date.

    Raises:
        MigrationError: an applied file changed, the database has a migration this code
            does not know, a file failed (its transaction is rolled back; earlier files
            stay applied), or ``roles.sql`` is missing.
        MeterConnectionError: the database cannot be reached (within ``conninfo``'s
            ``connect_timeout`` or ``PGCONNECT_TIMEOUT``, else 10 s).
        ValidationError: ``conninfo`` is malformed, or libpq refuses one of its values.
    """
    directory = sql_dir if sql_dir is not None else default_sql_dir()
    migrations = discover(directory)
    roles_path = directory / "roles.sql"
    if with_roles and not roles_path.is_file():
        raise MigrationError(f"with_roles requested but {roles_path} does not exist")

    conn = _connect(conninfo, "cannot connect to the database to migrate")
    with conn:
        try:
            return _migrate_locked(conn, migrations, roles_path if with_roles else None)
        except MeterError:
            raise
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration failed: {_describe(exc)}", sqlstate=exc.sqlstate
            ) from exc


def _connect(conninfo: str, unreachable: str) -> psycopg.Connection[Any]:
    """An autocommit connection: ValidationError for a malformed ``conninfo`` (the
    caller's mistake; it escaped as psycopg's ProgrammingError) or one with a value libpq
    refuses (``sslmode=bogus``; it was taken for a server out of reach),
    MeterConnectionError, prefixed ``unreachable``, when the server cannot be reached.

    Within ``connect_timeout`` seconds, 10 unless ``conninfo`` or ``PGCONNECT_TIMEOUT``
    sets it: without one, a host that does not answer held the run for psycopg's default
    of 130 s (the system's TCP timeout, for libpq)."""
    check_conninfo(conninfo, "conninfo")
    try:
        return connect(conninfo, "conninfo", autocommit=True)
    except psycopg.OperationalError as exc:
        raise MeterConnectionError(f"{unreachable}: {exc}") from exc


def _migrate_locked(
    conn: psycopg.Connection, migrations: list[Migration], roles_path: Path | None
) -> list[str]:
    """The run proper, under the advisory lock."""
    _quiet(conn)
    # Session-level: held across the per-file transactions below, and released by the
    # server when the connection ends, even if this process dies mid-way.
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        with conn.transaction():
            conn.execute(_BOOTSTRAP_SCHEMA)
            owner = _owner_to_become(conn)
            if owner is not None:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
            conn.execute(_BOOTSTRAP.encode())
        recorded: dict[str, str] = dict(
            conn.execute("SELECT version, checksum FROM meter.schema_migrations").fetchall()
        )
        _check_recorded(recorded, migrations)
        applied_now: list[str] = []
        for migration in migrations:
            if migration.version in recorded:
                continue
            _apply(conn, migration, owner)
            applied_now.append(migration.version)
            _quiet(conn)  # a file's plain SET must not leak into the next file
        if roles_path is not None:
            _apply_roles(conn, roles_path)
        return applied_now
    finally:
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _quiet(conn: psycopg.Connection) -> None:
    """Reset session settings and keep NOTICEs (``IF NOT EXISTS`` chatter) off the wire.

    The files run in UTC: 003 creates the ledger's first months with a ``create_partition``
    that added a month in the session's TimeZone (fixed by 056), and under a server, role
    or conninfo defaulting to America/New_York its months were cut short, or overlapped
    so that the migration failed (``partition "ledger_2026_12" would overlap``).
    """
    conn.execute("RESET ALL")
    conn.execute("SET client_min_messages = warning")
    conn.execute("SET TimeZone = 'UTC'")


def _check_recorded(recorded: dict[str, str], migrations: list[Migration]) -> None:
    """Refuse to run when history and files disagree, before touching anything."""
    by_version = {m.version: m for m in migrations}
    unknown = sorted(set(recorded) - set(by_version))
    if unknown:
        raise MigrationError(
            "the database has migrations that are not in the SQL directory "
            f"(is this code older than the database?): {', '.join(unknown)}"
        )
    changed = [v for v, checksum in recorded.items() if by_version[v].checksum != checksum]
    if changed:
        raise MigrationError(
            "applied migrations were modified since they were applied (add a new "
            f"migration instead of editing an old one): {', '.join(sorted(changed))}"
        )


def _owner_to_become(conn: psycopg.Connection) -> str | None:
    """The role the files run as when it is another role that we may become (a superuser
    may become any), else None: the owner of the schema's objects (of ``meter.accounts``,
    which the first file creates), or in a database that has none yet, the owner of schema
    ``meter`` when it may create in the database.

    Objects a file creates belong to the role that runs it. A schema its application's
    role owns, migrated later by a superuser (a DBA, a deploy job), got objects of two
    owners: SECURITY DEFINER functions running with a superuser's rights, and helpers that
    the owner's functions may not call once roles.sql revokes PUBLIC's EXECUTE (every
    dead letter refused). So the files run as the owner of what is there.

    A schema a DBA made for a role that may not create in the database (``CREATE SCHEMA
    meter AUTHORIZATION app``) is not migrated as that role: the first file's ``CREATE
    SCHEMA IF NOT EXISTS meter`` needs CREATE on the database ("permission denied for
    database", nothing migrated). It is migrated as the runner, and stays so (its objects
    are the runner's).

    Raises:
        MigrationError: the schema's objects belong to another role that the runner may
            not become (checked before any file).
    """
    # may SET ROLE to it: PostgreSQL 16 can grant a membership without that right
    may = "SET" if conn.info.server_version >= 160000 else "MEMBER"
    row = conn.execute(
        "SELECT r.rolname, r.rolname <> current_user, pg_has_role(current_user, r.oid, %s),"
        " to_regclass('meter.accounts') IS NOT NULL"
        " FROM pg_roles r WHERE r.oid = coalesce("
        "  (SELECT c.relowner FROM pg_class c WHERE c.oid = to_regclass('meter.accounts')),"
        "  (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'meter'"
        "   AND has_database_privilege(n.nspowner, current_database(), 'CREATE')))",
        (may,),
    ).fetchone()
    if row is None or not row[1]:
        return None
    name, _, may_become, existing = row
    if may_become:
        return str(name)
    if existing:
        # A member without SET (PostgreSQL 16+) or a role granted CREATE on the schema would
        # run the files as itself: its new helpers, PUBLIC's EXECUTE revoked, could not be
        # called by the owner's functions (049's: every dead letter refused).
        raise MigrationError(
            f"the schema's objects belong to {name!r}: run the migrations as {name}, or as "
            f"a role that may SET ROLE to it (a superuser, or a member WITH SET TRUE), so "
            "that what they create has one owner"
        )
    return None


def _apply(conn: psycopg.Connection, migration: Migration, owner: str | None = None) -> None:
    """Run one file and record it, atomically; as role ``owner`` when given (the schema's
    owner, :func:`_owner_to_become`), recorded as ourselves.

    The file is sent as one simple-protocol query (no parameters), so it may hold many
    statements, dollar-quoted bodies and literal ``%`` signs.
    """
    try:
        with conn.transaction():
            if owner is not None:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
            conn.execute(migration.sql)
            if owner is not None:
                conn.execute("RESET ROLE")
            conn.execute(
                "INSERT INTO meter.schema_migrations (version, checksum) VALUES (%s, %s)",
                (migration.version, migration.checksum),
            )
    except psycopg.Error as exc:
        raise MigrationError(
            f"migration {migration.path.name} failed and was rolled back: {_describe(exc)}",
            sqlstate=exc.sqlstate,
        ) from exc


# roles.sql touches cluster-wide catalogs (pg_authid, pg_auth_members). The advisory lock
# is per database, so two databases of one cluster migrating with roles at once can still
# collide there; the file is idempotent, so the loser simply runs it again.
_ROLE_RACES = (
    pg_errors.UniqueViolation,
    pg_errors.DuplicateObject,
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.InternalError_,  # "tuple concurrently updated"
)


def _apply_roles(conn: psycopg.Connection, roles_path: Path) -> None:
    sql = roles_path.read_bytes()
    attempts = 5
    for attempt in range(attempts):
        try:
            with conn.transaction():
                conn.execute(sql)
            return
        except psycopg.Error as exc:
            if isinstance(exc, _ROLE_RACES) and attempt + 1 < attempts:
                time.sleep(0.05 * (attempt + 1))
                continue
            raise MigrationError(
                f"{roles_path.name} failed and was rolled back: {_describe(exc)}",
                sqlstate=exc.sqlstate,
            ) from exc


def _describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    parts = [str(exc).strip()]
    if diag.context:
        parts.append(f"context: {diag.context.strip()}")
    return "\n".join(parts)


def recorded_versions(conn: psycopg.Connection[Any]) -> set[str]:
    """The migration versions recorded in ``conn``'s database (none for a database never
    migrated), whatever the connection's row factory."""
    cur = conn.cursor(row_factory=tuple_row)
    row = cur.execute("SELECT to_regclass('meter.schema_migrations') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return set()
    return {v for (v,) in cur.execute("SELECT version FROM meter.schema_migrations")}


def pending(recorded: set[str]) -> list[str]:
    """The versions of this package's migrations not among ``recorded``
    (:func:`recorded_versions`), in order."""
    return [m.version for m in discover() if m.version not in recorded]


def newest(versions: set[str]) -> str | None:
    """The newest of these migration versions (None for none), by numeric prefix, not as
    text: '1000_x' comes after '999_y'."""
    if not versions:
        return None
    return max(versions, key=lambda v: (int(v.split("_", 1)[0]) if v[:1].isdigit() else -1, v))


def schema_version(conninfo: str) -> str | None:
    """The newest applied migration version, or None for a database never migrated."""
    conn = _connect(conninfo, "cannot connect to the database")
    with conn:
        return newest(recorded_versions(conn))
