"""Queries, stats, reconcile, audit events and actor context (SPEC 3-4, Appendices B-C)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from meter.errors import ValidationError
from tests.fix_db import ledger_partitions, wait_until_expired

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"
T1 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
T2 = datetime(2024, 5, 2, 10, 0, tzinfo=UTC)
T3 = datetime(2024, 5, 3, 10, 0, tzinfo=UTC)

ACCOUNT_COLUMNS = {
    "namespace",
    "user_id",
    "event_type",
    "resource",
    "unit",
    "balance",
    "reserved",
    "total_credited",
    "total_debited",
    "period_start",
    "period_allocation",
    "carry_over_limit",
    "period_interval",
    "created_at",
    "updated_at",
}
LEDGER_COLUMNS = {
    "id",
    "entry_type",
    "amount",
    "balance_after",
    "event_time",
    "reservation_id",
    "reference_id",
    "actor_id",
    "reason",
    "metadata",
}
AUDIT_COLUMNS = {
    "kind",
    "at",
    "user_id",
    "event_type",
    "resource",
    "unit",
    "amount",
    "reservation_id",
    "entry_id",
    "actor_id",
    "on_behalf_of",
    "reason",
    "request_id",
    "metadata",
}
ALL_KINDS = {
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


def many_allocations(db, n, user_id=U):
    db.execute(
        f"DO $$ BEGIN FOR i IN 1..{int(n)} LOOP"
        f" PERFORM meter.allocate(p_user_id => '{user_id}', p_event_type => 'tokens',"
        " p_amount => 1, p_unit => 'tok'); END LOOP; END $$"
    )


def db_now(db):
    return db.execute("SELECT clock_timestamp() AS t").fetchone()["t"]


# ---------------------------------------------------------------- balances and accounts


def test_get_balance_unknown_account_is_zeros(client, snapshot):
    before = snapshot()
    assert client.get_balance("nobody", ET, UNIT) == {
        "balance": D("0"),
        "reserved": D("0"),
        "available": D("0"),
    }
    assert snapshot() == before


def test_get_balance_known_account(client):
    client.allocate(U, ET, D("10.5"), UNIT)
    client.reserve(U, ET, D("2.25"), UNIT)
    assert client.get_balance(U, ET, UNIT) == {
        "balance": D("10.5"),
        "reserved": D("2.25"),
        "available": D("8.25"),
    }


GET_BALANCE = (
    "SELECT * FROM meter.get_balance(p_user_id => %s, p_event_type => %s, p_unit => %s,"
    " p_resource => %s, p_namespace => 'default')"
)


def _balance(db, *key):
    return db.execute(GET_BALANCE, key).fetchall()


def _rows(balance, reserved=0):
    return [{"balance": D(balance), "reserved": D(reserved), "available": D(balance - reserved)}]


def test_get_balance_probe_first_answers_only_a_stored_key(client, db, snapshot):
    # 033: with the tenant set, get_balance probes before it checks the key, so a key that
    # finds an account is answered unchecked. These are the keys that must still be refused
    # (or answered with zeros) although an account sits next to them.
    client.allocate(None, ET, D("7"), UNIT)  # the pool: stored with user_id NULL
    client.allocate(U, ET, D("5"), UNIT, "r1")
    client.reserve(U, ET, D("2"), UNIT, "r1")
    db.execute("SELECT set_config('meter.tenant', 'default', false)")
    assert _balance(db, U, ET, UNIT, "r1") == _rows(5, 2)
    assert _balance(db, None, ET, UNIT, None) == _rows(7)
    assert _balance(db, None, ET, UNIT, "") == _rows(7)  # '' is no resource
    assert _balance(db, U, ET, UNIT, None) == _rows(0)
    before = snapshot()
    refused = {
        "user_id": ("", ET, UNIT, None),  # '' would find the pool
        "resource": (U, ET, UNIT, " r1"),
        "unit": (U, ET, "u" * 65, "r1"),
    }
    for param, key in refused.items():
        with pytest.raises(psycopg.Error) as ei:
            db.execute(GET_BALANCE, key)
        assert (ei.value.sqlstate, ei.value.diag.column_name) == ("MT001", param), key
    # Another tenant set: the account exists, but the call is refused as before 033.
    db.execute("SELECT set_config('meter.tenant', 'other', false)")
    with pytest.raises(psycopg.Error) as ei:
        db.execute(GET_BALANCE, (U, ET, UNIT, "r1"))
    assert (ei.value.sqlstate, ei.value.diag.column_name) == ("MT004", "namespace")
    assert snapshot() == before


def test_get_account_unknown_is_none(client):
    client.allocate(U, ET, D("1"), UNIT)
    assert client.get_account("nobody", ET, UNIT) is None
    assert client.get_account(U, ET, "other-unit") is None
    assert client.get_account(U, ET, UNIT, "some-resource") is None


def test_get_account_row(client):
    client.allocate(U, ET, D("10"), UNIT, resource="gpt")
    client.consume(U, ET, D("4"), UNIT, resource="gpt")
    client.reserve(U, ET, D("1"), UNIT, resource="gpt")
    acct = client.get_account(U, ET, UNIT, "gpt")
    assert ACCOUNT_COLUMNS <= set(acct)
    assert (
        acct["namespace"],
        acct["user_id"],
        acct["event_type"],
        acct["resource"],
        acct["unit"],
    ) == ("default", U, ET, "gpt", UNIT)
    assert (acct["balance"], acct["reserved"]) == (D("6"), D("1"))
    assert (acct["total_credited"], acct["total_debited"]) == (D("10"), D("4"))
    assert acct["period_allocation"] is None
    assert acct["carry_over_limit"] is None
    assert acct["created_at"] is not None
    assert acct["updated_at"] >= acct["created_at"]


def test_get_account_is_namespace_scoped(client, make_client):
    other = make_client(namespace="other")
    other.allocate(U, ET, D("5"), UNIT)
    assert client.get_account(U, ET, UNIT) is None
    assert client.get_balance(U, ET, UNIT)["balance"] == D("0")
    assert other.get_account(U, ET, UNIT)["namespace"] == "other"


def test_get_user_balances(client):
    client.allocate(U, ET, D("10"), UNIT)
    client.allocate(U, ET, D("7"), UNIT, resource="gpt")
    client.reserve(U, ET, D("2"), UNIT, resource="gpt")
    client.allocate(U, "requests", D("3"), "req")
    client.allocate("u2", ET, D("99"), UNIT)
    client.allocate(None, ET, D("50"), UNIT)
    rows = client.get_user_balances(U)
    key = lambda r: (r["event_type"], r["resource"], r["unit"])  # noqa: E731
    assert sorted(rows, key=key) == [
        {
            "event_type": "requests",
            "resource": "",
            "unit": "req",
            "balance": D("3"),
            "reserved": D("0"),
            "available": D("3"),
        },
        {
            "event_type": "tokens",
            "resource": "",
            "unit": "tok",
            "balance": D("10"),
            "reserved": D("0"),
            "available": D("10"),
        },
        {
            "event_type": "tokens",
            "resource": "gpt",
            "unit": "tok",
            "balance": D("7"),
            "reserved": D("2"),
            "available": D("5"),
        },
    ]
    assert client.get_user_balances("nobody") == []


# ---------------------------------------------------------------- get_ledger


def test_get_ledger_newest_first_by_event_time(client):
    e2 = client.allocate(U, ET, D("2"), UNIT, event_time=T2)["entry_id"]
    e1 = client.allocate(U, ET, D("1"), UNIT, event_time=T1)["entry_id"]
    e3 = client.consume(U, ET, D("3"), UNIT, event_time=T3)["entry_id"]
    rows = client.get_ledger(U, ET, UNIT)
    assert [r["id"] for r in rows] == [e3, e2, e1]
    assert LEDGER_COLUMNS <= set(rows[0])
    assert [(r["entry_type"], r["amount"], r["event_time"]) for r in rows] == [
        ("consumption", D("-3"), T3),
        ("allocation", D("2"), T2),
        ("allocation", D("1"), T1),
    ]
    # balance_after follows the order of application, not event_time
    assert [r["balance_after"] for r in rows] == [D("0"), D("2"), D("3")]


def test_get_ledger_ties_broken_by_id_desc(client):
    ids = [client.allocate(U, ET, D("1"), UNIT, event_time=T1)["entry_id"] for _ in range(3)]
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT)] == ids[::-1]


def test_get_ledger_time_range_is_half_open(client):
    e1 = client.allocate(U, ET, D("1"), UNIT, event_time=T1)["entry_id"]
    e2 = client.allocate(U, ET, D("2"), UNIT, event_time=T2)["entry_id"]
    e3 = client.allocate(U, ET, D("3"), UNIT, event_time=T3)["entry_id"]

    def ids(**kw):
        return [r["id"] for r in client.get_ledger(U, ET, UNIT, **kw)]

    assert ids(start_time=T2, end_time=T3) == [e2]
    assert ids(start_time=T2) == [e3, e2]
    assert ids(end_time=T2) == [e1]
    assert ids(start_time=T1, end_time=T3) == [e2, e1]


def test_get_ledger_only_this_account(client):
    client.allocate(U, ET, D("1"), UNIT)
    client.allocate(U, ET, D("1"), UNIT, resource="gpt")
    client.allocate("u2", ET, D("1"), UNIT)
    client.allocate(U, ET, D("1"), "other")
    assert len(client.get_ledger(U, ET, UNIT)) == 1
    assert client.get_ledger("nobody", ET, UNIT) == []


def test_get_ledger_limit_default_and_none(client, db):
    many_allocations(db, 105)
    all_ids = [
        r["id"]
        for r in db.execute(
            "SELECT id FROM meter.ledger WHERE user_id = %s ORDER BY event_time DESC, id DESC", (U,)
        ).fetchall()
    ]
    assert len(all_ids) == 105
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT)] == all_ids[:100]
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT, limit=None)] == all_ids[:100]
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT, limit=3)] == all_ids[:3]
    assert len(client.get_ledger(U, ET, UNIT, limit=105)) == 105


def test_get_ledger_limit_capped_at_10000(client, db):
    many_allocations(db, 10001)
    assert len(client.get_ledger(U, ET, UNIT, limit=20000)) == 10000
    assert len(client.get_ledger(U, ET, UNIT, limit=10000)) == 10000
    assert len(client.get_ledger(U, ET, UNIT, limit=10001)) == 10000
    # the SQL applies the same rules itself (NULL means 100, above 10000 is capped)
    q = (
        "SELECT count(*) AS n FROM meter.get_ledger(p_user_id => %s, p_event_type => %s,"
        " p_unit => %s, p_limit => %s)"
    )
    assert db.execute(q, (U, ET, UNIT, 20000)).fetchone()["n"] == 10000
    assert db.execute(q, (U, ET, UNIT, None)).fetchone()["n"] == 100
    assert (
        db.execute(
            "SELECT count(*) AS n FROM meter.get_ledger(p_user_id => %s, p_event_type => %s,"
            " p_unit => %s)",
            (U, ET, UNIT),
        ).fetchone()["n"]
        == 100
    )


@pytest.mark.parametrize("limit", [0, -1])
def test_get_ledger_limit_below_one_refused(client, limit, snapshot):
    client.allocate(U, ET, D("1"), UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.get_ledger(U, ET, UNIT, limit=limit)
    assert ei.value.parameter == "limit"
    assert snapshot() == before


def _pages(client, size, **kw):
    """Every entry, paging newest first as the get_ledger docstring says."""
    ids, end, before = [], kw.pop("end_time", None), None
    for _ in range(100):
        page = client.get_ledger(U, ET, UNIT, end_time=end, limit=size, before_id=before, **kw)
        if not page:
            return ids
        ids += [r["id"] for r in page]
        end, before = page[-1]["event_time"], page[-1]["id"]
    raise AssertionError(f"paging never ended: {ids}")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_get_ledger_pages_through_entries_of_one_time_once_each(client, size):
    """Paging by the last entry (event_time, id) lists every entry once, ties included;
    end_time alone, exclusive, skipped the tied entries a page had no room for."""
    older = client.allocate(U, ET, D("1"), UNIT, event_time=T1)["entry_id"]
    tied = [client.allocate(U, ET, D("1"), UNIT, event_time=T2)["entry_id"] for _ in range(4)]
    newest = client.consume(U, ET, D("1"), UNIT, event_time=T3)["entry_id"]
    everything = [newest, *tied[::-1], older]
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT)] == everything
    assert _pages(client, size) == everything
    # within a range: the cursor keeps start_time, and starts inside end_time's bound
    assert _pages(client, size, start_time=T2) == [newest, *tied[::-1]]
    assert _pages(client, size, end_time=T3) == [*tied[::-1], older]


def test_get_ledger_pages_through_a_period_close(client):
    """A close writes its expiration and carry-over at one instant: both are listed."""
    client.set_period_config(U, ET, UNIT, None, date(2024, 5, 1), D("10"), D("4"))
    client.open_period(U, ET, UNIT, None, date(2024, 5, 1))
    client.close_period(U, ET, UNIT, None, date(2024, 5, 31))
    everything = [r["id"] for r in client.get_ledger(U, ET, UNIT)]
    assert len(everything) == 3
    assert _pages(client, 1) == everything


def test_sql_get_ledger_before_id_is_positional_after_the_namespace(client, db):
    """Calls made before 062 (eight arguments, positional) are the same call."""
    ids = [client.allocate(U, ET, D("1"), UNIT, event_time=T1)["entry_id"] for _ in range(3)]
    rows = db.execute(
        "SELECT id FROM meter.get_ledger(%s, %s, %s, NULL, NULL, NULL, 5, 'default')",
        (U, ET, UNIT),
    ).fetchall()
    assert [r["id"] for r in rows] == ids[::-1]
    rows = db.execute(
        "SELECT id FROM meter.get_ledger(%s, %s, %s, NULL, NULL, %s, 5, 'default', %s)",
        (U, ET, UNIT, T1, ids[1]),
    ).fetchall()
    assert [r["id"] for r in rows] == [ids[0]]


def test_get_ledger_before_id_without_end_time_refused(client, db, snapshot):
    e = client.allocate(U, ET, D("1"), UNIT)["entry_id"]
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.get_ledger(U, ET, UNIT, before_id=e)
    assert ei.value.parameter == "before_id"
    with pytest.raises(ValidationError) as ei:
        client.get_ledger(U, ET, UNIT, end_time=T1, before_id="1")
    assert ei.value.parameter == "before_id"
    # the SQL refuses it itself
    with pytest.raises(psycopg.Error) as sql:
        db.execute(
            "SELECT * FROM meter.get_ledger(p_user_id => %s, p_event_type => %s,"
            " p_unit => %s, p_before_id => %s)",
            (U, ET, UNIT, e),
        )
    assert sql.value.sqlstate == "MT001"
    assert "before_id" in str(sql.value)
    assert snapshot() == before


# ---------------------------------------------------------------- usage


def _usage_fixture(client):
    client.allocate(U, ET, D("100"), UNIT)
    client.allocate(U, ET, D("100"), UNIT, resource="gpt")
    client.adjust(U, ET, D("-9"), UNIT)  # adjustments are not consumption
    client.consume(U, ET, D("3"), UNIT, event_time=T1)
    client.consume(U, ET, D("4"), UNIT, event_time=T2)
    client.consume(U, ET, D("5"), UNIT, resource="gpt", event_time=T2)
    client.consume("u2", ET, D("6"), UNIT, event_time=T2)
    client.consume("u2", "requests", D("1"), "req", event_time=T3)


def _sorted(rows):
    return sorted(rows, key=lambda r: (r["event_type"], r["resource"], r["unit"]))


def test_get_usage_consumption_only_with_totals_and_counts(client):
    _usage_fixture(client)
    rows = client.get_usage(U, T1, datetime(2024, 6, 1, tzinfo=UTC))
    assert _sorted(rows) == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("7"),
            "event_count": 2,
        },
        {
            "event_type": ET,
            "resource": "gpt",
            "unit": UNIT,
            "total_consumed": D("5"),
            "event_count": 1,
        },
    ]


def test_get_usage_time_bounds(client):
    _usage_fixture(client)
    assert _sorted(client.get_usage(U, T2, T3)) == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("4"),
            "event_count": 1,
        },
        {
            "event_type": ET,
            "resource": "gpt",
            "unit": UNIT,
            "total_consumed": D("5"),
            "event_count": 1,
        },
    ]
    assert client.get_usage(U, T1, T2) == [
        {"event_type": ET, "resource": "", "unit": UNIT, "total_consumed": D("3"), "event_count": 1}
    ]
    assert client.get_usage(U, T3, None) == []


def test_get_usage_includes_committed_reservations(client):
    client.allocate(U, ET, D("10"), UNIT)
    rid = client.reserve(U, ET, D("5"), UNIT)["reservation_id"]
    client.commit(rid, D("4"))
    rid2 = client.reserve(U, ET, D("1"), UNIT)["reservation_id"]
    client.release(rid2)
    assert client.get_usage(U, None, None) == [
        {"event_type": ET, "resource": "", "unit": UNIT, "total_consumed": D("4"), "event_count": 1}
    ]


def test_get_namespace_usage(client, make_client):
    _usage_fixture(client)
    make_client(namespace="other").consume(U, ET, D("1000"), UNIT, event_time=T2)
    rows = client.get_namespace_usage(T1, datetime(2024, 6, 1, tzinfo=UTC))
    assert _sorted(rows) == [
        {
            "event_type": "requests",
            "resource": "",
            "unit": "req",
            "total_consumed": D("1"),
            "event_count": 1,
            "unique_users": 1,
        },
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("13"),
            "event_count": 3,
            "unique_users": 2,
        },
        {
            "event_type": ET,
            "resource": "gpt",
            "unit": UNIT,
            "total_consumed": D("5"),
            "event_count": 1,
            "unique_users": 1,
        },
    ]
    assert _sorted(client.get_namespace_usage(T2, T3)) == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("10"),
            "event_count": 2,
            "unique_users": 2,
        },
        {
            "event_type": ET,
            "resource": "gpt",
            "unit": UNIT,
            "total_consumed": D("5"),
            "event_count": 1,
            "unique_users": 1,
        },
    ]


# ---------------------------------------------------------------- stats and reconcile


def test_get_stats_counts_only_active_holds(client, db, make_client):
    client.allocate(U, ET, D("100"), UNIT)
    client.allocate("u2", ET, D("50"), UNIT)
    client.consume("u2", ET, D("5"), UNIT)
    client.reserve(U, ET, D("4"), UNIT)  # active
    r = client.reserve(U, ET, D("3"), UNIT)
    client.release(r["reservation_id"])
    r = client.reserve(U, ET, D("2"), UNIT)
    client.commit(r["reservation_id"], D("2"))
    short = client.reserve(U, ET, D("7"), UNIT, ttl_seconds=1)
    make_client(namespace="other").allocate(U, ET, D("1000"), UNIT)
    wait_until_expired(db, short["expires_at"])

    stats = client.get_stats()
    assert stats["total_accounts"] == 2
    assert stats["total_ledger_entries"] == 4
    assert stats["active_reservations"] == 1
    assert stats["total_balance"] == D("143")

    assert client.release_expired_reservations() == 1
    stats = client.get_stats()
    assert stats == {
        "total_accounts": 2,
        "total_ledger_entries": 4,
        "active_reservations": 1,
        "total_balance": D("143"),
        "total_reserved": D("4"),
    }


def test_get_stats_empty_namespace(client):
    s = client.get_stats()
    assert (s["total_accounts"], s["total_ledger_entries"], s["active_reservations"]) == (0, 0, 0)
    assert (s["total_balance"] or D("0"), s["total_reserved"] or D("0")) == (D("0"), D("0"))


def test_reconcile_healthy_ledger_is_empty(client, db):
    assert client.reconcile() == []
    client.allocate(U, ET, D("100"), UNIT)
    client.consume(U, ET, D("30"), UNIT, event_time=T1)
    client.adjust(U, ET, D("-1.5"), UNIT)
    client.reserve(U, ET, D("10"), UNIT)
    rid = client.reserve(U, ET, D("5"), UNIT)["reservation_id"]
    client.commit(rid, D("6"))
    client.allocate(None, ET, D("5"), UNIT)
    client.set_period_config("u3", ET, UNIT, None, date(2024, 1, 1), D("10"), D("2"))
    client.open_period("u3", ET, UNIT, None, date(2024, 1, 1))
    client.close_period("u3", ET, UNIT, None, date(2024, 1, 31))
    assert client.reconcile() == []


def test_reconcile_reports_tampered_account(client, db):
    client.allocate(U, ET, D("10"), UNIT)
    client.reserve(U, ET, D("4"), UNIT)
    db.execute(
        "UPDATE meter.accounts SET balance = balance + 1, reserved = reserved + 2"
        " WHERE user_id = %s",
        (U,),
    )
    rows = sorted(client.reconcile(), key=lambda r: r["issue_type"])
    assert rows == [
        {
            "user_id": U,
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "issue_type": "balance_mismatch",
            "expected": D("10"),
            "actual": D("11"),
            "discrepancy": D("1"),
        },
        {
            "user_id": U,
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "issue_type": "reserved_mismatch",
            "expected": D("4"),
            "actual": D("6"),
            "discrepancy": D("2"),
        },
    ]


# ---------------------------------------------------------------- actor context and audit


def _actor(ev):
    return (ev["actor_id"], ev["request_id"], ev["on_behalf_of"], ev["reason"])


def test_every_kind_appears_in_audit(client, db):
    client.set_period_config(U, ET, UNIT, None, date(2024, 1, 1), D("100"), D("10"))
    client.open_period(U, ET, UNIT, None, date(2024, 1, 1))
    client.consume(U, ET, D("1"), UNIT)
    client.adjust(U, ET, D("1"), UNIT)
    client.close_period(U, ET, UNIT, None, date(2024, 1, 31))
    rid = client.reserve(U, ET, D("1"), UNIT)["reservation_id"]
    client.commit(rid, D("1"))
    client.release(client.reserve(U, ET, D("1"), UNIT)["reservation_id"])
    short = client.reserve(U, ET, D("1"), UNIT, ttl_seconds=1)
    client.allocate(U, ET, D("1"), UNIT)
    wait_until_expired(db, short["expires_at"])
    assert client.release_expired_reservations() == 1

    events = client.get_audit_events(limit=1000)
    assert {e["kind"] for e in events} == ALL_KINDS
    for e in events:
        assert AUDIT_COLUMNS <= set(e), e
    ats = [e["at"] for e in events]
    assert ats == sorted(ats, reverse=True)


def test_audit_event_fields_for_ledger_and_reservation(client):
    client.set_actor("alice", "req-1", "bob", "support ticket 7")
    a = client.allocate(U, ET, D("10"), UNIT, resource="gpt", metadata={"plan": "pro"})
    r = client.reserve(U, ET, D("4"), UNIT, resource="gpt")
    ev = client.get_audit_events(kinds=["ledger.allocation"])
    assert len(ev) == 1
    e = ev[0]
    assert (e["kind"], e["user_id"], e["event_type"], e["resource"], e["unit"]) == (
        "ledger.allocation",
        U,
        ET,
        "gpt",
        UNIT,
    )
    assert e["amount"] == D("10")
    assert e["entry_id"] == a["entry_id"]
    assert e["reservation_id"] is None
    assert e["metadata"] == {"plan": "pro"}
    assert _actor(e) == ("alice", "req-1", "bob", "support ticket 7")
    (h,) = client.get_audit_events(kinds=["reservation.active"])
    assert (h["reservation_id"], h["amount"], h["user_id"], h["resource"]) == (
        r["reservation_id"],
        D("4"),
        U,
        "gpt",
    )
    assert _actor(h) == ("alice", "req-1", "bob", "support ticket 7")


def test_actor_fields_recorded_on_ledger_rows(client, db):
    client.set_actor("alice", "req-1", "bob", "why")
    e = client.allocate(U, ET, D("1"), UNIT)["entry_id"]
    row = db.execute("SELECT * FROM meter.ledger WHERE id = %s", (e,)).fetchone()
    assert (row["actor_id"], row["request_id"], row["on_behalf_of"], row["reason"]) == (
        "alice",
        "req-1",
        "bob",
        "why",
    )
    led = client.get_ledger(U, ET, UNIT)[0]
    assert (led["actor_id"], led["reason"]) == ("alice", "why")


def test_set_actor_changes_only_passed_fields_and_clear_actor(client):
    def last_actor():
        return _actor(client.get_audit_events(limit=1)[0])

    client.set_actor(actor_id="alice", reason="r1")
    client.allocate(U, ET, D("1"), UNIT)
    assert last_actor() == ("alice", None, None, "r1")
    client.set_actor(request_id="req-2")
    client.allocate(U, ET, D("1"), UNIT)
    assert last_actor() == ("alice", "req-2", None, "r1")
    client.set_actor(actor_id="carol", on_behalf_of="dave")
    client.allocate(U, ET, D("1"), UNIT)
    assert last_actor() == ("carol", "req-2", "dave", "r1")
    client.clear_actor()
    client.allocate(U, ET, D("1"), UNIT)
    assert last_actor() == (None, None, None, None)


def test_actor_is_per_client(client, make_client):
    other = make_client()
    client.set_actor("alice")
    other.allocate("u9", ET, D("1"), UNIT)
    client.allocate(U, ET, D("1"), UNIT)
    assert _actor(client.get_audit_events(user_id="u9")[0]) == (None, None, None, None)
    assert client.get_audit_events(user_id=U)[0]["actor_id"] == "alice"


def test_audit_filters(client, db):
    client.set_actor("alice")
    client.allocate(U, ET, D("10"), UNIT)
    client.consume(U, ET, D("1"), UNIT)
    client.set_actor("bob")
    client.allocate("u2", ET, D("10"), UNIT)
    mid = db_now(db)
    time.sleep(0.01)
    client.consume("u2", ET, D("2"), UNIT)
    client.consume(U, ET, D("3"), UNIT)

    def view(**kw):
        return [
            (e["kind"], e["user_id"], e["amount"], e["actor_id"])
            for e in client.get_audit_events(**kw)
        ]

    assert view(user_id=U) == [
        ("ledger.consumption", U, D("-3"), "bob"),
        ("ledger.consumption", U, D("-1"), "alice"),
        ("ledger.allocation", U, D("10"), "alice"),
    ]
    assert view(actor_id="alice") == [
        ("ledger.consumption", U, D("-1"), "alice"),
        ("ledger.allocation", U, D("10"), "alice"),
    ]
    assert view(kinds=["ledger.allocation"]) == [
        ("ledger.allocation", "u2", D("10"), "bob"),
        ("ledger.allocation", U, D("10"), "alice"),
    ]
    assert view(start_time=mid) == [
        ("ledger.consumption", U, D("-3"), "bob"),
        ("ledger.consumption", "u2", D("-2"), "bob"),
    ]
    assert view(end_time=mid) == [
        ("ledger.allocation", "u2", D("10"), "bob"),
        ("ledger.consumption", U, D("-1"), "alice"),
        ("ledger.allocation", U, D("10"), "alice"),
    ]
    assert view(user_id="u2", actor_id="bob", kinds=["ledger.consumption"]) == [
        ("ledger.consumption", "u2", D("-2"), "bob")
    ]
    assert len(view(limit=2)) == 2
    assert view(limit=2) == view()[:2]


def test_reads_leave_out_holds_past_their_ttl_before_the_sweep(client, db, snapshot):
    # Appendix C: a hold is expired once now() >= expires_at, swept or not. A read that
    # still counted it said `available` 0 where a checked consume then took 10.
    client.allocate(U, ET, D("10"), UNIT)
    client.allocate(U, "images", D("5"), UNIT)
    kept = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=300)
    due = client.reserve(U, ET, D("6"), UNIT, ttl_seconds=1)
    client.reserve(U, "images", D("5"), UNIT, ttl_seconds=1)
    wait_until_expired(db, due["expires_at"])
    before = snapshot()

    assert client.get_balance(U, ET, UNIT) == {
        "balance": D("10"),
        "reserved": D("4"),
        "available": D("6"),
    }
    assert client.get_account(U, ET, UNIT)["reserved"] == D("4")
    by_type = {r["event_type"]: r for r in client.get_user_balances(U)}
    assert (by_type[ET]["reserved"], by_type[ET]["available"]) == (D("4"), D("6"))
    assert (by_type["images"]["reserved"], by_type["images"]["available"]) == (D("0"), D("5"))
    stats = client.get_stats()
    assert (stats["active_reservations"], stats["total_reserved"]) == (1, D("4"))
    # reads change nothing: the sweep still owns the transition
    assert snapshot() == before

    # what the read promised, a checked consume gets
    assert client.consume(U, ET, D("6"), UNIT, check_balance=True)["success"] is True
    assert client.release(kept["reservation_id"]) is True
    assert client.release_expired_reservations() == 1
    assert client.get_balance(U, "images", UNIT)["available"] == D("5")
    assert client.reconcile() == []


def test_audit_is_namespace_scoped(client, make_client):
    make_client(namespace="other").allocate(U, ET, D("1"), UNIT)
    assert client.get_audit_events() == []


def test_sweep_transitions_carry_system_expiry_actor(client, db):
    client.set_actor("alice")
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r["expires_at"])
    assert client.release_expired_reservations() == 1
    (ev,) = client.get_audit_events(kinds=["reservation.expired"])
    assert ev["actor_id"] == "system:expiry"
    assert ev["reservation_id"] == r["reservation_id"]
    assert ev["amount"] == D("4")
    (created,) = client.get_audit_events(kinds=["reservation.active"])
    assert created["actor_id"] == "alice"


def test_a_late_commit_after_the_sweep_keeps_the_expiry_in_the_audit(client, db):
    """The trail shows active -> expired (system:expiry) -> committed; the commit used to
    overwrite the expiry, leaving active -> committed."""
    client.set_actor("alice")
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r["expires_at"])
    assert client.release_expired_reservations() == 1
    client.set_actor("bob")
    assert client.commit(r["reservation_id"], D("2"))["status"] == "late"
    trail = [
        (ev["kind"], ev["actor_id"], ev["amount"])
        for ev in reversed(client.get_audit_events())
        if ev["reservation_id"] == r["reservation_id"] and ev["kind"].startswith("reservation.")
    ]
    assert trail == [
        ("reservation.active", "alice", D("4")),
        ("reservation.expired", "system:expiry", D("4")),
        ("reservation.committed", "bob", D("2")),
    ]
    # a hold committed in time has no expiry, and one committed late before the sweep none
    r2 = client.reserve(U, ET, D("1"), UNIT)
    client.commit(r2["reservation_id"], D("1"))
    r3 = client.reserve(U, ET, D("1"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r3["expires_at"])
    assert client.commit(r3["reservation_id"], D("1"))["status"] == "late"
    (expired,) = client.get_audit_events(kinds=["reservation.expired"])
    assert expired["reservation_id"] == r["reservation_id"]


def test_an_expiry_and_a_late_commit_in_one_transaction_keep_their_order(client, db):
    """All their rows share one time: the order of events of one time puts the expiry
    after the hold's active and before the commit's consumption and completion."""
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r["expires_at"])
    with db.transaction():
        db.execute("SELECT meter.release_expired_reservations()")
        db.execute("SELECT * FROM meter.commit(%s, 2)", (r["reservation_id"],))
    kinds = [ev["kind"] for ev in client.get_audit_events() if ev["reservation_id"]]
    assert kinds == [
        "reservation.committed",
        "ledger.consumption",
        "reservation.expired",
        "reservation.active",
    ]


def test_release_of_expired_hold_transition_carries_system_expiry(client, db):
    client.set_actor("alice")
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r["expires_at"])
    assert client.release(r["reservation_id"]) is False
    (ev,) = client.get_audit_events(kinds=["reservation.expired"])
    assert ev["actor_id"] == "system:expiry"


def test_period_audit_events(client):
    client.set_actor("ops")
    client.set_period_config(U, ET, UNIT, None, date(2024, 1, 1), D("100"), D("10"))
    client.open_period(U, ET, UNIT, None, date(2024, 1, 1))
    client.close_period(U, ET, UNIT, None, date(2024, 1, 31))
    kinds = [
        e["kind"]
        for e in client.get_audit_events(kinds=["period.config", "period.open", "period.close"])
    ]
    assert sorted(kinds) == ["period.close", "period.config", "period.open"]
    for e in client.get_audit_events(kinds=["period.config", "period.open", "period.close"]):
        assert (e["user_id"], e["event_type"], e["unit"], e["actor_id"]) == (U, ET, UNIT, "ops")


def test_audit_events_of_a_catch_up_come_in_the_order_they_are_dated(client, db):
    # A roll catching up runs every step in one transaction: its events share their time.
    # They came closes first (in no order: a close has no entry id), then opens.
    from datetime import UTC, datetime, timedelta

    t = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    d0 = t - timedelta(days=3)
    client.set_period_config("u", "tokens", "tok", None, d0, 10, 0, timedelta(days=1))
    db.execute("SELECT * FROM meter.roll_periods(NULL, %s)", (str(d0) + " 01:00+00",))
    client.consume(
        "u", "tokens", 4, "tok", event_time=datetime(d0.year, d0.month, d0.day, 12, tzinfo=UTC)
    )
    db.execute("SELECT * FROM meter.roll_periods()")  # d0 closed, three more days opened
    events = client.get_audit_events(user_id="u", limit=100)
    caught_up = [e for e in events if e["at"] == events[0]["at"]]
    day = [str(t - timedelta(days=i)) for i in range(4)]  # newest first
    assert [
        (e["kind"], e["metadata"].get("period_start") or e["metadata"].get("period_end"))
        if e["kind"].startswith("period.")
        else (e["kind"], None)
        for e in caught_up
    ] == [
        ("period.open", day[0]), ("ledger.allocation", None),
        ("period.close", day[1]), ("ledger.expiration", None),
        ("period.open", day[1]), ("ledger.allocation", None),
        ("period.close", day[2]), ("ledger.expiration", None),
        ("period.open", day[2]), ("ledger.allocation", None),
        ("period.close", day[3]), ("ledger.expiration", None),
    ]  # fmt: skip


def _audit_trail(client, db):
    """Events that share their time: a commit (its ledger row and the hold's completion),
    two holds and an allocation of one transaction, a roll catching up (one transaction)."""
    from datetime import timedelta

    client.allocate(U, ET, D("100"), UNIT)
    r = client.reserve(U, ET, D("30"), UNIT)
    client.commit(r["reservation_id"], D("10"))
    with db.transaction():
        for rid in ("hold-b", "hold-a"):
            db.execute(
                "SELECT meter.reserve(p_user_id => %s, p_event_type => %s, p_amount => 1,"
                " p_unit => %s, p_reservation_id => %s)",
                (U, ET, UNIT, rid),
            )
        db.execute(
            "SELECT meter.allocate(p_user_id => %s, p_event_type => %s, p_amount => 2,"
            " p_unit => %s)",
            (U, ET, UNIT),
        )
    t = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    d0 = t - timedelta(days=3)
    client.set_period_config("u", ET, UNIT, None, d0, 10, 0, timedelta(days=1))
    db.execute("SELECT * FROM meter.roll_periods()")


def _audit_pages(client, size, **kw):
    """Every event, paging newest first as the get_audit_events docstring says."""
    events, end, before = [], kw.pop("end_time", None), None
    for _ in range(200):
        page = client.get_audit_events(end_time=end, before_event_id=before, limit=size, **kw)
        if not page:
            return events
        events += page
        end, before = page[-1]["at"], page[-1]["event_id"]
    raise AssertionError(f"paging never ended: {[e['event_id'] for e in events]}")


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_get_audit_events_pages_through_events_of_one_time_once_each(client, db, size):
    """Paging by the last event (at, event_id) lists every event once; end_time alone,
    exclusive, skipped the events of its time a page had no room for."""
    _audit_trail(client, db)
    everything = client.get_audit_events(limit=1000)
    ids = [e["event_id"] for e in everything]
    assert len(set(ids)) == len(ids) > 20
    assert len({e["at"] for e in everything}) < len(everything) - 10  # ties, many
    # the order is total: the same at every call
    assert [e["event_id"] for e in client.get_audit_events(limit=1000)] == ids
    assert [e["event_id"] for e in _audit_pages(client, size)] == ids
    assert _audit_pages(client, size) == everything
    # filters and a range apply to every page
    mine = [e["event_id"] for e in client.get_audit_events(user_id=U, kinds=None, limit=1000)]
    assert [e["event_id"] for e in _audit_pages(client, size, user_id=U)] == mine
    reservations = [e for e in everything if e["kind"].startswith("reservation.")]
    assert [
        e["event_id"] for e in _audit_pages(client, size, kinds=sorted(
            {e["kind"] for e in reservations}))
    ] == [e["event_id"] for e in reservations]  # fmt: skip


def test_audit_event_ids_name_their_source(client):
    client.allocate(U, ET, D("5"), UNIT)
    client.reserve(U, ET, D("1"), UNIT, reservation_id="r-1")
    client.release("r-1")
    entry = client.get_ledger(U, ET, UNIT)[0]["id"]
    assert [e["event_id"] for e in client.get_audit_events()] == [
        "reservation.released:r-1",
        "reservation.active:r-1",
        f"ledger.allocation:{entry}",
    ]


def test_get_audit_events_cursor_refusals(client, db, snapshot):
    client.allocate(U, ET, D("5"), UNIT)
    last = client.get_audit_events()[0]
    before = snapshot()
    for kw in (
        {"before_event_id": last["event_id"]},  # no end_time
        {"before_event_id": last["event_id"], "end_time": T1},  # not its time
        {"before_event_id": "ledger.allocation:999999", "end_time": last["at"]},
        {"before_event_id": " x", "end_time": last["at"]},
    ):
        with pytest.raises(ValidationError) as ei:
            client.get_audit_events(**kw)
        assert ei.value.parameter == "before_event_id", kw
    with pytest.raises(psycopg.Error) as sql:
        db.execute("SELECT * FROM meter.get_audit_events(p_before_event_id => 'x')")
    assert sql.value.sqlstate == "MT001"
    assert "before_event_id" in str(sql.value)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("kinds", "says"),
    [
        (["ledger.consumtion"], "unknown kind 'ledger.consumtion' at index 0"),
        (["period.open", "ledger"], "unknown kind 'ledger' at index 1"),
        (["period.open", None], "unknown kind NULL at index 1"),
    ],
)
def test_get_audit_events_refuses_a_kind_that_names_no_event(client, db, snapshot, kinds, says):
    # A misspelt kind answered with no events, as if nothing had happened (the SDK already
    # refused it; SQL callers now get the same).
    client.consume("u", "tokens", 1, "tok")
    db.execute("SELECT meter.set_tenant('default')")
    before = snapshot()
    with pytest.raises(psycopg.Error) as exc:
        db.execute("SELECT * FROM meter.get_audit_events(p_kinds => %s)", (kinds,))
    assert snapshot() == before
    assert exc.value.sqlstate == "MT001"
    assert exc.value.diag.column_name == "kinds"
    assert says in str(exc.value)
    rows = db.execute(
        "SELECT kind FROM meter.get_audit_events(p_kinds => %s)", (["ledger.consumption"],)
    ).fetchall()
    assert [r["kind"] for r in rows] == ["ledger.consumption"]


def test_audit_pages_go_on_past_an_expiry_committed_late_between_them(client, db):
    """A sweep expires two holds at one time; the page ends at the first of them, which
    is then committed late. Its expiry keeps its at and event_id but moved from the
    completion's place in the order (seq 3) to the late expiry's (seq 1), so the next
    page, started after it, skipped the other hold's expiry."""
    client.allocate(U, ET, D("10"), UNIT)
    holds = [client.reserve(U, ET, D("1"), UNIT, reservation_id=r, ttl_seconds=1)
             for r in ("r-a", "r-b")]  # fmt: skip
    wait_until_expired(db, max(h["expires_at"] for h in holds))
    assert client.release_expired_reservations() == 2
    everything = [e["event_id"] for e in client.get_audit_events()]
    first = client.get_audit_events(limit=1)
    assert [e["event_id"] for e in first] == ["reservation.expired:r-b"]
    assert client.commit("r-b", D("1"))["status"] == "late"
    rest = client.get_audit_events(
        end_time=first[0]["at"], before_event_id=first[0]["event_id"], limit=100
    )
    assert [first[0]["event_id"], *(e["event_id"] for e in rest)] == everything


# ---------------------------------------------------------------- time windows

# A start after the end by a microsecond, and a window in months with no ledger partition.
REVERSED = [
    (T1 + timedelta(microseconds=1), T1),
    (datetime(2031, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)),
]
# Each read taking a window: its call through the SDK, and in SQL (with the window last).
WINDOW_READS = {
    "get_ledger": (
        lambda c, start, end: c.get_ledger(U, ET, UNIT, start_time=start, end_time=end),
        "SELECT * FROM meter.get_ledger(p_user_id => %s, p_event_type => %s, p_unit => %s,"
        " p_start_time => %s, p_end_time => %s)",
        (U, ET, UNIT),
    ),
    "get_usage": (
        lambda c, start, end: c.get_usage(U, start, end),
        "SELECT * FROM meter.get_usage(%s, %s, %s)",
        (U,),
    ),
    "get_namespace_usage": (
        lambda c, start, end: c.get_namespace_usage(start, end),
        "SELECT * FROM meter.get_namespace_usage(%s, %s)",
        (),
    ),
    "get_audit_events": (
        lambda c, start, end: c.get_audit_events(start_time=start, end_time=end),
        "SELECT * FROM meter.get_audit_events(p_start_time => %s, p_end_time => %s)",
        (),
    ),
}


@pytest.mark.parametrize("read", sorted(WINDOW_READS))
def test_a_window_ending_before_it_starts_is_refused(client, db, snapshot, read):
    """A start after the end answered with nothing, as if nothing had happened in the
    window (a report with its bounds swapped said a user consumed nothing): now MT001
    naming start_time, the message naming end_time too, and nothing written."""
    sdk, statement, key = WINDOW_READS[read]
    _usage_fixture(client)
    before, months = snapshot(), ledger_partitions(db)
    for start, end in REVERSED:
        with pytest.raises(ValidationError) as ei:
            sdk(client, start, end)
        assert ei.value.sqlstate == "MT001"
        assert ei.value.parameter == "start_time"
        assert str(ei.value).startswith("start_time: ") and "after end_time" in str(ei.value)
        with pytest.raises(psycopg.Error) as sql:
            db.execute(statement, (*key, start, end))
        assert sql.value.sqlstate == "MT001"
        assert sql.value.diag.column_name == "start_time"
        assert "after end_time" in sql.value.diag.message_primary
    assert snapshot() == before
    assert ledger_partitions(db) == months
    # a bound left open is unbounded, as before
    assert sdk(client, T1, None) == sdk(client, None, None)
    assert sdk(client, None, T1) == []


def test_a_reversed_window_is_refused_with_a_cursor_too(client, snapshot, app_url, make_client):
    """A cursor makes no reversed window meaningful (its entries are at end_time, before
    start_time). And a tenant's login gets the same refusal."""
    ids = [client.allocate(U, ET, D("1"), UNIT, event_time=T2)["entry_id"] for _ in range(2)]
    last = client.get_audit_events()[0]
    tenant = make_client(url=app_url)
    before = snapshot()
    for call in (
        lambda c: c.get_ledger(U, ET, UNIT, start_time=T3, end_time=T2, before_id=ids[1]),
        lambda c: c.get_audit_events(
            start_time=last["at"] + timedelta(seconds=1),
            end_time=last["at"],
            before_event_id=last["event_id"],
        ),
        lambda c: c.get_usage(U, T3, T2),
    ):
        for c in (client, tenant):
            with pytest.raises(ValidationError) as ei:
                call(c)
            assert ei.value.parameter == "start_time"
    assert snapshot() == before


def test_a_window_of_one_instant_is_empty_but_for_a_cursor(client, db):
    """start = end is not refused: [t, t) is empty, even of the entries at t, and with a
    cursor at t it holds the entries of t after the cursor (a listing's last page)."""
    a, b, c = (client.allocate(U, ET, D("9"), UNIT, event_time=T1)["entry_id"] for _ in "abc")
    client.consume(U, ET, D("1"), UNIT, event_time=T2)
    for sdk, _statement, _key in WINDOW_READS.values():
        assert sdk(client, T1, T1) == [] and sdk(client, T2, T2) == []
    assert [r["id"] for r in client.get_ledger(U, ET, UNIT, start_time=T1)] == [
        r["id"] for r in client.get_ledger(U, ET, UNIT)
    ]
    page = client.get_ledger(U, ET, UNIT, start_time=T1, end_time=T1, before_id=c)
    assert [r["id"] for r in page] == [b, a]
    # the audit trail: a commit records its ledger row and the hold's completion at one time
    rid = client.reserve(U, ET, D("2"), UNIT)["reservation_id"]
    client.commit(rid, D("1"))
    newest = client.get_audit_events(limit=2)
    assert newest[0]["at"] == newest[1]["at"]
    at = newest[0]["at"]
    assert client.get_audit_events(start_time=at, end_time=at) == []
    page = client.get_audit_events(
        start_time=at, end_time=at, before_event_id=newest[0]["event_id"]
    )
    of_that_time = [e for e in client.get_audit_events(start_time=at, limit=1000) if e["at"] == at]
    assert page == of_that_time[1:]
    assert page and page[0] == newest[1]


def test_a_reversed_window_is_refused_by_name_in_any_zone_and_date_style(db_url, db, snapshot):
    """The refusal's message prints both bounds in the session's TimeZone and DateStyle;
    the parameter comes from the error's COLUMN, so a caller's connection in another zone
    and style still gets start_time. Infinite bounds compare as PostgreSQL orders them."""
    from meter import MeterClient

    options = "-c TimeZone=America/New_York -c DateStyle=SQL,DMY"
    with psycopg.connect(db_url, options=options, autocommit=True) as conn:
        client = MeterClient(conn)
        client.allocate(U, ET, D("5"), UNIT, event_time=T1)
        before = snapshot()
        for sdk, _statement, _key in WINDOW_READS.values():
            with pytest.raises(ValidationError) as ei:
                sdk(client, T2, T1)
            assert ei.value.parameter == "start_time"
            assert "after end_time" in str(ei.value)
            assert sdk(client, T1, T1) == []
        assert snapshot() == before
        assert conn.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
    db.execute("SET TimeZone = 'Asia/Kolkata'")
    db.execute("SET DateStyle = 'German, DMY'")
    for _sdk, statement, key in WINDOW_READS.values():
        for start, end in (("infinity", "-infinity"), ("infinity", T1), (T1, "-infinity")):
            with pytest.raises(psycopg.Error) as sql:
                db.execute(statement, (*key, start, end))
            assert sql.value.sqlstate == "MT001"
            assert sql.value.diag.column_name == "start_time"
        for start, end in (
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
            ("infinity", None),
        ):
            assert db.execute(statement, (*key, start, end)).fetchall() == []
    assert snapshot() == before
