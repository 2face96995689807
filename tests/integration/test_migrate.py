"""The migration runner (SPEC section 4: ``meter.migrate`` / ``meter migrate``).

These tests use empty databases they create themselves (not the template): the point is
what happens to a database that has never seen Meter. Runner mechanics that do not depend
on our real schema (checksums, failure rollback, ordering) run on small stub directories.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import make_conninfo

from meter import dead_letters
from meter.cli import main as cli_main
from meter.client import MeterClient
from meter.errors import MeterError, ValidationError
from meter.migrate import MigrationError, default_sql_dir, discover, migrate, schema_version
from worker import db as worker_db

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count(1)


def real_versions() -> list[str]:
    """Versions of sql/NNN_*.sql, read straight off the directory (not via the runner)."""
    files = sorted(default_sql_dir().glob("[0-9][0-9][0-9]_*.sql"), key=lambda p: p.name)
    return [p.stem for p in files]


@pytest.fixture
def new_database(pg_server: Any) -> Iterator[Callable[[], str]]:
    """Factory of empty databases (from template0), all dropped at teardown."""
    created: list[str] = []
    admin = psycopg.connect(pg_server.url("postgres"), autocommit=True)

    def create() -> str:
        name = f"meter_mig_{os.getpid()}_{next(_counter)}"
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        created.append(name)
        return str(pg_server.url(name))

    try:
        yield create
    finally:
        for name in created:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


@pytest.fixture
def empty_url(new_database: Callable[[], str]) -> str:
    return new_database()


def recorded(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT version, checksum FROM meter.schema_migrations ORDER BY version"
        ).fetchall()
    return [(str(v), str(c)) for v, c in rows]


def role_exists(url: str, role: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row is not None


# ----------------------------------------------------------------- the real sql/


def test_real_sql_dir_has_migrations_and_roles() -> None:
    assert real_versions(), "no sql/NNN_*.sql files found"
    assert [m.version for m in discover()] == real_versions()
    assert (default_sql_dir() / "roles.sql").is_file()


def test_migrate_empty_database_applies_every_file_and_records_it(empty_url: str) -> None:
    assert schema_version(empty_url) is None

    applied = migrate(empty_url)

    assert applied == real_versions()
    assert [v for v, _ in recorded(empty_url)] == sorted(real_versions())
    checksums = {m.version: m.checksum for m in discover()}
    assert all(checksums[v] == c for v, c in recorded(empty_url))
    assert schema_version(empty_url) == real_versions()[-1]
    with psycopg.connect(empty_url) as conn:
        (ledger,) = conn.execute("SELECT to_regclass('meter.ledger')").fetchone() or (None,)
    assert ledger is not None


def test_a_database_in_another_time_zone_gets_months_of_utc(empty_url: str) -> None:
    # 003 creates this month's partition and the next three under the migration's session,
    # with a create_partition that added a month in the session's TimeZone: under New York
    # a month after a shorter one ended days early (any four months hold one), and in
    # November the next month's partition overlapped it and the migration failed.
    conninfo = psycopg.conninfo.make_conninfo(empty_url, options="-c TimeZone=America/New_York")
    migrate(conninfo)
    with psycopg.connect(empty_url) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'meter.ledger'::regclass"
        ).fetchall()
    assert len(rows) >= 4
    for name, bound in rows:
        y, m = int(name[7:11]), int(name[12:14])
        ny, nm = divmod(y * 12 + m, 12)
        assert bound == (
            f"FOR VALUES FROM ('{y:04d}-{m:02d}-01 00:00:00+00')"
            f" TO ('{ny:04d}-{nm + 1:02d}-01 00:00:00+00')"
        ), name


def test_rerun_is_a_noop(empty_url: str) -> None:
    migrate(empty_url)
    before = recorded(empty_url)

    assert migrate(empty_url) == []
    assert recorded(empty_url) == before


def test_concurrent_migrations_apply_each_file_once(empty_url: str) -> None:
    """Two runners starting together: one applies everything, the other finds nothing to do."""
    barrier = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            results.append(migrate(empty_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    assert not errors, errors
    assert sorted(results, key=len) == [[], real_versions()]
    assert [v for v, _ in recorded(empty_url)] == sorted(real_versions())


def test_concurrent_migrations_from_two_processes(empty_url: str) -> None:
    """Same as above with separate processes, which is what two deploys starting at once are."""
    code = "import sys; from meter.migrate import migrate; print(len(migrate(sys.argv[1])))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(int(out) for out, _ in outs) == [0, len(real_versions())]
    assert [v for v, _ in recorded(empty_url)] == sorted(real_versions())


def test_with_roles_twice_creates_both_group_roles(empty_url: str) -> None:
    first = migrate(empty_url, with_roles=True)
    second = migrate(empty_url, with_roles=True)

    assert first == real_versions()
    assert second == []
    assert role_exists(empty_url, "meter_app")
    assert role_exists(empty_url, "meter_maintenance")


def test_with_roles_on_an_already_migrated_database(empty_url: str) -> None:
    """Roles can be added later: roles.sql is re-applied even when no migration is pending."""
    migrate(empty_url)
    assert migrate(empty_url, with_roles=True) == []
    with psycopg.connect(empty_url) as conn:
        (can_read,) = conn.execute(
            "SELECT has_table_privilege('meter_app', 'meter.ledger', 'SELECT')"
        ).fetchone() or (False,)
    assert can_read


_ACL_SQL = """
SELECT p.oid::regprocedure::text AS f,
       has_function_privilege('meter_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('meter_maintenance', p.oid, 'EXECUTE') AS maint,
       coalesce(array_to_string(p.proacl, ',') ~ '(^|,)=X', true) AS public
FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace ORDER BY 1
"""


def function_acls(url: str) -> list[tuple[str, bool, bool, bool]]:
    with psycopg.connect(url) as conn:
        return [(str(f), bool(a), bool(m), bool(p)) for f, a, m, p in conn.execute(_ACL_SQL)]


def test_no_function_is_executable_by_public_without_roles(empty_url: str) -> None:
    # Files after 044 created functions (helpers, retention_backlog, dead_letters_to_retry,
    # a SECURITY DEFINER one) without revoking PUBLIC's default EXECUTE; only roles.sql did.
    migrate(empty_url)
    with psycopg.connect(empty_url) as conn:
        public = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " WHERE p.pronamespace = 'meter'::regnamespace"
            " AND coalesce(array_to_string(p.proacl, ',') ~ '(^|,)=X', true) ORDER BY 1"
        ).fetchall()
    assert public == []


def test_roles_then_migrations_without_them_grant_what_roles_sql_grants(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    """An installation migrated --with-roles, then upgraded by a plain ``meter migrate``
    (what docs/operations.md says to run before new workers) has the grants of one that
    ran --with-roles after the upgrade: no more (PUBLIC's default EXECUTE on the new
    functions reached meter_app), no less (a function the workers need)."""
    older = tmp_path / "older"
    older.mkdir()
    for m in discover():
        if m.number <= 47:
            write(older, m.path.name, m.path.read_text())
    write(older, "roles.sql", (default_sql_dir() / "roles.sql").read_text())
    upgraded, fresh = new_database(), new_database()
    migrate(upgraded, with_roles=True, sql_dir=older)
    migrate(upgraded)
    migrate(fresh, with_roles=True)
    assert function_acls(upgraded) == function_acls(fresh)


OWNER_ROLE = "meter_test_owner"


@pytest.fixture
def owned_database(pg_server: Any, new_database: Callable[[], str]) -> tuple[str, str]:
    """An empty database owned by a login role that is no superuser: (its URL as that
    role, its URL as the superuser)."""
    from psycopg.conninfo import make_conninfo

    from tests.fix_db import TEST_ROLE_PASSWORD

    superuser_url = new_database()
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
        try:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(OWNER_ROLE)))
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            pass  # roles are cluster-wide: an earlier test made it
        admin.execute(
            sql.SQL("ALTER ROLE {} NOSUPERUSER NOCREATEROLE NOBYPASSRLS PASSWORD {}").format(
                sql.Identifier(OWNER_ROLE), sql.Literal(TEST_ROLE_PASSWORD)
            )
        )
        name = psycopg.conninfo.conninfo_to_dict(superuser_url)["dbname"]
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(str(name)), sql.Identifier(OWNER_ROLE)
            )
        )
    owner_url = make_conninfo(
        pg_server.url(str(name), user=OWNER_ROLE), password=TEST_ROLE_PASSWORD
    )
    return owner_url, superuser_url


def test_a_superuser_migrating_a_schema_a_role_owns_creates_what_that_role_owns(
    owned_database: tuple[str, str], tmp_path: Path
) -> None:
    """The application's owner role migrated its database; later a superuser (a DBA,
    a deploy job) runs the next migrations, with roles. What those created belonged to
    the superuser: a SECURITY DEFINER function running with a superuser's rights, and
    helpers the owner's functions could not call once roles.sql revoked PUBLIC's EXECUTE
    (049's meter._dead_letter_source: every dead letter was refused, "permission denied
    for function _dead_letter_source")."""
    owner_url, superuser_url = owned_database
    older = tmp_path / "older"
    older.mkdir()
    for m in discover():
        if m.number <= 47:
            write(older, m.path.name, m.path.read_text())
    migrate(owner_url, sql_dir=older)

    migrate(superuser_url, with_roles=True)

    with psycopg.connect(superuser_url, autocommit=True) as conn:
        foreign = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'meter'::regnamespace"
            " AND c.relowner <> (SELECT nspowner FROM pg_namespace WHERE nspname = 'meter')"
            " UNION ALL SELECT p.proname FROM pg_proc p"
            " WHERE p.pronamespace = 'meter'::regnamespace"
            " AND p.proowner <> (SELECT nspowner FROM pg_namespace WHERE nspname = 'meter')"
        ).fetchall()
        assert foreign == []
        (letter,) = conn.execute(
            "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad',"
            " repeat('x', 300), 'default')"
        ).fetchone() or (None,)
    assert letter is not None
    assert schema_version(owner_url) == real_versions()[-1]
    assert migrate(owner_url) == []  # the owner may go on migrating


SCHEMA_ROLE = "meter_test_schema_owner"


def _one_owner(conn: psycopg.Connection[Any]) -> list[str]:
    """The owners of the schema's tables and functions (schema_migrations aside: the
    runner's bookkeeping)."""
    return [
        str(r)
        for (r,) in conn.execute(
            "SELECT DISTINCT o::regrole::text FROM ("
            " SELECT c.relowner AS o FROM pg_class c"
            " WHERE c.relnamespace = 'meter'::regnamespace AND c.relname <> 'schema_migrations'"
            " UNION ALL SELECT p.proowner FROM pg_proc p"
            " WHERE p.pronamespace = 'meter'::regnamespace) x ORDER BY 1"
        ).fetchall()
    ]


def test_a_superuser_migrates_a_schema_made_for_a_role_that_may_not_create_schemas(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    """A DBA made the schema for the application's role (``CREATE SCHEMA meter
    AUTHORIZATION app``, the usual way when that role may not create in the database) and
    migrates it as a superuser. The files ran as the schema's owner, and the first one's
    ``CREATE SCHEMA IF NOT EXISTS meter`` needs CREATE on the database, which it lacks:
    "permission denied for database", nothing could be migrated, fresh or upgraded. Such a
    database is migrated as the runner, as before, and its objects keep one owner."""
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(SCHEMA_ROLE)))
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            pass  # roles are cluster-wide: an earlier test made it
        conn.execute(
            sql.SQL("CREATE SCHEMA meter AUTHORIZATION {}").format(sql.Identifier(SCHEMA_ROLE))
        )
    older = tmp_path / "older"
    older.mkdir()
    for m in discover():
        if m.number <= 47:
            write(older, m.path.name, m.path.read_text())
    write(older, "roles.sql", (default_sql_dir() / "roles.sql").read_text())
    migrate(url, with_roles=True, sql_dir=older)
    migrate(url, with_roles=True)
    assert schema_version(url) == real_versions()[-1]
    with psycopg.connect(url, autocommit=True) as conn:
        assert len(_one_owner(conn)) == 1
        (letter,) = conn.execute(
            "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad',"
            " repeat('x', 300), 'default')"
        ).fetchone() or (None,)
    assert letter is not None


def test_a_role_goes_on_migrating_a_schema_a_superuser_first_migrated_for_it(
    owned_database: tuple[str, str],
) -> None:
    """A schema made for the application's role (which may create in its database) and
    first migrated by a superuser: the files ran as the role, but the runner's own
    ``meter.schema_migrations`` was the superuser's, so the role could not migrate its own
    schema later ("permission denied for table schema_migrations")."""
    owner_url, superuser_url = owned_database
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE SCHEMA meter AUTHORIZATION {}").format(sql.Identifier(OWNER_ROLE))
        )
    migrate(superuser_url, with_roles=True)
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        assert _one_owner(conn) == [OWNER_ROLE]
        (table_owner,) = conn.execute(
            "SELECT relowner::regrole::text FROM pg_class"
            " WHERE oid = 'meter.schema_migrations'::regclass"
        ).fetchone() or (None,)
        assert table_owner == OWNER_ROLE
    assert migrate(owner_url) == []
    assert schema_version(owner_url) == real_versions()[-1]


MEMBER_ROLE = "meter_test_member"


def test_a_member_that_may_not_become_the_owner_is_refused_before_any_file(
    owned_database: tuple[str, str], pg_server: Any, tmp_path: Path
) -> None:
    """PostgreSQL 16 can grant a role's membership, with its rights, but not the right to
    SET ROLE to it. Such a member migrating the owner's schema ran the files as itself:
    what they created was its own (049's meter._dead_letter_source), which the owner's
    record_dead_letter could not call once PUBLIC's EXECUTE was revoked, and every dead
    letter was refused. It is refused before any file, naming the owner."""
    from psycopg.conninfo import make_conninfo

    from tests.fix_db import TEST_ROLE_PASSWORD

    owner_url, superuser_url = owned_database
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        if conn.info.server_version < 160000:
            pytest.skip("membership without SET needs PostgreSQL 16")
        member = sql.Identifier(MEMBER_ROLE)
        try:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(member))
        except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            pass  # roles are cluster-wide: an earlier test made it
        conn.execute(
            sql.SQL("ALTER ROLE {} NOSUPERUSER PASSWORD {}").format(
                member, sql.Literal(TEST_ROLE_PASSWORD)
            )
        )
        conn.execute(
            sql.SQL("GRANT {} TO {} WITH INHERIT TRUE, SET FALSE").format(
                sql.Identifier(OWNER_ROLE), member
            )
        )
    older = tmp_path / "older"
    older.mkdir()
    for m in discover():
        if m.number <= 47:
            write(older, m.path.name, m.path.read_text())
    migrate(owner_url, sql_dir=older)
    dbname = str(psycopg.conninfo.conninfo_to_dict(superuser_url)["dbname"])
    member_url = make_conninfo(pg_server.url(dbname, user=MEMBER_ROLE), password=TEST_ROLE_PASSWORD)
    with pytest.raises(MigrationError, match=f"run the migrations as {OWNER_ROLE}"):
        migrate(member_url)
    assert schema_version(owner_url) == "047_a_refused_consume_creates_no_month"
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(OWNER_ROLE), member))


def test_cli_migrate_with_database_url(empty_url: str) -> None:
    runner = CliRunner()

    result = runner.invoke(cli_main, ["migrate", "--database-url", empty_url, "--with-roles"])

    assert result.exit_code == 0, result.output
    assert f"applied {real_versions()[0]}" in result.output
    assert [v for v, _ in recorded(empty_url)] == sorted(real_versions())

    again = runner.invoke(cli_main, ["migrate", "--database-url", empty_url])
    assert again.exit_code == 0, again.output
    assert "nothing to apply" in again.output


def test_cli_reads_meter_database_url_from_env(empty_url: str) -> None:
    result = CliRunner().invoke(cli_main, ["migrate"], env={"METER_DATABASE_URL": empty_url})
    assert result.exit_code == 0, result.output
    assert [v for v, _ in recorded(empty_url)] == sorted(real_versions())


def test_python_dash_m_meter_migrate(empty_url: str) -> None:
    """``python -m meter`` is the same CLI (what the console script runs)."""
    proc = subprocess.run(
        [sys.executable, "-m", "meter", "migrate", "--database-url", empty_url],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "schema version" in proc.stdout
    assert schema_version(empty_url) == real_versions()[-1]


def test_cli_reports_unreachable_database() -> None:
    result = CliRunner().invoke(
        cli_main, ["migrate", "--database-url", "postgresql://postgres@127.0.0.1:1/x"]
    )
    assert result.exit_code == 3  # cannot connect (meter/cli.py: EXIT_UNREACHABLE)
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("conninfo", ["not a url", "host=x bogus=1", "host=x\x00port=1"])
def test_a_malformed_conninfo_is_a_validation_error(conninfo: str) -> None:
    # It escaped as psycopg's ProgrammingError, which the CLI showed as a traceback, exit 1.
    for call in (lambda: migrate(conninfo), lambda: schema_version(conninfo)):
        with pytest.raises(ValidationError, match=r"^conninfo: invalid conninfo") as info:
            call()
        assert info.value.parameter == "conninfo"


# ------------------------------------------------------- runner mechanics on stubs


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def stub_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sql"
    d.mkdir()
    write(d, "001_one.sql", "CREATE TABLE meter.one (x int);\n")
    write(d, "002_two.sql", "INSERT INTO meter.one VALUES (1); -- 100% literal percent\n")
    write(d, "notes.txt", "not a migration")
    write(d, "roles.sql", "SELECT 1;\n")
    return d


def test_files_apply_in_numeric_order(empty_url: str, stub_dir: Path) -> None:
    write(stub_dir, "010_ten.sql", "INSERT INTO meter.one VALUES (10);\n")
    assert migrate(empty_url, sql_dir=stub_dir) == ["001_one", "002_two", "010_ten"]
    write(stub_dir, "011_eleven.sql", "INSERT INTO meter.one VALUES (11);\n")
    assert migrate(empty_url, sql_dir=stub_dir) == ["011_eleven"]


def test_changed_checksum_is_refused(empty_url: str, stub_dir: Path) -> None:
    migrate(empty_url, sql_dir=stub_dir)
    write(stub_dir, "001_one.sql", "CREATE TABLE meter.one (x bigint);\n")

    with pytest.raises(MigrationError, match="001_one") as info:
        migrate(empty_url, sql_dir=stub_dir)
    assert isinstance(info.value, MeterError)


def test_unknown_applied_version_is_refused(empty_url: str, stub_dir: Path) -> None:
    migrate(empty_url, sql_dir=stub_dir)
    (stub_dir / "002_two.sql").unlink()

    with pytest.raises(MigrationError, match="002_two"):
        migrate(empty_url, sql_dir=stub_dir)


def test_failing_file_is_rolled_back_and_not_recorded(empty_url: str, stub_dir: Path) -> None:
    write(stub_dir, "003_bad.sql", "CREATE TABLE meter.three (y int);\nSELECT 1/0;\n")

    with pytest.raises(MigrationError, match="003_bad"):
        migrate(empty_url, sql_dir=stub_dir)

    assert [v for v, _ in recorded(empty_url)] == ["001_one", "002_two"]
    with psycopg.connect(empty_url) as conn:
        (three,) = conn.execute("SELECT to_regclass('meter.three')").fetchone() or (None,)
    assert three is None

    write(stub_dir, "003_bad.sql", "CREATE TABLE meter.three (y int);\n")
    assert migrate(empty_url, sql_dir=stub_dir) == ["003_bad"]


def test_duplicate_numbers_are_refused(stub_dir: Path) -> None:
    write(stub_dir, "002_also_two.sql", "SELECT 1;\n")
    with pytest.raises(MigrationError, match="share number 2"):
        discover(stub_dir)


@pytest.mark.parametrize(
    "name", ["003_fix-the-thing.sql", "03_short.sql", "003_name with space.sql", "003_x.SQL"]
)
def test_a_misnamed_migration_is_refused_not_skipped(
    empty_url: str, stub_dir: Path, name: str
) -> None:
    # A numbered file the pattern did not match was silently not a migration: never
    # applied, and `meter status` saw nothing pending.
    write(stub_dir, name, "CREATE TABLE meter.three (y int);\n")
    with pytest.raises(MigrationError, match=re.escape(name)):
        migrate(empty_url, sql_dir=stub_dir)
    assert schema_version(empty_url) is None  # refused before touching the database


def test_with_roles_requires_roles_file(empty_url: str, stub_dir: Path) -> None:
    (stub_dir / "roles.sql").unlink()
    with pytest.raises(MigrationError, match=r"roles\.sql"):
        migrate(empty_url, with_roles=True, sql_dir=stub_dir)
    assert schema_version(empty_url) is None  # refused before touching the database


def sql_below(tmp_path: Path, below: int) -> Path:
    """A directory of the migrations numbered below ``below``."""
    older = tmp_path / f"below_{below}"
    if not older.is_dir():
        older.mkdir()
        for m in discover():
            if m.number < below:
                write(older, m.path.name, m.path.read_text())
    return older


def before_056(new_database: Callable[[], str], tmp_path: Path) -> str:
    """A database migrated with the files before 056 only (before it, create_partition
    added a month in the session's TimeZone)."""
    url = new_database()
    migrate(url, sql_dir=sql_below(tmp_path, 56))
    return url


def in_berlin(url: str) -> str:
    return psycopg.conninfo.make_conninfo(url, options="-c TimeZone=Europe/Berlin")


def ledger_bounds(conn: psycopg.Connection[Any]) -> dict[str, str]:
    conn.execute("SET TimeZone = 'UTC'")
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'meter.ledger'::regclass"
    ).fetchall()
    return {str(n): str(b) for n, b in rows}


def month_of_utc(y: int, m: int) -> str:
    ny, nm = divmod(y * 12 + m, 12)
    return (
        f"FOR VALUES FROM ('{y:04d}-{m:02d}-01 00:00:00+00')"
        f" TO ('{ny:04d}-{nm + 1:02d}-01 00:00:00+00')"
    )


def month_catalog(conn: psycopg.Connection[Any], name: str) -> list[Any]:
    """What a month carries (its own name written M), to compare with a month made fresh."""
    queries = [
        "SELECT relowner::regrole::text, relacl::text, relrowsecurity, relispartition"
        " FROM pg_class WHERE oid = %(t)s::regclass",
        "SELECT tgname, tgtype, tgparentid <> 0, tgenabled FROM pg_trigger"
        " WHERE tgrelid = %(t)s::regclass ORDER BY 1",
        "SELECT replace(conname, %(n)s, 'M'), contype, conislocal, coninhcount, convalidated,"
        " pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %(t)s::regclass"
        " ORDER BY 1",
        "SELECT p.inhparent::regclass::text, i.indisvalid, i.indisunique FROM pg_index i"
        " LEFT JOIN pg_inherits p ON p.inhrelid = i.indexrelid"
        " WHERE i.indrelid = %(t)s::regclass ORDER BY 1",
    ]
    args = {"t": f"meter.{name}", "n": name}
    return [conn.execute(q, args).fetchall() for q in queries]


def test_months_made_before_056_in_a_local_zone_become_months_of_utc(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    # 058: before 056 a month's upper bound was its UTC start plus '1 month' in the
    # creating session's TimeZone, and 056 left the months already made so. Under
    # Europe/Berlin October ran to November 1 01:00 UTC, so November could never be
    # created (42P17: every event of November refused); March ended on the 31st at 23:00
    # UTC, and its last hour had no partition (23514).
    url = before_056(new_database, tmp_path)
    berlin = in_berlin(url)
    with psycopg.connect(berlin, autocommit=True) as conn:
        for y, m in [(2019, 3), (2019, 10), (2018, 10)]:
            conn.execute("SELECT meter.create_partition(%s, %s)", (y, m))
        with pytest.raises(psycopg.errors.InvalidObjectDefinition):
            conn.execute("SELECT meter.create_partition(2019, 11)")
        conn.execute(
            "SELECT meter.allocate('u1', 'tokens', 5, 'tok', NULL, NULL, '2019-03-15 12:00Z')"
        )
        # a row of November's first hour that October took (the writers never put one
        # there: they made November first, and failed; but nothing else stops one)
        conn.execute(
            "INSERT INTO meter.ledger_2018_10 (namespace, account_id, user_id, event_type,"
            " resource, unit, entry_type, amount, balance_after, event_time, metadata)"
            " SELECT namespace, account_id, user_id, event_type, resource, unit, entry_type,"
            " amount, balance_after, '2018-11-01 00:30Z', '{\"k\": 1}' FROM meter.ledger"
        )
        conn.execute("SET TimeZone = 'UTC'")
        stray = conn.execute(
            "SELECT l::text FROM meter.ledger l WHERE event_time = '2018-11-01 00:30Z'"
        ).fetchall()
    migrate(url)

    with psycopg.connect(berlin, autocommit=True) as conn:
        found = ledger_bounds(conn)
        assert found["ledger_2019_03"] == month_of_utc(2019, 3)
        assert found["ledger_2019_10"] == month_of_utc(2019, 10)
        # a review of 058: its row of November went to November, unchanged (it was left
        # there, with a WARNING that `meter migrate` does not show, and November could
        # still never be created)
        assert found["ledger_2018_10"] == month_of_utc(2018, 10)
        assert found["ledger_2018_11"] == month_of_utc(2018, 11)
        assert (
            conn.execute(
                "SELECT l::text FROM meter.ledger l WHERE event_time = '2018-11-01 00:30Z'"
            ).fetchall()
            == stray
        )
        conn.execute("SET TimeZone = 'Europe/Berlin'")
        assert conn.execute("SELECT meter.create_partition(2019, 11)").fetchone() == (
            "ledger_2019_11",
        )
        for at in ("2019-03-31 23:30:00+00", "2019-10-31 23:30:00+00", "2019-11-01 00:30:00+00"):
            conn.execute(
                "SELECT meter.allocate('u1', 'tokens', 1, 'tok', NULL, NULL, %s::timestamptz)",
                (at,),
            )
        rows = conn.execute(
            "SELECT to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI'),"
            " tableoid::regclass::text FROM meter.ledger ORDER BY event_time"
        ).fetchall()
        assert rows == [
            ("2018-11-01 00:30", "meter.ledger_2018_11"),
            ("2019-03-15 12:00", "meter.ledger_2019_03"),
            ("2019-03-31 23:30", "meter.ledger_2019_03"),
            ("2019-10-31 23:30", "meter.ledger_2019_10"),
            ("2019-11-01 00:30", "meter.ledger_2019_11"),
        ]
        # the ledger's row trigger reaches the months attached again, once
        # (each holding a row), and its own TRUNCATE trigger stays
        for month in ("ledger_2019_03", "ledger_2019_10", "ledger_2018_11"):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(f"DELETE FROM meter.{month}")
        for month in ("ledger_2019_03", "ledger_2019_10", "ledger_2018_10", "ledger_2018_11"):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(f"TRUNCATE meter.{month}")
        # and a month repaired carries what a month made fresh does, nothing more (the
        # CHECK that spared ATTACH its read is gone)
        fresh = month_catalog(conn, "ledger_2019_11")
        for month in ("ledger_2019_03", "ledger_2019_10", "ledger_2018_10", "ledger_2018_11"):
            assert month_catalog(conn, month) == fresh


def test_058_takes_the_ledger_before_a_month_so_a_retention_under_way_does_not_deadlock(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    # A review of 058: it read its first month to repair (ACCESS SHARE on the month) and
    # only then asked for the ledger (DETACH). drop_old_partitions takes the ledger, then
    # the month: a retention holding the ledger when the upgrade began then waited for the
    # month, and one of the two was killed (40P01).
    url = before_056(new_database, tmp_path)
    with psycopg.connect(in_berlin(url), autocommit=True) as conn:
        conn.execute("SELECT meter.create_partition(2019, 3)")
        conn.execute(
            "SELECT meter.allocate('u1', 'tokens', 5, 'tok', NULL, NULL, '2019-03-15 12:00Z')"
        )
    failures: list[BaseException] = []

    def upgrade() -> None:
        try:
            migrate(url)
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    with psycopg.connect(url) as retention:
        retention.execute("SET lock_timeout = '20s'")
        # as drop_old_partitions holds it, from its first month's lock to its commit
        retention.execute("LOCK TABLE ONLY meter.ledger IN ACCESS EXCLUSIVE MODE")
        runner = threading.Thread(target=upgrade)
        runner.start()
        with psycopg.connect(url, autocommit=True) as watch:
            for _ in range(400):
                waiting = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'meter.ledger'::regclass"
                ).fetchone()
                if waiting == (1,):
                    break
                threading.Event().wait(0.05)
            else:
                pytest.fail("the migration never waited for the ledger")
        dropped = retention.execute("SELECT meter.drop_old_partitions(24)").fetchall()
        retention.commit()
        runner.join(60)
        assert not runner.is_alive()
    assert failures == []
    assert ("ledger_2019_03",) in dropped
    assert "058_months_made_in_a_local_zone_are_months_of_utc" in {v for v, _ in recorded(url)}
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT * FROM meter.reconcile()").fetchall() == []


def test_058_reads_a_repaired_month_once_and_attach_reads_nothing(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    # A review of 058: each repaired month holding rows was read twice with every read and
    # write of the ledger waiting (a search for rows outside its month, then ATTACH's own
    # check). A CHECK of its month, validated by one read, spares ATTACH its read.
    url = before_056(new_database, tmp_path)
    with psycopg.connect(in_berlin(url), autocommit=True) as conn:
        conn.execute("SELECT meter.create_partition(2019, 3)")
        conn.execute(
            "SELECT meter.allocate('u1', 'tokens', 5, 'tok', NULL, NULL, '2019-03-15 12:00Z')"
        )
    files = {m.number: m for m in discover()}
    migrate(url, sql_dir=sql_below(tmp_path, 58))
    messages: list[str] = []
    with psycopg.connect(url) as conn:
        conn.add_notice_handler(lambda d: messages.append(d.message_primary or ""))
        conn.execute("SET client_min_messages = debug1")
        conn.execute(files[58].sql)
        conn.execute("SET client_min_messages = warning")
        assert ledger_bounds(conn)["ledger_2019_03"] == month_of_utc(2019, 3)
        conn.rollback()
    reads = [m for m in messages if '"ledger_2019_03"' in m]
    assert reads == [
        'verifying table "ledger_2019_03"',
        'partition constraint for table "ledger_2019_03" is implied by existing constraints',
    ]


# ----------------------------------------------------------------- upgrading a live database


def before_062(new_database: Callable[[], str], tmp_path: Path) -> str:
    """A database migrated with the files before 062 (get_audit_events without event_id)."""
    url = new_database()
    migrate(url, sql_dir=sql_below(tmp_path, 62))
    return url


@pytest.mark.parametrize("kind", ["own pool", "autocommit connection", "connection"])
def test_a_client_reads_audit_events_on_connections_open_across_the_migration_of_062(
    new_database: Callable[[], str], tmp_path: Path, kind: str
) -> None:
    # psycopg prepares a statement on its fifth run on a connection, and the server keeps
    # the columns it returned: once 062 added event_id, every get_audit_events on such a
    # connection failed ("cached plan must not change result type") for as long as it
    # lived, the whole of a client's pool until max_lifetime replaced it (an hour).
    url = before_062(new_database, tmp_path)
    conn: psycopg.Connection[Any] | None = None
    if kind == "own pool":
        client = MeterClient(url, "t", max_size=1)
    else:
        conn = psycopg.connect(url, autocommit=kind == "autocommit connection")
        client = MeterClient(conn, "t")
    try:
        client.allocate("u", "api", Decimal(5), "calls")
        for _ in range(7):  # past psycopg's prepare_threshold (5)
            assert "event_id" not in client.get_audit_events(limit=1)[0]

        migrate(url)

        (event,) = client.get_audit_events(limit=1)
        assert event["event_id"].startswith("ledger.allocation:")
        assert client.get_audit_events(limit=1) == [event]
        assert client.get_balance("u", "api", "calls")["balance"] == Decimal(5)
    finally:
        client.close()
        if conn is not None:
            conn.close()


def test_a_call_in_the_callers_transaction_fails_once_after_062_and_the_next_one_reads(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    # The caller's transaction is the caller's to run again: the client cannot run the
    # call again inside it, but it drops the stale statement so that the next call reads.
    url = before_062(new_database, tmp_path)
    with psycopg.connect(url) as conn:
        client = MeterClient(conn, "t")
        client.allocate("u", "api", Decimal(5), "calls")
        for _ in range(7):
            client.get_audit_events(limit=1)
        conn.commit()

        migrate(url)

        with conn.transaction():
            with pytest.raises(MeterError, match="cached plan must not change result type"):
                client.get_audit_events(limit=1)
            (event,) = client.get_audit_events(limit=1)  # in the same transaction
        assert event["event_id"].startswith("ledger.allocation:")


def one_column_more(url: str, function: str) -> None:
    """Give ``meter.<function>`` one result column more, as a migration would: the old one
    renamed and called by a new one of the same arguments."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        (sig, args, result, identity, nargs) = conn.execute(
            "SELECT p.oid::regprocedure::text, pg_get_function_arguments(p.oid),"
            " pg_get_function_result(p.oid), pg_get_function_identity_arguments(p.oid),"
            " p.pronargs FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace"
            " AND p.proname = %s",
            (function,),
        ).fetchone()
        assert result.startswith("TABLE(")
        call = ", ".join(f"${i}" for i in range(1, nargs + 1))
        conn.execute(f"ALTER FUNCTION {sig} RENAME TO {function}_before")
        conn.execute(
            f"CREATE FUNCTION meter.{function}({args}) RETURNS {result[:-1]}, added int)"
            f" LANGUAGE sql SECURITY DEFINER AS $$ SELECT *, 1 FROM meter.{function}_before"
            f"({call}) $$"
        )
        conn.execute(f"GRANT EXECUTE ON FUNCTION meter.{function}({identity}) TO PUBLIC")


@pytest.mark.parametrize(
    "kind", ["own pool", "autocommit connection", "connection", "pipeline", "caller's transaction"]
)
def test_a_keyless_consume_whose_statement_went_stale_is_applied_once(
    new_database: Callable[[], str], kind: str
) -> None:
    # Review R4a: the server refuses a stale statement before running it, so the client's
    # run again (a keyless consume has no key to replay) counts the units once; inside a
    # caller's transaction it raises, and consumes nothing.
    url = new_database()
    migrate(url)
    conn = None
    if kind == "own pool":
        client = MeterClient(url, "t", max_size=1)
    else:
        conn = psycopg.connect(url, autocommit=kind != "connection")
        client = MeterClient(conn, "t")
    try:
        client.allocate("u", "api", Decimal(100), "calls")
        for _ in range(7):  # past psycopg's prepare_threshold (5)
            client.consume("u", "api", 1, "calls")
        if conn is not None and not conn.autocommit:
            conn.commit()

        one_column_more(url, "consume")

        if kind == "pipeline":
            assert conn is not None
            with conn.pipeline():
                assert client.consume("u", "api", 1, "calls")["added"] == 1
        elif kind == "caller's transaction":
            assert conn is not None
            with conn.transaction():
                with pytest.raises(MeterError, match="cached plan must not change result type"):
                    client.consume("u", "api", 1, "calls")
                assert client.get_balance("u", "api", "calls")["balance"] == Decimal(93)
        else:
            assert client.consume("u", "api", 1, "calls")["added"] == 1
        if conn is not None and not conn.autocommit:
            conn.commit()
        spent = 8 if kind != "caller's transaction" else 7
        assert client.get_balance("u", "api", "calls")["balance"] == Decimal(100 - spent)
    finally:
        client.close()
        if conn is not None:
            conn.close()


def columns_reordered(url: str, function: str, order: list[str]) -> None:
    """Give ``meter.<function>`` its result columns in ``order`` (the same names, types and
    values), as a migration would: the old one renamed and called by a new one."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        (sig, args, identity, nargs) = conn.execute(
            "SELECT p.oid::regprocedure::text, pg_get_function_arguments(p.oid),"
            " pg_get_function_identity_arguments(p.oid), p.pronargs"
            " FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace AND p.proname = %s",
            (function,),
        ).fetchone()
        types = dict(
            conn.execute(
                "SELECT n, format_type(t, NULL) FROM pg_proc p,"
                " unnest(p.proargnames, p.proallargtypes, p.proargmodes) AS a(n, t, m)"
                " WHERE p.oid = %s::regprocedure AND m = 't'",
                (sig,),
            ).fetchall()
        )
        assert sorted(types) == sorted(order)
        columns = ", ".join(f"{name} {types[name]}" for name in order)
        call = ", ".join(f"${i}" for i in range(1, nargs + 1))
        conn.execute(f"ALTER FUNCTION {sig} RENAME TO {function}_before")
        conn.execute(
            f"CREATE FUNCTION meter.{function}({args}) RETURNS TABLE({columns})"
            f" LANGUAGE sql SECURITY DEFINER AS $$ SELECT {', '.join(order)}"
            f" FROM meter.{function}_before({call}) $$"
        )
        conn.execute(f"GRANT EXECUTE ON FUNCTION meter.{function}({identity}) TO PUBLIC")


@pytest.mark.parametrize(
    "kind", ["own pool", "autocommit connection", "connection", "client made after"]
)
def test_a_read_whose_columns_a_migration_reordered_names_each_value_by_its_column(
    new_database: Callable[[], str], kind: str
) -> None:
    # Review R5b: the client kept each statement's column names for the life of the
    # process and read them again only when their number changed, so once a migration
    # gave get_balance its columns in another order, every client of the process (one made
    # after it too) reported the available quantity as the balance and the balance as
    # the available quantity.
    url = new_database()
    migrate(url)
    conn = None
    if kind == "own pool" or kind == "client made after":
        client = MeterClient(url, "t", max_size=1)
    else:
        conn = psycopg.connect(url, autocommit=kind == "autocommit connection")
        client = MeterClient(conn, "t")
    try:
        client.allocate("u", "api", Decimal(10), "calls")
        client.reserve("u", "api", Decimal(3), "calls")
        expected = {"balance": Decimal(10), "reserved": Decimal(3), "available": Decimal(7)}
        for _ in range(7):  # past psycopg's prepare_threshold (5)
            assert client.get_balance("u", "api", "calls") == expected
        if conn is not None and not conn.autocommit:
            conn.commit()

        columns_reordered(url, "get_balance", ["available", "reserved", "balance"])

        if kind == "client made after":
            client.close()
            client = MeterClient(url, "t", max_size=1)
        for _ in range(7):
            assert client.get_balance("u", "api", "calls") == expected
    finally:
        client.close()
        if conn is not None:
            conn.close()


@pytest.mark.parametrize("function", ["roll_periods", "apply_events", "retention_backlog"])
def test_the_workers_calls_go_on_across_a_migration_adding_a_column(
    new_database: Callable[[], str], function: str
) -> None:
    # Review R5b: the worker's pool keeps its connections for up to an hour, and roll_periods
    # runs every minute: its `SELECT *`, prepared on a connection's fifth run, failed
    # "cached plan must not change result type" (0A000, not retried: worker.retry) on
    # that connection at every tick after a migration added a column to roll_periods.
    # The statements naming their columns (apply_events, ...) were not affected.
    url = new_database()
    migrate(url)
    calls: dict[str, Callable[[], object]] = {
        "roll_periods": lambda: worker_db.roll_periods(url, 1, 10),
        "apply_events": lambda: worker_db.apply_events(url, 1, [{}]),
        "retention_backlog": lambda: worker_db.drop_old_partitions(url, 1, 1200),
    }
    call = calls[function]
    try:
        first = call()
        for _ in range(7):  # past psycopg's prepare_threshold (5), on the pool's one connection
            call()

        one_column_more(url, function)

        assert call() == first
    finally:
        pool = worker_db._pools.pop(url, None)
        if pool is not None:
            pool.close()


@pytest.mark.parametrize("function", ["list_dead_letters", "retry"])
def test_dead_letters_are_read_and_retried_across_a_migration_adding_a_column(
    new_database: Callable[[], str], function: str
) -> None:
    # Review R5b: meter.dead_letters takes a caller's connection; on one in autocommit, such
    # as an operator's tool keeps open, its `SELECT *` prepared on the fifth call failed
    # "cached plan must not change result type" at every call after a migration added a
    # column to retry_dead_letter, for as long as the connection lived (no rollback drops
    # the statement there); list_dead_letters' rows lacked a column added to the table.
    url = new_database()
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        (letter,) = conn.execute(
            "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad', NULL, 't')"
        ).fetchone()
        calls: dict[str, Callable[[], Any]] = {
            "list_dead_letters": lambda: set(dead_letters.list_dead_letters(conn)[0]),
            "retry": lambda: set(dead_letters.retry(conn, letter)),
        }
        call = calls[function]
        first = call()
        for _ in range(7):  # past psycopg's prepare_threshold (5)
            assert call() == first

        if function == "retry":  # its body names its columns as retry_dead_letter.<name>
            with psycopg.connect(url, autocommit=True) as other, other.transaction():
                (definition,) = other.execute(
                    "SELECT pg_get_functiondef('meter.retry_dead_letter(bigint)'::regprocedure)"
                ).fetchone()
                definition, replaced = re.subn(
                    r"(RETURNS TABLE\(.*?)\)\n", r"\1, added integer)\n", definition, count=1
                )
                assert replaced == 1
                other.execute("DROP FUNCTION meter.retry_dead_letter(bigint)")
                other.execute(definition)
        else:  # it returns the table's rows
            with psycopg.connect(url, autocommit=True) as other:
                other.execute("ALTER TABLE meter.dead_letters ADD COLUMN added int")

        assert call() == first | {"added"}


def test_067_waits_for_an_open_hold_and_a_lock_timeout_lets_it_run_again(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    # 067 adds reservations.release_key under the table's ACCESS EXCLUSIVE lock, which waits
    # for a transaction that touched the reservations (docs/operations.md, "From sql/065 to
    # sql/069"): with a lock timeout it fails whole, 066 stays applied, and a run once that
    # transaction ended applies the rest. A client's prepared reserve, commit, release
    # (functions holding a reservations row) and get_balance go on across it.
    url = new_database()
    migrate(url, sql_dir=sql_below(tmp_path, 66))
    client = MeterClient(url, "t", max_size=1)
    conn = psycopg.connect(url)
    holder = MeterClient(conn, "t")

    def calls() -> None:
        hold = client.reserve("u", "api", Decimal(2), "calls")
        assert client.commit(hold["reservation_id"], Decimal(1))["status"] == "committed"
        assert client.release(client.reserve("u", "api", 1, "calls")["reservation_id"])

    try:
        client.allocate("u", "api", Decimal(100), "calls")
        for _ in range(7):  # past psycopg's prepare_threshold (5)
            calls()
            client.get_balance("u", "api", "calls")
        with conn.transaction():
            held = holder.reserve("u", "api", Decimal(5), "calls")["reservation_id"]
            waiting = make_conninfo(url, options="-c lock_timeout=200ms")
            with pytest.raises(MigrationError, match=r"067_.*lock timeout"):
                migrate(waiting)
            assert (schema_version(url) or "").startswith("066_")
        migrate(url)

        assert holder.release(held) is True
        for _ in range(3):
            calls()
        assert client.get_balance("u", "api", "calls") == {
            "balance": Decimal(90),
            "reserved": Decimal(0),
            "available": Decimal(90),
        }
        with psycopg.connect(url) as check:
            assert check.execute(
                "SELECT release_key IS NULL FROM meter.reservations WHERE reservation_id = %s",
                (held,),
            ).fetchone() == (True,)
    finally:
        client.close()
        conn.close()
