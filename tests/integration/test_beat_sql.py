"""Beat's SQL (sql/009_beat.sql): roll_periods, prune_idempotency_keys, maintenance runs,
and the partition and retention functions beat calls (issue #4).

Time is driven through ``p_now``, never by sleeping: configurations are dated months back
and rolled as of a chosen instant.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from meter import MeterClient
from meter.errors import ValidationError
from tests.fix_db import ledger_partitions
from tests.integration.test_pipeline import eventually
from worker import db as wdb

D = Decimal
ET = "tokens"
UNIT = "tok"


def month_start(today: date, back: int) -> date:
    """The first day of the month ``back`` months before ``today``'s."""
    y, m = divmod(today.year * 12 + today.month - 1 - back, 12)
    return date(y, m + 1, 1)


def today(db: psycopg.Connection[Any]) -> date:
    return db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]


def last_instant(day: date) -> datetime:
    """The last microsecond of ``day`` (UTC): where close_period dates its rows."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1, microseconds=-1)


def first_instant(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def roll(
    db: psycopg.Connection[Any], now: Any = None, batch: int = 100, namespace: str | None = None
) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT * FROM meter.roll_periods(%s, coalesce(%s::timestamptz, now()), %s)",
        (namespace, now, batch),
    ).fetchall()


def period_history(db: psycopg.Connection[Any], namespace: str) -> list[tuple[Any, ...]]:
    """A namespace's periods, oldest first: start, end, allocation, expired, carried over,
    balance at the close."""
    rows = db.execute(
        "SELECT period_start, period_end, allocation, expired, carried_over, close_balance"
        " FROM meter.periods WHERE namespace = %s ORDER BY period_start",
        (namespace,),
    ).fetchall()
    return [tuple(r.values()) for r in rows]


def ledger(db: psycopg.Connection[Any], user: str) -> list[tuple[str, Decimal, datetime]]:
    rows = db.execute(
        "SELECT entry_type, amount, event_time FROM meter.ledger"
        " WHERE user_id = %s AND event_type = %s ORDER BY event_time, id",
        (user, ET),
    ).fetchall()
    return [(r["entry_type"], r["amount"], r["event_time"]) for r in rows]


def periods(db: psycopg.Connection[Any], user: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT period_start, period_end, allocation, expired, carried_over, close_balance"
        " FROM meter.periods WHERE user_id = %s ORDER BY period_start",
        (user,),
    ).fetchall()


def sqlstate(exc: pytest.ExceptionInfo[psycopg.Error]) -> str | None:
    return exc.value.sqlstate


# ---------------------------------------------------------------- roll_periods


def test_roll_catches_up_three_missed_months_with_boundary_dated_rows(client, db):
    t = today(db)
    m0, m1, m2, m3 = (month_start(t, back) for back in (3, 2, 1, 0))
    client.set_period_config("u1", ET, UNIT, None, m0, D("100"), D("30"))

    # As of the second day of m0: the configured period has started and is opened.
    steps = roll(db, now=first_instant(m0) + timedelta(days=1))
    assert [(s["status"], s["opened_period_start"], s["balance"]) for s in steps] == [
        ("opened", m0, D("100"))
    ]
    client.consume("u1", ET, D("20"), UNIT, event_time=first_instant(m0) + timedelta(days=5))

    # Beat was down since: one run catches up m0, m1, m2 in order and opens m3.
    steps = roll(db)
    assert [
        (s["status"], s["closed_period_end"], s["expired"], s["carried_over"],
         s["opened_period_start"], s["allocation"], s["balance"])
        for s in steps
    ] == [
        ("rolled", m1 - timedelta(days=1), D("50"), D("30"), m1, D("100"), D("130")),
        ("rolled", m2 - timedelta(days=1), D("100"), D("30"), m2, D("100"), D("130")),
        ("rolled", m3 - timedelta(days=1), D("100"), D("30"), m3, D("100"), D("130")),
    ]  # fmt: skip
    assert ledger(db, "u1") == [
        ("allocation", D("100"), first_instant(m0)),
        ("consumption", D("-20"), first_instant(m0) + timedelta(days=5)),
        ("expiration", D("-80"), last_instant(m1 - timedelta(days=1))),
        ("carry_over", D("30"), last_instant(m1 - timedelta(days=1))),
        ("allocation", D("100"), first_instant(m1)),
        ("expiration", D("-130"), last_instant(m2 - timedelta(days=1))),
        ("carry_over", D("30"), last_instant(m2 - timedelta(days=1))),
        ("allocation", D("100"), first_instant(m2)),
        ("expiration", D("-130"), last_instant(m3 - timedelta(days=1))),
        ("carry_over", D("30"), last_instant(m3 - timedelta(days=1))),
        ("allocation", D("100"), first_instant(m3)),
    ]
    bal = client.get_balance("u1", ET, UNIT)
    assert (bal["balance"], bal["available"]) == (D("130"), D("130"))
    acct = client.get_account("u1", ET, UNIT)
    assert acct["period_start"] == m3
    assert (acct["total_credited"], acct["total_debited"]) == (D("490"), D("360"))
    assert [(p["period_start"], p["period_end"], p["expired"]) for p in periods(db, "u1")] == [
        (m0, m1 - timedelta(days=1), D("50")),
        (m1, m2 - timedelta(days=1), D("100")),
        (m2, m3 - timedelta(days=1), D("100")),
        (m3, None, None),
    ]
    # The rolls are attributed to the system, and nothing is left to do.
    actors = db.execute(
        "SELECT DISTINCT actor_id FROM meter.ledger WHERE entry_type <> 'consumption'"
    ).fetchall()
    assert [r["actor_id"] for r in actors] == ["system:periods"]
    assert roll(db) == []
    assert client.reconcile() == []


def test_roll_as_of_an_earlier_instant_stops_there(client, db):
    t = today(db)
    m0, m1, m2 = (month_start(t, back) for back in (3, 2, 1))
    client.set_period_config("u1", ET, UNIT, None, m0, D("10"), None)
    steps = roll(db, now=first_instant(m1) + timedelta(hours=1))
    assert [(s["status"], s["opened_period_start"]) for s in steps] == [
        ("opened", m0),
        ("rolled", m1),
    ]
    # NULL limit: everything unused carries over (both rows written).
    assert steps[1]["expired"] == D("0") and steps[1]["carried_over"] == D("10")
    assert client.get_account("u1", ET, UNIT)["period_start"] == m1
    # The last instant of a period does not end it yet.
    assert roll(db, now=first_instant(m2) - timedelta(microseconds=1)) == []
    assert [s["opened_period_start"] for s in roll(db, now=first_instant(m2))] == [m2]


def test_roll_in_batches_resumes_in_order(client, db):
    t = today(db)
    m0 = month_start(t, 4)
    client.set_period_config("u1", ET, UNIT, None, m0, D("5"), D("0"))
    first = roll(db, batch=2)
    assert [s["opened_period_start"] for s in first] == [m0, month_start(t, 3)]
    rest = roll(db, batch=2)
    rest += roll(db, batch=2)
    assert [s["opened_period_start"] for s in rest] == [month_start(t, b) for b in (2, 1, 0)]
    assert roll(db, batch=2) == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("5")


def test_roll_keeps_a_next_period_opened_by_hand(client, db):
    t = today(db)
    m0, m1 = month_start(t, 1), month_start(t, 0)
    client.set_period_config("u1", ET, UNIT, None, m0, D("100"), D("0"))
    roll(db, now=first_instant(m0))
    # An operator opened the next period early with a bonus allocation: that closed the
    # period before it (031), as the roll would have.
    client.open_period("u1", ET, UNIT, None, m1, D("150"))
    periods = db.execute(
        "SELECT period_start, period_end, allocation FROM meter.periods ORDER BY period_start"
    ).fetchall()
    assert [tuple(p.values()) for p in periods] == [(m0, m1 - timedelta(days=1), D("100")),
                                                    (m1, None, D("150"))]  # fmt: skip
    # The configured start put back on the closed period: the roll moves on to the one
    # opened by hand and keeps it (it writes nothing, so it reports no step).
    client.set_period_config("u1", ET, UNIT, None, m0, D("100"), D("0"))
    assert roll(db) == []
    assert client.get_account("u1", ET, UNIT)["period_start"] == m1
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("150")
    assert roll(db) == []


def test_monthly_periods_keep_the_day_they_were_configured_on(client, db):
    # Jan 31 + 1 month is Feb 28; the next period starts Mar 31, not Feb 28 + 1 month.
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("10"), D("0"))
    steps = roll(db, now=datetime(2025, 6, 15, tzinfo=UTC))
    assert [(s["closed_period_end"], s["opened_period_start"]) for s in steps] == [
        (None, date(2025, 1, 31)),
        (date(2025, 2, 27), date(2025, 2, 28)),
        (date(2025, 3, 30), date(2025, 3, 31)),
        (date(2025, 4, 29), date(2025, 4, 30)),
        (date(2025, 5, 30), date(2025, 5, 31)),
    ]
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 5, 31)
    # May 31's period ends Jun 29; Jun 30's ends Jul 30 (and not Jul 29)
    assert roll(db, now=datetime(2025, 6, 29, 23, tzinfo=UTC)) == []
    assert [s["opened_period_start"] for s in roll(db, now=datetime(2025, 6, 30, tzinfo=UTC))] == [
        date(2025, 6, 30)
    ]
    assert roll(db, now=datetime(2025, 7, 30, 23, tzinfo=UTC)) == []
    assert [s["opened_period_start"] for s in roll(db, now=datetime(2025, 7, 31, tzinfo=UTC))] == [
        date(2025, 7, 31)
    ]
    # quarterly from Nov 30: Feb 28, then May 30 (not May 28)
    client.set_period_config("u2", ET, UNIT, None, date(2024, 11, 30), D("1"), None, "3 months")
    steps = roll(db, now=datetime(2025, 9, 1, tzinfo=UTC))
    assert [s["opened_period_start"] for s in steps if s["user_id"] == "u2"] == [
        date(2024, 11, 30),
        date(2025, 2, 28),
        date(2025, 5, 30),
        date(2025, 8, 30),
    ]
    assert client.reconcile() == []


def test_a_late_roll_closes_each_period_as_it_stood_at_its_end(client, db):
    # Two accounts, the same configuration and the same usage (150 dated in m1). One is
    # rolled on time, before that usage arrives; the other only today, after it.
    t = today(db)
    m0, m1, m2 = (month_start(t, back) for back in (2, 1, 0))
    client.set_period_config("on_time", ET, UNIT, None, m0, D("100"), D("50"))
    roll(db, now=first_instant(m1))
    client.set_period_config("late", ET, UNIT, None, m0, D("100"), D("50"))
    for user in ("on_time", "late"):
        client.consume(user, ET, D("150"), UNIT, event_time=first_instant(m1) + timedelta(days=5))
    roll(db)

    # m0 left 100 unused (50 expire, 50 carry); m1 used all it had; m2 opens with 100.
    for user in ("on_time", "late"):
        assert client.get_balance(user, ET, UNIT)["balance"] == D("100"), user
        assert [
            (p["period_end"], p["expired"], p["carried_over"], p["close_balance"])
            for p in periods(db, user)
        ] == [
            (m1 - timedelta(days=1), D("50"), D("50"), D("50")),
            (m2 - timedelta(days=1), D("0"), D("0"), D("0")),
            (None, None, None, None),
        ], user
    assert ledger(db, "late") == ledger(db, "on_time")
    assert client.reconcile() == []


def test_a_late_roll_counts_the_holds_that_held_at_the_period_end(client, db):
    t = today(db)
    yesterday = t - timedelta(days=1)
    users = ("committed", "committed_0", "released", "active")
    for user in users:
        client.set_period_config(user, ET, UNIT, None, yesterday, D("10"), D("0"), "1 day")
    roll(db, now=first_instant(yesterday) + timedelta(hours=1))
    holds = {u: client.reserve(u, ET, D("4"), UNIT)["reservation_id"] for u in users}
    # made yesterday at noon, while the period ran
    db.execute(
        "UPDATE meter.reservations SET created_at = %s",
        (first_instant(yesterday) + timedelta(hours=12),),
    )
    # settled today, after the period's end: the usage of 3 is dated today
    client.commit(holds["committed"], D("3"))
    client.commit(holds["committed_0"], D("0"))
    client.release(holds["released"])
    roll(db)

    # At the period's end 10 were there and 4 held, however each hold ended later: 6
    # expire, and today's allocation of 10 comes on top of the 4.
    for user in users:
        assert periods(db, user)[0]["expired"] == D("6"), user
    assert client.get_balance("committed", ET, UNIT)["balance"] == D("11")
    for user in ("committed_0", "released"):
        assert client.get_balance(user, ET, UNIT)["balance"] == D("14"), user
    assert client.get_balance("active", ET, UNIT) == {
        "balance": D("14"),
        "reserved": D("4"),
        "available": D("10"),
    }
    assert client.reconcile() == []


def test_a_late_roll_reads_the_ledger_after_each_end_once(client, db, make_client):
    # Daily periods caught up over 40 days in four calls, usage on each day: every close
    # sees only what is dated after its own end, as if each had been rolled on its day
    # (the same account in another namespace, rolled before each day's usage).
    t = today(db)
    first = t - timedelta(days=40)
    on_time = make_client(namespace="on_time")
    for c in (client, on_time):
        c.set_period_config("daily", ET, UNIT, None, first, D("10"), D("2"), "1 day")
    for back in range(40, 0, -1):
        day = t - timedelta(days=back)
        used = D(back % 7 + 1)
        client.consume("daily", ET, used, UNIT, event_time=first_instant(day) + timedelta(hours=9))
        db.execute("SELECT * FROM meter.roll_periods('on_time', %s)", (first_instant(day),))
        on_time.consume("daily", ET, used, UNIT, event_time=first_instant(day) + timedelta(hours=9))
    db.execute("SELECT * FROM meter.roll_periods('on_time')")
    for _ in range(4):
        db.execute("SELECT * FROM meter.roll_periods('default', now(), 11)")

    assert len(period_history(db, "default")) == 41
    assert period_history(db, "default") == period_history(db, "on_time")
    assert client.get_balance("daily", ET, UNIT) == on_time.get_balance("daily", ET, UNIT)
    assert client.reconcile() == [] and on_time.reconcile() == []


def test_a_late_roll_records_each_period_s_opening_as_it_stood_at_its_start(make_client, db):
    # One history, three ways: rolled on time (ten minutes after each start, usage dated
    # before that already in), rolled once today, and caught up by set_period_config.
    # Usage is dated inside each period, some at a start's first instant and some between
    # a start and the on-time roll. A period's opening balance is the balance at its first
    # instant, its allocation included, whenever the roll came: the late roll recorded
    # the balance when it ran, later periods' usage included (m1 opened at -30, not 1300).
    t = today(db)
    m0, m1, m2, m3 = (month_start(t, back) for back in (3, 2, 1, 0))
    usage = [
        (first_instant(m0) + timedelta(days=3), D("400")),
        (first_instant(m1), D("100")),
        (first_instant(m1) + timedelta(minutes=5), D("50")),
        (first_instant(m1) + timedelta(days=10), D("700")),
        (first_instant(m2) + timedelta(minutes=5), D("250")),
        (first_instant(m2) + timedelta(days=20), D("200")),
        (first_instant(m3), D("30")),
    ]
    clients = {ns: make_client(namespace=ns) for ns in ("on_time", "late", "catch_up")}
    for c in clients.values():
        c.set_period_config("u", ET, UNIT, None, m0, D("1000"), D("300"))
    now = db.execute("SELECT now() AS n").fetchone()["n"]
    on_time_steps: list[dict[str, Any]] = []
    applied = 0
    for start in (m0, m1, m2, m3):
        at = min(first_instant(start) + timedelta(minutes=10), now)
        for when, amount in usage[applied:]:
            if when > at:
                break
            clients["on_time"].consume("u", ET, amount, UNIT, event_time=when)
            applied += 1
        on_time_steps += roll(db, now=at, namespace="on_time")
    for when, amount in usage[applied:]:
        clients["on_time"].consume("u", ET, amount, UNIT, event_time=when)
    on_time_steps += roll(db, namespace="on_time")
    for ns in ("late", "catch_up"):
        for when, amount in usage:
            clients[ns].consume("u", ET, amount, UNIT, event_time=when)
    late_steps = roll(db, namespace="late")
    # m0 opened, then the roll behind: a start past the limit makes set_period_config roll
    # this account up to today first (026), and m3 stays as rolled
    roll(db, now=first_instant(m0) + timedelta(minutes=10), namespace="catch_up")
    clients["catch_up"].set_period_config("u", ET, UNIT, None, m3, D("1000"), D("300"))

    def history(ns: str) -> list[tuple[Any, ...]]:
        rows = db.execute(
            "SELECT period_start, period_end, allocation, open_balance, expired,"
            " carried_over, close_balance FROM meter.get_periods('u', %s, %s, NULL, 100, %s)"
            " ORDER BY period_start",
            (ET, UNIT, ns),
        ).fetchall()
        return [tuple(r.values()) for r in rows]

    def step(s: dict[str, Any]) -> tuple[Any, ...]:
        return (s["status"], s["closed_period_end"], s["expired"], s["carried_over"],
                s["opened_period_start"], s["allocation"], s["balance"])  # fmt: skip

    day = timedelta(days=1)
    # 1000 a month, 300 carried at most: m0 leaves 600 (300 expire), m1 450 (150 expire),
    # m2 850 (550 expire); each period after m0 opens at 300 + 1000
    assert history("on_time") == [
        (m0, m1 - day, D("1000"), D("1000"), D("300"), D("300"), D("300")),
        (m1, m2 - day, D("1000"), D("1300"), D("150"), D("300"), D("300")),
        (m2, m3 - day, D("1000"), D("1300"), D("550"), D("300"), D("300")),
        (m3, None, D("1000"), D("1300"), None, None, None),
    ]
    assert history("late") == history("on_time")
    assert history("catch_up") == history("on_time")
    # roll_periods reports the same opening balances as it records
    assert [step(s) for s in late_steps] == [step(s) for s in on_time_steps]
    assert [s["balance"] for s in late_steps] == [D("1000"), D("1300"), D("1300"), D("1300")]
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("1270")
        assert c.reconcile() == []


@pytest.mark.parametrize(
    ("interval", "back", "limit", "user"),
    [
        ("1 day", timedelta(days=4), D("0"), "u"),
        ("7 days", timedelta(days=23), None, "u"),
        ("1 year", timedelta(days=3 * 366), D("5"), "u"),
        ("1 month", None, D("5"), "u"),  # from Jan 31 a year back: Feb 28, Mar 31, ...
        ("1 day", timedelta(days=3), D("5"), None),  # the pool (credits only)
    ],
)
def test_a_late_roll_opens_as_an_on_time_one_on_every_grid(
    make_client, db, interval: str, back: timedelta | None, limit: Decimal | None,
    user: str | None,
) -> None:  # fmt: skip
    """069 on other grids than whole months, with overage, carry-over limits 0 and NULL,
    and the pool: rolled once today, every period records and reports the opening an
    on-time roll (ten minutes after each start) recorded, its allocation included, and
    each opens at the close of the one before plus its allocation."""
    t = today(db)
    start = t - back if back is not None else date(t.year - 1, 1, 31)
    grid = [
        r["d"]
        for r in db.execute(
            "SELECT (%s::date + %s::interval * k)::date AS d FROM generate_series(0, 60) k",
            (start, interval),
        ).fetchall()
    ]
    starts = [s for s in grid if s <= t]
    now = db.execute("SELECT now() AS n").fetchone()["n"]
    usage = []
    for s, e in zip(starts, grid[1:], strict=False):
        for when, amount in (
            (first_instant(s), D("3")),
            (first_instant(s) + timedelta(minutes=5), D("4")),
            (first_instant(s) + (first_instant(e) - first_instant(s)) / 2, D("11")),
            (first_instant(e) - timedelta(microseconds=1), D("2")),
        ):
            if when < now - timedelta(minutes=1):
                usage.append((when, amount))
    clients = {ns: make_client(namespace=ns) for ns in ("on_time", "late")}

    def use(ns: str, when: datetime, amount: Decimal) -> None:
        if user is None:
            clients[ns].allocate(None, ET, amount, UNIT, event_time=when)
        else:
            clients[ns].consume(user, ET, amount, UNIT, event_time=when)

    for c in clients.values():
        c.set_period_config(user, ET, UNIT, None, start, D("10"), limit, interval)
    steps: dict[str, list[dict[str, Any]]] = {"on_time": []}
    applied = 0
    for s in starts:
        at = min(first_instant(s) + timedelta(minutes=10), now)
        while applied < len(usage) and usage[applied][0] <= at:
            use("on_time", *usage[applied])
            applied += 1
        steps["on_time"] += roll(db, now=at, namespace="on_time")
    for when, amount in usage[applied:]:
        use("on_time", when, amount)
    steps["on_time"] += roll(db, namespace="on_time")
    for when, amount in usage:
        use("late", when, amount)
    steps["late"] = roll(db, namespace="late")

    def history(ns: str) -> list[tuple[Any, ...]]:
        rows = db.execute(
            "SELECT period_start, period_end, allocation, open_balance, expired,"
            " carried_over, close_balance FROM meter.periods WHERE namespace = %s"
            " ORDER BY period_start",
            (ns,),
        ).fetchall()
        return [tuple(r.values()) for r in rows]

    assert [r[0] for r in history("on_time")] == starts
    assert history("late") == history("on_time")
    for before, after in itertools.pairwise(history("late")):
        assert after[3] == before[6] + after[2]
    opened = {r[0]: r[3] for r in history("late")}
    for ns in ("on_time", "late"):
        assert [s["balance"] for s in steps[ns]] == [opened[s] for s in starts]
    for c in clients.values():
        assert c.reconcile() == []
    assert (
        clients["late"].get_balance(user, ET, UNIT)["balance"]
        == clients["on_time"].get_balance(user, ET, UNIT)["balance"]
    )


def test_a_roll_locks_no_account_whose_period_has_not_ended(client, db, db_url):
    # From Sep 30, start + 1 month is Oct 30 but the period ends on Oct 30 (next: Oct 31).
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("1"), None)
    assert roll(db, now=datetime(2025, 10, 1, tzinfo=UTC))[-1]["opened_period_start"] == date(
        2025, 9, 30
    )
    with psycopg.connect(db_url) as other:
        other.execute("SELECT 1 FROM meter.accounts WHERE user_id = 'u1' FOR UPDATE")
        db.execute("SET lock_timeout = '2s'")
        try:
            assert roll(db, now=datetime(2025, 10, 30, 12, tzinfo=UTC)) == []
        finally:
            db.execute("RESET lock_timeout")
    assert [s["opened_period_start"] for s in roll(db, now=datetime(2025, 10, 31, tzinfo=UTC))] == [
        date(2025, 10, 31)
    ]


def test_a_roll_through_recorded_periods_replays_them(client, db):
    # History made by another rule (the old roll slid to the 28th; here by hand).
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("100"), None)
    client.open_period("u1", ET, UNIT, None, date(2025, 1, 31))
    for end, start in (
        (date(2025, 2, 27), date(2025, 2, 28)),
        (date(2025, 3, 27), date(2025, 3, 28)),
    ):
        client.close_period("u1", ET, UNIT, None, end)
        client.open_period("u1", ET, UNIT, None, start)
    before = ledger(db, "u1")
    # The configuration re-applied with its first start (nightly provisioning, say) leaves
    # the roll at the current period: nothing to walk again.
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("100"), None)
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 3, 28)
    assert roll(db, now=datetime(2025, 4, 15, tzinfo=UTC)) == []
    # A start stored back there before 024: the walk replays the recorded periods (not Mar
    # 30/31 on top of them), writes nothing and reports nothing.
    db.execute("UPDATE meter.accounts SET period_start = '2025-01-31' WHERE user_id = 'u1'")
    assert roll(db, now=datetime(2025, 4, 15, tzinfo=UTC)) == []
    assert ledger(db, "u1") == before
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 3, 28)
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("300")
    # off the grid now (the 28th): start + interval, as before
    assert [s["opened_period_start"] for s in roll(db, now=datetime(2025, 4, 28, tzinfo=UTC))] == [
        date(2025, 4, 28)
    ]
    # a new interval re-applied from the first start: from the current period on
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("100"), None, "14 days")
    assert roll(db, now=datetime(2025, 5, 5, tzinfo=UTC)) == []
    assert [s["opened_period_start"] for s in roll(db, now=datetime(2025, 5, 12, tzinfo=UTC))] == [
        date(2025, 5, 12)
    ]


def test_raising_the_allocation_at_the_current_start_keeps_the_day(client, db):
    # SDK docstring: period_start is the first day of the current period. Restating it
    # (Apr 30, cut from the 31st) to raise the allocation keeps the 31st.
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("100"), D("0"))
    roll(db, now=datetime(2025, 5, 15, tzinfo=UTC))
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 4, 30)
    client.set_period_config("u1", ET, UNIT, None, date(2025, 4, 30), D("200"), D("0"))
    assert roll(db, now=datetime(2025, 5, 30, tzinfo=UTC)) == []
    steps = roll(db, now=datetime(2025, 7, 31, tzinfo=UTC))
    assert [(s["opened_period_start"], s["allocation"]) for s in steps] == [
        (date(2025, 5, 31), D("200")),
        (date(2025, 6, 30), D("200")),
        (date(2025, 7, 31), D("200")),
    ]


def test_a_configuration_moved_on_closes_the_period_still_open(client, db):
    # A plan change from Sep 15: the period opened Sep 1 ends Sep 14, and with limit 0
    # nothing of it runs on into the new one.
    client.set_period_config("u1", ET, UNIT, None, date(2025, 8, 1), D("100"), D("0"))
    roll(db, now=datetime(2025, 9, 10, tzinfo=UTC))
    client.consume("u1", ET, D("30"), UNIT, event_time=datetime(2025, 9, 5, tzinfo=UTC))
    client.set_period_config("u1", ET, UNIT, None, date(2025, 9, 15), D("200"), D("0"))
    steps = roll(db, now=datetime(2025, 9, 15, 1, tzinfo=UTC))
    assert [
        (s["status"], s["closed_period_end"], s["expired"], s["opened_period_start"], s["balance"])
        for s in steps
    ] == [("rolled", date(2025, 9, 14), D("70"), date(2025, 9, 15), D("200"))]
    assert [(p["period_start"], p["period_end"]) for p in periods(db, "u1")] == [
        (date(2025, 8, 1), date(2025, 8, 31)),
        (date(2025, 9, 1), date(2025, 9, 14)),
        (date(2025, 9, 15), None),
    ]
    assert client.reconcile() == []


def test_an_interval_stored_too_long_stops_only_its_own_account(client, db):
    # Before 024 a tenant could store '200000000 days'; the roll's date arithmetic
    # overflowed in its candidate query and no tenant's periods rolled.
    client.set_period_config("long", ET, UNIT, None, date(2025, 1, 31), D("10"), None)
    db.execute(
        "UPDATE meter.accounts SET period_interval = '200000000 days' WHERE user_id = 'long'"
    )
    client.open_period("long", ET, UNIT, None, date(2025, 1, 31))
    client.set_period_config("other", ET, UNIT, None, date(2025, 1, 1), D("10"), None)
    steps = roll(db, now=datetime(2025, 3, 1, tzinfo=UTC))
    assert [(s["user_id"], s["opened_period_start"]) for s in steps] == [
        ("other", date(2025, 1, 1)),
        ("other", date(2025, 2, 1)),
        ("other", date(2025, 3, 1)),
    ]


def test_a_start_rewound_inside_recorded_periods_grants_nothing_twice(client, db):
    client.set_period_config("u1", ET, UNIT, None, date(2025, 8, 1), D("100"), D("0"))
    roll(db, now=datetime(2025, 9, 2, tzinfo=UTC))
    before = ledger(db, "u1")
    # Aug 15 is inside August, which was closed: no period started on it
    client.set_period_config("u1", ET, UNIT, None, date(2025, 8, 15), D("100"), D("0"))
    assert roll(db, now=datetime(2025, 9, 2, tzinfo=UTC)) == []
    assert ledger(db, "u1") == before
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 9, 1)
    steps = roll(db, now=datetime(2025, 10, 1, tzinfo=UTC))
    assert [(s["closed_period_end"], s["opened_period_start"]) for s in steps] == [
        (date(2025, 9, 30), date(2025, 10, 1))
    ]
    assert [p["period_start"] for p in periods(db, "u1")] == [
        date(2025, 8, 1),
        date(2025, 9, 1),
        date(2025, 10, 1),
    ]
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("100")


def test_set_period_config_refuses_a_start_that_would_skip_periods(client, db, snapshot):
    # This month's period is open; its successor starts on the 1st of next month, not due
    # yet. A start on the 15th of the month after would leave next month unopened.
    t = today(db)
    this, nxt, after = (month_start(t, back) for back in (0, -1, -2))
    client.set_period_config("u1", ET, UNIT, None, this, D("100"), D("0"))
    roll(db)
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config("u1", ET, UNIT, None, after + timedelta(days=14), D("200"), D("0"))
    assert ei.value.parameter == "period_start"
    assert nxt.isoformat() in str(ei.value)
    assert snapshot() == before
    # up to the next start is a plan change at a period's end, or in its middle
    client.set_period_config("u1", ET, UNIT, None, nxt, D("200"), D("0"))
    client.set_period_config("u1", ET, UNIT, None, this + timedelta(days=5), D("200"), D("0"))


def test_the_refusal_reads_the_open_period_s_own_interval_and_closed_periods(client, db, snapshot):
    t = today(db)
    # (a) a pending configuration's interval does not widen the limit
    client.set_period_config("a", ET, UNIT, None, t, D("100"), D("0"), "1 day")
    # (b) a period closed by hand before the roll still has a successor due
    client.set_period_config("b", ET, UNIT, None, t, D("100"), D("0"), "1 day")
    roll(db)
    client.close_period("b", ET, UNIT, None, t)
    client.set_period_config("a", ET, UNIT, None, t + timedelta(days=1), D("100"), D("0"), "3 days")
    before = snapshot()
    for user in ("a", "b"):
        with pytest.raises(ValidationError) as ei:
            client.set_period_config(
                user, ET, UNIT, None, t + timedelta(days=2), D("100"), D("0"), "1 day"
            )
        assert ei.value.parameter == "period_start"
        assert (t + timedelta(days=1)).isoformat() in str(ei.value), user
    assert snapshot() == before


def ledger_with_actors(db: psycopg.Connection[Any], user: str) -> list[tuple[Any, ...]]:
    rows = db.execute(
        "SELECT entry_type, amount, event_time, actor_id FROM meter.ledger"
        " WHERE user_id = %s ORDER BY event_time, id",
        (user,),
    ).fetchall()
    return [tuple(r.values()) for r in rows]


def test_set_period_config_catches_up_a_late_roll_first(client, db):
    # Two identical accounts, monthly since two months back. The roll reaches "a_on_time"
    # (batch 2: its two steps) but not "b_late", as when beat is down. A plan change from
    # the 15th of this month is within the limit for the first; for the second it looked
    # past one (its open period's successor is two months old) and was refused. It now
    # rolls "b_late" up to today first, and both end alike.
    t = today(db)
    m2, m1, m0 = (month_start(t, back) for back in (2, 1, 0))
    for user in ("a_on_time", "b_late"):
        client.set_period_config(user, ET, UNIT, None, m2, D("100"), D("30"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    for user in ("a_on_time", "b_late"):
        client.consume(user, ET, D("20"), UNIT, event_time=first_instant(m2) + timedelta(days=3))
    steps = roll(db, batch=2)
    assert [(s["user_id"], s["opened_period_start"]) for s in steps] == [
        ("a_on_time", m1),
        ("a_on_time", m0),
    ]
    change = (m0 + timedelta(days=14), D("200"), D("30"))
    client.set_period_config("a_on_time", ET, UNIT, None, *change)
    client.set_period_config("b_late", ET, UNIT, None, *change)
    assert [p["period_start"] for p in periods(db, "b_late")] == [m2, m1, m0]

    roll(db)  # the change's start, when it has come: the same for both
    assert ledger_with_actors(db, "b_late") == ledger_with_actors(db, "a_on_time")
    assert periods(db, "b_late") == periods(db, "a_on_time")
    keys = ("period_start", "period_allocation", "balance", "total_credited", "total_debited")
    late, on_time = (client.get_account(u, ET, UNIT) for u in ("b_late", "a_on_time"))
    assert [late[k] for k in keys] == [on_time[k] for k in keys]
    assert late["period_allocation"] == D("200")
    assert roll(db) == []
    assert client.reconcile() == []


def _configured_ahead(db: psycopg.Connection[Any], user: str, days: int = 40) -> None:
    """Date the account's configuration changes ``days`` back: configured ahead of a start
    that has begun since (a test cannot wait for its start)."""
    db.execute(
        "UPDATE meter.period_config_changes SET changed_at = changed_at - %s * interval '1 day'"
        " WHERE user_id = %s",
        (days, user),
    )


def test_a_due_configured_start_opens_before_a_change_replaces_it(client, db, snapshot):
    # Two identical accounts, monthly from the first of this month, configured last month.
    # The roll reaches "a_on_time" (batch 1) but not "b_late", as when beat is down. A
    # change from tomorrow, within the limit for both, used to replace b_late's
    # configuration before its first period ever opened: that period's allocation was
    # never granted. Now the change rolls the due start first (029), and both end alike.
    t = today(db)
    m0 = month_start(t, 0)
    for user in ("a_on_time", "b_late"):
        client.set_period_config(user, ET, UNIT, None, m0, D("100"), D("30"))
        _configured_ahead(db, user)
    assert [s["user_id"] for s in roll(db, batch=1)] == ["a_on_time"]
    # a start past the next one is refused for both, and the roll it began is undone
    before = snapshot()
    for user in ("a_on_time", "b_late"):
        with pytest.raises(ValidationError) as ei:
            client.set_period_config(user, ET, UNIT, None, month_start(t, -2), D("1"), None)
        assert ei.value.parameter == "period_start"
    assert snapshot() == before
    change = (t + timedelta(days=1), D("200"), D("30"))
    client.set_period_config("a_on_time", ET, UNIT, None, *change)
    client.set_period_config("b_late", ET, UNIT, None, *change)
    assert [p["period_start"] for p in periods(db, "b_late")] == [m0]
    assert ledger_with_actors(db, "b_late") == ledger_with_actors(db, "a_on_time")
    assert periods(db, "b_late") == periods(db, "a_on_time")
    keys = ("period_start", "period_allocation", "balance", "total_credited", "total_debited")
    late, on_time = (client.get_account(u, ET, UNIT) for u in ("b_late", "a_on_time"))
    assert [late[k] for k in keys] == [on_time[k] for k in keys]
    assert late["balance"] == D("100")
    assert client.reconcile() == []


def test_a_backdated_start_replaced_before_the_roll_is_taken_as_corrected(client, db):
    # A start set after it began (a typo: years back, say), replaced before beat came
    # round: the replacement stands alone, as before 029; rolling the typo first would
    # grant every period since it.
    t = today(db)
    client.set_period_config("u1", ET, UNIT, None, month_start(t, 30), D("100"), None)
    client.set_period_config("u1", ET, UNIT, None, t + timedelta(days=1), D("7"), None)
    assert periods(db, "u1") == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("0")
    assert client.get_account("u1", ET, UNIT)["period_start"] == t + timedelta(days=1)


def test_a_catch_up_that_still_refuses_changes_nothing(client, db, snapshot):
    # The roll catches the account up to this month; the start, past next month's first
    # day (not due), would still skip next month: refused, and the roll undone with it.
    t = today(db)
    m2, nxt = month_start(t, 2), month_start(t, -1)
    client.set_period_config("u1", ET, UNIT, None, m2, D("100"), D("30"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config("u1", ET, UNIT, None, nxt + timedelta(days=1), D("1"), None)
    assert ei.value.parameter == "period_start"
    assert f"no later than {nxt.isoformat()}" in str(ei.value)  # as rolled up to today
    assert snapshot() == before


def test_a_start_no_roll_could_accept_is_refused_without_one(client, db, snapshot):
    # Daily since 300 days back and never rolled since: a start 40 days on is past today
    # plus the longest interval configured, so no roll could accept it. It is refused as
    # the periods stand (naming tomorrow of 300 days back), without rolling them first.
    t = today(db)
    first = t - timedelta(days=300)
    client.set_period_config("u1", ET, UNIT, None, first, D("1"), None, "1 day")
    roll(db, now=first_instant(first) + timedelta(hours=1))
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config(
            "u1", ET, UNIT, None, t + timedelta(days=40), D("1"), None, "1 day"
        )
    assert f"no later than {(first + timedelta(days=1)).isoformat()}" in str(ei.value)
    assert snapshot() == before


def test_a_start_past_a_due_pending_configuration_is_judged_after_it_opens(client, db):
    # Weekly since three days ago; a change from yesterday is pending (due, not rolled):
    # "a_on_time" gets it rolled, "b_late" does not. A change from six days on is within
    # the limit once yesterday's period is open, and was refused while it was not.
    t = today(db)
    for user in ("a_on_time", "b_late"):
        client.set_period_config(
            user, ET, UNIT, None, t - timedelta(days=3), D("100"), D("0"), "7 days"
        )
    roll(db)
    for user in ("a_on_time", "b_late"):
        client.set_period_config(
            user, ET, UNIT, None, t - timedelta(days=1), D("50"), D("0"), "7 days"
        )
    assert [s["user_id"] for s in roll(db, batch=1)] == ["a_on_time"]
    for user in ("a_on_time", "b_late"):
        client.set_period_config(
            user, ET, UNIT, None, t + timedelta(days=6), D("70"), D("0"), "7 days"
        )
    assert ledger_with_actors(db, "b_late") == ledger_with_actors(db, "a_on_time")
    assert periods(db, "b_late") == periods(db, "a_on_time")
    assert [p["period_start"] for p in periods(db, "b_late")] == [
        t - timedelta(days=3),
        t - timedelta(days=1),
    ]


def test_a_catch_up_is_recorded_as_the_roll_s(client, db):
    # The caller's actor, on_behalf_of and reason are its own call's (the configuration
    # change); the periods the catch-up rolls are the roll's, as beat would have written them.
    t = today(db)
    m2, m0 = month_start(t, 2), month_start(t, 0)
    client.set_period_config("u1", ET, UNIT, None, m2, D("100"), D("30"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    client.set_actor(actor_id="alice", request_id="req-7", on_behalf_of="bob", reason="upgrade")
    client.set_period_config("u1", ET, UNIT, None, m0 + timedelta(days=14), D("200"), D("30"))
    rows = db.execute(
        "SELECT entry_type, actor_id, on_behalf_of, reason, request_id FROM meter.ledger"
        " WHERE user_id = 'u1' AND event_time > %s ORDER BY event_time, id",
        (first_instant(m2),),
    ).fetchall()
    assert [r["entry_type"] for r in rows] == [
        "expiration", "carry_over", "allocation", "expiration", "carry_over", "allocation"
    ]  # fmt: skip
    assert {(r["actor_id"], r["on_behalf_of"], r["reason"], r["request_id"]) for r in rows} == {
        ("system:periods", None, None, "req-7")
    }
    change = db.execute(
        "SELECT actor FROM meter.period_config_changes WHERE user_id = 'u1'"
        " ORDER BY change_id DESC LIMIT 1"
    ).fetchone()
    assert change["actor"] == {
        "actor_id": "alice", "request_id": "req-7", "on_behalf_of": "bob", "reason": "upgrade"
    }  # fmt: skip


def test_a_catch_up_in_a_transaction_holding_the_account_does_not_deadlock_the_roll(
    client, db, db_url
):
    # The caller's own transaction holds the account (a consume) while beat's roll waits
    # for it; the caller then changes the configuration, which catches the account up.
    # Neither may fail: the catch-up takes no lock the roll holds. (The months exist: a
    # month the roll creates stays locked until it commits, and a transaction holding an
    # account can wait on it, as any that creates a month under account locks.)
    t = today(db)
    m2, m1, m0 = (month_start(t, back) for back in (2, 1, 0))
    for month in (month_start(t, 3), m2, m1, m0):
        db.execute("SELECT meter.create_partition(%s, %s)", (month.year, month.month))
    for user in ("a_other", "u1"):
        client.set_period_config(user, ET, UNIT, None, m2, D("100"), D("0"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    outcome: dict[str, Any] = {}

    def beat() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
                outcome["roll"] = roll(conn)
        except BaseException as exc:
            outcome["roll"] = exc

    with psycopg.connect(db_url, row_factory=dict_row) as app:
        app.execute("SELECT 1")  # a transaction of the caller's: the SDK's calls nest in it
        MeterClient(app).consume("u1", ET, D("1"), UNIT)
        thread = threading.Thread(target=beat)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive()  # the roll waits for u1
        # this month's start, restated: past the limit until the account is caught up
        MeterClient(app).set_period_config("u1", ET, UNIT, None, m0, D("200"), D("0"))
        app.commit()
    thread.join(30)
    assert not isinstance(outcome["roll"], BaseException), outcome["roll"]
    assert [p["period_start"] for p in periods(db, "u1")] == [m2, m1, m0]
    assert [p["period_start"] for p in periods(db, "a_other")] == [m2, m1, m0]
    assert client.reconcile() == []


def test_the_catch_up_bound_compares_intervals_as_dates(client, db):
    # Configured '361 days' a year ago, restated as '1 year': a start a year from today is
    # within reach of a roll up to today. As intervals, '1 year' (360 days) is less than
    # '361 days', and a bound taken that way refused the start without catching up.
    t = today(db)
    s = date(t.year - 1, t.month, min(t.day, 28))
    client.set_period_config("u1", ET, UNIT, None, s, D("10"), None, "361 days")
    roll(db, now=first_instant(s) + timedelta(hours=1))
    client.set_period_config("u1", ET, UNIT, None, s, D("10"), None, "1 year")
    start = date(s.year + 2, s.month, s.day)
    client.set_period_config("u1", ET, UNIT, None, start, D("20"), None, "1 year")
    assert [p["period_start"] for p in periods(db, "u1")] == [s, date(s.year + 1, s.month, s.day)]
    assert client.get_account("u1", ET, UNIT)["period_start"] == start


def test_a_catch_up_passes_over_an_interval_stored_too_long(client, db):
    # An interval stored before intervals were bounded (024), in an older configuration,
    # must not overflow the catch-up's date arithmetic.
    t = today(db)
    m2, m1, m0 = (month_start(t, back) for back in (2, 1, 0))
    client.set_period_config("u1", ET, UNIT, None, m2, D("10"), None)
    roll(db, now=first_instant(m2) + timedelta(days=1))
    client.set_period_config("u1", ET, UNIT, None, m2, D("10"), None)  # restated
    db.execute(
        "UPDATE meter.period_config_changes SET period_interval = '200000000 days'"
        " WHERE change_id = (SELECT min(change_id) FROM meter.period_config_changes)"
    )
    client.set_period_config("u1", ET, UNIT, None, m0, D("10"), None)
    assert [p["period_start"] for p in periods(db, "u1")] == [m2, m1, m0]


def waiting_on_lock(db: psycopg.Connection[Any], statement: str, event: str) -> bool:
    """Whether a session running ``statement`` waits for a lock of kind ``event``."""
    rows = db.execute(
        "SELECT 1 FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND wait_event = %s AND query LIKE %s",
        (event, f"%{statement}%"),
    ).fetchall()
    return bool(rows)


def blocked_by(db: psycopg.Connection[Any], waiter: str, holder: str) -> bool:
    """Whether the session running ``waiter`` waits for a lock the one running ``holder`` has."""
    row = db.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity w, pg_stat_activity h"
        "  WHERE w.query LIKE %s AND h.query LIKE %s"
        "    AND h.pid = ANY (pg_blocking_pids(w.pid))) AS blocked",
        (f"%{waiter}%", f"%{holder}%"),
    ).fetchone()
    return bool(row["blocked"])


def test_a_catch_up_creates_its_months_before_it_locks_the_account(client, db, db_url):
    # Last month's partition is missing (the one before exists). The catch-up of "u1" is paused in its first step
    # (a trigger waits on a lock the test holds), holding u1. Beat's roll creates last
    # month for "a_other", then waits for u1. Had the catch-up created last month only in
    # its second step, under u1's lock, it would wait for beat: a deadlock. It creates its
    # months first, so beat waits for it instead, and both finish.
    t = today(db)
    m3, m2, m1, m0 = (month_start(t, back) for back in (3, 2, 1, 0))
    for user in ("a_other", "u1"):
        client.set_period_config(user, ET, UNIT, None, m3, D("100"), D("0"))
    roll(db, now=first_instant(m3) + timedelta(days=1))
    db.execute("SELECT meter.create_partition(%s, %s)", (m2.year, m2.month))
    assert f"ledger_{m1:%Y_%m}" not in ledger_partitions(db)
    db.execute(
        "CREATE FUNCTION public.pause_u1() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN IF NEW.user_id = 'u1' THEN PERFORM pg_advisory_xact_lock(4242); END IF;"
        " RETURN NEW; END$$"
    )
    db.execute(
        "CREATE TRIGGER pause_u1 AFTER INSERT ON meter.periods"
        " FOR EACH ROW EXECUTE FUNCTION public.pause_u1()"
    )
    outcome: dict[str, Any] = {}

    def run(name: str, call: Callable[[psycopg.Connection[Any]], Any]) -> threading.Thread:
        def target() -> None:
            try:
                with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
                    outcome[name] = call(conn)
            except BaseException as exc:
                outcome[name] = exc

        thread = threading.Thread(target=target)
        thread.start()
        return thread

    with psycopg.connect(db_url, row_factory=dict_row) as pause:
        pause.execute("SELECT pg_advisory_xact_lock(4242)")
        change = run(  # in SQL: the SDK would retry a deadlock and hide it
            "change",
            lambda conn: conn.execute(
                "SELECT meter.set_period_config('u1', %s, %s, NULL, %s, 200, 0)", (ET, UNIT, m0)
            ),
        )
        eventually(lambda: waiting_on_lock(db, "set_period_config", "advisory"))
        beat = run("roll", roll)
        eventually(lambda: blocked_by(db, "roll_periods", "set_period_config"))
        pause.commit()
    change.join(30)
    beat.join(30)
    assert not isinstance(outcome.get("change"), BaseException), outcome
    assert not isinstance(outcome.get("roll"), BaseException), outcome
    for user in ("a_other", "u1"):
        assert [p["period_start"] for p in periods(db, user)] == [m3, m2, m1, m0]
    assert client.reconcile() == []


def test_a_refusal_says_why_the_catch_up_failed(client, db, snapshot):
    t = today(db)
    m2 = month_start(t, 2)
    client.set_period_config("u1", ET, UNIT, None, m2, D("100"), D("0"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    # the roll fails for this account (a failure injected where it records periods)
    db.execute(
        "CREATE FUNCTION public.fail_roll() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'injected failure'; END$$"
    )
    db.execute(
        "CREATE TRIGGER fail_roll BEFORE INSERT OR UPDATE ON meter.periods"
        " FOR EACH ROW EXECUTE FUNCTION public.fail_roll()"
    )
    assert [s["status"] for s in roll(db)] == ["error"]
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config("u1", ET, UNIT, None, t, D("100"), D("0"))
    assert ei.value.parameter == "period_start"
    assert "rolling this account up to today failed: P0001 injected failure" in str(ei.value)
    assert snapshot() == before


def test_a_catch_up_waits_for_a_roll_under_way_and_repeats_nothing(client, db, db_url):
    # A roll holds its lock until it commits; a set_period_config that catches the same
    # account up waits for it, then finds nothing left to roll.
    t = today(db)
    m2, m1, m0 = (month_start(t, back) for back in (2, 1, 0))
    client.set_period_config("u1", ET, UNIT, None, m2, D("100"), D("30"))
    roll(db, now=first_instant(m2) + timedelta(days=1))
    errors: list[BaseException] = []

    def change() -> None:
        try:
            client.set_period_config(
                "u1", ET, UNIT, None, m0 + timedelta(days=14), D("200"), D("30")
            )
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(db_url, row_factory=dict_row) as held:
        assert [s["opened_period_start"] for s in roll(held)] == [m1, m0]
        thread = threading.Thread(target=change)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive()  # waiting for the roll
        held.commit()
    thread.join(30)
    assert errors == []
    assert [p["period_start"] for p in periods(db, "u1")] == [m2, m1, m0]
    assert [e for e, _, _ in ledger(db, "u1")].count("allocation") == 3
    assert client.get_account("u1", ET, UNIT)["period_allocation"] == D("200")
    assert client.reconcile() == []


def test_the_refusal_goes_by_a_restated_interval(client, db):
    # monthly, then restated as annual at the current start: the period of Mar 1 runs a
    # year, so an upgrade on Jun 15 skips nothing
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 1), D("100"), D("0"))
    roll(db, now=datetime(2025, 3, 10, tzinfo=UTC))
    client.set_period_config("u1", ET, UNIT, None, date(2025, 3, 1), D("1200"), D("0"), "1 year")
    assert roll(db, now=datetime(2025, 4, 2, tzinfo=UTC)) == []
    client.set_period_config("u1", ET, UNIT, None, date(2025, 6, 15), D("2400"), D("0"), "1 year")
    steps = roll(db, now=datetime(2025, 6, 15, 1, tzinfo=UTC))
    assert [(s["closed_period_end"], s["opened_period_start"]) for s in steps] == [
        (date(2025, 6, 14), date(2025, 6, 15))
    ]


def test_nightly_reprovisioning_walks_and_reports_nothing(client, db):
    t = today(db)
    first = t - timedelta(days=30)
    client.set_period_config("u1", ET, UNIT, None, first, D("10"), D("5"), "1 day")
    roll(db)
    before = ledger(db, "u1")
    client.set_period_config("u1", ET, UNIT, None, first, D("10"), D("5"), "1 day")
    assert client.get_account("u1", ET, UNIT)["period_start"] == t
    assert roll(db) == []
    assert ledger(db, "u1") == before


def test_a_walk_past_a_period_opened_by_hand_early_expires_nothing_twice(client, db):
    client.set_period_config("u1", ET, UNIT, None, date(2025, 9, 1), D("100"), D("50"))
    roll(db, now=datetime(2025, 9, 1, 0, 1, tzinfo=UTC))
    client.open_period("u1", ET, UNIT, None, date(2025, 10, 1))  # before the roll came
    roll(db, now=datetime(2025, 11, 1, tzinfo=UTC))
    before = ledger(db, "u1")
    # provisioning re-applies the configuration: the walk passes September again
    client.set_period_config("u1", ET, UNIT, None, date(2025, 9, 1), D("100"), D("50"))
    roll(db, now=datetime(2025, 11, 5, tzinfo=UTC))
    assert ledger(db, "u1") == before
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 11, 1)


def test_a_period_skipped_by_hand_is_neither_closed_again_nor_opened(client, db):
    # Two identical accounts; an operator opens Nov 1 by hand (skipping October) while
    # September runs, and closes November by hand. Only one then gets its unchanged
    # configuration re-applied: both must end with the same ledger.
    for user in ("reapplied", "control"):
        client.set_period_config(user, ET, UNIT, None, date(2025, 9, 1), D("100"), D("0"))
    roll(db, now=datetime(2025, 9, 2, tzinfo=UTC))
    for user in ("reapplied", "control"):
        client.open_period(user, ET, UNIT, None, date(2025, 11, 1))
        client.close_period(user, ET, UNIT, None, date(2025, 11, 30))
    client.set_period_config("reapplied", ET, UNIT, None, date(2025, 9, 1), D("100"), D("0"))
    roll(db, now=datetime(2025, 12, 15, tzinfo=UTC))
    assert [(e, a, t.date()) for e, a, t in ledger(db, "reapplied")] == [
        (e, a, t.date()) for e, a, t in ledger(db, "control")
    ]
    assert [p["period_start"] for p in periods(db, "reapplied")] == [
        p["period_start"] for p in periods(db, "control")
    ]
    assert client.reconcile() == []


def test_a_rewound_start_that_gave_way_keeps_the_day(client, db):
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("100"), D("0"))
    roll(db, now=datetime(2025, 4, 1, tzinfo=UTC))
    client.set_period_config("u1", ET, UNIT, None, date(2025, 3, 10), D("200"), D("0"))
    starts = []
    for day in (datetime(2025, 4, 2), datetime(2025, 5, 1), datetime(2025, 6, 1)):
        starts += [s["opened_period_start"] for s in roll(db, now=day.replace(tzinfo=UTC))]
    assert starts == [date(2025, 4, 30), date(2025, 5, 31)]


def test_the_hold_window_at_a_period_end_does_not_follow_the_time_zone(client, db):
    # A 24 h hold made 00:30 UTC on Mar 8 2026 holds at that day's end. In New York the
    # clocks moved that day, so its calendar day before the end is 23 hours long.
    client.set_period_config("u1", ET, UNIT, None, date(2026, 3, 8), D("100"), D("0"), "1 day")
    roll(db, now=datetime(2026, 3, 8, 1, tzinfo=UTC))
    hold = client.reserve("u1", ET, D("40"), UNIT)
    db.execute(
        "UPDATE meter.reservations SET created_at = %s, expires_at = %s, ttl_seconds = 86400"
        " WHERE reservation_id = %s",
        (
            datetime(2026, 3, 8, 0, 30, tzinfo=UTC),
            datetime(2026, 3, 9, 0, 30, tzinfo=UTC),
            hold["reservation_id"],
        ),
    )
    db.execute("SET TimeZone = 'America/New_York'")
    try:
        steps = roll(db, now=datetime(2026, 3, 9, tzinfo=UTC))
    finally:
        db.execute("RESET TimeZone")
    assert (steps[0]["closed_period_end"], steps[0]["expired"]) == (date(2026, 3, 8), D("60"))


def next_start(db: psycopg.Connection[Any], user: str, start: date, interval: str) -> date:
    return db.execute(
        "SELECT meter._next_period_start(a.namespace, a.account_id, %s, %s::interval) AS d"
        " FROM meter.accounts a WHERE a.user_id = %s",
        (start, interval, user),
    ).fetchone()["d"]


@pytest.mark.parametrize(
    ("configured", "interval", "start", "expected"),
    [
        (date(2025, 1, 31), "1 month", date(2025, 2, 28), date(2025, 3, 31)),
        (date(2025, 1, 31), "1 month", date(2025, 4, 30), date(2025, 5, 31)),
        (date(2025, 1, 30), "1 month", date(2025, 2, 28), date(2025, 3, 30)),
        (date(2024, 2, 29), "1 year", date(2027, 2, 28), date(2028, 2, 29)),
        # a day that no month cuts: start + interval
        (date(2025, 1, 15), "1 month", date(2025, 2, 15), date(2025, 3, 15)),
        # off the grid (opened by hand on another day): start + interval
        (date(2025, 1, 31), "1 month", date(2025, 2, 15), date(2025, 3, 15)),
        (date(2025, 1, 31), "2 months", date(2025, 4, 30), date(2025, 6, 30)),
        # before the configured start
        (date(2025, 5, 31), "1 month", date(2025, 2, 28), date(2025, 3, 28)),
        # days are never cut
        (date(2025, 1, 31), "7 days", date(2025, 2, 28), date(2025, 3, 7)),
    ],
)
def test_next_period_start_follows_the_configured_grid(
    client, db, configured, interval, start, expected
):
    client.set_period_config("u1", ET, UNIT, None, configured, D("1"), None, interval)
    client.open_period("u1", ET, UNIT, None, configured)  # what the roll does first
    assert next_start(db, "u1", start, interval) == expected


def test_next_period_start_keeps_the_day_through_restated_starts(client, db):
    def opened(user: str, *days: int) -> list[date]:
        return [s["opened_period_start"] for s in roll(db, now=datetime(*days, tzinfo=UTC))]

    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 31), D("1"), None)
    assert opened("u1", 2025, 3, 5) == [date(2025, 1, 31), date(2025, 2, 28)]
    # the current start restated (to raise the allocation, say): still the 31st, also
    # for a second account with the same change made at the end of February
    client.set_period_config("u1", ET, UNIT, None, date(2025, 2, 28), D("2"), None)
    assert opened("u1", 2025, 5, 5) == [date(2025, 3, 31), date(2025, 4, 30)]
    assert next_start(db, "u1", date(2025, 4, 30), "1 month") == date(2025, 5, 31)
    # the same call again is accepted (a pending start says nothing of the grid)
    client.set_period_config("u1", ET, UNIT, None, date(2025, 5, 31), D("3"), None)
    client.set_period_config("u1", ET, UNIT, None, date(2025, 5, 31), D("3"), None)
    assert opened("u1", 2025, 5, 31) == [date(2025, 5, 31)]
    # a start on another day moves the day: the 28th from then on, Februaries included
    client.set_period_config("u1", ET, UNIT, None, date(2025, 6, 28), D("3"), None)
    assert opened("u1", 2026, 3, 1)[:2] == [date(2025, 6, 28), date(2025, 7, 28)]
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2026, 2, 28)
    assert next_start(db, "u1", date(2026, 2, 28), "1 month") == date(2026, 3, 28)
    # another interval starts its own grid
    client.set_period_config("u2", ET, UNIT, None, date(2025, 1, 31), D("1"), None)
    client.set_period_config("u2", ET, UNIT, None, date(2025, 2, 28), D("1"), None, "2 months")
    client.open_period("u2", ET, UNIT, None, date(2025, 2, 28))
    assert next_start(db, "u2", date(2025, 2, 28), "2 months") == date(2025, 4, 28)
    # an account never configured has no grid
    client.allocate("u3", ET, D("1"), UNIT)
    assert next_start(db, "u3", date(2025, 2, 28), "1 month") == date(2025, 3, 28)


def test_roll_ignores_unconfigured_and_future_accounts(client, db):
    t = today(db)
    client.allocate("plain", ET, D("5"), UNIT)
    future = month_start(t, -1)
    client.set_period_config("later", ET, UNIT, None, future, D("7"), None)
    assert roll(db) == []
    assert client.get_balance("later", ET, UNIT)["balance"] == D("0")


def test_roll_pool_accounts_and_daily_periods(client, db):
    t = today(db)
    client.set_period_config(
        None, ET, UNIT, None, t - timedelta(days=3), D("2"), D("1"), period_interval="1 day"
    )
    steps = roll(db)
    assert [(s["status"], s["opened_period_start"]) for s in steps] == [
        ("opened", t - timedelta(days=3)),
        ("rolled", t - timedelta(days=2)),
        ("rolled", t - timedelta(days=1)),
        ("rolled", t),
    ]
    assert client.get_balance(None, ET, UNIT)["balance"] == D("3")


def break_config(client, db, user: str) -> None:
    """A configuration that fails at every roll: a period start before 1900."""
    client.set_period_config(user, ET, UNIT, None, date(1900, 1, 1), D("1"))
    db.execute("UPDATE meter.accounts SET period_start = '1850-01-01' WHERE user_id = %s", (user,))


def test_a_period_configured_from_1900_rolls(client, db):
    # The earliest start set_period_config accepts. The day before it is in 1899, where no
    # row can be dated and no period can end: the roll no longer asks for its month.
    client.set_period_config("u1", ET, UNIT, None, date(1900, 1, 1), D("10"), None, "100 years")
    assert [(s["status"], s["opened_period_start"], s["error"]) for s in roll(db)] == [
        ("opened", date(1900, 1, 1), None),
        ("rolled", date(2000, 1, 1), None),
    ]


def test_set_period_config_refuses_a_start_before_1900(client, snapshot):
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.set_period_config("u1", ET, UNIT, None, date(1899, 12, 31), D("1"))
    assert ei.value.parameter == "period_start"
    assert snapshot() == before


def test_accounts_that_always_fail_do_not_use_up_the_batch(client, db):
    # Sorted before the healthy account and as many as the batch: it still rolls.
    t = today(db)
    for user in ("a1", "a2", "a3"):
        break_config(client, db, user)
    client.set_period_config("z", ET, UNIT, None, month_start(t, 1), D("3"), D("0"))
    steps = roll(db, batch=2)
    assert [(s["user_id"], s["status"]) for s in steps] == [
        ("a1", "error"), ("a2", "error"), ("a3", "error"), ("z", "opened"), ("z", "rolled"),
    ]  # fmt: skip
    assert client.get_balance("z", ET, UNIT)["balance"] == D("3")


def test_roll_reports_a_failing_account_and_rolls_the_others(client, db):
    t = today(db)
    # Rows cannot be dated before 1900: this account can never open its period.
    # set_period_config refuses such a start now (022); data from before, forced here:
    break_config(client, db, "bad")
    client.set_period_config("good", ET, UNIT, None, month_start(t, 1), D("3"), D("0"))
    steps = roll(db)
    assert [(s["user_id"], s["status"]) for s in steps] == [
        ("bad", "error"),
        ("good", "opened"),
        ("good", "rolled"),
    ]
    assert steps[0]["error"].startswith("MT001") and steps[0]["balance"] is None
    assert client.get_balance("good", ET, UNIT)["balance"] == D("3")
    assert client.get_balance("bad", ET, UNIT)["balance"] == D("0")
    assert [(s["user_id"], s["status"]) for s in roll(db)] == [("bad", "error")]


def test_two_concurrent_rolls_produce_each_period_once(client, db, db_url):
    t = today(db)
    users = [f"c{i}" for i in range(6)]
    for user in users:
        client.set_period_config(user, ET, UNIT, None, month_start(t, 3), D("100"), D("30"))

    def roll_alone(url: str) -> list[dict[str, Any]]:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            return roll(conn)

    results = twice_at_once(db_url, roll_alone)
    # 6 accounts x (first open + 3 rolls), split between the two runs, none twice
    steps = [s for r in results for s in r]
    assert len(steps) == 24
    assert len({(s["user_id"], s["opened_period_start"]) for s in steps}) == 24
    counts = db.execute(
        "SELECT entry_type, count(*) AS n FROM meter.ledger GROUP BY entry_type ORDER BY 1"
    ).fetchall()
    assert {r["entry_type"]: r["n"] for r in counts} == {
        "allocation": 24,
        "carry_over": 18,
        "expiration": 18,
    }
    for user in users:
        assert client.get_balance(user, ET, UNIT)["balance"] == D("130")
        assert len(periods(db, user)) == 4
    assert client.reconcile() == []


def test_roll_refuses_bad_arguments_and_changes_nothing(client, db, snapshot):
    client.set_period_config("u1", ET, UNIT, None, month_start(today(db), 2), D("1"))
    before = snapshot()
    with pytest.raises(psycopg.Error) as exc:
        roll(db, now=datetime.now(UTC) + timedelta(days=2))
    assert sqlstate(exc) == "MT001" and "now:" in str(exc.value)
    with pytest.raises(psycopg.Error) as exc:
        roll(db, batch=0)
    assert sqlstate(exc) == "MT001" and "batch_size:" in str(exc.value)
    assert snapshot() == before


def test_roll_needs_maintenance_rights_across_namespaces(client, db, app_url, maint_url):
    client.set_period_config("u1", ET, UNIT, None, month_start(today(db), 1), D("1"))
    with psycopg.connect(app_url, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SELECT * FROM meter.roll_periods()")
        assert sqlstate(exc) == "MT004"
        # For its own tenant, the application may roll.
        conn.execute("SELECT meter.set_tenant('default')")
        rows = conn.execute("SELECT status FROM meter.roll_periods('default')").fetchall()
        assert [r[0] for r in rows] == ["opened", "rolled"]
    with psycopg.connect(maint_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM meter.roll_periods()").fetchone()[0] == 0


# ---------------------------------------------------------------- prune_idempotency_keys


def age_key(db: psycopg.Connection[Any], key: str, days: float) -> None:
    db.execute(
        "UPDATE meter.idempotency_keys SET created_at = now() - make_interval(days => %s)"
        " WHERE key = %s",
        (days, key),
    )


def keys(db: psycopg.Connection[Any]) -> set[str]:
    return {r["key"] for r in db.execute("SELECT key FROM meter.idempotency_keys").fetchall()}


def prune(db: psycopg.Connection[Any], days: int = 35, batch: int = 10000, now: Any = None) -> int:
    return db.execute(
        "SELECT meter.prune_idempotency_keys(%s, %s, coalesce(%s::timestamptz, now())) AS n",
        (days, batch, now),
    ).fetchone()["n"]


def test_prune_deletes_old_keys_but_not_live_reservations(client, db):
    client.allocate("u1", ET, D("100"), UNIT, idempotency_key="old")
    client.allocate("u1", ET, D("1"), UNIT, idempotency_key="recent")
    client.consume("u1", ET, D("1"), UNIT, idempotency_key="old-consume")
    held = client.reserve("u1", ET, D("5"), UNIT, idempotency_key="old-hold")
    for key in ("old", "old-consume", "old-hold"):
        age_key(db, key, 40)
    age_key(db, "recent", 30)

    assert prune(db) == 2
    assert keys(db) == {"recent", "old-hold"}
    # As of 23 hours later (p_now goes no further), "recent" is 31 days old: kept. With a
    # 29-day window it goes; the hold's key stays while the hold is active.
    assert prune(db, now=datetime.now(UTC) + timedelta(hours=23)) == 0
    assert prune(db, days=29) == 1
    assert keys(db) == {"old-hold"}
    client.release(held["reservation_id"])
    assert prune(db) == 1
    assert keys(db) == set()
    # A pruned key is forgotten: the same request applies again (that is what the window
    # is for), and claims the key anew.
    client.allocate("u1", ET, D("100"), UNIT, idempotency_key="old")
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("200")


def test_prune_counts_days_of_24_hours_across_a_change_of_clocks(client, db):
    # 057: the window was 35 calendar days of the session's zone. New York moved its clocks
    # forward on 2026-03-08, so 35 days before 2026-03-20 12:00 UTC was Feb 13 13:00 UTC
    # there: a key 34 days 23.5 hours old went, inside the hour the worker's replay bound
    # for signed messages keeps as its margin for clocks that disagree.
    now = datetime(2026, 3, 20, 12, tzinfo=UTC)
    for key, age in (
        ("young", timedelta(days=35, minutes=-30)),
        ("old", timedelta(days=35, minutes=30)),
    ):
        client.allocate("u1", ET, D("1"), UNIT, idempotency_key=key)
        db.execute(
            "UPDATE meter.idempotency_keys SET created_at = %s WHERE key = %s", (now - age, key)
        )
    db.execute("SET TimeZone = 'America/New_York'")
    try:
        assert prune(db, now=now) == 1
    finally:
        db.execute("RESET TimeZone")
    assert keys(db) == {"young"}


def test_prune_keeps_keys_a_recent_retention_fold_still_needs(client, db):
    long_ago = datetime.now(UTC) - timedelta(days=31 * 30)
    for user in ("kept", "pruned"):
        client.allocate(user, ET, D("1"), UNIT, idempotency_key=f"k-{user}", event_time=long_ago)
        age_key(db, f"k-{user}", 50)
    db.execute("SELECT meter.drop_old_partitions(24)")
    # "kept" was folded 20 days ago, when its key (then 30 days old) was within the window;
    # "pruned" was folded 10 days ago, when its key was 40 days old, already past it.
    for user, days in (("kept", 20), ("pruned", 10)):
        db.execute(
            "UPDATE meter.ledger_checkpoints c SET updated_at = now() - make_interval(days => %s)"
            " FROM meter.accounts a WHERE a.account_id = c.account_id AND a.user_id = %s",
            (days, user),
        )
    assert prune(db) == 1
    assert keys(db) == {"k-kept"}
    assert client.reconcile() == []


def test_prune_in_batches_and_concurrently(client, db, db_url):
    for i in range(30):
        client.allocate("u1", ET, D("1"), UNIT, idempotency_key=f"k{i}")
    db.execute("UPDATE meter.idempotency_keys SET created_at = now() - interval '90 days'")
    assert prune(db, batch=10) == 10
    counts: list[int] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            barrier.wait()
            counts.append(prune(conn, batch=15))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(counts) <= 20 and prune(db) == 20 - sum(counts)
    assert keys(db) == set()


def test_prune_refuses_bad_arguments_and_changes_nothing(client, db, snapshot, app_url):
    client.allocate("u1", ET, D("1"), UNIT, idempotency_key="k")
    age_key(db, "k", 100)
    before = snapshot()
    for args, param in (((0, 10, None), "older_than_days:"), ((35, 0, None), "batch_size:")):
        with pytest.raises(psycopg.Error) as exc:
            prune(db, *args)
        assert sqlstate(exc) == "MT001" and param in str(exc.value)
    with pytest.raises(psycopg.Error) as exc:
        prune(db, now=datetime.now(UTC) + timedelta(days=3))
    assert sqlstate(exc) == "MT001"
    with psycopg.connect(app_url, autocommit=True) as conn:
        conn.execute("SELECT meter.set_tenant('default')")
        with pytest.raises(psycopg.Error) as exc:
            conn.execute("SELECT meter.prune_idempotency_keys()")
        # Not granted to meter_app (sql/roles.sql); the function refuses a tenant too.
        assert sqlstate(exc) == "42501"
    assert snapshot() == before


# ---------------------------------------------------------------- partitions and retention


def test_partitions_ahead_and_retention_keep_reconcile_empty(client, db, db_url):
    t = today(db)
    created = wdb.ensure_partitions(db_url, 1, 6)
    expected = {f"ledger_{month_start(t, -i):%Y_%m}" for i in range(7)}
    assert expected <= ledger_partitions(db)
    assert set(created) == {f"ledger_{month_start(t, -i):%Y_%m}" for i in (4, 5, 6)}
    assert wdb.ensure_partitions(db_url, 1, 6) == []

    old = first_instant(month_start(t, 30)) + timedelta(days=3)
    client.allocate("u1", ET, D("10"), UNIT, event_time=old)
    client.consume("u1", ET, D("4"), UNIT, event_time=old + timedelta(days=1))
    client.allocate("u1", ET, D("1"), UNIT)
    assert wdb.drop_old_partitions(db_url, 1, 24) == [f"ledger_{month_start(t, 30):%Y_%m}"]
    assert client.reconcile() == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("7")
    assert wdb.drop_old_partitions(db_url, 1, 24) == []


def test_retention_drops_a_backlog_one_month_per_transaction(client, db, db_url):
    # Each call of drop_old_partitions holds the ledger's ACCESS EXCLUSIVE lock, which every
    # read and write waits for, to its commit (045): the worker drops a backlog oldest first,
    # a month per transaction, so that no read or write waits for more than one month's fold.
    t = today(db)
    for user, back in (("u1", 32), ("u2", 31), ("u3", 30)):
        client.allocate(user, ET, D("2"), UNIT, event_time=first_instant(month_start(t, back)))
    assert wdb.drop_old_partitions(db_url, 1, 24) == [
        f"ledger_{month_start(t, back):%Y_%m}" for back in (32, 31, 30)
    ]
    # one account per month: one transaction per checkpoint row
    folds = db.execute("SELECT count(DISTINCT xmin::text) AS n FROM meter.ledger_checkpoints")
    assert folds.fetchone()["n"] == 3
    assert client.reconcile() == []
    assert wdb.drop_old_partitions(db_url, 1, 24) == []


def twice_at_once(url: str, call: Any) -> list[Any]:
    """``call(url)`` in two threads released together; both results (errors raised)."""
    barrier = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            results.append(call(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    return results


def test_partitions_and_retention_run_twice_at_once(client, db, db_url):
    t = today(db)
    created = twice_at_once(db_url, lambda url: wdb.ensure_partitions(url, 1, 9))
    # each month created by exactly one of the two
    assert sorted(created[0] + created[1]) == sorted(
        f"ledger_{month_start(t, -i):%Y_%m}" for i in range(4, 10)
    )
    for back in (30, 29):
        client.allocate("u1", ET, D("2"), UNIT, event_time=first_instant(month_start(t, back)))
    client.allocate("u1", ET, D("1"), UNIT)
    dropped = twice_at_once(db_url, lambda url: wdb.drop_old_partitions(url, 1, 24))
    assert sorted(dropped[0] + dropped[1]) == [
        f"ledger_{month_start(t, back):%Y_%m}" for back in (30, 29)
    ]
    checkpoint = db.execute("SELECT balance, entries FROM meter.ledger_checkpoints").fetchone()
    assert (checkpoint["balance"], checkpoint["entries"]) == (D("4"), 2)
    assert client.reconcile() == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("5")


# ---------------------------------------------------------------- maintenance runs


def runs(db: psycopg.Connection[Any]) -> dict[str, dict[str, Any]]:
    return {r["task"]: r for r in db.execute("SELECT * FROM meter.get_maintenance_runs()")}


def test_maintenance_runs_record_the_last_outcome(db, db_url, maint_url, app_url, snapshot):
    assert runs(db) == {}
    started = datetime.now(UTC) - timedelta(seconds=5)
    wdb.record_maintenance_run(
        maint_url, 1, task="t", ok=True, result={"n": D("1.5")}, started_at=started
    )
    first = runs(db)["t"]
    assert first["runs"] == 1 and first["last_started_at"] == started
    assert first["last_result"] == {"n": D("1.5")} and first["last_error"] is None
    assert first["last_ok_at"] == first["last_finished_at"]

    wdb.record_maintenance_run(maint_url, 1, task="t", ok=False, error="boom")
    second = runs(db)["t"]
    assert second["runs"] == 2 and second["last_error"] == "boom"
    assert second["last_ok_at"] == first["last_ok_at"]
    assert second["last_finished_at"] > first["last_finished_at"]

    wdb.record_maintenance_run(maint_url, 1, task="t", ok=True)
    assert runs(db)["t"]["last_error"] is None

    before = snapshot()
    with pytest.raises(psycopg.Error) as exc:
        db.execute("SELECT meter.record_maintenance_run(' t', true, NULL, NULL)")
    assert sqlstate(exc) == "MT001" and "task:" in str(exc.value)
    with psycopg.connect(app_url, autocommit=True) as conn:
        for stmt in (
            "SELECT meter.record_maintenance_run('x', true, NULL, NULL)",
            "SELECT * FROM meter.get_maintenance_runs()",
        ):
            with pytest.raises(psycopg.Error) as exc:
                conn.execute(stmt)
            assert sqlstate(exc) == "42501"  # not granted to meter_app (sql/roles.sql)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM meter.maintenance_runs")
    assert snapshot() == before


# ---------------------------------------------------------------- meter periods show


def test_cli_periods_show(client, db, db_url, app_url):
    import json

    from click.testing import CliRunner

    from meter.cli import main

    t = today(db)
    client.set_period_config("u1", ET, UNIT, None, month_start(t, 2), D("100"), D("30"))
    client.set_period_config(None, "api", "req", None, month_start(t, 0), D("9"))
    roll(db)
    runner = CliRunner()
    out = runner.invoke(main, ["periods", "show", "u1", "--database-url", app_url, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output, parse_float=Decimal, parse_int=Decimal)
    assert [(r["period_start"], r["expired"], r["carried_over"]) for r in rows] == [
        (str(month_start(t, 0)), None, None),
        (str(month_start(t, 1)), D("100"), D("30")),
        (str(month_start(t, 2)), D("70"), D("30")),
    ]
    assert rows[0]["opened_by"] == "system:periods"
    out = runner.invoke(main, ["periods", "show", "--pool", "--database-url", db_url])
    assert out.exit_code == 0, out.output
    assert "api" in out.output and "system:periods" in out.output
    out = runner.invoke(main, ["periods", "show", "nobody", "--database-url", db_url])
    assert out.exit_code == 0 and "no periods" in out.output
    out = runner.invoke(main, ["periods", "show", "--database-url", db_url])
    assert out.exit_code == 2
    out = runner.invoke(main, ["periods", "show", "u1", "--unit", " x", "--database-url", db_url])
    assert out.exit_code == 2 and "unit" in out.output


# ---------------------------------------------------------------- the beat schedule


def test_beat_schedule_from_settings():
    from worker.schedule import EveryFromStart, beat_schedule
    from worker.settings import Settings

    default = beat_schedule(Settings.from_env({}))
    assert {name: (e["task"], e["schedule"].seconds, e["options"]["expires"])
            for name, e in default.items()} == {
        "meter.release-expired": ("meter.release_expired", 5, 5),
        "meter.roll-periods": ("meter.roll_periods", 60, 60),
        "meter.ensure-partitions": ("meter.ensure_partitions", 86400, 86400),
        "meter.prune-idempotency-keys": ("meter.prune_idempotency_keys", 3600, 3600),
    }  # fmt: skip
    tuned = beat_schedule(
        Settings.from_env(
            {"METER_LEDGER_RETENTION_MONTHS": "13", "METER_RETENTION_INTERVAL_SECONDS": "60",
             "METER_ROLL_INTERVAL_SECONDS": "2.5"}
        )
    )  # fmt: skip
    assert tuned["meter.retention"]["task"] == "meter.retention"
    assert tuned["meter.retention"]["schedule"].seconds == 60
    assert tuned["meter.roll-periods"]["schedule"].seconds == 2.5
    with pytest.raises(ValueError, match="METER_LEDGER_RETENTION_MONTHS"):
        Settings.from_env({"METER_LEDGER_RETENTION_MONTHS": "0"})
    # 034: above what its SQL function takes, a setting stops the worker at start.
    for var, most in [("METER_LEDGER_RETENTION_MONTHS", 1200),
                      ("METER_PARTITIONS_AHEAD_MONTHS", 120),
                      ("METER_IDEMPOTENCY_KEY_RETENTION_DAYS", 36500)]:  # fmt: skip
        assert Settings.from_env({var: str(most)}) is not None
        with pytest.raises(ValueError, match=f"{var} must be at most {most}"):
            Settings.from_env({var: str(most + 1)})

    # Due when beat starts (checked once to order its heap, then again to send it), until it
    # has run; then every interval.
    every = EveryFromStart(timedelta(hours=1))
    started = datetime.now(UTC)
    assert every.is_due(started).is_due and every.is_due(started).is_due
    ran = started + timedelta(seconds=1)
    assert not every.is_due(ran).is_due
    assert every.is_due(ran - timedelta(hours=2)).is_due


def test_tasks_take_the_time_as_an_argument_and_record_their_runs(client, db, maint_url):
    from worker.app import make_app

    # never contacted: apply() runs the tasks here, eagerly
    app = make_app(broker_url="redis://127.0.0.1:9/0", database_url=maint_url, env={})
    t = today(db)
    m0, m1 = month_start(t, 2), month_start(t, 1)
    client.set_period_config("u1", ET, UNIT, None, m0, D("10"), D("0"))
    task = app.tasks["meter.roll_periods"]
    # As of the first instant of m1: m0 opened and rolled into m1, nothing further.
    result = task.apply(kwargs={"now": first_instant(m1).isoformat()})
    assert result.get() == {"opened": 1, "rolled": 1, "error": 0}
    assert client.get_account("u1", ET, UNIT)["period_start"] == m1
    assert app.tasks["meter.roll_periods"].apply().get() == {"opened": 0, "rolled": 1, "error": 0}
    with pytest.raises(ValueError, match="now"):
        task.apply(kwargs={"now": "2026-01-01T00:00:00"}).get()

    assert app.tasks["meter.ensure_partitions"].apply().get() == []
    assert app.tasks["meter.retention"].apply().get() == []  # retention off: nothing dropped
    assert app.tasks["meter.prune_idempotency_keys"].apply().get() == 0
    assert app.tasks["meter.release_expired"].apply().get() == 0
    recorded = runs(db)
    assert set(recorded) == {
        "meter.roll_periods",
        "meter.ensure_partitions",
        "meter.retention",
        "meter.prune_idempotency_keys",
        "meter.release_expired",
    }
    assert recorded["meter.roll_periods"]["runs"] == 2
    assert recorded["meter.roll_periods"]["last_result"] == {
        "opened": 0,
        "rolled": 1,
        "error": 0,
    }
    assert recorded["meter.retention"]["last_result"] == {"dropped": []}


@pytest.fixture
def task_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog that sees Celery's task loggers (worker.schedule logs through celery.task).

    An in-process worker of an earlier test may have set up Celery's logging, which stops
    ``celery.task`` propagating to the root logger and raises its level to ERROR.
    """
    task_logger = logging.getLogger("celery.task")
    propagate, level = task_logger.propagate, task_logger.level
    task_logger.propagate = True
    task_logger.setLevel(logging.NOTSET)
    try:
        yield caplog
    finally:
        task_logger.propagate = propagate
        task_logger.setLevel(level)


def test_a_transient_failure_defers_the_run_with_one_warning(db, maint_url, task_logs):
    from worker.app import make_app
    from worker.schedule import MaintenanceDeferred

    # lock_timeout on the worker's sessions; the sweep waits on a lock this test holds
    url = maint_url + ("&" if "?" in maint_url else "?") + "options=-c%20lock_timeout%3D200"
    app = make_app(broker_url="redis://127.0.0.1:9/0", database_url=url, env={})
    task = app.tasks["meter.release_expired"]
    caplog = task_logs
    caplog.set_level("INFO")
    with psycopg.connect(db.info.dsn, autocommit=False) as holder:
        holder.execute("LOCK TABLE meter.reservations IN ACCESS EXCLUSIVE MODE")
        result = task.apply()
        holder.rollback()
    assert result.failed()
    assert isinstance(result.result, MaintenanceDeferred)
    assert "meter.release_expired" in str(result.result) and "LockNotAvailable" in str(
        result.result
    )
    # one warning naming the task, no traceback, nothing at ERROR
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage().split(":")[0] for r in warnings] == [
        "meter.release_expired deferred to the next tick"
    ]
    assert not [r for r in caplog.records if r.levelno >= 40], [
        r.getMessage() for r in caplog.records if r.levelno >= 40
    ]
    assert all(r.exc_info is None for r in warnings)
    failed = runs(db)["meter.release_expired"]
    assert failed["last_ok_at"] is None and "LockNotAvailable" in failed["last_error"]

    # the next tick, the lock gone: runs and is recorded as a success
    caplog.clear()
    assert task.apply().get() == 0
    assert runs(db)["meter.release_expired"]["last_ok_at"] is not None
    assert not [r for r in caplog.records if r.levelno >= 30]


@pytest.mark.parametrize("transient", [True, False], ids=["transient", "other"])
def test_a_run_that_cannot_be_recorded_still_reports_its_own_failure(
    transient, monkeypatch, task_logs
):
    """The database gone for the run and for its record: the task's own error decides the
    outcome (deferred or raised as is), and the lost record is one more log line."""
    caplog = task_logs
    from meter.embedded import free_port
    from worker.schedule import MaintenanceDeferred, _recorded
    from worker.settings import Settings

    monkeypatch.setattr(wdb, "POOL_TIMEOUT", 0.5)  # the pool gives up on the dead server fast
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=1"

    def work() -> None:
        if transient:
            psycopg.connect(url).close()  # refused: a real connection error
        raise ValueError("a bug in the task")

    caplog.set_level("INFO")
    try:
        with pytest.raises(MaintenanceDeferred if transient else ValueError) as raised:
            _recorded("meter.release_expired", Settings(database_url=url), work, str)
    finally:
        wdb.close_all()
    lines = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == "worker.schedule"
    ]  # (the pool logs its own reconnection attempts besides)
    if transient:
        assert isinstance(raised.value.__cause__, psycopg.OperationalError)
        assert [m for level, m in lines if level == "WARNING"] == [
            lines[0][1],  # the run's own warning, then the record's
            "meter.release_expired: could not record the deferred run either",
        ]
        assert lines[0][1].startswith("meter.release_expired deferred to the next tick: ")
        assert not [m for level, m in lines if level == "ERROR"]
    else:
        assert str(raised.value) == "a bug in the task"
        assert [m for level, m in lines if level == "ERROR"] == [
            "meter.release_expired failed",
            "meter.release_expired: could not record the failed run",
        ]


def test_a_period_opened_by_hand_ahead_of_the_roll_closes_the_one_before(client, db):
    """An application opening its periods itself, ahead of beat, on a configured account:
    the period before is closed as the roll closes it (unused at its end, by event time,
    expires above the limit). It used to stay open for good, its unused units running on
    into the new period past the carry-over limit."""
    jan, feb = date(2025, 1, 1), date(2025, 2, 1)
    client.set_period_config("u1", ET, UNIT, None, jan, D("100"), D("0"))
    roll(db, first_instant(date(2025, 1, 15)))  # opens January: 100
    client.consume("u1", ET, 30, UNIT, event_time=datetime(2025, 1, 10, tzinfo=UTC))
    client.consume("u1", ET, 5, UNIT, event_time=datetime(2025, 2, 3, tzinfo=UTC))  # February's
    # 70 unused at January's end; without the close, 165 would be available
    assert client.open_period("u1", ET, UNIT, None, feb) == D("95")
    (january,) = db.execute(
        "SELECT period_end, expired, carried_over FROM meter.periods"
        " WHERE user_id = 'u1' AND period_start = %s",
        (jan,),
    ).fetchall()
    assert january == {"period_end": date(2025, 1, 31), "expired": D("70"), "carried_over": 0}
    assert ledger(db, "u1") == [
        ("allocation", D("100"), first_instant(jan)),
        ("consumption", D("-30"), datetime(2025, 1, 10, tzinfo=UTC)),
        ("expiration", D("-70"), last_instant(date(2025, 1, 31))),
        ("allocation", D("100"), first_instant(feb)),
        ("consumption", D("-5"), datetime(2025, 2, 3, tzinfo=UTC)),
    ]
    # the roll and a close by hand of the same day find it done
    assert [r for r in roll(db, first_instant(date(2025, 2, 15))) if r["user_id"] == "u1"] == []
    again = client.close_period("u1", ET, UNIT, None, date(2025, 1, 31))
    assert (again["expired"], again["carried_over"]) == (D("70"), 0)
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("95")
    # the roll closes February at its end as usual: 95 unused, expired
    (step,) = [r for r in roll(db, first_instant(date(2025, 3, 2))) if r["user_id"] == "u1"]
    assert (step["closed_period_end"], step["expired"]) == (date(2025, 2, 28), D("95"))
    assert client.reconcile() == []


def test_a_period_opened_by_hand_on_an_account_without_configuration_closes_nothing(client, db):
    """Periods kept by hand entirely: their caller closes when it chooses."""
    client.allocate("u2", ET, 50, UNIT)
    client.open_period("u2", ET, UNIT, None, date(2025, 1, 1), D("10"))
    assert client.open_period("u2", ET, UNIT, None, date(2025, 2, 1), D("10")) == D("70")
    ends = db.execute(
        "SELECT period_end FROM meter.periods WHERE user_id = 'u2' ORDER BY period_start"
    ).fetchall()
    assert ends == [{"period_end": None}, {"period_end": None}]
    assert client.reconcile() == []


def test_a_period_opened_by_hand_ahead_of_its_start_leaves_the_current_one_to_the_roll(client, db):
    """Opened up to a day ahead, the next period must not close the current one at once:
    that counted all it had then as unused, and charged the rest of its day (and its
    holds) to the next period. The roll closes it at its end, then keeps the one opened
    ahead."""
    t = today(db)
    client.set_period_config("u1", ET, UNIT, None, t, D("100"), D("0"), timedelta(days=1))
    roll(db)  # opens today: 100
    client.consume("u1", ET, 30, UNIT)
    assert client.open_period("u1", ET, UNIT, None, t + timedelta(days=1)) == D("170")
    assert client.get_account("u1", ET, UNIT)["period_start"] == t  # still today's
    client.consume("u1", ET, 20, UNIT)  # later today: today's usage
    (step,) = roll(db, first_instant(t + timedelta(days=1)))
    assert (step["closed_period_end"], step["expired"], step["opened_period_start"]) == (
        t,
        D("50"),
        t + timedelta(days=1),
    )
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("100")  # as on time
    assert client.get_account("u1", ET, UNIT)["period_start"] == t + timedelta(days=1)
    assert client.reconcile() == []


def test_a_plan_change_opened_ahead_of_its_start_still_closes_the_running_period(make_client, db):
    """042: a plan change set for the next start, then that period opened by hand a few
    hours ahead of its day. The account's start was then the period opened, which had not
    ended: the roll did nothing, and the period before never closed (its 70 unused units,
    limit 0, ran on into the new one). Now it closes as in the control, where beat opens
    the new period on its day."""
    t = today(db)
    nxt = t + timedelta(days=1)
    first = nxt - timedelta(days=30)
    clients = {ns: make_client(namespace=ns) for ns in ("control", "ahead")}
    for ns, c in clients.items():
        c.set_period_config("u", ET, UNIT, None, first, D("100"), D("0"), timedelta(days=30))
        roll(db, namespace=ns)
        c.consume("u", ET, 30, UNIT)
        c.set_period_config("u", ET, UNIT, None, nxt, D("200"), D("0"), timedelta(days=30))
        if ns == "ahead":
            assert c.open_period("u", ET, UNIT, None, nxt) == D("270")
        # at the new period's first instant: never more than the 24 h ahead of the
        # database clock a roll accepts (5 minutes later was, run from 00:00 to 00:05 UTC)
        roll(db, first_instant(nxt), namespace=ns)
    assert period_history(db, "ahead") == period_history(db, "control")
    assert period_history(db, "ahead")[0][:4] == (first, t, D("100"), D("70"))
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("200")
        assert c.get_account("u", ET, UNIT)["period_start"] == nxt
        assert c.reconcile() == []


def test_a_period_opened_by_hand_past_a_due_plan_change_leaves_both_to_the_roll(make_client, db):
    """042: ten-day periods, the roll behind, a plan change from the due next start not
    opened yet, and today's period opened by hand (037 leaves the periods before it to the
    roll). The roll took the configured start for a rewind into recorded periods and moved
    on to today's: the first period never closed, the plan change's never opened."""
    t = today(db)
    a, b = t - timedelta(days=20), t - timedelta(days=10)
    clients = {ns: make_client(namespace=ns) for ns in ("control", "by_hand")}
    for ns, c in clients.items():
        c.set_period_config("u", ET, UNIT, None, a, D("100"), D("0"), timedelta(days=10))
        roll(db, first_instant(a) + timedelta(minutes=5), namespace=ns)
        c.consume("u", ET, 30, UNIT, event_time=first_instant(a) + timedelta(hours=12))
        c.set_period_config("u", ET, UNIT, None, b, D("200"), D("0"), timedelta(days=10))
        if ns == "by_hand":
            assert c.open_period("u", ET, UNIT, None, t) == D("270")
        while roll(db, namespace=ns):
            pass
    assert [h[:2] for h in period_history(db, "by_hand")] == [
        (a, b - timedelta(days=1)), (b, t - timedelta(days=1)), (t, None),
    ]  # fmt: skip
    assert period_history(db, "by_hand") == period_history(db, "control")
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("200")
        assert c.get_account("u", ET, UNIT)["period_start"] == t
        assert c.reconcile() == []


def test_a_period_opened_by_hand_while_the_roll_is_behind_leaves_the_days_between_to_it(
    make_client, db
):
    """Daily periods opened three days ago, then beat down. A period opened by hand today
    used to close the first one at yesterday (one period of three days) and skip the two
    between with their allocations. Now the roll, back, closes and opens them as on time,
    then keeps the one opened by hand."""
    t = today(db)
    d0 = t - timedelta(days=3)
    clients = {ns: make_client(namespace=ns) for ns in ("on_time", "by_hand")}
    for ns, c in clients.items():
        c.set_period_config("u", ET, UNIT, None, d0, D("10"), None, timedelta(days=1))
        roll(db, first_instant(d0) + timedelta(hours=1), namespace=ns)
        if ns == "on_time":
            roll(db, namespace=ns)
        c.open_period("u", ET, UNIT, None, t)  # on time: a replay of the roll's
    assert clients["by_hand"].get_account("u", ET, UNIT)["period_start"] == d0  # the roll's
    for ns in clients:
        roll(db, namespace=ns)

    assert [h[0] for h in period_history(db, "by_hand")] == [
        d0 + timedelta(days=i) for i in range(4)
    ]
    assert period_history(db, "by_hand") == period_history(db, "on_time")
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("40")
        assert c.get_account("u", ET, UNIT)["period_start"] == t
        assert c.reconcile() == []


def test_a_step_keeping_a_period_opened_by_hand_reports_the_balance_at_its_start(make_client, db):
    """The roll, back, keeps a period opened by hand while it was behind: the step reports
    the balance at that period's start, its allocation included, as the on-time roll that
    opened it did, not the balance when the roll came (usage dated after the start
    included)."""
    t = today(db)
    d0 = t - timedelta(days=3)
    clients = {ns: make_client(namespace=ns) for ns in ("on_time", "by_hand")}
    steps: dict[str, list[dict[str, Any]]] = {}
    for ns, c in clients.items():
        c.set_period_config("u", ET, UNIT, None, d0, D("10"), None, timedelta(days=1))
        roll(db, first_instant(d0) + timedelta(hours=1), namespace=ns)
        if ns == "on_time":
            steps[ns] = roll(db, namespace=ns)
        c.open_period("u", ET, UNIT, None, t)
        c.consume("u", ET, D("5"), UNIT, event_time=first_instant(t))
    steps["by_hand"] = roll(db, namespace="by_hand")

    def step(s: dict[str, Any]) -> tuple[Any, ...]:
        return (s["status"], s["closed_period_end"], s["opened_period_start"],
                s["allocation"], s["balance"])  # fmt: skip

    assert [step(s) for s in steps["on_time"]] == [
        ("rolled", d0 + timedelta(days=i), d0 + timedelta(days=i + 1), D("10"), D(20 + 10 * i))
        for i in range(3)
    ]
    assert [step(s) for s in steps["by_hand"]] == [step(s) for s in steps["on_time"]]
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("35")
        assert c.reconcile() == []


def test_a_period_opened_by_hand_back_inside_closed_ones_closes_nothing(client, db):
    """January left open (as before 031, or opened while unconfigured), February opened and
    closed by hand, a close that took January's units too. A period opened by hand on
    Feb 15 must not close January now: that expired its units a second time; nor must the
    roll afterwards (042's period "still running before" excludes one with a later close)."""
    jan, feb = date(2025, 1, 1), date(2025, 2, 1)
    client.set_period_config("u1", ET, UNIT, None, jan, D("100"), D("0"))
    roll(db, first_instant(date(2025, 1, 2)))  # January: 100
    db.execute("UPDATE meter.accounts SET period_allocation = NULL")  # unconfigured a while
    client.open_period("u1", ET, UNIT, None, feb, D("100"))  # closes nothing: 200
    assert client.close_period("u1", ET, UNIT, None, date(2025, 2, 28))["expired"] == D("200")
    db.execute("UPDATE meter.accounts SET period_allocation = 100")
    assert client.open_period("u1", ET, UNIT, None, date(2025, 2, 15)) == D("100")
    roll(db, first_instant(date(2025, 3, 2)))
    (january,) = db.execute(
        "SELECT period_end FROM meter.periods WHERE user_id = 'u1' AND period_start = %s",
        (jan,),
    ).fetchall()
    assert january["period_end"] is None
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("100")
    assert client.reconcile() == []


def test_the_roll_closes_a_period_left_open_before_one_opened_by_hand_at_its_end(client, db):
    """January left open (opened while unconfigured), February opened by hand, then the
    account configured again. The roll, at February's end, used to close February alone,
    with January's units (200 expired at Feb 28). Since 042 it closes January at its own
    end first, as a roll on time would have: each month expires its own 100."""
    jan, feb = date(2025, 1, 1), date(2025, 2, 1)
    client.set_period_config("u1", ET, UNIT, None, jan, D("100"), D("0"))
    roll(db, first_instant(date(2025, 1, 2)))  # January: 100
    db.execute("UPDATE meter.accounts SET period_allocation = NULL")  # unconfigured a while
    client.open_period("u1", ET, UNIT, None, feb, D("100"))  # closes nothing: 200
    db.execute("UPDATE meter.accounts SET period_allocation = 100")
    steps = roll(db, first_instant(date(2025, 3, 2)))
    assert [(s["closed_period_end"], s["expired"], s["opened_period_start"]) for s in steps] == [
        (date(2025, 1, 31), D("100"), feb),
        (date(2025, 2, 28), D("100"), date(2025, 3, 1)),
    ]
    assert [h[:4] for h in period_history(db, "default")] == [
        (jan, date(2025, 1, 31), D("100"), D("100")),
        (feb, date(2025, 2, 28), D("100"), D("100")),
        (date(2025, 3, 1), None, D("100"), None),
    ]
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("100")
    assert client.reconcile() == []


def test_a_close_recorded_without_a_start_does_not_make_the_roll_repeat_a_step(client, db):
    """A close by hand with no period open (a row with no start, ending Jan 31), then
    January opened by hand, then a configuration from Feb 1. A first version of 042 took
    January for a period still running: each step closed it at Jan 31, which replayed that
    close, and repeated, using up every run's batch (a second account never rolled)."""
    jan, feb = date(2025, 1, 1), date(2025, 2, 1)
    client.allocate("u1", ET, 50, UNIT)
    client.close_period("u1", ET, UNIT, None, date(2025, 1, 31))
    client.open_period("u1", ET, UNIT, None, jan, D("100"))
    client.set_period_config("u1", ET, UNIT, None, feb, D("100"), D("0"))
    client.allocate("u2", ET, 1, UNIT)
    client.set_period_config("u2", ET, UNIT, None, feb, D("10"), D("0"))
    steps = roll(db, first_instant(date(2025, 2, 2)), batch=5)
    assert [(s["user_id"], s["opened_period_start"]) for s in steps] == [
        ("u1", feb), ("u2", feb),
    ]  # fmt: skip
    assert all(s["status"] != "error" for s in steps)
    assert roll(db, first_instant(date(2025, 2, 2)), batch=5) == []
    assert client.reconcile() == []


def test_the_roll_moves_on_past_a_close_recorded_inside_later_periods(client, db):
    """January opened by the roll, closed by hand on Mar 31, then February and March opened
    by hand. A first version of 042 took February for a period still running and closed it
    at Feb 28, which 041 refuses (inside January's Jan 1 - Mar 31): the account failed at
    every run and never rolled again (found by a review)."""
    client.set_period_config("u1", ET, UNIT, None, date(2025, 1, 1), D("100"), D("0"))
    roll(db, first_instant(date(2025, 1, 2)))
    client.close_period("u1", ET, UNIT, None, date(2025, 3, 31))
    client.open_period("u1", ET, UNIT, None, date(2025, 2, 1))
    client.open_period("u1", ET, UNIT, None, date(2025, 3, 1))
    for day in (date(2025, 3, 2), date(2025, 4, 2), date(2025, 5, 2)):
        assert all(s["status"] != "error" for s in roll(db, first_instant(day)))
    assert client.get_account("u1", ET, UNIT)["period_start"] == date(2025, 5, 1)
    assert client.reconcile() == []


def test_retention_keeps_the_months_a_late_roll_still_needs(make_client, db):
    # A roll closes a period as it stood at its end: the balance less the rows dated after
    # the end. Rows folded by retention have no date left, so a month dropped while the roll
    # was behind counted its usage before the end: the late account below carried 50 units
    # that never were (and reconcile() saw nothing). Retention now keeps, from the next
    # start of every due roll on, and drops those months once the roll caught up.
    t = today(db)
    aug, sep, octo = (month_start(t, back) for back in (3, 2, 1))
    clients = {ns: make_client(namespace=ns) for ns in ("on_time", "late")}
    for ns, c in clients.items():
        c.set_period_config("u", ET, UNIT, None, aug, D("100"), D("50"))
        roll(db, first_instant(aug) + timedelta(hours=1), namespace=ns)
    for ns, c in clients.items():
        if ns == "on_time":
            roll(db, first_instant(sep), namespace=ns)
        c.consume("u", ET, D("150"), UNIT, event_time=first_instant(sep) + timedelta(days=14))
        if ns == "on_time":
            roll(db, first_instant(octo), namespace=ns)
        c.consume("u", ET, D("100"), UNIT, event_time=first_instant(octo) + timedelta(days=14))

    dropped = [r["d"] for r in db.execute("SELECT meter.drop_old_partitions(1) AS d").fetchall()]
    assert f"ledger_{aug:%Y_%m}" in dropped
    assert f"ledger_{sep:%Y_%m}" not in dropped  # the late roll's next start is Sep 1
    for ns in clients:
        roll(db, namespace=ns)

    assert period_history(db, "late") == period_history(db, "on_time")
    assert period_history(db, "late")[0][3:5] == (D("50"), D("50"))  # Aug: 100 unused, limit 50
    for c in clients.values():
        assert c.get_balance("u", ET, UNIT)["balance"] == D("100")
        assert c.reconcile() == []
    # caught up: the months kept go at the next run
    dropped = [r["d"] for r in db.execute("SELECT meter.drop_old_partitions(1) AS d").fetchall()]
    assert f"ledger_{sep:%Y_%m}" in dropped  # (with months the roll created again, empty)
    assert f"ledger_{octo:%Y_%m}" not in dropped
    assert all(c.reconcile() == [] for c in clients.values())


def test_retention_west_of_utc_keeps_the_month_a_late_roll_still_needs(client, db):
    # 056: drop_old_partitions took a month's end as its start plus '1 month' in the
    # session's zone: under New York a month after a shorter one ended a day early (Jul 31
    # 00:00 UTC for July), at the cutoff 036 lowers to a due roll's next start (Jul 31
    # here). July was dropped with the consume dated Jul 31, which the late roll then
    # counted inside the period of Jul 30: it expired 40 of its 100 unused units, not 100.
    t = today(db)
    back = 2
    while month_start(t, back).month not in (3, 5, 7, 10, 12):  # after a shorter month
        back += 1
    month = month_start(t, back)
    last = month_start(t, back - 1) - timedelta(days=1)  # the 31st
    start = last - timedelta(days=1)
    client.set_period_config("u", ET, UNIT, None, start, D("100"), D("0"), "1 day")
    roll(db, first_instant(start) + timedelta(hours=1))
    client.consume("u", ET, D("60"), UNIT, event_time=first_instant(last) + timedelta(hours=12))

    db.execute("SET TimeZone = 'America/New_York'")
    try:
        dropped = [r["d"] for r in db.execute("SELECT meter.drop_old_partitions(1) AS d")]
    finally:
        db.execute("RESET TimeZone")
    assert f"ledger_{month:%Y_%m}" not in dropped
    roll(db)
    first = db.execute(
        "SELECT period_end, expired, carried_over FROM meter.periods WHERE period_start = %s",
        (start,),
    ).fetchone()
    assert first == {"period_end": start, "expired": D("100"), "carried_over": D("0")}
    assert client.reconcile() == []


def test_a_plan_change_set_ahead_leaves_the_running_period_its_own_limit(make_client, db):
    """Plan A (100 a month, carry-over limit 50) from Aug 1; plan B (20, limit 0) from Oct 1.
    September ran under plan A: 150 unused at its end, 50 carried, whether B was set in
    September (ahead) or on Oct 1 after the roll. Set ahead, September used to close under
    B's limit: 150 expired, 0 carried."""
    seps = {}
    for ns in ("ahead", "after"):
        c = make_client(namespace=ns)
        c.set_period_config("u", ET, UNIT, None, date(2025, 8, 1), D("100"), D("50"))
        roll(db, datetime(2025, 9, 10, tzinfo=UTC), namespace=ns)
        if ns == "ahead":
            c.set_period_config("u", ET, UNIT, None, date(2025, 10, 1), D("20"), D("0"))
        roll(db, datetime(2025, 10, 1, 1, tzinfo=UTC), namespace=ns)
        if ns == "after":
            c.set_period_config("u", ET, UNIT, None, date(2025, 10, 1), D("20"), D("0"))
        seps[ns] = db.execute(
            "SELECT expired, carried_over FROM meter.periods"
            " WHERE namespace = %s AND period_start = '2025-09-01'",
            (ns,),
        ).fetchone()
        assert c.reconcile() == []
    assert seps["ahead"] == seps["after"] == {"expired": D("100"), "carried_over": D("50")}
    (october,) = db.execute(
        "SELECT allocation FROM meter.periods WHERE namespace = 'ahead' AND period_start = '2025-10-01'"
    ).fetchall()
    assert october["allocation"] == D("20")  # plan B from its start on
    # and B's limit from October on
    roll(db, datetime(2025, 11, 1, 1, tzinfo=UTC), namespace="ahead")
    (closed,) = db.execute(
        "SELECT expired, carried_over FROM meter.periods"
        " WHERE namespace = 'ahead' AND period_start = '2025-10-01'"
    ).fetchall()
    assert closed == {"expired": D("70"), "carried_over": D("0")}


def test_retention_says_when_it_keeps_months_for_a_roll_that_is_behind(client, db, db_url, caplog):
    # One account whose roll is behind (or fails at every run) keeps months for every
    # namespace: the worker's retention task logs it.
    t = today(db)
    aug, sep = month_start(t, 3), month_start(t, 2)
    client.set_period_config("u", ET, UNIT, None, aug, D("100"), D("50"))
    roll(db, first_instant(aug) + timedelta(hours=1))  # August opened; the roll then stops
    client.consume("u", ET, D("10"), UNIT, event_time=first_instant(sep) + timedelta(days=3))
    with caplog.at_level(logging.WARNING, logger="worker.db"):
        dropped = wdb.drop_old_partitions(db_url, 1, 1)
    assert f"ledger_{sep:%Y_%m}" not in dropped
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "worker.db"]
    assert "kept 1 month(s) older than 1 months" in warning
    assert f"ending from {sep - timedelta(days=1)}" in warning
    roll(db)  # caught up: nothing said, the month goes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.db"):
        assert f"ledger_{sep:%Y_%m}" in wdb.drop_old_partitions(db_url, 1, 1)
    assert [r for r in caplog.records if r.name == "worker.db"] == []
    assert client.reconcile() == []
