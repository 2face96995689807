"""Periods: set_period_config, open_period, close_period (SPEC 3 item 4, Appendix C)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from meter import MeterClient
from meter.errors import IdempotencyConflictError, NotFoundError, ValidationError
from tests.fix_db import wait_until_expired

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"
JAN1 = date(2024, 1, 1)
JAN31 = date(2024, 1, 31)
FEB1 = date(2024, 2, 1)
FEB29 = date(2024, 2, 29)
JAN_END = datetime(2024, 1, 31, 23, 59, 59, 999999, tzinfo=UTC)
MID_JAN = datetime(2024, 1, 15, 12, 0, tzinfo=UTC)


def ledger(db, user_id=U):
    return db.execute(
        "SELECT * FROM meter.ledger WHERE namespace = 'default'"
        " AND user_id IS NOT DISTINCT FROM %s::text AND event_type = %s AND unit = %s"
        " ORDER BY id",
        (user_id, ET, UNIT),
    ).fetchall()


def kinds(rows):
    return [(r["entry_type"], r["amount"]) for r in rows]


def account(db, user_id=U):
    return db.execute(
        "SELECT * FROM meter.accounts WHERE namespace = 'default'"
        " AND user_id IS NOT DISTINCT FROM %s::text AND event_type = %s AND unit = %s",
        (user_id, ET, UNIT),
    ).fetchone()


def config(client, allocation=D("100"), limit=None, start=JAN1, **kw):
    client.set_period_config(U, ET, UNIT, None, start, allocation, limit, **kw)


def bal(client):
    return client.get_balance(U, ET, UNIT)


# ---------------------------------------------------------------- set_period_config


def test_set_period_config_creates_account_and_stores_config(client, db):
    assert client.get_account(U, ET, UNIT) is None
    assert client.set_period_config(U, ET, UNIT, None, JAN1, D("100"), D("20")) is None
    acct = client.get_account(U, ET, UNIT)
    assert acct["balance"] == D("0")
    assert acct["reserved"] == D("0")
    assert acct["period_allocation"] == D("100")
    assert acct["carry_over_limit"] == D("20")
    row = db.execute(
        "SELECT period_start::date AS ps, period_interval = interval '1 month' AS monthly"
        " FROM meter.accounts WHERE user_id = %s",
        (U,),
    ).fetchone()
    assert row == {"ps": JAN1, "monthly": True}
    assert ledger(db) == []


def test_set_period_config_interval_and_update(client, db):
    config(client, D("100"), D("20"))
    client.set_period_config(
        U, ET, UNIT, None, date(2024, 3, 4), D("7"), None, period_interval="7 days"
    )
    row = db.execute(
        "SELECT period_start::date AS ps, period_allocation AS pa, carry_over_limit AS col,"
        " period_interval = interval '7 days' AS weekly"
        " FROM meter.accounts WHERE user_id = %s",
        (U,),
    ).fetchone()
    assert row == {"ps": date(2024, 3, 4), "pa": D("7"), "col": None, "weekly": True}
    assert len(db.execute("SELECT * FROM meter.accounts").fetchall()) == 1


@pytest.mark.parametrize(
    ("interval", "read"),
    [
        ("1 month", "1 mon"),
        ("1 year 2 months", "1 year 2 mons"),
        ("7 days", timedelta(days=7)),
        (timedelta(days=30), timedelta(days=30)),
    ],
)
def test_a_period_interval_read_back_configures_the_same_periods(client, db, interval, read):
    """A month is not 30 days: read as a timedelta (psycopg's default), a monthly
    interval passed back to set_period_config made the periods 30 days long. Intervals with
    months are read as their text, which set_period_config takes."""
    client.set_period_config(U, ET, UNIT, None, date(2024, 1, 31), D("10"), None, interval)
    for reader in (client, MeterClient(db)):  # its own pool, and a caller's connection
        account = reader.get_account(U, ET, UNIT)
        assert account is not None and account["period_interval"] == read
    client.set_period_config(
        U, ET, UNIT, None, date(2024, 1, 31), D("10"), None, account["period_interval"]
    )
    (same,) = (
        db.execute(
            "SELECT period_interval = %s::interval AS same FROM meter.accounts", (str(read),)
        )
        .fetchone()
        .values()
    )
    assert same


def test_set_period_config_keeps_existing_balance(client):
    client.allocate(U, ET, D("12"), UNIT)
    config(client)
    assert bal(client)["balance"] == D("12")


@pytest.mark.parametrize(
    ("allocation", "limit", "param"),
    [
        (D("-1"), None, "period_allocation"),
        (D("10"), D("-1"), "carry_over_limit"),
        (D("10"), D("-0.000000000001"), "carry_over_limit"),
    ],
)
def test_set_period_config_refuses_negative(client, snapshot, allocation, limit, param):
    client.allocate(U, ET, D("1"), UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config(U, ET, UNIT, None, JAN1, allocation, limit)
    assert ei.value.parameter == param or param in str(ei.value)
    assert snapshot() == before


def test_zero_carry_over_limit_accepted(client):
    config(client, D("10"), D("0"))
    assert client.get_account(U, ET, UNIT)["carry_over_limit"] == D("0")


# ---------------------------------------------------------------- open_period


def test_open_period_uses_configured_allocation(client, db):
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    rows = ledger(db)
    assert kinds(rows) == [("allocation", D("100"))]
    assert rows[0]["event_time"] == datetime(2024, 1, 1, tzinfo=UTC)
    assert rows[0]["balance_after"] == D("100")
    assert bal(client) == {"balance": D("100"), "reserved": D("0"), "available": D("100")}


def test_open_period_explicit_allocation_overrides_config(client, db):
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1, D("40")) == D("40")
    assert kinds(ledger(db)) == [("allocation", D("40"))]


def test_open_period_explicit_allocation_without_config(client, db):
    client.allocate(U, ET, D("5"), UNIT)
    assert client.open_period(U, ET, UNIT, None, date(2024, 3, 1), D("10")) == D("15")
    rows = ledger(db)
    assert rows[-1]["event_time"] == datetime(2024, 3, 1, tzinfo=UTC)
    assert rows[-1]["amount"] == D("10")


def test_open_period_without_any_allocation_refused(client, snapshot):
    client.allocate(U, ET, D("5"), UNIT)
    before = snapshot()
    with pytest.raises(ValidationError):
        client.open_period(U, ET, UNIT, None, JAN1)
    assert snapshot() == before


def test_open_period_unknown_account_not_found(client, snapshot):
    config(client)  # another account exists; this one does not
    before = snapshot()
    with pytest.raises(NotFoundError):
        client.open_period("nobody", ET, UNIT, None, JAN1, D("10"))
    assert snapshot() == before


def test_open_period_negative_allocation_refused(client, snapshot):
    config(client)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.open_period(U, ET, UNIT, None, JAN1, D("-5"))
    assert ei.value.parameter == "allocation" or "allocation" in str(ei.value)
    assert snapshot() == before


def test_open_period_repeat_returns_first_result_and_writes_nothing(client, snapshot):
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    client.consume(U, ET, D("30"), UNIT)
    before = snapshot()
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    # the effective allocation is the same: still the same request
    assert client.open_period(U, ET, UNIT, None, JAN1, D("100.000")) == D("100")
    assert snapshot() == before
    assert bal(client)["balance"] == D("70")


def test_open_period_repeat_after_the_config_changed_returns_first_result(client, snapshot):
    # The repeat's own arguments decide, not the account's configuration now.
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    config(client, D("200"))
    before = snapshot()
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    assert snapshot() == before
    with pytest.raises(IdempotencyConflictError):  # an explicit other amount still conflicts
        client.open_period(U, ET, UNIT, None, JAN1, D("200"))
    assert snapshot() == before


def test_open_period_repeat_without_allocation_replays_an_explicit_open(client, snapshot):
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1, D("40")) == D("40")
    before = snapshot()
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("40")  # as beat's roll would
    assert snapshot() == before


def test_open_period_repeat_with_other_allocation_conflicts(client, snapshot):
    config(client, D("100"))
    client.open_period(U, ET, UNIT, None, JAN1)
    before = snapshot()
    with pytest.raises(IdempotencyConflictError):
        client.open_period(U, ET, UNIT, None, JAN1, D("50"))
    assert snapshot() == before


def test_open_period_other_date_is_a_new_period(client):
    config(client, D("100"))
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("100")
    assert client.open_period(U, ET, UNIT, None, FEB1) == D("200")


# ---------------------------------------------------------------- close_period


def _opened(client, limit, consumed=D("30")):
    config(client, D("100"), limit)
    client.open_period(U, ET, UNIT, None, JAN1)
    if consumed:
        client.consume(U, ET, consumed, UNIT, event_time=MID_JAN)


def test_close_with_null_limit_carries_all_with_both_rows(client, db):
    _opened(client, None)
    n = len(ledger(db))
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("0"), "carried_over": D("70"), "new_balance": D("70")}
    rows = ledger(db)[n:]
    assert kinds(rows) == [("expiration", D("-70")), ("carry_over", D("70"))]
    assert [r_["event_time"] for r_ in rows] == [JAN_END, JAN_END]
    assert [r_["balance_after"] for r_ in rows] == [D("0"), D("70")]
    assert bal(client) == {"balance": D("70"), "reserved": D("0"), "available": D("70")}


def test_close_with_limit_caps_carry_over(client, db):
    _opened(client, D("20"))
    n = len(ledger(db))
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("50"), "carried_over": D("20"), "new_balance": D("20")}
    rows = ledger(db)[n:]
    assert kinds(rows) == [("expiration", D("-70")), ("carry_over", D("20"))]
    assert [r_["event_time"] for r_ in rows] == [JAN_END, JAN_END]
    assert bal(client)["balance"] == D("20")


def test_close_with_zero_limit_writes_only_expiration(client, db):
    _opened(client, D("0"))
    n = len(ledger(db))
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("70"), "carried_over": D("0"), "new_balance": D("0")}
    rows = ledger(db)[n:]
    assert kinds(rows) == [("expiration", D("-70"))]
    assert rows[0]["event_time"] == JAN_END


def test_close_with_limit_above_available_carries_all(client, db):
    _opened(client, D("500"))
    n = len(ledger(db))
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("0"), "carried_over": D("70"), "new_balance": D("70")}
    assert kinds(ledger(db)[n:]) == [("expiration", D("-70")), ("carry_over", D("70"))]


def test_close_keeps_reserved_out_of_expiry(client, db):
    _opened(client, D("20"))
    client.reserve(U, ET, D("30"), UNIT)  # balance 70, available 40
    n = len(ledger(db))
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("20"), "carried_over": D("20"), "new_balance": D("50")}
    assert kinds(ledger(db)[n:]) == [("expiration", D("-40")), ("carry_over", D("20"))]
    assert bal(client) == {"balance": D("50"), "reserved": D("30"), "available": D("20")}


@pytest.mark.parametrize(
    ("consumed", "expected_balance"), [(D("100"), D("0")), (D("130"), D("-30"))]
)
def test_close_with_nothing_available_writes_nothing(client, db, consumed, expected_balance):
    _opened(client, None, consumed)
    rows_before = ledger(db)
    acct_before = account(db)
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("0"), "carried_over": D("0"), "new_balance": expected_balance}
    assert ledger(db) == rows_before
    acct_after = account(db)
    for col in ("balance", "reserved", "total_credited", "total_debited"):
        assert acct_after[col] == acct_before[col], col


def test_close_with_everything_reserved_writes_nothing(client, db):
    _opened(client, None, consumed=None)
    client.reserve(U, ET, D("100"), UNIT)
    rows_before = ledger(db)
    r = client.close_period(U, ET, UNIT, None, JAN31)
    assert r == {"expired": D("0"), "carried_over": D("0"), "new_balance": D("100")}
    assert ledger(db) == rows_before


@pytest.mark.parametrize(
    ("end", "stamp"),
    [
        (date(2024, 4, 30), datetime(2024, 4, 30, 23, 59, 59, 999999, tzinfo=UTC)),
        (FEB29, datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)),
        (date(2023, 12, 31), datetime(2023, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_close_rows_dated_at_last_microsecond(client, db, end, stamp):
    config(client, D("10"), D("4"))
    client.allocate(U, ET, D("10"), UNIT)
    n = len(ledger(db))
    client.close_period(U, ET, UNIT, None, end)
    rows = ledger(db)[n:]
    assert kinds(rows) == [("expiration", D("-10")), ("carry_over", D("4"))]
    assert [r["event_time"] for r in rows] == [stamp, stamp]


def test_close_repeat_returns_first_result_and_writes_nothing(client, snapshot):
    _opened(client, D("20"))
    first = client.close_period(U, ET, UNIT, None, JAN31)
    client.allocate(U, ET, D("5"), UNIT)  # new money after the close
    before = snapshot()
    again = client.close_period(U, ET, UNIT, None, JAN31)
    assert again == first
    assert snapshot() == before
    assert bal(client)["balance"] == D("25")


def test_close_of_another_date_is_a_new_close(client, db):
    _opened(client, D("20"))
    assert client.close_period(U, ET, UNIT, None, JAN31)["new_balance"] == D("20")
    r = client.close_period(U, ET, UNIT, None, FEB29)
    assert r == {"expired": D("0"), "carried_over": D("20"), "new_balance": D("20")}


@pytest.mark.parametrize("end", [date(2024, 1, 30), JAN1])
def test_a_close_inside_a_period_closed_already_is_refused_by_name(client, snapshot, end):
    # 041: January closed on the 31st, February open. A close of the 30th (an end off by
    # one) matched no period: it expired February's allocation, dated back into January.
    config(client, D("100"), D("0"))
    client.open_period(U, ET, UNIT, None, JAN1)
    client.close_period(U, ET, UNIT, None, JAN31)
    client.open_period(U, ET, UNIT, None, FEB1)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.close_period(U, ET, UNIT, None, end)
    assert ei.value.parameter == "period_end"
    assert "closed already" in str(ei.value)
    assert snapshot() == before
    assert bal(client)["available"] == D("100")
    # The period's own last day still replays, and February still closes.
    assert client.close_period(U, ET, UNIT, None, JAN31)["expired"] == D("100")
    assert client.close_period(U, ET, UNIT, None, FEB29)["expired"] == D("100")


def test_a_close_before_every_period_takes_nothing_of_the_later_ones(client):
    # 041 (second and fourth reviews): at call time the balance holds the later periods'
    # units; closing a day before them expired February's allocation, dated back. The
    # close counts what stood at the end of that day: nothing.
    config(client, D("100"), D("0"))
    client.open_period(U, ET, UNIT, None, JAN1)
    client.close_period(U, ET, UNIT, None, JAN31)
    client.open_period(U, ET, UNIT, None, FEB1)
    r = client.close_period(U, ET, UNIT, None, date(2023, 12, 31))
    assert (r["expired"], r["carried_over"]) == (D(0), D(0))
    assert bal(client)["balance"] == D("100")
    assert client.reconcile() == []


@pytest.mark.parametrize("case", ["running period", "hold active at the close"])
def test_a_close_before_a_period_opened_ahead_agrees_with_closing_first(make_client, db, case):
    # 041 (fourth review): today's period running (or an account kept by close_period with
    # a hold of 40 made today), tomorrow's opened ahead, then today closed. The close took
    # tomorrow's allocation for today's unused (running period), or the hold for gone
    # (it expires before today ends, but was committed after the close): -30.
    t = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    out = {}
    for ns, ahead in (("control", False), ("ahead", True)):
        c = make_client(namespace=ns)
        if case == "running period":
            c.set_period_config(U, ET, UNIT, None, t - timedelta(days=5), D("100"), D("0"))
            c.open_period(U, ET, UNIT, None, t - timedelta(days=5))
            c.consume(U, ET, 20, UNIT)
        else:
            c.allocate(U, ET, 100, UNIT)
            c.close_period(U, ET, UNIT, None, t - timedelta(days=2))
            c.allocate(U, ET, 30, UNIT)
            hold = c.reserve(U, ET, 40, UNIT, ttl_seconds=60)
        if ahead:
            c.open_period(U, ET, UNIT, None, t + timedelta(days=1), D("10"))
        closed = c.close_period(U, ET, UNIT, None, t)
        if not ahead:
            c.open_period(U, ET, UNIT, None, t + timedelta(days=1), D("10"))
        if case != "running period":
            assert c.commit(hold["reservation_id"], 40)["success"]
        out[ns] = (closed["expired"], closed["carried_over"], c.get_balance(U, ET, UNIT))
        assert c.reconcile() == []
    assert out["ahead"] == out["control"]
    # limit 0: 80 unused expire, then 10; no limit: 90 carried, 10 added, 40 committed
    assert out["control"][2]["balance"] == D(10 if case == "running period" else 100)


def test_a_close_in_a_gap_before_a_later_period_counts_what_stood_at_its_end(make_client, db):
    # 041 (a third review): an account kept by close_period, whose next period is opened by
    # hand a day ahead. Closing today then counted tomorrow's allocation as today's unused
    # (and a first version of this rule refused the close). It now closes as the control,
    # which closes today before it opens tomorrow.
    t = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    results = {}
    for ns, ahead in (("control", False), ("ahead", True)):
        c = make_client(namespace=ns)
        c.allocate(U, ET, 100, UNIT)
        c.close_period(U, ET, UNIT, None, t - timedelta(days=2))
        c.allocate(U, ET, 30, UNIT)
        if ahead:
            c.open_period(U, ET, UNIT, None, t + timedelta(days=1), D("10"))
        results[ns] = c.close_period(U, ET, UNIT, None, t)
        if not ahead:
            c.open_period(U, ET, UNIT, None, t + timedelta(days=1), D("10"))
        assert c.get_balance(U, ET, UNIT)["balance"] == D(140)
        assert c.reconcile() == []
    assert results["ahead"] == results["control"] == {
        "expired": D(0), "carried_over": D(130), "new_balance": D(130),
    }  # fmt: skip
    rows = {
        ns: db.execute(
            "SELECT period_start, period_end, allocation, expired, carried_over, close_balance"
            " FROM meter.periods WHERE namespace = %s ORDER BY period_start NULLS FIRST,"
            " period_end",
            (ns,),
        ).fetchall()
        for ns in ("control", "ahead")
    }
    assert rows["ahead"] == rows["control"]


def test_period_totals(client):
    _opened(client, D("20"))
    client.close_period(U, ET, UNIT, None, JAN31)
    acct = client.get_account(U, ET, UNIT)
    # credited: allocation 100 + carry_over 20; debited: consumption 30 + expiration 70
    assert acct["total_credited"] == D("120")
    assert acct["total_debited"] == D("100")
    assert acct["balance"] == D("20")
    assert client.reconcile() == []


def test_periods_history(client, db):
    _opened(client, D("20"))
    client.close_period(U, ET, UNIT, None, JAN31)
    rows = db.execute(
        "SELECT p.* FROM meter.periods p JOIN meter.accounts a USING (account_id)"
        " WHERE a.user_id = %s ORDER BY p.period_start",
        (U,),
    ).fetchall()
    assert len(rows) == 1
    p = rows[0]
    assert p["namespace"] == "default"
    assert p["period_start"] == JAN1
    assert p["allocation"] == D("100")
    assert p["expired"] == D("50")
    assert p["carried_over"] == D("20")
    assert p["opened_at"] is not None
    assert p["closed_at"] is not None


def test_full_month_cycle(client, db):
    client.set_period_config(U, ET, UNIT, None, JAN1, D("1000"), D("200"))
    assert client.open_period(U, ET, UNIT, None, JAN1) == D("1000")
    assert client.consume(U, ET, D("300"), UNIT, event_time=MID_JAN)["balance"] == D("700")
    rid = client.reserve(U, ET, D("100"), UNIT)["reservation_id"]
    assert bal(client) == {"balance": D("700"), "reserved": D("100"), "available": D("600")}

    closed = client.close_period(U, ET, UNIT, None, JAN31)
    assert closed == {"expired": D("400"), "carried_over": D("200"), "new_balance": D("300")}
    assert bal(client) == {"balance": D("300"), "reserved": D("100"), "available": D("200")}

    assert client.open_period(U, ET, UNIT, None, FEB1) == D("1300")
    assert bal(client) == {"balance": D("1300"), "reserved": D("100"), "available": D("1200")}

    c = client.commit(rid, D("50"))
    assert (c["status"], c["balance"], c["released"]) == ("committed", D("1250"), D("50"))

    rows = ledger(db)
    assert [(r["entry_type"], r["amount"], r["balance_after"]) for r in rows] == [
        ("allocation", D("1000"), D("1000")),
        ("consumption", D("-300"), D("700")),
        ("expiration", D("-600"), D("100")),
        ("carry_over", D("200"), D("300")),
        ("allocation", D("1000"), D("1300")),
        ("consumption", D("-50"), D("1250")),
    ]
    assert [r["event_time"] for r in rows[:5]] == [
        datetime(2024, 1, 1, tzinfo=UTC),
        MID_JAN,
        JAN_END,
        JAN_END,
        datetime(2024, 2, 1, tzinfo=UTC),
    ]

    acct = client.get_account(U, ET, UNIT)
    assert acct["total_credited"] == D("2200")
    assert acct["total_debited"] == D("950")
    assert (acct["balance"], acct["reserved"]) == (D("1250"), D("0"))
    assert client.reconcile() == []

    hist = db.execute(
        "SELECT p.period_start, p.allocation, p.expired, p.carried_over,"
        " p.closed_at IS NOT NULL AS closed"
        " FROM meter.periods p JOIN meter.accounts a USING (account_id)"
        " WHERE a.user_id = %s ORDER BY p.period_start",
        (U,),
    ).fetchall()
    assert len(hist) == 2
    assert hist[0] == {
        "period_start": JAN1,
        "allocation": D("1000"),
        "expired": D("400"),
        "carried_over": D("200"),
        "closed": True,
    }
    assert (hist[1]["period_start"], hist[1]["allocation"], hist[1]["closed"]) == (
        FEB1,
        D("1000"),
        False,
    )


@pytest.mark.parametrize(
    "interval", ["0 days", "-1 month", "-7 days", "101 years", "36501 days", "200000000 days"]
)
def test_set_period_config_refuses_a_non_positive_or_too_long_interval(client, snapshot, interval):
    client.allocate(U, ET, D("1"), UNIT)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config(U, ET, UNIT, None, JAN1, D("10"), None, period_interval=interval)
    assert ei.value.parameter == "period_interval" or "period_interval" in str(ei.value)
    assert snapshot() == before


@pytest.mark.parametrize("interval", ["infinity", "-infinity"])
def test_set_period_config_refuses_an_infinite_interval_by_name(client, db, snapshot, interval):
    # 034: 'infinity' failed in the check's own arithmetic, a raw 22008 naming nothing.
    client.allocate(U, ET, D("1"), UNIT)
    before = snapshot()
    with pytest.raises(psycopg.Error) as ei:
        db.execute(
            "SELECT meter.set_period_config(p_user_id => %s, p_event_type => %s, p_unit => %s,"
            " p_resource => NULL, p_period_start => %s, p_period_allocation => 10,"
            " p_period_interval => %s::interval)",
            (U, ET, UNIT, JAN1, interval),
        )
    assert (ei.value.sqlstate, ei.value.diag.column_name) == ("MT001", "period_interval")
    with pytest.raises(ValidationError) as ei_sdk:
        client.set_period_config(U, ET, UNIT, None, JAN1, D("10"), None, period_interval=interval)
    assert ei_sdk.value.parameter == "period_interval"
    assert snapshot() == before


@pytest.mark.parametrize("period_end", ["5874897-12-31", "300000-01-01", "10000-01-01"])
def test_close_period_refuses_a_date_past_year_9999_by_name(client, db, snapshot, period_end):
    # 034: the last date there is, and any past the end of timestamps, overflowed the
    # close's own arithmetic before the future was refused: a raw 22008 naming nothing.
    config(client, D("100"))
    client.open_period(U, ET, UNIT, None, JAN1)
    before = snapshot()
    with pytest.raises(psycopg.Error) as ei:
        db.execute(
            "SELECT * FROM meter.close_period(p_user_id => %s, p_event_type => %s,"
            " p_unit => %s, p_resource => NULL, p_period_end => %s::date)",
            (U, ET, UNIT, period_end),
        )
    assert (ei.value.sqlstate, ei.value.diag.column_name) == ("MT001", "period_end")
    assert "in the future" in ei.value.diag.message_primary
    # The key's checks still come first, as in meter._close_period: another tenant's call
    # is refused as such.
    db.execute("SELECT set_config('meter.tenant', 'other', false)")
    with pytest.raises(psycopg.Error) as ei:
        db.execute(
            "SELECT * FROM meter.close_period(p_user_id => %s, p_event_type => %s,"
            " p_unit => %s, p_resource => NULL, p_period_end => %s::date)",
            (U, ET, UNIT, period_end),
        )
    assert ei.value.sqlstate == "MT004"
    assert snapshot() == before


def test_close_expires_what_an_expired_hold_no_longer_reserves(client, db):
    # carry_over_limit 0: nothing may survive the close, an unswept expired hold included
    config(client, D("100"), D("0"))
    client.open_period(U, ET, UNIT, None, JAN1)
    hold = client.reserve(U, ET, D("30"), UNIT, ttl_seconds=1)
    wait_until_expired(db, hold["expires_at"])
    closed = client.close_period(U, ET, UNIT, None, date(2024, 1, 31))
    assert closed == {"expired": D("100"), "carried_over": D("0"), "new_balance": D("0")}
    assert client.release_expired_reservations() == 0
    assert bal(client) == {"balance": D("0"), "reserved": D("0"), "available": D("0")}
    assert client.reconcile() == []


def test_a_repeated_close_leaves_an_expired_hold_alone(client, db, snapshot):
    config(client, D("100"))
    client.open_period(U, ET, UNIT, None, JAN1)
    first = client.close_period(U, ET, UNIT, None, date(2024, 1, 31))
    client.allocate(U, ET, D("10"), UNIT)
    hold = client.reserve(U, ET, D("4"), UNIT, ttl_seconds=1)
    wait_until_expired(db, hold["expires_at"])
    before = snapshot()
    assert client.close_period(U, ET, UNIT, None, date(2024, 1, 31)) == first
    assert snapshot() == before


# ---------------------------------------------------------------- get_periods


def test_get_periods_reads_the_history_by_account_newest_first(client, make_client):
    """The SDK reads the periods history the CLI shows; ``resource=None`` is any resource
    and ``""`` none, as the SQL function takes them; other namespaces' periods never."""
    config(client, D("100"), D("10"))
    client.set_period_config(U, ET, UNIT, "gpu", JAN1, D("7"))
    client.set_period_config(None, ET, UNIT, None, JAN1, D("1000"))
    client.open_period(U, ET, UNIT, None, JAN1)
    client.open_period(U, ET, UNIT, "gpu", JAN1)
    client.open_period(None, ET, UNIT, None, JAN1)
    client.consume(U, ET, D("30.5"), UNIT)
    client.close_period(U, ET, UNIT, None, JAN31)
    client.open_period(U, ET, UNIT, None, FEB1)
    other = make_client(namespace="other-ns")
    other.set_period_config(U, ET, UNIT, None, JAN1, D("5"))
    other.open_period(U, ET, UNIT, None, JAN1)

    rows = client.get_periods(U)
    assert [(r["resource"], r["period_start"], r["period_end"]) for r in rows] == [
        ("", FEB1, None),
        ("gpu", JAN1, None),
        ("", JAN1, JAN31),
    ]
    jan = rows[2]
    assert (jan["allocation"], jan["open_balance"]) == (D("100"), D("100"))
    assert (jan["expired"], jan["carried_over"], jan["close_balance"]) == (
        D("59.5"),
        D("10"),
        D("10"),
    )
    assert all(isinstance(jan[k], Decimal) for k in ("expired", "carried_over", "open_balance"))
    assert rows[0]["open_balance"] == D("110")  # 10 carried and February's 100
    assert [r["period_start"] for r in client.get_periods(U, resource="")] == [FEB1, JAN1]
    assert [r["resource"] for r in client.get_periods(U, ET, UNIT, "gpu")] == ["gpu"]
    assert client.get_periods(U, unit="other") == []
    assert len(client.get_periods(U, limit=1)) == 1
    assert [r["allocation"] for r in client.get_periods(None)] == [D("1000")]
    assert [r["allocation"] for r in other.get_periods(U)] == [D("5")]
    assert client.get_periods("nobody") == []
