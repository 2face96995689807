"""Recording functions: allocate, consume, reserve, commit, release, adjust (SPEC 2-3, App. C)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from psycopg.types.json import Jsonb

from meter.errors import IdempotencyConflictError, NotFoundError, ValidationError
from tests.fix_db import wait_until_expired

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"


# ---------------------------------------------------------------- helpers


def ledger_rows(db, user_id=U, event_type=ET, unit=UNIT, resource="", namespace="default"):
    return db.execute(
        "SELECT * FROM meter.ledger WHERE namespace = %s"
        " AND user_id IS NOT DISTINCT FROM %s::text"
        " AND event_type = %s AND unit = %s AND resource = %s ORDER BY id",
        (namespace, user_id, event_type, unit, resource),
    ).fetchall()


def account_rows(db, user_id=U, event_type=ET, unit=UNIT, namespace="default"):
    return db.execute(
        "SELECT * FROM meter.accounts WHERE namespace = %s"
        " AND user_id IS NOT DISTINCT FROM %s::text AND event_type = %s AND unit = %s",
        (namespace, user_id, event_type, unit),
    ).fetchall()


def reservation_row(db, reservation_id):
    return db.execute(
        "SELECT * FROM meter.reservations WHERE reservation_id = %s", (reservation_id,)
    ).fetchone()


def count(db, sql, params=()):
    return db.execute(f"SELECT count(*) AS n FROM ({sql}) q", params).fetchone()["n"]


def balance(client, user_id=U, event_type=ET, unit=UNIT, resource=None):
    return client.get_balance(user_id, event_type, unit, resource)


# ---------------------------------------------------------------- allocate


def test_allocate_credits_and_writes_one_allocation_row(client, db):
    r1 = client.allocate(U, ET, D("10"), UNIT)
    assert r1["balance"] == D("10")
    assert isinstance(r1["entry_id"], int)
    r2 = client.allocate(U, ET, D("2.5"), UNIT)
    assert r2["balance"] == D("12.5")
    assert r2["entry_id"] != r1["entry_id"]

    rows = ledger_rows(db)
    assert [(r["id"], r["entry_type"], r["amount"], r["balance_after"]) for r in rows] == [
        (r1["entry_id"], "allocation", D("10"), D("10")),
        (r2["entry_id"], "allocation", D("2.5"), D("12.5")),
    ]
    assert balance(client) == {"balance": D("12.5"), "reserved": D("0"), "available": D("12.5")}


def test_allocate_stores_metadata_and_event_time(client, db):
    when = db.execute("SELECT now() - interval '3 days' AS t").fetchone()["t"]
    r = client.allocate(U, ET, 7, UNIT, event_time=when, metadata={"src": "plan", "n": 1})
    row = db.execute("SELECT * FROM meter.ledger WHERE id = %s", (r["entry_id"],)).fetchone()
    assert row["event_time"] == when
    assert row["metadata"] == {"src": "plan", "n": 1}
    assert row["amount"] == D("7")


@pytest.mark.parametrize("amount", [D("0"), D("-1")])
def test_allocate_requires_positive_amount(client, snapshot, amount):
    client.allocate(U, ET, 5, UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.allocate(U, ET, amount, UNIT)
    assert ei.value.parameter == "amount" or "amount" in str(ei.value)
    assert snapshot() == before


# ---------------------------------------------------------------- consume


def test_consume_without_check_may_go_negative(client, db):
    client.allocate(U, ET, 10, UNIT)
    r = client.consume(U, ET, D("15"), UNIT)
    assert r["success"] is True
    assert r["balance"] == D("-5")
    assert r["available"] == D("-5")
    assert isinstance(r["entry_id"], int)
    rows = ledger_rows(db)
    assert [(r_["entry_type"], r_["amount"], r_["balance_after"]) for r_ in rows] == [
        ("allocation", D("10"), D("10")),
        ("consumption", D("-15"), D("-5")),
    ]
    assert rows[-1]["id"] == r["entry_id"]


def test_consume_default_is_unchecked_on_unknown_account(client, db):
    r = client.consume(U, ET, D("3"), UNIT)
    assert r["success"] is True
    assert r["balance"] == D("-3")
    assert r["available"] == D("-3")
    assert len(account_rows(db)) == 1


def test_consume_with_check_balance_succeeds_when_available(client):
    client.allocate(U, ET, 10, UNIT)
    r = client.consume(U, ET, D("10"), UNIT, check_balance=True)
    assert r["success"] is True
    assert r["balance"] == D("0")
    assert r["available"] == D("0")
    assert r["entry_id"] is not None


def test_consume_refused_by_check_balance_changes_nothing(client, snapshot):
    client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    r = client.consume(U, ET, D("10.000000000001"), UNIT, check_balance=True)
    assert r == {"success": False, "balance": D("10"), "available": D("10"), "entry_id": None}
    assert snapshot() == before


def test_consume_check_balance_counts_reserved(client, snapshot):
    client.allocate(U, ET, 10, UNIT)
    client.reserve(U, ET, D("8"), UNIT)
    before = snapshot()
    r = client.consume(U, ET, D("3"), UNIT, check_balance=True)
    assert r == {"success": False, "balance": D("10"), "available": D("2"), "entry_id": None}
    assert snapshot() == before
    ok = client.consume(U, ET, D("2"), UNIT, check_balance=True)
    assert ok["success"] is True
    assert ok["balance"] == D("8")
    assert ok["available"] == D("0")


def test_refused_consume_creates_no_account_row(client, db, snapshot):
    before = snapshot()
    r = client.consume("newbie", ET, D("1"), UNIT, check_balance=True)
    assert r == {"success": False, "balance": D("0"), "available": D("0"), "entry_id": None}
    assert account_rows(db, user_id="newbie") == []
    assert client.get_account("newbie", ET, UNIT) is None
    assert snapshot() == before


# ---------------------------------------------------------------- reserve


def test_reserve_granted_raises_reserved_not_balance(client, db):
    client.allocate(U, ET, 10, UNIT)
    n_ledger = len(ledger_rows(db))
    r = client.reserve(U, ET, D("4"), UNIT)
    assert r["granted"] is True
    assert isinstance(r["reservation_id"], str) and r["reservation_id"]
    assert r["balance"] == D("10")
    assert r["available"] == D("6")
    assert r["expires_at"] is not None
    assert balance(client) == {"balance": D("10"), "reserved": D("4"), "available": D("6")}
    assert len(ledger_rows(db)) == n_ledger  # a hold is not a ledger entry
    res = reservation_row(db, r["reservation_id"])
    assert res["status"] == "active"
    assert res["amount"] == D("4")
    assert res["expires_at"] == r["expires_at"]
    assert res["user_id"] == U and res["event_type"] == ET and res["unit"] == UNIT
    assert res["resource"] == ""


def test_reserve_exactly_available_is_granted(client):
    client.allocate(U, ET, 10, UNIT)
    client.reserve(U, ET, D("4"), UNIT)
    r = client.reserve(U, ET, D("6"), UNIT)
    assert r["granted"] is True
    assert r["available"] == D("0")


def test_reserve_not_granted_changes_nothing(client, snapshot):
    client.allocate(U, ET, 10, UNIT)
    client.reserve(U, ET, D("4"), UNIT)
    before = snapshot()
    r = client.reserve(U, ET, D("6.000000000001"), UNIT)
    assert r == {
        "granted": False,
        "reservation_id": None,
        "balance": D("10"),
        "available": D("6"),
        "expires_at": None,
    }
    assert snapshot() == before


def test_reserve_not_granted_on_unknown_account_creates_no_row(client, db, snapshot):
    before = snapshot()
    r = client.reserve("newbie", ET, D("1"), UNIT)
    assert r["granted"] is False
    assert r["reservation_id"] is None
    assert r["balance"] == D("0") and r["available"] == D("0")
    assert account_rows(db, user_id="newbie") == []
    assert snapshot() == before


def _ttl_of(db, reservation_id):
    return db.execute(
        "SELECT expires_at - created_at AS ttl FROM meter.reservations WHERE reservation_id = %s",
        (reservation_id,),
    ).fetchone()["ttl"]


def test_reserve_default_ttl_is_300_seconds(client, db):
    client.allocate(U, ET, 10, UNIT)
    r = client.reserve(U, ET, 1, UNIT)
    ttl = _ttl_of(db, r["reservation_id"])
    assert abs(ttl - timedelta(seconds=300)) < timedelta(seconds=1)
    now = db.execute("SELECT now() AS t").fetchone()["t"]
    assert timedelta(seconds=295) < r["expires_at"] - now <= timedelta(seconds=300)


@pytest.mark.parametrize("ttl", [1, 86400])
def test_reserve_ttl_bounds_accepted(client, db, ttl):
    client.allocate(U, ET, 10, UNIT)
    r = client.reserve(U, ET, 1, UNIT, ttl_seconds=ttl)
    assert r["granted"] is True
    assert abs(_ttl_of(db, r["reservation_id"]) - timedelta(seconds=ttl)) < timedelta(seconds=1)


@pytest.mark.parametrize("ttl", [0, -1, 86401])
def test_reserve_ttl_out_of_bounds_refused(client, snapshot, ttl):
    client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.reserve(U, ET, 1, UNIT, ttl_seconds=ttl)
    assert ei.value.parameter == "ttl_seconds" or "ttl_seconds" in str(ei.value)
    assert snapshot() == before


# ---------------------------------------------------------------- commit


def _reserve(client, amount=D("6"), allocate=D("10"), **kw):
    if allocate:
        client.allocate(U, ET, allocate, UNIT)
    r = client.reserve(U, ET, amount, UNIT, **kw)
    assert r["granted"] is True
    return r["reservation_id"]


def test_commit_less_than_hold(client, db):
    rid = _reserve(client)
    r = client.commit(rid, D("4"))
    assert r["success"] is True
    assert r["status"] == "committed"
    assert r["consumed"] == D("4")
    assert r["released"] == D("2")
    assert r["reserved_amount"] == D("6")
    assert r["balance"] == D("6")
    assert isinstance(r["entry_id"], int)
    assert balance(client) == {"balance": D("6"), "reserved": D("0"), "available": D("6")}
    rows = ledger_rows(db)
    assert len(rows) == 2
    assert rows[-1]["id"] == r["entry_id"]
    assert rows[-1]["entry_type"] == "consumption"
    assert rows[-1]["amount"] == D("-4")
    assert rows[-1]["balance_after"] == D("6")
    assert rows[-1]["reservation_id"] == rid
    res = reservation_row(db, rid)
    assert res["status"] == "committed"
    assert res["actual_amount"] == D("4")
    assert res["completed_at"] is not None


def test_commit_equal_to_hold(client):
    rid = _reserve(client)
    r = client.commit(rid, D("6"))
    assert (r["success"], r["status"]) == (True, "committed")
    assert (r["consumed"], r["released"], r["reserved_amount"], r["balance"]) == (
        D("6"),
        D("0"),
        D("6"),
        D("4"),
    )
    assert balance(client) == {"balance": D("4"), "reserved": D("0"), "available": D("4")}


def test_commit_overage_may_drive_balance_negative(client, db):
    rid = _reserve(client)
    r = client.commit(rid, D("15"))
    assert (r["success"], r["status"]) == (True, "committed")
    assert (r["consumed"], r["released"], r["reserved_amount"], r["balance"]) == (
        D("15"),
        D("0"),
        D("6"),
        D("-5"),
    )
    assert balance(client) == {"balance": D("-5"), "reserved": D("0"), "available": D("-5")}
    assert ledger_rows(db)[-1]["amount"] == D("-15")


def test_commit_zero_writes_no_row(client, db):
    rid = _reserve(client)
    n = len(ledger_rows(db))
    r = client.commit(rid, 0)
    assert r["success"] is True
    assert r["status"] == "committed"
    assert r["consumed"] == D("0")
    assert r["released"] == D("6")
    assert r["reserved_amount"] == D("6")
    assert r["balance"] == D("10")
    assert r["entry_id"] is None
    assert len(ledger_rows(db)) == n
    assert balance(client) == {"balance": D("10"), "reserved": D("0"), "available": D("10")}
    assert reservation_row(db, rid)["status"] == "committed"


def test_commit_negative_actual_refused(client, snapshot):
    rid = _reserve(client)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.commit(rid, D("-1"))
    assert ei.value.parameter == "actual_amount" or "actual_amount" in str(ei.value)
    assert snapshot() == before


def test_late_commit_before_sweep_records_usage(client, db):
    client.allocate(U, ET, 10, UNIT)
    r0 = client.reserve(U, ET, D("6"), UNIT, ttl_seconds=1)
    rid = r0["reservation_id"]
    wait_until_expired(db, r0["expires_at"])
    assert reservation_row(db, rid)["status"] == "active"  # not swept yet
    r = client.commit(rid, D("4"))
    assert r["success"] is True
    assert r["status"] == "late"
    assert r["consumed"] == D("4")
    assert r["released"] == D("0")
    assert r["reserved_amount"] == D("6")
    assert r["balance"] == D("6")
    assert isinstance(r["entry_id"], int)
    assert balance(client) == {"balance": D("6"), "reserved": D("0"), "available": D("6")}
    res = reservation_row(db, rid)
    assert res["status"] == "committed"
    assert res["actual_amount"] == D("4")
    assert ledger_rows(db)[-1]["amount"] == D("-4")
    # the sweep finds nothing left to do and the books still balance
    assert client.release_expired_reservations() == 0
    assert client.reconcile() == []


def test_late_commit_after_sweep_records_usage(client, db):
    client.allocate(U, ET, 10, UNIT)
    r0 = client.reserve(U, ET, D("6"), UNIT, ttl_seconds=1)
    rid = r0["reservation_id"]
    wait_until_expired(db, r0["expires_at"])
    assert client.release_expired_reservations() == 1
    assert reservation_row(db, rid)["status"] == "expired"
    assert balance(client) == {"balance": D("10"), "reserved": D("0"), "available": D("10")}
    r = client.commit(rid, D("4"))
    assert r["success"] is True
    assert r["status"] == "late"
    assert (r["consumed"], r["released"], r["reserved_amount"], r["balance"]) == (
        D("4"),
        D("0"),
        D("6"),
        D("6"),
    )
    assert balance(client) == {"balance": D("6"), "reserved": D("0"), "available": D("6")}
    assert reservation_row(db, rid)["status"] == "committed"
    assert client.reconcile() == []


def test_commit_of_released_reservation(client, snapshot):
    rid = _reserve(client)
    assert client.release(rid) is True
    before = snapshot()
    r = client.commit(rid, D("4"))
    assert r == {
        "success": False,
        "consumed": None,
        "released": None,
        "reserved_amount": D("6"),
        "balance": None,
        "entry_id": None,
        "status": "released",
    }
    assert snapshot() == before


def test_commit_of_unknown_reservation(client, snapshot):
    client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    r = client.commit("no-such-reservation", D("4"))
    assert r == {
        "success": False,
        "consumed": None,
        "released": None,
        "reserved_amount": None,
        "balance": None,
        "entry_id": None,
        "status": "not_found",
    }
    assert snapshot() == before


def test_commit_replay_same_amount_returns_original(client, snapshot):
    rid = _reserve(client)
    first = client.commit(rid, D("4"), metadata={"k": "v"})
    client.allocate(U, ET, 100, UNIT)  # balance moves on; the replay reports the original
    before = snapshot()
    again = client.commit(rid, "4.000", metadata={"k": "v"})
    assert again["success"] is True
    assert again["status"] == "replayed"
    for col in ("consumed", "released", "reserved_amount", "balance", "entry_id"):
        assert again[col] == first[col], col
    assert again["balance"] == D("6")
    assert snapshot() == before


def test_commit_replay_of_zero_commit(client, snapshot):
    rid = _reserve(client)
    client.commit(rid, 0)
    before = snapshot()
    again = client.commit(rid, D("0"))
    assert (again["success"], again["status"], again["entry_id"]) == (True, "replayed", None)
    assert (again["consumed"], again["released"], again["reserved_amount"]) == (
        D("0"),
        D("6"),
        D("6"),
    )
    assert snapshot() == before


def test_commit_replay_different_amount_conflicts(client, snapshot):
    rid = _reserve(client)
    client.commit(rid, D("4"))
    before = snapshot()
    with pytest.raises(IdempotencyConflictError):
        client.commit(rid, D("5"))
    assert snapshot() == before
    assert balance(client)["balance"] == D("6")


# ---------------------------------------------------------------- release


def test_release_once_then_false(client, db, snapshot):
    rid = _reserve(client)
    n = len(ledger_rows(db))
    assert client.release(rid) is True
    assert balance(client) == {"balance": D("10"), "reserved": D("0"), "available": D("10")}
    assert len(ledger_rows(db)) == n
    res = reservation_row(db, rid)
    assert res["status"] == "released"
    assert res["completed_at"] is not None
    before = snapshot()
    assert client.release(rid) is False
    assert snapshot() == before


def test_release_unknown_and_committed_are_false(client, snapshot):
    rid = _reserve(client)
    client.commit(rid, 1)
    before = snapshot()
    assert client.release(rid) is False
    assert client.release("never-existed") is False
    assert snapshot() == before


def test_release_of_expired_hold_is_false_and_returns_hold(client, db):
    client.allocate(U, ET, 10, UNIT)
    r0 = client.reserve(U, ET, D("6"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r0["expires_at"])
    assert client.release(r0["reservation_id"]) is False
    assert reservation_row(db, r0["reservation_id"])["status"] == "expired"
    assert balance(client) == {"balance": D("10"), "reserved": D("0"), "available": D("10")}
    assert client.reconcile() == []


def test_release_of_swept_hold_is_false(client, db):
    client.allocate(U, ET, 10, UNIT)
    r0 = client.reserve(U, ET, D("6"), UNIT, ttl_seconds=1)
    wait_until_expired(db, r0["expires_at"])
    assert client.release_expired_reservations() == 1
    assert client.release(r0["reservation_id"]) is False
    assert reservation_row(db, r0["reservation_id"])["status"] == "expired"


# ---------------------------------------------------------------- adjust


def test_adjust_both_signs(client, db):
    client.allocate(U, ET, 10, UNIT)
    up = client.adjust(U, ET, D("5"), UNIT)
    assert up["balance"] == D("15")
    down = client.adjust(U, ET, D("-3.5"), UNIT)
    assert down["balance"] == D("11.5")
    rows = ledger_rows(db)
    assert [(r["entry_type"], r["amount"], r["balance_after"]) for r in rows[1:]] == [
        ("adjustment", D("5"), D("15")),
        ("adjustment", D("-3.5"), D("11.5")),
    ]
    assert [r["id"] for r in rows[1:]] == [up["entry_id"], down["entry_id"]]


def test_adjust_may_drive_balance_negative(client):
    client.allocate(U, ET, 1, UNIT)
    assert client.adjust(U, ET, D("-3"), UNIT)["balance"] == D("-2")


def test_adjust_zero_refused(client, snapshot):
    client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.adjust(U, ET, D("0"), UNIT)
    assert ei.value.parameter == "amount" or "amount" in str(ei.value)
    assert snapshot() == before


def test_adjust_reference_id(client, db):
    c = client.consume(U, ET, D("4"), UNIT)
    r = client.adjust(U, ET, D("4"), UNIT, reference_id=c["entry_id"], metadata={"why": "refund"})
    row = db.execute("SELECT * FROM meter.ledger WHERE id = %s", (r["entry_id"],)).fetchone()
    assert row["reference_id"] == c["entry_id"]
    assert row["metadata"] == {"why": "refund"}
    assert r["balance"] == D("0")
    ledger = client.get_ledger(U, ET, UNIT)
    assert ledger[0]["id"] == r["entry_id"]
    assert ledger[0]["reference_id"] == c["entry_id"]


def test_adjust_unknown_reference_id_not_found(client, snapshot):
    e = client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    with pytest.raises(NotFoundError):
        client.adjust(U, ET, D("1"), UNIT, reference_id=e["entry_id"] + 1000)
    assert snapshot() == before


def test_adjust_reference_id_of_other_namespace_not_found(client, make_client, snapshot):
    other = make_client(namespace="other")
    e = other.allocate(U, ET, 10, UNIT)
    client.allocate(U, ET, 10, UNIT)
    before = snapshot()
    with pytest.raises(NotFoundError):
        client.adjust(U, ET, D("1"), UNIT, reference_id=e["entry_id"])
    assert snapshot() == before


# ---------------------------------------------------------------- pools


def test_pool_account_allocate_adjust_and_queries(client, db):
    a = client.allocate(None, ET, D("100"), UNIT)
    assert a["balance"] == D("100")
    j = client.adjust(None, ET, D("-10"), UNIT)
    assert j["balance"] == D("90")
    client.allocate(U, ET, D("1"), UNIT)  # a user account beside the pool
    assert balance(client, user_id=None) == {
        "balance": D("90"),
        "reserved": D("0"),
        "available": D("90"),
    }
    assert balance(client)["balance"] == D("1")
    acct = client.get_account(None, ET, UNIT)
    assert acct["user_id"] is None
    assert acct["balance"] == D("90")
    assert acct["total_credited"] == D("100")
    assert acct["total_debited"] == D("10")
    ledger = client.get_ledger(None, ET, UNIT)
    assert [(r["entry_type"], r["amount"]) for r in ledger] == [
        ("adjustment", D("-10")),
        ("allocation", D("100")),
    ]
    rows = account_rows(db, user_id=None)
    assert len(rows) == 1 and rows[0]["user_id"] is None


def test_pool_account_periods(client, db):
    client.set_period_config(None, ET, UNIT, None, date(2024, 1, 1), D("50"), D("10"))
    assert client.open_period(None, ET, UNIT, None, date(2024, 1, 1)) == D("50")
    closed = client.close_period(None, ET, UNIT, None, date(2024, 1, 31))
    assert closed == {"expired": D("40"), "carried_over": D("10"), "new_balance": D("10")}
    rows = ledger_rows(db, user_id=None)
    assert [(r["entry_type"], r["amount"]) for r in rows] == [
        ("allocation", D("50")),
        ("expiration", D("-50")),
        ("carry_over", D("10")),
    ]
    assert rows[0]["event_time"] == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("op", ["consume", "reserve"])
def test_pool_cannot_consume_or_reserve(client, snapshot, op):
    client.allocate(None, ET, D("100"), UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        getattr(client, op)(None, ET, D("1"), UNIT)
    assert ei.value.parameter == "user_id" or "user_id" in str(ei.value)
    assert snapshot() == before


# ---------------------------------------------------------------- resource normalisation


def test_resource_none_and_empty_are_the_same_account(client, db):
    client.allocate(U, ET, D("5"), UNIT, resource=None)
    r = client.allocate(U, ET, D("3"), UNIT, resource="")
    assert r["balance"] == D("8")
    assert balance(client, resource=None)["balance"] == D("8")
    assert balance(client, resource="")["balance"] == D("8")
    rows = account_rows(db)
    assert len(rows) == 1
    assert rows[0]["resource"] == ""
    assert client.get_account(U, ET, UNIT, "")["resource"] == ""
    assert len(client.get_ledger(U, ET, UNIT, None)) == 2
    assert len(client.get_ledger(U, ET, UNIT, "")) == 2


def test_distinct_resources_are_distinct_accounts(client):
    client.allocate(U, ET, D("5"), UNIT, resource="gpt-4")
    client.allocate(U, ET, D("3"), UNIT)
    assert balance(client, resource="gpt-4")["balance"] == D("5")
    assert balance(client)["balance"] == D("3")


# ---------------------------------------------------------------- lifetime totals


def test_total_credited_and_debited(client, db):
    client.allocate(U, ET, D("10"), UNIT)
    client.consume(U, ET, D("3"), UNIT)
    client.adjust(U, ET, D("2"), UNIT)
    client.adjust(U, ET, D("-1"), UNIT)
    rid = client.reserve(U, ET, D("5"), UNIT)["reservation_id"]
    client.commit(rid, D("4"))
    rid2 = client.reserve(U, ET, D("1"), UNIT)["reservation_id"]
    client.release(rid2)
    client.consume(U, ET, D("100"), UNIT, check_balance=True)  # refused: no effect
    acct = client.get_account(U, ET, UNIT)
    assert acct["total_credited"] == D("12")
    assert acct["total_debited"] == D("8")
    assert acct["balance"] == D("4")
    assert acct["reserved"] == D("0")
    assert client.reconcile() == []


# ---------------------------------------------------------------- namespaces


def test_reservation_of_another_namespace_is_unknown(client, make_client, snapshot):
    other = make_client(namespace="other")
    other.allocate(U, ET, D("10"), UNIT)
    rid = other.reserve(U, ET, D("4"), UNIT)["reservation_id"]
    before = snapshot()
    r = client.commit(rid, D("1"))
    assert (r["success"], r["status"], r["entry_id"]) == (False, "not_found", None)
    assert client.release(rid) is False
    assert snapshot() == before
    assert other.commit(rid, D("1"))["status"] == "committed"


def test_accounts_are_per_namespace(client, make_client, db):
    other = make_client(namespace="other")
    client.allocate(U, ET, D("10"), UNIT)
    other.allocate(U, ET, D("3"), UNIT)
    assert balance(client)["balance"] == D("10")
    assert balance(other)["balance"] == D("3")
    assert len(account_rows(db, namespace="other")) == 1


def test_the_reservations_table_refuses_an_inconsistent_hold(client, db, snapshot):
    import psycopg

    client.allocate(U, ET, 100, UNIT)
    ids = {fate: client.reserve(U, ET, D("5"), UNIT)["reservation_id"]
           for fate in ("active", "used", "unused", "released")}  # fmt: skip
    client.commit(ids["used"], D("3"))
    client.commit(ids["unused"], D("0"))
    client.release(ids["released"])
    rows = {r["reservation_id"]: r for r in db.execute("SELECT * FROM meter.reservations")}
    assert rows[ids["used"]]["entry_id"] is not None
    assert rows[ids["unused"]]["entry_id"] is None  # nothing consumed: no ledger entry
    before = snapshot()

    bad = [
        ("status = 'committed'", "active"),  # committed without actual amount or result
        ("completed_at = now()", "active"),  # active yet completed
        ("actual_amount = 1", "active"),
        ("ttl_seconds = 0", "active"),
        ("ttl_seconds = 86401", "active"),
        ("completed_at = NULL", "used"),
        ("actual_amount = -1", "used"),
        ("actual_amount = NULL", "used"),
        ("entry_id = NULL", "used"),  # consumed, but no ledger entry
        ("entry_id = 1", "unused"),  # nothing consumed, yet a ledger entry
        ("commit_result = NULL", "unused"),
        ("status = 'active'", "released"),  # back to active while marked completed
        ("actual_amount = 2", "released"),
        ("status = 'expired', entry_id = 1", "released"),
        ("status = 'pending'", "active"),
    ]
    for assignment, fate in bad:
        with pytest.raises(psycopg.errors.CheckViolation) as refused, db.transaction():
            db.execute(
                f"UPDATE meter.reservations SET {assignment} WHERE reservation_id = %s",
                (ids[fate],),
            )
        assert refused.value.diag.constraint_name in (
            "reservations_consistent",
            "reservations_status_check",
        ), assignment
    assert snapshot() == before
    # the outcomes the API writes pass: expiring the active hold is one of them
    db.execute(
        "UPDATE meter.reservations SET expires_at = now() - interval '1 second'"
        " WHERE reservation_id = %s",
        (ids["active"],),
    )
    assert db.execute("SELECT meter.release_expired_reservations()").fetchone() is not None
    status = db.execute(
        "SELECT status FROM meter.reservations WHERE reservation_id = %s", (ids["active"],)
    ).fetchone()
    assert list(status.values()) == ["expired"]


# ---------------------------------------------------------------- holds past their TTL


def _expired_hold(client, db, amount="30"):
    """An active hold whose TTL has passed, not swept yet."""
    r = client.reserve(U, ET, D(amount), UNIT, ttl_seconds=1)
    wait_until_expired(db, r["expires_at"])
    assert reservation_row(db, r["reservation_id"])["status"] == "active"
    return r["reservation_id"]


def test_checked_consume_is_not_refused_for_an_expired_hold(client, db):
    client.allocate(U, ET, 100, UNIT)
    rid = _expired_hold(client, db)
    r = client.consume(U, ET, D("80"), UNIT, check_balance=True)
    assert (r["success"], r["balance"], r["available"]) == (True, D("20"), D("20"))
    hold = reservation_row(db, rid)
    assert hold["status"] == "expired"
    assert hold["completed_actor"] == {"actor_id": "system:expiry"}
    assert balance(client) == {"balance": D("20"), "reserved": D("0"), "available": D("20")}
    assert client.release_expired_reservations() == 0
    assert client.reconcile() == []


def test_reserve_is_granted_past_an_expired_hold(client, db):
    client.allocate(U, ET, 100, UNIT)
    rid = _expired_hold(client, db)
    r = client.reserve(U, ET, D("80"), UNIT)
    assert (r["granted"], r["available"]) == (True, D("20"))
    assert reservation_row(db, rid)["status"] == "expired"
    assert balance(client)["reserved"] == D("80")
    assert client.reconcile() == []


def test_a_refusal_that_expired_holds_would_not_save_changes_nothing(client, db, snapshot):
    client.allocate(U, ET, 100, UNIT)
    rid = _expired_hold(client, db)
    before = snapshot()
    r = client.consume(U, ET, D("101"), UNIT, check_balance=True)
    assert (r["success"], r["balance"]) == (False, D("100"))
    assert client.reserve(U, ET, D("101"), UNIT)["granted"] is False
    assert snapshot() == before  # the hold too: left to the sweep
    assert reservation_row(db, rid)["status"] == "active"
    assert client.release_expired_reservations() == 1
    assert client.reconcile() == []


def test_a_refusal_reports_what_is_available_without_expired_holds(client, db):
    client.allocate(U, ET, 100, UNIT)
    _expired_hold(client, db, "60")
    client.reserve(U, ET, D("30"), UNIT)  # still active
    r = client.consume(U, ET, D("80"), UNIT, check_balance=True)
    assert (r["success"], r["balance"], r["available"]) == (False, D("100"), D("70"))
    assert client.reserve(U, ET, D("80"), UNIT)["available"] == D("70")
    assert client.consume(U, ET, D("70"), UNIT, check_balance=True)["success"] is True
    assert client.reconcile() == []


def _stored_reserved(db):
    return account_rows(db)[0]["reserved"]


@pytest.mark.parametrize("check_balance", [False, True])
def test_a_consume_reports_available_without_expired_holds(client, db, check_balance):
    """Appendix C: a hold past its TTL reserves nothing, swept or not; a write's result
    says so as get_balance does, and a replay returns the same figures (028)."""
    client.allocate(U, ET, 100, UNIT)
    rid = _expired_hold(client, db, "30")
    client.reserve(U, ET, D("20"), UNIT)  # still active
    r = client.consume(U, ET, D("10"), UNIT, check_balance=check_balance, idempotency_key="c1")
    assert (r["success"], r["balance"], r["available"]) == (True, D("90"), D("70"))
    assert balance(client) == {"balance": D("90"), "reserved": D("20"), "available": D("70")}
    assert client.consume(U, ET, D("2"), UNIT, check_balance=check_balance)["available"] == D("68")
    # the stored figures are the sweep's to change, as for the reads
    assert reservation_row(db, rid)["status"] == "active"
    assert _stored_reserved(db) == D("50")
    assert client.consume(U, ET, D("10"), UNIT, check_balance=check_balance,
                          idempotency_key="c1") == r  # fmt: skip
    assert client.release_expired_reservations() == 1
    assert client.consume(U, ET, D("10"), UNIT, check_balance=check_balance,
                          idempotency_key="c1") == r  # fmt: skip
    assert client.reconcile() == []


def test_a_reserve_reports_available_without_expired_holds(client, db):
    client.allocate(U, ET, 100, UNIT)
    _expired_hold(client, db, "30")
    r = client.reserve(U, ET, D("20"), UNIT, idempotency_key="r1", reservation_id="h1")
    assert (r["granted"], r["balance"], r["available"]) == (True, D("100"), D("80"))
    assert balance(client)["available"] == D("80")
    assert _stored_reserved(db) == D("50")
    # replays, by the hold's id and by the key, return what the first call did
    assert client.reserve(U, ET, D("20"), UNIT, idempotency_key="r1", reservation_id="h1") == r
    assert reservation_row(db, "h1")["reserve_result"]["available"] == 80
    key = db.execute("SELECT result FROM meter.idempotency_keys WHERE key = 'r1'").fetchone()
    assert D(str(key["result"]["available"])) == D("80")
    assert client.reserve(U, ET, D("5"), UNIT)["available"] == D("75")
    assert client.release_expired_reservations() == 1
    assert client.reconcile() == []


def test_a_batch_reports_available_without_expired_holds(client, db):
    """apply_events' batch path (two events or more), and its replay: each account's own
    holds past their TTL, once per event whatever the number of events on the account."""
    client.allocate(U, ET, 100, UNIT)
    client.allocate("u2", ET, 100, UNIT)
    client.allocate("u3", ET, 50, UNIT)
    client.reserve("u3", ET, D("7"), UNIT, ttl_seconds=1)  # past its TTL with u1's below
    _expired_hold(client, db, "30")
    client.reserve(U, ET, D("20"), UNIT)  # still active

    def consume(user, amount, key=None):
        args = {"user_id": user, "event_type": ET, "unit": UNIT, "amount": amount}
        if key:
            args["idempotency_key"] = key
        return {"op": "consume", "namespace": "default", "args": args}

    allocate = {"op": "allocate", "namespace": "default",
                "args": {"user_id": U, "event_type": ET, "unit": UNIT, "amount": "1",
                         "idempotency_key": "b2"}}  # fmt: skip
    events = Jsonb([consume(U, "10", "b1"), consume("u2", "1"), consume(U, "5"), allocate,
                    consume("u3", "3", "b3")])  # fmt: skip
    apply = "SELECT idx, status, result FROM meter.apply_events(%s) ORDER BY idx"
    rows = db.execute(apply, (events,)).fetchall()
    assert [r["status"] for r in rows] == ["applied"] * 5
    available = [D(str(r["result"].get("available"))) for r in rows if r["idx"] != 3]
    assert available == [D("70"), D("99"), D("65"), D("47")]
    assert balance(client)["available"] == D("66")
    assert balance(client, "u3")["available"] == D("47")
    assert _stored_reserved(db) == D("50")
    again = db.execute(apply, (events,)).fetchall()
    assert [r["status"] for r in again] == ["replayed", "applied", "applied", "replayed",
                                            "replayed"]  # fmt: skip
    assert [again[i]["result"] for i in (0, 3, 4)] == [rows[i]["result"] for i in (0, 3, 4)]
    assert client.consume(U, ET, D("10"), UNIT, idempotency_key="b1")["available"] == D("70")
    assert client.consume("u3", ET, D("3"), UNIT, idempotency_key="b3")["available"] == D("47")
    assert client.release_expired_reservations() == 2
    assert client.reconcile() == []


# ---------------------------------------------------------------- lifecycle against a model


@pytest.mark.parametrize("seed", range(4))
def test_hold_lifecycle_with_expiry_agrees_with_a_model(client, db, seed):
    # The property test's holds never expire. Here holds are aged past their TTL (their
    # expires_at moved back, as a clock would) among reserves, replays, commits (less,
    # more, zero, again), releases, sweeps and checked consumes; after every step the
    # reads, get_stats and reconcile agree with a model in which a hold past its TTL
    # reserves nothing, swept or not (Appendix C), and its commit is 'late'.
    rng = random.Random(seed)
    users = ["a", "b"]
    bal = {u: D("100") for u in users}
    holds: dict[str, dict] = {}
    for u in users:
        client.allocate(u, ET, D("100"), UNIT)

    def held(u: str) -> Decimal:
        return sum(
            (h["amount"] for h in holds.values() if h["user"] == u and h["status"] == "active"),
            D("0"),
        )

    for step in range(150):
        op = rng.choice(["reserve", "reserve", "replay", "commit", "commit", "release", "age",
                         "sweep", "consume"])  # fmt: skip
        u = rng.choice(users)
        if op == "reserve":
            amount, rid = D(rng.randint(1, 60)), f"r{step}"
            r = client.reserve(u, ET, amount, UNIT, reservation_id=rid)
            assert r["granted"] == (bal[u] - held(u) >= amount), (step, r)
            if r["granted"]:
                holds[rid] = {"user": u, "amount": amount, "status": "active", "result": r}
            assert r["available"] == bal[u] - held(u), (step, r)
        elif op == "replay" and holds:
            rid = rng.choice(list(holds))
            h = holds[rid]
            again = client.reserve(h["user"], ET, h["amount"], UNIT, reservation_id=rid)
            assert again == h["result"], (step, again)
        elif op == "commit" and holds:
            rid = rng.choice(list(holds))
            h = holds[rid]
            actual = D(rng.randint(0, 80))
            if h["status"] == "committed":
                if rng.random() < 0.5:
                    with pytest.raises(IdempotencyConflictError):
                        client.commit(rid, h["actual"] + 1)
                else:
                    r = client.commit(rid, h["actual"])
                    assert r == {**h["commit"], "status": "replayed"}, (step, r)
                continue
            r = client.commit(rid, actual)
            if h["status"] == "released":
                assert (r["success"], r["status"]) == (False, "released"), (step, r)
                continue
            late = h["status"] in ("due", "expired")
            assert (r["success"], r["status"]) == (True, "late" if late else "committed")
            assert r["released"] == (0 if late else max(h["amount"] - actual, D("0")))
            bal[h["user"]] -= actual
            assert r["balance"] == bal[h["user"]], (step, r)
            h.update(status="committed", actual=actual, commit=r)
        elif op == "release" and holds:
            rid = rng.choice(list(holds))
            h = holds[rid]
            assert client.release(rid) is (h["status"] == "active"), (step, h)
            if h["status"] in ("active", "due"):
                h["status"] = "released" if h["status"] == "active" else "expired"
        elif op == "age":
            active = [rid for rid, h in holds.items() if h["status"] == "active"]
            if active:
                rid = rng.choice(active)
                db.execute(
                    "UPDATE meter.reservations SET expires_at = now() - interval '1 second',"
                    " created_at = now() - interval '301 seconds' WHERE reservation_id = %s",
                    (rid,),
                )
                holds[rid]["status"] = "due"
        elif op == "sweep":
            due = [h for h in holds.values() if h["status"] == "due"]
            # a refused write may have expired some already (meter._expire_due)
            assert client.release_expired_reservations() <= len(due)
            for h in due:
                h["status"] = "expired"
        elif op == "consume":
            amount = D(rng.randint(1, 40))
            r = client.consume(u, ET, amount, UNIT, check_balance=True)
            assert r["success"] == (bal[u] - held(u) >= amount), (step, r)
            if r["success"]:
                bal[u] -= amount
            assert r["available"] == bal[u] - held(u), (step, r)
        for v in users:
            expected = {"balance": bal[v], "reserved": held(v), "available": bal[v] - held(v)}
            assert balance(client, v) == expected, (step, op, v)
        assert client.reconcile() == []
        stats = client.get_stats()
        assert stats["active_reservations"] == sum(
            1 for h in holds.values() if h["status"] == "active"
        )
        assert stats["total_reserved"] == sum(held(v) for v in users)
    for v in users:
        assert sum(r["amount"] for r in ledger_rows(db, v)) == bal[v]
    trail: dict[str, list[str]] = {}
    for e in client.get_audit_events(kinds=["reservation.active", "reservation.committed",
                                            "reservation.released", "reservation.expired"],
                                     limit=10000):  # fmt: skip
        trail.setdefault(e["reservation_id"], []).insert(0, e["kind"])
    for rid, h in holds.items():
        assert trail[rid][0] == "reservation.active", (rid, trail[rid])
        if h["status"] not in ("active", "due"):
            assert trail[rid][-1] == f"reservation.{h['status']}", (rid, trail[rid], h)
