"""Tenancy, roles and ledger immutability (SPEC 3 item 6, Appendix C "Tenants and roles").

Everything here runs against the login roles of the fixtures: ``app_url`` (a member of
``meter_app``, subject to row-level security) and ``maint_url`` (a member of
``meter_maintenance``), plus the superuser ``db`` connection for setup and for checking
what is really stored.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
import pytest
from psycopg.rows import dict_row

from meter.errors import NotFoundError

D = Decimal
ET = "tokens"
UNIT = "tok"
OLD = datetime(2020, 1, 15, 12, 0, tzinfo=UTC)  # far beyond any retention cutoff

# The tables every tenant-scoped row lives in; Appendix C and the lead's decisions.
CORE_TABLES = ["accounts", "ledger", "reservations", "idempotency_keys"]

# One call of every tenant-scoped API function, with the namespace as a parameter.
API_CALLS: dict[str, str] = {
    "allocate": "SELECT * FROM meter.allocate(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_amount => 10, p_unit => 'tok', p_namespace => %(ns)s)",
    "consume": "SELECT * FROM meter.consume(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_amount => 1, p_unit => 'tok', p_namespace => %(ns)s)",
    "consume_checked": "SELECT * FROM meter.consume(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_amount => 1, p_unit => 'tok', p_check_balance => true, p_namespace => %(ns)s)",
    "reserve": "SELECT * FROM meter.reserve(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_amount => 1, p_unit => 'tok', p_namespace => %(ns)s)",
    "commit": "SELECT * FROM meter.commit(p_reservation_id => 'seed-hold',"
    " p_actual_amount => 1, p_namespace => %(ns)s)",
    "release": "SELECT meter.release(p_reservation_id => 'seed-hold', p_namespace => %(ns)s)",
    "adjust": "SELECT * FROM meter.adjust(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_amount => 5, p_unit => 'tok', p_namespace => %(ns)s)",
    "get_balance": "SELECT * FROM meter.get_balance(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_unit => 'tok', p_namespace => %(ns)s)",
    "get_account": "SELECT * FROM meter.get_account(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_unit => 'tok', p_namespace => %(ns)s)",
    "get_user_balances": "SELECT * FROM meter.get_user_balances(p_user_id => 'u1',"
    " p_namespace => %(ns)s)",
    "get_ledger": "SELECT * FROM meter.get_ledger(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_unit => 'tok', p_namespace => %(ns)s)",
    "get_usage": "SELECT * FROM meter.get_usage(p_user_id => 'u1',"
    " p_start_time => '2000-01-01 00:00+00'::timestamptz,"
    " p_end_time => '2100-01-01 00:00+00'::timestamptz, p_namespace => %(ns)s)",
    "get_namespace_usage": "SELECT * FROM meter.get_namespace_usage("
    " p_start_time => '2000-01-01 00:00+00'::timestamptz,"
    " p_end_time => '2100-01-01 00:00+00'::timestamptz, p_namespace => %(ns)s)",
    "set_period_config": "SELECT meter.set_period_config(p_user_id => 'u1',"
    " p_event_type => 'tokens', p_unit => 'tok', p_resource => NULL::text,"
    " p_period_start => '2026-01-01'::date, p_period_allocation => 10, p_namespace => %(ns)s)",
    "open_period": "SELECT meter.open_period(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_unit => 'tok', p_resource => NULL::text, p_period_start => '2026-02-01'::date,"
    " p_allocation => 10, p_namespace => %(ns)s)",
    "close_period": "SELECT * FROM meter.close_period(p_user_id => 'u1', p_event_type => 'tokens',"
    " p_unit => 'tok', p_resource => NULL::text, p_period_end => '2026-02-28'::date,"
    " p_namespace => %(ns)s)",
    "release_expired_reservations": "SELECT meter.release_expired_reservations("
    "p_namespace => %(ns)s)",
    "reconcile": "SELECT * FROM meter.reconcile(p_namespace => %(ns)s)",
    "get_stats": "SELECT * FROM meter.get_stats(p_namespace => %(ns)s)",
    "get_audit_events": "SELECT * FROM meter.get_audit_events(p_user_id => NULL::text,"
    " p_actor_id => NULL::text, p_kinds => NULL::text[], p_start_time => NULL::timestamptz,"
    " p_end_time => NULL::timestamptz, p_namespace => %(ns)s)",
}

# Statements that would end the test early for a reason other than the check we
# mean (they are spelled wrong, or name something missing) must not count as a refusal.
BROKEN_STATEMENT = {"42601", "42P01", "42703", "42883", "42P02", "42804", "42725"}


# ---------------------------------------------------------------- helpers


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def run(conn: psycopg.Connection, sql: str, params=None) -> list[dict] | None:
    """Run one statement in its own transaction; return its rows (None when it has none)."""
    with conn.transaction():
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None


def sqlstate_of(conn: psycopg.Connection, sql: str, params=None) -> str:
    """Run a statement that must fail; return its SQLSTATE."""
    with pytest.raises(psycopg.Error) as exc:
        run(conn, sql, params)
    assert exc.value.sqlstate is not None, exc.value
    return exc.value.sqlstate


def outcome(conn: psycopg.Connection, sql: str, params=None) -> str:
    """The SQLSTATE a statement fails with, or "ok" when it succeeds (then rolled back)."""
    try:
        with conn.transaction():
            conn.execute(sql, params)
            raise _Rollback
    except _Rollback:
        return "ok"
    except psycopg.Error as e:
        return e.sqlstate or repr(e)


class _Rollback(Exception):
    pass


def seed_tenant(c, tag: str) -> dict:
    """Give a namespace rows in every table: accounts, ledger, reservations, keys, periods."""
    out = {}
    out["alloc"] = c.allocate("u1", ET, D("100"), UNIT, idempotency_key=f"{tag}-alloc")
    c.consume("u1", ET, D("10"), UNIT, idempotency_key=f"{tag}-consume")
    out["hold"] = c.reserve("u1", ET, D("20"), UNIT, ttl_seconds=3600, reservation_id="seed-hold")
    r = c.reserve("u1", ET, D("5"), UNIT, ttl_seconds=3600)
    assert c.release(r["reservation_id"]) is True
    r = c.reserve("u1", ET, D("3"), UNIT, ttl_seconds=3600)
    assert c.commit(r["reservation_id"], D("2"))["status"] == "committed"
    c.adjust("u1", ET, D("4"), UNIT, idempotency_key=f"{tag}-adjust")
    # u1: 100 - 10 - 2 + 4 = 92, + 50 opened = 142; the close expires what is available
    # (142 - 20 held = 122) above the limit of 10: u1 ends at 30, 20 of it held.
    c.set_period_config("u1", ET, UNIT, None, date(2025, 1, 1), D("50"), carry_over_limit=D("10"))
    assert c.open_period("u1", ET, UNIT, None, date(2025, 1, 1)) == D("142")
    assert c.close_period("u1", ET, UNIT, None, date(2025, 1, 31)) == {
        "expired": D("112"),
        "carried_over": D("10"),
        "new_balance": D("30"),
    }
    c.allocate(None, ET, D("1000"), UNIT)  # the namespace pool
    c.allocate("u2", ET, D("7"), UNIT, event_time=OLD)  # an old month, for retention
    return out


def namespaced_tables(db) -> list[str]:
    """Every table of schema meter with a namespace column, partitions included."""
    rows = db.execute(
        """
        SELECT c.relname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'namespace'
             AND NOT a.attisdropped
        WHERE n.nspname = 'meter' AND c.relkind IN ('r', 'p')
        ORDER BY c.relname
        """
    ).fetchall()
    return [r["relname"] for r in rows]


def current_month(db) -> tuple[int, int]:
    row = db.execute(
        "SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int AS y,"
        " extract(month FROM now() AT TIME ZONE 'UTC')::int AS m"
    ).fetchone()
    return row["y"], row["m"]


def partition_exists(db, name: str) -> bool:
    return db.execute("SELECT to_regclass(%s) IS NOT NULL AS e", (f"meter.{name}",)).fetchone()["e"]


@pytest.fixture
def app_conn(app_url):
    with connect(app_url) as conn:
        yield conn


@pytest.fixture
def maint_conn(maint_url):
    with connect(maint_url) as conn:
        yield conn


@pytest.fixture
def two_tenants(make_client):
    """Namespaces 'a' and 'b', each with rows in every table (written by the superuser)."""
    a, b = make_client("a"), make_client("b")
    return {"a": seed_tenant(a, "a"), "b": seed_tenant(b, "b"), "clients": {"a": a, "b": b}}


# ---------------------------------------------------------------- no tenant: loud refusal


def test_app_role_call_without_tenant_is_refused(two_tenants, app_conn, snapshot):
    before = snapshot()
    got = {name: outcome(app_conn, sql, {"ns": "a"}) for name, sql in API_CALLS.items()}
    assert got == dict.fromkeys(API_CALLS, "MT004")
    assert snapshot() == before


def test_app_role_call_without_namespace_argument_is_refused(two_tenants, app_conn, snapshot):
    # p_namespace left at its default 'default': still no tenant, still refused.
    before = snapshot()
    state = sqlstate_of(
        app_conn,
        "SELECT * FROM meter.get_balance(p_user_id => 'u1', p_event_type => 'tokens',"
        " p_unit => 'tok')",
    )
    assert state == "MT004"
    assert snapshot() == before


def test_app_role_select_without_tenant_is_refused(two_tenants, app_conn):
    # Rows exist (two tenants' worth): the answer must be an error, never silent emptiness.
    got = {}
    for t in CORE_TABLES:
        got[f"{t}:rows"] = outcome(app_conn, f"SELECT * FROM meter.{t}")
        got[f"{t}:count"] = outcome(app_conn, f"SELECT count(*) FROM meter.{t}")
    assert got == dict.fromkeys(got, "MT004")


def test_app_role_select_after_clear_tenant_is_refused(two_tenants, app_conn):
    run(app_conn, "SELECT meter.set_tenant('a')")
    assert run(app_conn, "SELECT count(*) AS n FROM meter.accounts")[0]["n"] == 3
    run(app_conn, "SELECT meter.clear_tenant()")
    assert sqlstate_of(app_conn, "SELECT count(*) FROM meter.accounts") == "MT004"
    assert sqlstate_of(app_conn, API_CALLS["get_balance"], {"ns": "a"}) == "MT004"


# Relations a role may shadow in its own temporary schema, which PostgreSQL searches before
# pg_catalog unless the search_path names it after: the catalogs row visibility reads (043).
CATALOG_DECOYS = {
    "pg_roles": "CREATE TEMP VIEW pg_roles AS SELECT current_user::name AS rolname,"
    " true AS rolsuper, true AS rolbypassrls",
    "pg_namespace": "CREATE TEMP VIEW pg_namespace AS SELECT 'meter'::name AS nspname,"
    " (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user) AS nspowner",
}


@pytest.mark.parametrize("decoy", CATALOG_DECOYS.values(), ids=CATALOG_DECOYS.keys())
def test_app_role_cannot_pass_as_privileged_with_a_temporary_catalog(two_tenants, app_conn, decoy):
    """The policies' visibility check reads the real catalog, whatever the reader's
    temporary schema holds: with no tenant set, reads stay refused (MT004); with one, only
    that tenant's rows show."""
    run(app_conn, decoy)
    got = {t: outcome(app_conn, f"SELECT * FROM meter.{t}") for t in CORE_TABLES}
    assert got == dict.fromkeys(CORE_TABLES, "MT004")
    run(app_conn, "SELECT meter.set_tenant('a')")
    seen = run(app_conn, "SELECT DISTINCT namespace FROM meter.ledger")
    assert [r["namespace"] for r in seen] == ["a"]


# ---------------------------------------------------------------- other tenant: refused


def test_app_role_call_for_other_namespace_is_refused(two_tenants, app_conn, snapshot):
    run(app_conn, "SELECT meter.set_tenant('a')")
    before = snapshot()
    got = {name: outcome(app_conn, sql, {"ns": "b"}) for name, sql in API_CALLS.items()}
    assert got == dict.fromkeys(API_CALLS, "MT004")
    assert snapshot() == before


def test_app_role_with_tenant_calls_its_own_namespace(two_tenants, app_conn):
    # Positive control for the two refusals above: the very same calls pass with the tenant.
    run(app_conn, "SELECT meter.set_tenant('a')")
    assert run(app_conn, API_CALLS["get_balance"], {"ns": "a"}) == [
        {"balance": D("30"), "reserved": D("20"), "available": D("10")}
    ]
    assert run(app_conn, API_CALLS["reconcile"], {"ns": "a"}) == []
    row = run(app_conn, API_CALLS["allocate"], {"ns": "a"})[0]
    assert row["balance"] == D("40")


def test_tenant_set_with_guc_scopes_calls_and_reads(two_tenants, app_conn, snapshot):
    # The tenant is a plain setting: SET meter.tenant works like meter.set_tenant.
    run(app_conn, "SET meter.tenant = 'b'")
    assert run(app_conn, API_CALLS["get_balance"], {"ns": "b"}) == [
        {"balance": D("30"), "reserved": D("20"), "available": D("10")}
    ]
    before = snapshot()
    assert outcome(app_conn, API_CALLS["allocate"], {"ns": "a"}) == "MT004"
    assert snapshot() == before
    rows = run(app_conn, "SELECT namespace, count(*) AS n FROM meter.accounts GROUP BY 1")
    assert rows == [{"namespace": "b", "n": 3}]
    # Transaction-local, as the SDK sets it: gone after the transaction.
    run(app_conn, "RESET meter.tenant")
    with app_conn.transaction():
        app_conn.execute("SET LOCAL meter.tenant = 'a'")
        rows = app_conn.execute("SELECT count(*) AS n FROM meter.reservations").fetchone()
        assert rows == {"n": 3}
    assert outcome(app_conn, "SELECT count(*) FROM meter.reservations") == "MT004"


# ---------------------------------------------------------------- SDK as the app role


def test_sdk_as_app_role_sets_its_own_tenant(make_client, app_url, db):
    c = make_client("a", url=app_url)
    assert c.allocate("u1", ET, 100, UNIT)["balance"] == D("100")
    r = c.consume("u1", ET, 30, UNIT, check_balance=True)
    assert (r["success"], r["balance"], r["available"]) == (True, D("70"), D("70"))
    hold = c.reserve("u1", ET, 20, UNIT, ttl_seconds=60)
    assert (hold["granted"], hold["available"]) == (True, D("50"))
    cm = c.commit(hold["reservation_id"], 5)
    assert {k: cm[k] for k in ("success", "status", "consumed", "released", "reserved_amount")} == {
        "success": True,
        "status": "committed",
        "consumed": D("5"),
        "released": D("15"),
        "reserved_amount": D("20"),
    }
    assert cm["balance"] == D("65")
    hold2 = c.reserve("u1", ET, 10, UNIT, ttl_seconds=60)
    assert c.release(hold2["reservation_id"]) is True
    assert c.adjust("u1", ET, -3, UNIT)["balance"] == D("62")
    assert c.get_balance("u1", ET, UNIT) == {
        "balance": D("62"),
        "reserved": D("0"),
        "available": D("62"),
    }
    assert [e["amount"] for e in c.get_ledger("u1", ET, UNIT)] == [
        D("-3"),
        D("-5"),
        D("-30"),
        D("100"),
    ]
    assert c.get_usage(
        "u1", datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC)
    ) == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("35"),
            "event_count": 2,
        }
    ]
    assert c.reconcile() == []
    stats = c.get_stats()
    assert (stats["total_accounts"], stats["total_ledger_entries"]) == (1, 4)
    assert (stats["active_reservations"], stats["total_balance"]) == (0, D("62"))
    assert c.release_expired_reservations() == 0
    c.set_period_config("u1", ET, UNIT, None, date(2026, 1, 1), D("10"))
    assert c.open_period("u1", ET, UNIT, None, date(2026, 1, 1)) == D("72")
    assert c.close_period("u1", ET, UNIT, None, date(2026, 1, 31)) == {
        "expired": D("0"),
        "carried_over": D("72"),
        "new_balance": D("72"),
    }
    assert c.get_user_balances("u1") == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "balance": D("72"),
            "reserved": D("0"),
            "available": D("72"),
        }
    ]

    # Everything landed in namespace 'a', and only there.
    namespaces = db.execute(
        "SELECT DISTINCT namespace FROM meter.ledger UNION"
        " SELECT DISTINCT namespace FROM meter.accounts UNION"
        " SELECT DISTINCT namespace FROM meter.reservations"
    ).fetchall()
    assert namespaces == [{"namespace": "a"}]

    # Another namespace through the same role sees none of it.
    other = make_client("b", url=app_url)
    assert other.get_balance("u1", ET, UNIT) == {
        "balance": D("0"),
        "reserved": D("0"),
        "available": D("0"),
    }
    assert other.get_user_balances("u1") == []
    assert other.get_ledger("u1", ET, UNIT) == []
    assert other.get_account("u1", ET, UNIT) is None
    assert other.reconcile() == []
    assert other.get_stats()["total_accounts"] == 0


# ---------------------------------------------------------------- direct reads


def test_tenant_sees_only_its_rows_in_every_table(two_tenants, db, app_url):
    # Give both tenants a retention checkpoint too (rows of 2020 are folded and dropped).
    db.execute("SELECT * FROM meter.drop_old_partitions(24)").fetchall()
    tables = namespaced_tables(db)
    for t in [*CORE_TABLES, "periods", "period_config_changes", "ledger_checkpoints"]:
        assert t in tables
    for tenant in ("a", "b"):
        with connect(app_url) as conn:
            run(conn, "SELECT meter.set_tenant(%s)", (tenant,))
            for t in tables:
                expected = db.execute(
                    f"SELECT count(*) AS n FROM meter.{t} WHERE namespace = %s", (tenant,)
                ).fetchone()["n"]
                try:
                    seen = run(
                        conn,
                        f"SELECT namespace, count(*) AS n FROM meter.{t}"
                        " GROUP BY namespace ORDER BY namespace",
                    )
                except psycopg.errors.InsufficientPrivilege:
                    # Not readable at all is no leak; but the core tables must be readable.
                    assert t not in CORE_TABLES, f"app role cannot read meter.{t}"
                    continue
                want = [{"namespace": tenant, "n": expected}] if expected else []
                assert seen == want, f"table meter.{t} as tenant {tenant!r}"
                if t in CORE_TABLES or t in ("periods", "ledger_checkpoints"):
                    assert expected > 0, f"meter.{t} has no rows of {tenant!r} to check"


def test_tenant_cannot_read_other_tenant_rows_by_filter(two_tenants, app_conn):
    run(app_conn, "SELECT meter.set_tenant('a')")
    for t in CORE_TABLES:
        rows = run(app_conn, f"SELECT count(*) AS n FROM meter.{t} WHERE namespace = 'b'")
        assert rows == [{"n": 0}], t
    rows = run(
        app_conn, "SELECT count(*) AS n FROM meter.reservations WHERE reservation_id = 'seed-hold'"
    )
    assert rows == [{"n": 1}]  # a's own hold of that name, not b's


def test_partitions_are_read_only_through_the_ledger(two_tenants, app_conn, maint_conn, db):
    """A partition carries no row-level security of its own: no role but the owner may
    read one directly, whether migrated, made by the maintenance role, or made on demand
    by an application's backdated write."""
    y, m = current_month(db)
    run(maint_conn, "SELECT meter.create_partition(2041, 3)")
    run(app_conn, "SELECT meter.set_tenant('a')")
    run(
        app_conn,
        "SELECT * FROM meter.allocate(p_user_id => 'u1', p_event_type => 'tokens',"
        " p_amount => 1, p_unit => 'tok', p_event_time => '2019-06-15 12:00Z',"
        " p_namespace => 'a')",
    )
    months = [f"ledger_{y:04d}_{m:02d}", "ledger_2020_01", "ledger_2041_03", "ledger_2019_06"]
    assert all(partition_exists(db, t) for t in months)
    got = {
        f"{who}:{t}": outcome(conn, f"SELECT count(*) FROM meter.{t}")
        for who, conn in (("app", app_conn), ("maint", maint_conn))
        for t in months
    }
    assert got == dict.fromkeys(got, "42501")


# ---------------------------------------------------------------- cross-tenant ids


def test_other_tenant_reservation_ids_behave_as_unknown(make_client, app_url, db, snapshot):
    b = make_client("b", url=app_url)
    a = make_client("a", url=app_url)
    b.allocate("ub", ET, 100, UNIT)
    hb1 = b.reserve("ub", ET, 40, UNIT, ttl_seconds=600, reservation_id="shared-id")
    hb2 = b.reserve("ub", ET, 10, UNIT, ttl_seconds=600)
    assert hb1["granted"] and hb2["granted"]
    a.allocate("ua", ET, 50, UNIT)

    before = snapshot()
    for rid in ("shared-id", hb2["reservation_id"]):
        cm = a.commit(rid, 5)
        assert cm == {
            "success": False,
            "consumed": None,
            "released": None,
            "reserved_amount": None,
            "balance": None,
            "entry_id": None,
            "status": "not_found",
        }
        assert a.release(rid) is False
    assert snapshot() == before

    assert b.get_balance("ub", ET, UNIT) == {
        "balance": D("100"),
        "reserved": D("50"),
        "available": D("50"),
    }
    statuses = db.execute(
        "SELECT reservation_id, status FROM meter.reservations WHERE namespace = 'b'"
        " ORDER BY amount DESC"
    ).fetchall()
    assert statuses == [
        {"reservation_id": "shared-id", "status": "active"},
        {"reservation_id": hb2["reservation_id"], "status": "active"},
    ]

    # The same client-chosen id in A is a different reservation: granted, A's own.
    ha = a.reserve("ua", ET, 8, UNIT, ttl_seconds=600, reservation_id="shared-id")
    assert (ha["granted"], ha["reservation_id"], ha["available"]) == (True, "shared-id", D("42"))
    assert a.release("shared-id") is True
    cm = b.commit("shared-id", 15)
    assert (cm["success"], cm["status"], cm["consumed"], cm["released"]) == (
        True,
        "committed",
        D("15"),
        D("25"),
    )
    assert b.get_balance("ub", ET, UNIT) == {
        "balance": D("85"),
        "reserved": D("10"),
        "available": D("75"),
    }
    assert a.get_balance("ua", ET, UNIT) == {
        "balance": D("50"),
        "reserved": D("0"),
        "available": D("50"),
    }
    assert a.reconcile() == [] and b.reconcile() == []


@pytest.mark.parametrize("role", ["app", "superuser"])
def test_adjust_cannot_reference_other_tenant_entry(role, make_client, app_url, db, snapshot):
    url = app_url if role == "app" else None
    b = make_client("b", url=url)
    a = make_client("a", url=url)
    eb = b.allocate("ub", ET, 100, UNIT)["entry_id"]
    ea = a.allocate("ua", ET, 30, UNIT)["entry_id"]

    before = snapshot()
    with pytest.raises(NotFoundError):
        a.adjust("ua", ET, -5, UNIT, reference_id=eb)
    assert snapshot() == before

    # Positive control: A's own entry is a valid reference.
    r = a.adjust("ua", ET, -5, UNIT, reference_id=ea)
    assert r["balance"] == D("25")
    row = db.execute(
        "SELECT namespace, entry_type, amount, reference_id FROM meter.ledger WHERE id = %s",
        (r["entry_id"],),
    ).fetchone()
    assert row == {
        "namespace": "a",
        "entry_type": "adjustment",
        "amount": D("-5"),
        "reference_id": ea,
    }
    assert b.get_balance("ub", ET, UNIT)["balance"] == D("100")


# ---------------------------------------------------------------- no direct writes


def _write_statements() -> dict[str, str]:
    stmts = {
        "insert-accounts": "INSERT INTO meter.accounts (namespace, user_id, event_type, resource,"
        " unit, balance) VALUES ('a', 'u9', 'tokens', '', 'tok', 1000000)",
        "insert-ledger": "INSERT INTO meter.ledger (namespace, account_id, user_id, event_type,"
        " resource, unit, entry_type, amount, balance_after, event_time)"
        " VALUES ('a', 1, 'u1', 'tokens', '', 'tok', 'allocation', 1000, 1000, now())",
        "insert-reservations": "INSERT INTO meter.reservations (namespace, reservation_id,"
        " account_id, user_id, event_type, resource, unit, amount, status, ttl_seconds,"
        " expires_at, request_hash, reserve_result) VALUES ('a', 'forged', 1, 'u1', 'tokens',"
        " '', 'tok', 1, 'active', 60, now() + interval '1 hour', 'x', '{}')",
        "insert-idempotency_keys": "INSERT INTO meter.idempotency_keys (namespace, key,"
        " operation, request_hash, result) VALUES ('a', 'forged', 'allocate', 'x', '{}')",
    }
    for t, col, val in [
        ("accounts", "balance", "balance + 1000"),
        ("ledger", "amount", "amount"),
        ("reservations", "status", "'released'"),
        ("idempotency_keys", "result", "'{}'::jsonb"),
    ]:
        stmts[f"update-{t}"] = f"UPDATE meter.{t} SET {col} = {val}"
        stmts[f"delete-{t}"] = f"DELETE FROM meter.{t}"
        stmts[f"truncate-{t}"] = f"TRUNCATE meter.{t}"
    return stmts


WRITES = _write_statements()


def test_app_role_cannot_write_tables_directly(two_tenants, app_conn, snapshot):
    run(app_conn, "SELECT meter.set_tenant('a')")  # so a refusal is not a tenant error
    before = snapshot()
    got = {name: outcome(app_conn, sql) for name, sql in WRITES.items()}
    assert got == dict.fromkeys(WRITES, "42501")
    assert snapshot() == before


# ---------------------------------------------------------------- actor context set directly

ACTOR_SETTINGS = ("actor_id", "request_id", "on_behalf_of", "reason")
# Values meter.set_actor refuses (Appendix C), set with SET instead.
BAD_ACTOR_VALUES = {"too-long": "x" * 257, "newline": "a\nforged line", "trail-space": "a "}
# Every call that records an actor (reads need not look at it).
ACTOR_CALLS = {
    **{name: sql for name, sql in API_CALLS.items() if not name.startswith(("get_", "reconcile"))},
    "apply_events": "SELECT * FROM meter.apply_events(jsonb_build_array(jsonb_build_object("
    "'op', 'allocate', 'namespace', %(ns)s::text, 'args', jsonb_build_object('user_id', 'u1',"
    " 'event_type', 'tokens', 'amount', '7', 'unit', 'tok'))), 'src-1')",
}


def test_actor_context_set_directly_is_held_to_set_actors_rules(two_tenants, app_conn, snapshot):
    """The four settings of the actor context are plain settings anyone may SET: a value
    meter.set_actor refuses went into the (immutable) ledger and the audit trail as it was.
    Now every write refuses it (MT001, as set_actor would) and changes nothing."""
    run(app_conn, "SELECT meter.set_tenant('a')")
    before = snapshot()
    got = {}
    for field in ACTOR_SETTINGS:
        for label, value in BAD_ACTOR_VALUES.items():
            run(app_conn, "SELECT set_config(%s, %s, false)", (f"meter.{field}", value))
            for name, sql in ACTOR_CALLS.items():
                got[f"{field}:{label}:{name}"] = outcome(app_conn, sql, {"ns": "a"})
            run(app_conn, "SELECT meter.clear_actor()")
    assert got == dict.fromkeys(got, "MT001")
    assert snapshot() == before
    # a valid one set the same way is recorded as it is
    run(app_conn, "SET meter.actor_id = 'ops-1'")
    entry = run(app_conn, API_CALLS["allocate"], {"ns": "a"})[0]["entry_id"]
    rows = run(app_conn, "SELECT actor_id FROM meter.ledger WHERE id = %s", (entry,))
    assert rows == [{"actor_id": "ops-1"}]


def test_a_dead_letter_retry_refuses_an_actor_set_directly_and_leaves_the_letter(
    two_tenants, app_conn, snapshot
):
    """retry_dead_letter caught its event's refusal of the context as the event's failure:
    it returned ok false, and the letter got an attempt more and the caller's error in
    place of its own. Now it refuses the context first (MT001 naming the setting) and the
    letter is as it was."""
    run(app_conn, "SELECT meter.set_tenant('a')")
    event = (
        '[{"op": "allocate", "namespace": "a", "args": {"user_id": "u1",'
        ' "event_type": "tokens", "amount": "-7", "unit": "tok"}}]'
    )
    run(app_conn, "SELECT * FROM meter.apply_events(%s::jsonb, 'src-dl')", (event,))
    (letter,) = run(app_conn, "SELECT dead_letter_id AS id FROM meter.dead_letters")
    before = snapshot()
    run(app_conn, "SELECT set_config('meter.reason', %s, false)", ("a\nforged line",))
    with pytest.raises(psycopg.Error) as exc:
        run(app_conn, "SELECT * FROM meter.retry_dead_letter(%s)", (letter["id"],))
    assert exc.value.sqlstate == "MT001"
    assert exc.value.diag.column_name == "reason"
    assert snapshot() == before


# ---------------------------------------------------------------- maintenance functions


MAINTENANCE_CALLS = {
    "create_partition": "SELECT meter.create_partition(2041, 1)",
    "ensure_partitions": "SELECT * FROM meter.ensure_partitions(24)",
    "drop_old_partitions": "SELECT * FROM meter.drop_old_partitions(1)",
    "retention_backlog": "SELECT * FROM meter.retention_backlog(1)",
    "release_expired_reservations": "SELECT meter.release_expired_reservations(NULL)",
}


def test_maintenance_functions_refused_for_app_role(two_tenants, app_url, db, snapshot):
    y, m = current_month(db)
    before = snapshot()
    parts = db.execute(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'meter.ledger'::regclass"
    ).fetchone()["n"]
    got = {}
    for tenant in (None, "a"):
        with connect(app_url) as conn:
            if tenant is not None:
                run(conn, "SELECT meter.set_tenant(%s)", (tenant,))
            for name, sql in MAINTENANCE_CALLS.items():
                state = outcome(conn, sql)
                got[f"{name}:tenant={tenant}"] = "refused" if state in ("42501", "MT004") else state
    assert got == dict.fromkeys(got, "refused")
    assert snapshot() == before
    assert not partition_exists(db, "ledger_2041_01")
    assert partition_exists(db, "ledger_2020_01")
    assert partition_exists(db, f"ledger_{y:04d}_{m:02d}")
    after = db.execute(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'meter.ledger'::regclass"
    ).fetchone()["n"]
    assert after == parts


def test_app_role_sweep_does_not_touch_other_tenants(make_client, app_url, db):
    # Both tenants have an expired, unswept hold; A's own sweep (through the SDK, as the app
    # role) releases A's and leaves B's alone.
    a = make_client("a", url=app_url)
    b = make_client("b")
    for c, u in ((a, "ua"), (b, "ub")):
        c.allocate(u, ET, 10, UNIT)
        assert c.reserve(u, ET, 4, UNIT, ttl_seconds=1)["granted"]
    _wait_db_clock_past(db, "SELECT max(expires_at) AS t FROM meter.reservations")
    assert a.release_expired_reservations() == 1
    rows = db.execute(
        "SELECT namespace, status FROM meter.reservations ORDER BY namespace"
    ).fetchall()
    assert rows == [{"namespace": "a", "status": "expired"}, {"namespace": "b", "status": "active"}]
    assert db.execute("SELECT reserved FROM meter.accounts WHERE namespace = 'b'").fetchone()[
        "reserved"
    ] == D("4")


def _wait_db_clock_past(db, sql: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    target = db.execute(sql).fetchone()["t"]
    while db.execute("SELECT now() < %s AS w", (target,)).fetchone()["w"]:
        assert time.monotonic() < deadline, "database clock did not pass the target"
        time.sleep(0.05)


def test_maintenance_role_works_across_namespaces_without_tenant(two_tenants, maint_conn, db):
    y, m = current_month(db)
    # Partitions.
    assert run(maint_conn, "SELECT meter.create_partition(2041, 2) AS p") == [
        {"p": "ledger_2041_02"}
    ]
    assert partition_exists(db, "ledger_2041_02")
    assert run(maint_conn, "SELECT meter.create_partition(2041, 2) AS p") == [{"p": None}]
    assert run(maint_conn, "SELECT * FROM meter.ensure_partitions(3)") == []  # all exist
    dropped = run(maint_conn, "SELECT * FROM meter.drop_old_partitions(24) AS d")
    assert [r["d"].split(".")[-1] for r in dropped] == ["ledger_2020_01"]
    assert not partition_exists(db, "ledger_2020_01")
    assert partition_exists(db, f"ledger_{y:04d}_{m:02d}")

    # Direct reads see every namespace.
    rows = run(
        maint_conn,
        "SELECT namespace, count(*) AS n FROM meter.accounts GROUP BY namespace ORDER BY 1",
    )
    assert rows == [{"namespace": "a", "n": 3}, {"namespace": "b", "n": 3}]

    # API calls for any namespace, no tenant set.
    for ns in ("a", "b", "c"):
        r = run(
            maint_conn,
            "SELECT * FROM meter.allocate(p_user_id => 'u1', p_event_type => 'tokens',"
            " p_amount => 6, p_unit => 'tok', p_namespace => %s)",
            (ns,),
        )[0]
        assert r["balance"] == (D("6") if ns == "c" else D("36"))
        assert run(maint_conn, API_CALLS["reconcile"], {"ns": ns}) == []
        assert run(maint_conn, API_CALLS["get_balance"], {"ns": ns})[0]["balance"] == r["balance"]

    # The cross-namespace sweep: expired holds of a and b, in one call.
    for ns in ("a", "b"):
        run(
            maint_conn,
            "SELECT * FROM meter.reserve(p_user_id => 'u1', p_event_type => 'tokens',"
            " p_amount => 2, p_unit => 'tok', p_ttl_seconds => 1, p_namespace => %s)",
            (ns,),
        )
    _wait_db_clock_past(
        db,
        "SELECT max(expires_at) AS t FROM meter.reservations WHERE status = 'active'"
        " AND ttl_seconds = 1",
    )
    swept = run(maint_conn, "SELECT meter.release_expired_reservations(NULL) AS n")
    assert swept == [{"n": 2}]
    rows = db.execute(
        "SELECT namespace, status FROM meter.reservations WHERE ttl_seconds = 1 ORDER BY 1"
    ).fetchall()
    assert rows == [
        {"namespace": "a", "status": "expired"},
        {"namespace": "b", "status": "expired"},
    ]
    for ns in ("a", "b"):
        # seed-hold (20) stays active: its TTL is an hour.
        assert run(maint_conn, API_CALLS["get_balance"], {"ns": ns}) == [
            {"balance": D("36"), "reserved": D("20"), "available": D("16")}
        ]


# ---------------------------------------------------------------- immutability


def _ledger_rows(db) -> list[dict]:
    return db.execute("SELECT * FROM meter.ledger ORDER BY id").fetchall()


IMMUTABLE = {
    "update-all": "UPDATE meter.ledger SET amount = amount + 1",
    "update-one": "UPDATE meter.ledger SET metadata = '{\"x\": 1}' WHERE id = {id}",
    "delete-all": "DELETE FROM meter.ledger",
    "delete-one": "DELETE FROM meter.ledger WHERE id = {id}",
    "truncate-parent": "TRUNCATE meter.ledger",
    "truncate-parent-cascade": "TRUNCATE meter.ledger CASCADE",
    "truncate-current": "TRUNCATE meter.{current}",
    "truncate-backdated": "TRUNCATE meter.ledger_2020_01",
    "truncate-ahead": "TRUNCATE meter.{ahead}",
    "update-partition": "UPDATE meter.{current} SET balance_after = 0",
    "delete-partition": "DELETE FROM meter.{current}",
    "delete-backdated": "DELETE FROM meter.ledger_2020_01",
}


def test_ledger_refuses_change_even_for_superuser(client, db):
    y, m = current_month(db)
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    first = client.allocate("u1", ET, 100, UNIT)["entry_id"]
    client.consume("u1", ET, 30, UNIT)
    client.allocate("u1", ET, 7, UNIT, event_time=OLD)  # creates ledger_2020_01 on demand
    client.allocate(None, ET, 5, UNIT)
    assert partition_exists(db, "ledger_2020_01")
    before = _ledger_rows(db)
    assert len(before) == 4
    got = {}
    for name, template in IMMUTABLE.items():
        sql = (
            template.replace("{id}", str(first))
            .replace("{current}", f"ledger_{y:04d}_{m:02d}")
            .replace("{ahead}", f"ledger_{ny:04d}_{nm:02d}")
        )
        try:
            db.execute(sql)
            got[name] = "accepted"
        except psycopg.Error as e:
            got[name] = "broken statement" if e.sqlstate in BROKEN_STATEMENT else "refused"
        assert _ledger_rows(db) == before, name
    assert got == dict.fromkeys(IMMUTABLE, "refused")
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("77")
    assert client.reconcile() == []
