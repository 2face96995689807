"""Database fixtures: one PostgreSQL per session, one fresh database per test.

The schema is migrated once into a template database (``meter_template``); each test gets
a clone (``CREATE DATABASE ... TEMPLATE meter_template STRATEGY FILE_COPY``), which takes
a fraction of a second and isolates tests perfectly, then dropped. The server is an embedded
PostgreSQL in a fresh temp dir with durability off, unless ``METER_TEST_DATABASE_URL``
names a superuser connection to an existing server.

Fixtures (the names are a contract: tests everywhere use them):

``pg_server``   session   the server; ``pg_server.url(dbname, user=...)`` gives conninfo.
``meter_template`` session name of the migrated template database (roles applied,
                          login roles ``meter_test_app`` / ``meter_test_maint`` created).
``db_url``      function  superuser conninfo of a fresh, migrated database.
``db``          function  autocommit ``psycopg.Connection`` (dict rows) to ``db_url``.
``app_url``     function  same database as ``meter_test_app`` (member of ``meter_app``).
``maint_url``   function  same database as ``meter_test_maint`` (member of ``meter_maintenance``).
``client``      function  ``meter.MeterClient(db_url)``, namespace ``default``.
``make_client`` function  ``make_client(namespace="default", url=None) -> MeterClient``.
``snapshot``    function  ``snapshot() -> {table: sorted rows}`` of every ``meter`` table.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from meter.embedded import EmbeddedPostgres
from meter.migrate import migrate

if TYPE_CHECKING:
    from meter import MeterClient

TEMPLATE_DB = "meter_template"
APP_ROLE = "meter_test_app"
MAINT_ROLE = "meter_test_maint"
# Only used against an external server that checks passwords; the embedded one trusts.
TEST_ROLE_PASSWORD = "meter_test"

_db_counter = itertools.count(1)


class PgServer(Protocol):
    """What tests may rely on from ``pg_server``."""

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str: ...


class ExternalPostgres:
    """A server given by ``METER_TEST_DATABASE_URL`` (a superuser conninfo or URL)."""

    def __init__(self, conninfo: str) -> None:
        self._params = conninfo_to_dict(conninfo)

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """Conninfo for ``dbname``; ``user="postgres"`` means the superuser of the URL."""
        params: dict[str, Any] = {**self._params, "dbname": dbname}
        if user != "postgres":
            params["user"] = user
            params.pop("password", None)
            if user in (APP_ROLE, MAINT_ROLE):
                params["password"] = TEST_ROLE_PASSWORD
        return make_conninfo(**params)

    def __repr__(self) -> str:
        return f"ExternalPostgres(host={self._params.get('host')!r})"


def _suffix() -> str:
    """Per-xdist-worker suffix, so parallel workers sharing one external server don't clash."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"_{worker}" if worker else ""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A running PostgreSQL 18 for the whole session (embedded unless the env says otherwise).

    The embedded cluster lives in its own ``tempfile.mkdtemp`` directory, not under pytest's
    ``tmp_path_factory``: as root the server runs as an unprivileged user that must
    traverse every parent directory, and each new pytest session (anyone's, on this machine)
    resets ``/tmp/pytest-of-root`` to mode 0700, which made a running server PANIC on its
    next checkpoint ("could not open file .../global/pg_control: Permission denied").
    """
    external = os.environ.get("METER_TEST_DATABASE_URL")
    if external:
        yield ExternalPostgres(external)
        return
    base = Path(tempfile.mkdtemp(prefix="meter-test-pg-"))
    server = EmbeddedPostgres(base / "data", fast=True)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def _admin(pg_server: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection to the ``postgres`` database, for CREATE/DROP DATABASE."""
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")
        yield conn


def _ensure_login_role(conn: psycopg.Connection[Any], role: str, group: str) -> None:
    """Create ``role`` (LOGIN, no special attributes) if missing and make it a ``group`` member.

    Attributes are reset explicitly so a role left over on an external server by some other
    use cannot give a test superuser or BYPASSRLS powers it must not have.
    """
    ident = sql.Identifier(role)
    try:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
    except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
        pass  # exists (roles are cluster-wide: an earlier session, or a concurrent one)
    conn.execute(
        sql.SQL(
            "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS INHERIT "
            "PASSWORD {}"
        ).format(ident, sql.Literal(TEST_ROLE_PASSWORD))
    )
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), ident))


@pytest.fixture(scope="session")
def meter_template(pg_server: PgServer, _admin: psycopg.Connection[Any]) -> Iterator[str]:
    """Build the migrated template database once per session; yield its name.

    Rebuilt from scratch each session (a template left on an external server by an older
    checkout would carry an older schema) and dropped at the end.
    """
    name = TEMPLATE_DB + _suffix()
    ident = sql.Identifier(name)
    _admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    _admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    migrate(pg_server.url(name), with_roles=True)
    _ensure_login_role(_admin, APP_ROLE, "meter_app")
    _ensure_login_role(_admin, MAINT_ROLE, "meter_maintenance")
    try:
        yield name
    finally:
        _admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


@pytest.fixture
def db_url(
    pg_server: PgServer, _admin: psycopg.Connection[Any], meter_template: str
) -> Iterator[str]:
    """Superuser conninfo of a fresh database cloned from the template; dropped afterwards."""
    name = f"meter_t{_suffix()}_{next(_db_counter)}"
    with cloned_database(_admin, meter_template, name):
        yield pg_server.url(name)


@contextmanager
def cloned_database(admin: psycopg.Connection[Any], template: str, name: str) -> Iterator[None]:
    """Database ``name``, a file copy of ``template``, for the duration; dropped afterwards."""
    ident = sql.Identifier(name)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
    admin.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
            ident, sql.Identifier(template)
        )
    )
    try:
        yield
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def wait_until_expired(db: psycopg.Connection[Any], expires_at: Any, timeout: float = 10.0) -> None:
    """Wait until the database clock reaches ``expires_at`` (a hold expired, not swept)."""
    deadline = time.monotonic() + timeout
    while db.execute("SELECT now() < %s AS w", (expires_at,)).fetchone()["w"]:  # type: ignore[index]
        assert time.monotonic() < deadline, "reservation did not expire in time"
        time.sleep(0.05)


def ledger_partitions(db: psycopg.Connection[Any]) -> set[str]:
    """The names of ``meter.ledger``'s partitions (``db`` returning dict rows)."""
    rows = db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'meter.ledger'::regclass"
    ).fetchall()
    return {r["relname"] for r in rows}


def _dbname(conninfo: str) -> str:
    return str(conninfo_to_dict(conninfo)["dbname"])


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Superuser connection to the test database: autocommit, rows as dicts."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def app_url(pg_server: PgServer, db_url: str) -> str:
    """The test database as ``meter_test_app``: subject to row-level security, API only."""
    return pg_server.url(_dbname(db_url), user=APP_ROLE)


@pytest.fixture
def maint_url(pg_server: PgServer, db_url: str) -> str:
    """The test database as ``meter_test_maint``: what worker and beat run as."""
    return pg_server.url(_dbname(db_url), user=MAINT_ROLE)


@pytest.fixture
def make_client(db_url: str) -> Iterator[Callable[..., MeterClient]]:
    """Factory ``make_client(namespace="default", url=None)``; every client closed afterwards."""
    from meter import MeterClient

    clients: list[MeterClient] = []

    def factory(namespace: str = "default", url: str | None = None) -> MeterClient:
        client = MeterClient(url or db_url, namespace=namespace)
        clients.append(client)
        return client

    try:
        yield factory
    finally:
        for client in reversed(clients):
            client.close()


@pytest.fixture
def client(db_url: str) -> Iterator[MeterClient]:
    """``MeterClient(db_url)`` in namespace ``default`` (superuser: no RLS in the way)."""
    from meter import MeterClient

    c = MeterClient(db_url)
    try:
        yield c
    finally:
        c.close()


_TABLES_SQL = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'meter'
  AND c.relkind IN ('r', 'p')          -- plain and partitioned tables
  AND NOT c.relispartition             -- partitions are read through their parent
  AND c.relname <> 'schema_migrations'
ORDER BY c.relname
"""


@pytest.fixture
def snapshot(db_url: str) -> Iterator[Callable[[], dict[str, list[tuple[Any, ...]]]]]:
    """``snapshot()`` -> ``{table: sorted list of row tuples}`` for every ``meter`` table.

    Read as superuser (row-level security does not hide anything) in one REPEATABLE READ
    transaction (a consistent picture across tables). Rows are sorted by their ``repr`` so
    that rows with NULLs or JSON values still have a total order. Sequences are not part
    of it: ``nextval`` is not rolled back, so a refused call may legitimately advance one.
    """
    conn = psycopg.connect(db_url, autocommit=True)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ

    def take() -> dict[str, list[tuple[Any, ...]]]:
        with conn.transaction():
            tables = [name for (name,) in conn.execute(_TABLES_SQL).fetchall()]
            result: dict[str, list[tuple[Any, ...]]] = {}
            for table in tables:
                rows = conn.execute(
                    sql.SQL("SELECT * FROM {}").format(sql.Identifier("meter", table))
                ).fetchall()
                result[table] = sorted(rows, key=repr)
        return result

    try:
        yield take
    finally:
        conn.close()
