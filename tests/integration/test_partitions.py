"""Ledger partitions and retention (SPEC 3 items 5 and 7, Appendix C).

Partitions are monthly (UTC), named ``meter.ledger_YYYY_MM``. ``create_partition`` returns
the name or NULL when it exists; ``ensure_partitions(n)`` creates this month and the next n;
a backdated event creates its month on demand; ``drop_old_partitions(n)`` drops the months
that end on or before the first day of the current month minus n months, folding their rows
into ``meter.ledger_checkpoints`` first so that ``reconcile()`` stays empty.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from meter.errors import NotFoundError
from tests.fix_db import ledger_partitions
from tests.integration.test_pipeline import eventually

D = Decimal
ET = "tokens"
UNIT = "tok"
ALL_TIME = (datetime(1990, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
PART_RE = re.compile(r"^ledger_(\d{4})_(\d{2})$")


# ---------------------------------------------------------------- helpers


def add_months(y: int, m: int, k: int) -> tuple[int, int]:
    idx = y * 12 + (m - 1) + k
    return idx // 12, idx % 12 + 1


def pname(y: int, m: int) -> str:
    return f"ledger_{y:04d}_{m:02d}"


def short(name: str | None) -> str | None:
    """A partition name without its schema (functions may return it either way)."""
    return None if name is None else name.split(".")[-1]


def this_month(db) -> tuple[int, int]:
    row = db.execute(
        "SELECT extract(year FROM now() AT TIME ZONE 'UTC')::int AS y,"
        " extract(month FROM now() AT TIME ZONE 'UTC')::int AS m"
    ).fetchone()
    return row["y"], row["m"]


def bounds(db, name: str) -> str:
    db.execute("SET TimeZone = 'UTC'")
    return db.execute(
        "SELECT pg_get_expr(c.relpartbound, c.oid) AS b FROM pg_class c WHERE c.oid = %s::regclass",
        (f"meter.{name}",),
    ).fetchone()["b"]


def column(db, sql: str, params=None) -> list:
    return [next(iter(r.values())) for r in db.execute(sql, params).fetchall()]


def sqlstate_of(db, sql: str, params=None) -> str:
    with pytest.raises(psycopg.Error) as exc:
        db.execute(sql, params)
    return exc.value.sqlstate


def mid_month(y: int, m: int, day: int = 15) -> datetime:
    return datetime(y, m, day, 12, 0, tzinfo=UTC)


def partition_of(db, entry_id: int) -> str:
    return db.execute(
        "SELECT tableoid::regclass::text AS p FROM meter.ledger WHERE id = %s", (entry_id,)
    ).fetchone()["p"]


def checkpoint(db, user_id: str, namespace: str = "default") -> dict | None:
    return db.execute(
        "SELECT c.balance, c.entries, c.through FROM meter.ledger_checkpoints c"
        " JOIN meter.accounts a ON a.namespace = c.namespace AND a.account_id = c.account_id"
        " WHERE a.namespace = %s AND a.user_id = %s",
        (namespace, user_id),
    ).fetchone()


def bal(client, user_id: str) -> dict:
    return client.get_balance(user_id, ET, UNIT)


# ---------------------------------------------------------------- create_partition


def test_create_partition_returns_name_then_null(db):
    before = ledger_partitions(db)
    assert pname(2040, 5) not in before
    assert short(db.execute("SELECT meter.create_partition(2040, 5) AS p").fetchone()["p"]) == (
        "ledger_2040_05"
    )
    assert ledger_partitions(db) == before | {"ledger_2040_05"}
    assert bounds(db, "ledger_2040_05") == (
        "FOR VALUES FROM ('2040-05-01 00:00:00+00') TO ('2040-06-01 00:00:00+00')"
    )
    # December rolls over into the next year.
    assert short(db.execute("SELECT meter.create_partition(2040, 12) AS p").fetchone()["p"]) == (
        "ledger_2040_12"
    )
    assert bounds(db, "ledger_2040_12") == (
        "FOR VALUES FROM ('2040-12-01 00:00:00+00') TO ('2041-01-01 00:00:00+00')"
    )
    # Existing: NULL, nothing changes.
    assert db.execute("SELECT meter.create_partition(2040, 5) AS p").fetchone()["p"] is None
    assert ledger_partitions(db) == before | {"ledger_2040_05", "ledger_2040_12"}


@pytest.mark.parametrize("month", [0, 13, -1, None])
def test_create_partition_bad_month_is_validation_error(db, month):
    before = ledger_partitions(db)
    assert sqlstate_of(db, "SELECT meter.create_partition(2040, %s::int)", (month,)) == "MT001"
    assert ledger_partitions(db) == before


# ---------------------------------------------------------------- ensure_partitions


def test_ensure_partitions_creates_current_and_months_ahead(db):
    y, m = this_month(db)
    before = ledger_partitions(db)
    want3 = {pname(*add_months(y, m, k)) for k in range(4)}
    created = {short(n) for n in column(db, "SELECT * FROM meter.ensure_partitions(3)")}
    assert created == want3 - before
    assert want3 <= ledger_partitions(db)
    assert ledger_partitions(db) == before | want3
    # Again: nothing to create.
    assert column(db, "SELECT * FROM meter.ensure_partitions(3)") == []
    # Further ahead: exactly the missing months, in order.
    want14 = [pname(*add_months(y, m, k)) for k in range(15)]
    created = [short(n) for n in column(db, "SELECT * FROM meter.ensure_partitions(14)")]
    assert created == [n for n in want14 if n not in before | want3]
    assert len(created) >= 14 - 3
    assert ledger_partitions(db) == before | set(want14)
    # Every one has its UTC month bounds.
    ny, nm = add_months(y, m, 14)
    fy, fm = add_months(y, m, 15)
    assert bounds(db, pname(ny, nm)) == (
        f"FOR VALUES FROM ('{ny:04d}-{nm:02d}-01 00:00:00+00')"
        f" TO ('{fy:04d}-{fm:02d}-01 00:00:00+00')"
    )


def test_ensure_partitions_default_is_three_months(db):
    y, m = this_month(db)
    column(db, "SELECT * FROM meter.ensure_partitions()")
    for k in range(4):
        assert pname(*add_months(y, m, k)) in ledger_partitions(db)


def test_new_partitions_refuse_truncate(db, client):
    # A partition made after migration (here: on demand) is as immutable as the others.
    db.execute("SELECT meter.create_partition(2040, 7)")
    e = client.allocate("u1", ET, 5, UNIT, event_time=mid_month(2019, 3))["entry_id"]
    for name in ("ledger_2040_07", "ledger_2019_03"):
        with pytest.raises(psycopg.Error):
            db.execute(f"TRUNCATE meter.{name}")
    assert partition_of(db, e) == "meter.ledger_2019_03"


# ---------------------------------------------------------------- backdated events


def test_backdated_events_create_their_month_on_demand(client, db):
    assert "ledger_2019_03" not in ledger_partitions(db)
    assert "ledger_2018_11" not in ledger_partitions(db)
    a = client.allocate("u1", ET, 100, UNIT, event_time=mid_month(2019, 3))
    c = client.consume("u1", ET, 40, UNIT, event_time=mid_month(2018, 11))
    assert (a["balance"], c["balance"]) == (D("100"), D("60"))
    assert {"ledger_2019_03", "ledger_2018_11"} <= ledger_partitions(db)
    assert partition_of(db, a["entry_id"]) == "meter.ledger_2019_03"
    assert partition_of(db, c["entry_id"]) == "meter.ledger_2018_11"
    rows = client.get_ledger("u1", ET, UNIT)
    # Newest first by event_time.
    assert [(r["entry_type"], r["amount"], r["event_time"]) for r in rows] == [
        ("allocation", D("100"), mid_month(2019, 3)),
        ("consumption", D("-40"), mid_month(2018, 11)),
    ]
    assert client.reconcile() == []


def test_a_refused_checked_consume_creates_no_month(client, db, snapshot):
    # The month's partition was created before the balance check refused the consume: a
    # refusal that changed the schema (047). Through apply_events as well (its one-by-one
    # path calls consume), and a granted one still creates its month.
    client.allocate("u1", ET, 10, UNIT)
    parts, before = ledger_partitions(db), snapshot()
    refused = client.consume(
        "u1", ET, 11, UNIT, check_balance=True, event_time=mid_month(2017, 4),
        idempotency_key="k-refused",
    )  # fmt: skip
    assert (refused["success"], refused["available"]) == (False, D("10"))
    batch = db.execute(
        "SELECT ok, status FROM meter.apply_events(%s::jsonb)",
        (
            '[{"op": "consume", "namespace": "default", "args": {"user_id": "u1",'
            f' "event_type": "{ET}", "unit": "{UNIT}", "amount": "11", "check_balance": true,'
            ' "event_time": "2017-05-15T00:00:00+00:00"}}]',
        ),
    ).fetchall()
    assert [(r["ok"], r["status"]) for r in batch] == [(True, "refused")]
    assert ledger_partitions(db) == parts
    assert snapshot() == before
    granted = client.consume(
        "u1", ET, 4, UNIT, check_balance=True, event_time=mid_month(2017, 4),
        idempotency_key="k-refused",
    )  # fmt: skip
    assert (granted["success"], granted["balance"]) == (True, D("6"))
    assert ledger_partitions(db) == parts | {"ledger_2017_04"}
    assert partition_of(db, granted["entry_id"]) == "meter.ledger_2017_04"
    assert client.reconcile() == []


def test_month_boundaries_are_utc(client, db):
    cases = [
        (datetime(2024, 3, 1, 0, 0, tzinfo=UTC), "meter.ledger_2024_03"),
        (datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC), "meter.ledger_2024_02"),
        # 00:30 on March 1st at UTC+1 is still February in UTC.
        (datetime(2024, 3, 1, 0, 30, tzinfo=UTC) - timedelta(hours=1), "meter.ledger_2024_02"),
        (datetime.fromisoformat("2024-03-01T00:30:00+01:00"), "meter.ledger_2024_02"),
        # 23:30 on March 31st at UTC-1 is already April in UTC.
        (datetime.fromisoformat("2024-03-31T23:30:00-01:00"), "meter.ledger_2024_04"),
    ]
    for when, part in cases:
        entry = client.allocate("u1", ET, 1, UNIT, event_time=when)["entry_id"]
        assert partition_of(db, entry) == part, when
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("5")


@pytest.mark.parametrize("zone", ["America/New_York", "Pacific/Chatham", "Asia/Kolkata"])
def test_a_month_is_a_month_of_utc_whatever_the_sessions_time_zone(db, zone):
    # 056: the upper bound was the lower one plus '1 month', added in the session's zone.
    # West of UTC a month after a shorter one was cut short (March ended on the 28th at
    # 23:00 UTC under New York); across a change of daylight saving time east of UTC a
    # month ran into the next, which could then not be created (42P17 under Chatham).
    db.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    for m in range(1, 13):
        assert short(
            db.execute("SELECT meter.create_partition(2041, %s) AS p", (m,)).fetchone()["p"]
        ) == pname(2041, m)
    for m in range(1, 13):
        y2, m2 = add_months(2041, m, 1)
        assert bounds(db, pname(2041, m)) == (
            f"FOR VALUES FROM ('2041-{m:02d}-01 00:00:00+00') TO ('{y2:04d}-{m2:02d}-01 00:00:00+00')"
        )


def test_a_backdated_month_created_by_a_session_west_of_utc_holds_its_last_day(
    make_client, db_url, db
):
    # 056: created on demand by a writer under America/New_York, March 2019 ended on Mar 28
    # 23:00 UTC: the month's last days had no partition (23514) for every session after.
    ny = make_client(url=make_conninfo(db_url, options="-c TimeZone=America/New_York"))
    utc = make_client(url=make_conninfo(db_url, options="-c TimeZone=UTC"))
    assert "ledger_2019_03" not in ledger_partitions(db)
    cases = [
        (ny, datetime(2019, 3, 15, 12, tzinfo=UTC), "meter.ledger_2019_03"),  # creates March
        (ny, datetime(2019, 3, 31, 23, 59, 59, 999999, tzinfo=UTC), "meter.ledger_2019_03"),
        (utc, datetime(2019, 3, 29, 0, 0, tzinfo=UTC), "meter.ledger_2019_03"),
        (ny, datetime(2019, 4, 1, 0, 0, tzinfo=UTC), "meter.ledger_2019_04"),
        (ny, datetime(2019, 2, 28, 23, 59, 59, 999999, tzinfo=UTC), "meter.ledger_2019_02"),
    ]
    for client, when, part in cases:
        entry = client.allocate("u1", ET, 1, UNIT, event_time=when)["entry_id"]
        assert partition_of(db, entry) == part, when
    assert utc.get_balance("u1", ET, UNIT)["balance"] == D("5")
    assert utc.reconcile() == []


# ---------------------------------------------------------------- drop_old_partitions


@pytest.mark.parametrize("n", [0, -1, None, 1201, 2**31 - 1])  # 034: 2**31 - 1 raised 22008
def test_drop_old_partitions_outside_1_to_1200_is_validation_error(client, db, snapshot, n):
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(2019, 1))
    before, parts = snapshot(), ledger_partitions(db)
    assert sqlstate_of(db, "SELECT * FROM meter.drop_old_partitions(%s::int)", (n,)) == "MT001"
    assert ledger_partitions(db) == parts
    assert snapshot() == before


def test_an_adjust_replays_after_retention_dropped_the_entry_it_refers_to(client, db, snapshot):
    """Its key still holds the first result: a retry (a redelivery) of the adjustment must
    replay it. The existence check of reference_id used to come first and refuse it,
    NotFoundError, for a write that had happened. A new adjustment is still refused."""
    y, m = this_month(db)
    old = add_months(y, m, -30)
    ref = client.allocate("u1", ET, 100, UNIT, event_time=mid_month(*old))["entry_id"]
    first = client.adjust("u1", ET, 5, UNIT, reference_id=ref, idempotency_key="adj-1")
    db.execute("SELECT * FROM meter.drop_old_partitions(24)")
    assert (
        db.execute("SELECT count(*) AS n FROM meter.ledger WHERE id = %s", (ref,)).fetchone()["n"]
        == 0
    )
    before = snapshot()
    again = client.adjust("u1", ET, 5, UNIT, reference_id=ref, idempotency_key="adj-1")
    assert again == first
    assert snapshot() == before
    with pytest.raises(NotFoundError) as refused:
        client.adjust("u1", ET, 5, UNIT, reference_id=ref, idempotency_key="adj-2")
    assert refused.value.parameter == "reference_id"
    assert snapshot() == before
    assert client.reconcile() == []


def test_drop_old_partitions_folds_into_checkpoint(client, db, make_client):
    y, m = this_month(db)
    old1 = add_months(y, m, -30)  # far beyond the 24 months default
    old2 = add_months(y, m, -2)  # ends on the cutoff of drop_old_partitions(1): dropped
    prev = add_months(y, m, -1)  # ends after it: kept
    cutoff = datetime(*prev, 1, tzinfo=UTC)

    client.allocate("u1", ET, 100, UNIT, event_time=mid_month(*old1))
    client.consume("u1", ET, 30, UNIT, event_time=mid_month(*old2))
    e_prev = client.allocate("u1", ET, 7, UNIT, event_time=mid_month(*prev))["entry_id"]
    e_now = client.consume("u1", ET, 5, UNIT)["entry_id"]
    # u2 lives only in dropped months and ends at zero; u3 only in kept ones.
    client.allocate("u2", ET, 40, UNIT, event_time=mid_month(*old1))
    client.consume("u2", ET, 40, UNIT, event_time=mid_month(*old1, 20))
    client.allocate("u3", ET, 9, UNIT)
    # A pool account in a dropped month.
    client.allocate(None, ET, 1000, UNIT, event_time=mid_month(*old2))
    # Another namespace shares the partitions; its rows are folded into its own checkpoint.
    other = make_client("other")
    other.allocate("u1", ET, 11, UNIT, event_time=mid_month(*old1))
    other.allocate("u1", ET, 2, UNIT)

    assert client.reconcile() == [] and other.reconcile() == []
    usage_old = client.get_usage("u1", datetime(*old2, 1, tzinfo=UTC), cutoff)
    assert [(u["total_consumed"], u["event_count"]) for u in usage_old] == [(D("30"), 1)]
    balances = {u: bal(client, u) for u in ("u1", "u2", "u3")}
    assert balances["u1"] == {"balance": D("72"), "reserved": D("0"), "available": D("72")}
    pool_before = client.get_balance(None, ET, UNIT)
    accounts_before = db.execute(
        "SELECT namespace, user_id, balance, reserved, total_credited, total_debited"
        " FROM meter.accounts ORDER BY namespace, user_id NULLS FIRST"
    ).fetchall()

    stats_before = (client.get_stats(), other.get_stats())
    parts = ledger_partitions(db)
    expected_drop = set()
    for p in parts:
        mt = PART_RE.match(p)
        if mt and datetime(*add_months(int(mt[1]), int(mt[2]), 1), 1, tzinfo=UTC) <= cutoff:
            expected_drop.add(p)
    assert {pname(*old1), pname(*old2)} <= expected_drop
    assert pname(*prev) not in expected_drop

    dropped = [short(n) for n in column(db, "SELECT * FROM meter.drop_old_partitions(1)")]
    assert sorted(dropped) == sorted(expected_drop)
    assert ledger_partitions(db) == parts - expected_drop
    assert pname(*prev) in ledger_partitions(db)
    assert pname(y, m) in ledger_partitions(db)

    # The checkpoints hold the folded sums, per account and namespace.
    cp = checkpoint(db, "u1")
    assert (cp["balance"], cp["entries"]) == (D("70"), 2)
    assert cp["through"] == cutoff  # the end of the last month folded
    cp = checkpoint(db, "u2")
    assert (cp["balance"], cp["entries"]) == (D("0"), 2)
    assert checkpoint(db, "u3") is None
    cp = db.execute(
        "SELECT c.balance, c.entries FROM meter.ledger_checkpoints c JOIN meter.accounts a"
        " USING (namespace, account_id) WHERE a.namespace = 'default' AND a.user_id IS NULL"
    ).fetchone()
    assert (cp["balance"], cp["entries"]) == (D("1000"), 1)
    cp = checkpoint(db, "u1", namespace="other")
    assert (cp["balance"], cp["entries"]) == (D("11"), 1)

    # Balances and reconcile are unchanged; accounts untouched; the stats count every
    # entry ever recorded, the folded ones included (059).
    assert client.reconcile() == [] and other.reconcile() == []
    assert (client.get_stats(), other.get_stats()) == stats_before
    assert stats_before[0]["total_ledger_entries"] == 8  # u1 4, u2 2, u3 and the pool 1
    assert {u: bal(client, u) for u in ("u1", "u2", "u3")} == balances
    assert client.get_balance(None, ET, UNIT) == pool_before
    assert (
        db.execute(
            "SELECT namespace, user_id, balance, reserved, total_credited, total_debited"
            " FROM meter.accounts ORDER BY namespace, user_id NULLS FIRST"
        ).fetchall()
        == accounts_before
    )

    # Reads work on what is left.
    rows = client.get_ledger("u1", ET, UNIT)
    assert [(r["id"], r["entry_type"], r["amount"]) for r in rows] == [
        (e_now, "consumption", D("-5")),
        (e_prev, "allocation", D("7")),
    ]
    assert client.get_ledger("u2", ET, UNIT) == []
    assert client.get_usage("u1", *ALL_TIME) == [
        {
            "event_type": ET,
            "resource": "",
            "unit": UNIT,
            "total_consumed": D("5"),
            "event_count": 1,
        }
    ]
    assert client.get_usage("u1", datetime(*old2, 1, tzinfo=UTC), cutoff) == []
    assert client.get_account("u2", ET, UNIT)["balance"] == D("0")

    # Nothing left to drop.
    assert column(db, "SELECT * FROM meter.drop_old_partitions(1)") == []

    # Writing to a dropped month again recreates it; a second drop adds to the checkpoint.
    r = client.allocate("u1", ET, 10, UNIT, event_time=mid_month(*old1, 3))
    assert r["balance"] == D("82")
    assert partition_of(db, r["entry_id"]) == f"meter.{pname(*old1)}"
    assert client.reconcile() == []
    client.consume("u1", ET, 1, UNIT)
    assert client.reconcile() == []
    assert [short(n) for n in column(db, "SELECT * FROM meter.drop_old_partitions(1)")] == [
        pname(*old1)
    ]
    cp = checkpoint(db, "u1")
    assert (cp["balance"], cp["entries"]) == (D("80"), 3)
    assert cp["through"] == cutoff  # never moves backwards
    assert client.reconcile() == []
    assert bal(client, "u1") == {"balance": D("81"), "reserved": D("0"), "available": D("81")}
    assert sum(r["amount"] for r in client.get_ledger("u1", ET, UNIT)) == D("1")
    stats = client.get_stats()
    assert stats["total_balance"] == D("81") + D("0") + D("9") + D("1000")


@pytest.mark.parametrize("style", ["SQL, YMD", "SQL, DMY", "German", "Postgres, MDY"])
def test_drop_old_partitions_folds_months_under_any_datestyle(client, db, db_url, style):
    # 056: the second month's fold quoted its end into the INSERT as text, read back in
    # the session's DateStyle: 'SQL, YMD' writes '03/01/2020 00:00:00 UTC' and cannot read
    # it (22008), so a retention of two months or more failed whole, every run.
    client.allocate("u1", ET, 100, UNIT, event_time=mid_month(2020, 1))
    client.consume("u1", ET, 30, UNIT, event_time=mid_month(2020, 2))
    client.consume("u1", ET, 1, UNIT)
    with psycopg.connect(
        make_conninfo(db_url, options=f"-c DateStyle={style.replace(' ', '')}"), autocommit=True
    ) as conn:
        dropped = [r[0] for r in conn.execute("SELECT * FROM meter.drop_old_partitions(1)")]
    assert sorted(short(n) for n in dropped) == [pname(2020, 1), pname(2020, 2)]
    cp = checkpoint(db, "u1")
    assert (cp["balance"], cp["entries"]) == (D("70"), 2)
    assert cp["through"] == datetime(2020, 3, 1, tzinfo=UTC)
    assert client.reconcile() == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("69")


def test_drop_old_partitions_default_keeps_24_months(client, db):
    y, m = this_month(db)
    inside = add_months(y, m, -23)  # ends after the cutoff: kept
    edge = add_months(y, m, -25)  # ends exactly on the cutoff: dropped
    client.allocate("u1", ET, 3, UNIT, event_time=mid_month(*inside))
    client.allocate("u1", ET, 4, UNIT, event_time=mid_month(*edge))
    client.allocate("u1", ET, 5, UNIT, event_time=mid_month(*add_months(y, m, -24)))
    dropped = {short(n) for n in column(db, "SELECT * FROM meter.drop_old_partitions()")}
    assert dropped == {pname(*edge)}
    assert pname(*inside) in ledger_partitions(db)
    assert pname(*add_months(y, m, -24)) in ledger_partitions(db)
    cp = checkpoint(db, "u1")
    assert (cp["balance"], cp["entries"]) == (D("4"), 1)
    assert client.reconcile() == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D("12")


def test_two_callers_creating_one_month_both_succeed(db_url, db):
    # Both wait while a third session holds the month's lock (one for it, the other, since
    # 055, for the ledger's lock the first took before it); the one served second must
    # find the partition the first created (it used to fail with 42P07).
    from concurrent.futures import ThreadPoolExecutor

    from meter import MeterClient

    when = datetime(2019, 5, 17, 12, tzinfo=UTC)
    assert "ledger_2019_05" not in ledger_partitions(db)
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(19781, 201905)")

        def consume(user: str) -> Decimal:
            with MeterClient(db_url) as c:
                return c.consume(user, "tokens", 1, "tok", event_time=when)["balance"]

        with ThreadPoolExecutor(2) as ex:
            futures = [ex.submit(consume, u) for u in ("u1", "u2")]
            eventually(
                lambda: (
                    db.execute(
                        "SELECT count(*) AS n FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND wait_event IN ('advisory', 'relation')"
                    ).fetchone()["n"]
                    == 2
                )
            )
            holder.commit()
            assert [f.result(timeout=30) for f in futures] == [Decimal(-1), Decimal(-1)]
    assert "ledger_2019_05" in ledger_partitions(db)
    assert db.execute("SELECT count(*) AS n FROM meter.ledger_2019_05").fetchone()["n"] == 2


def test_creating_a_month_does_not_stop_other_writers(db_url, db, client):
    # The creating transaction stays open; a write into another month goes on meanwhile.
    client.allocate("u1", "tokens", 5, "tok")  # this month's partition exists
    with psycopg.connect(db_url) as creator:
        assert creator.execute("SELECT meter.create_partition(1998, 7)").fetchone() == (
            "ledger_1998_07",
        )
        with psycopg.connect(db_url, autocommit=True) as writer:
            writer.execute("SET lock_timeout = '3s'")
            writer.execute("SELECT meter.set_tenant('default')")
            row = writer.execute(
                "SELECT success FROM meter.consume('u1', 'tokens', 1, 'tok')"
            ).fetchone()
            assert row == (True,)
        creator.commit()
    assert "ledger_1998_07" in ledger_partitions(db)
    assert client.get_balance("u1", "tokens", "tok")["balance"] == Decimal(4)


def test_drop_old_partitions_refuses_other_isolation_levels(client, db, db_url, snapshot):
    # Its fold must see every row it drops; at REPEATABLE READ or SERIALIZABLE the snapshot
    # predates the partition's lock.
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(2019, 1))
    before, parts = snapshot(), ledger_partitions(db)
    for level in ("repeatable read", "serializable"):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"SET default_transaction_isolation = '{level}'")
            with pytest.raises(psycopg.Error) as ei:
                conn.execute("SELECT * FROM meter.drop_old_partitions(1)")
            assert ei.value.sqlstate == "MT001"
            assert "READ COMMITTED" in str(ei.value)
    assert ledger_partitions(db) == parts
    assert snapshot() == before


def test_the_worker_drops_at_read_committed_whatever_the_default(client, db, db_url):
    from worker import db as wdb

    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(2019, 1))
    url = db_url + ("&" if "?" in db_url else "?")
    url += "options=-c%20default_transaction_isolation%3Dserializable"
    assert wdb.drop_old_partitions(url, 1, 1) == ["ledger_2019_01"]
    assert client.reconcile() == []
    assert client.get_balance("u1", ET, UNIT)["balance"] == D(10)


def test_a_backdated_write_waiting_for_a_drop_recreates_its_month(client, db, db_url):
    # The drop holds the month's partition, dropped but not committed; a write dated in
    # that month waits for it, then finds the month gone. It used to fail with 23514 ("no
    # partition ... found for row"), which the pipeline files as a dead letter; it now
    # creates the month again, as for any backdated event.
    import threading

    y, m = this_month(db)
    old = add_months(y, m, -30)
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(*old))
    outcome: dict[str, object] = {}
    with psycopg.connect(db_url) as dropper:
        dropped = dropper.execute("SELECT * FROM meter.drop_old_partitions(24)").fetchall()
        assert pname(*old) in {short(r[0]) for r in dropped}

        def write() -> None:
            try:
                outcome["balance"] = client.allocate(
                    "u1", ET, 5, UNIT, event_time=mid_month(*old, day=16)
                )["balance"]
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

        writer = threading.Thread(target=write)
        writer.start()
        eventually(
            lambda: (
                db.execute("SELECT count(*) AS n FROM pg_locks WHERE NOT granted").fetchone()["n"]
                >= 1
            )
        )
        dropper.commit()
        writer.join(30)
    assert "error" not in outcome, outcome
    assert outcome["balance"] == D(15)
    assert pname(*old) in ledger_partitions(db)
    assert client.reconcile() == []


# ------------------------------------------------ drop_old_partitions: lock order (045)


def waiting(db) -> int:
    """How many backends wait for a lock."""
    return db.execute("SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted").fetchone()[
        "n"
    ]


def test_a_backdated_write_and_the_drop_of_its_month_do_not_deadlock(client, db, db_url):
    """SPEC 3 item 6 (one lock order, no deadlocks) and item 5 (a backdated write lands in
    its month). A write dated in a past month takes the ledger's ROW EXCLUSIVE lock first
    (036's _ledger_time), then the month's partition on insert. drop_old_partitions used to
    lock the partition, fold it, and only then take the ledger (its DROP TABLE locks the
    parent): with the write queued behind another writer of its account, each waited for
    the other (40P01). Since 045 the drop takes the ledger first, waits for the write, and
    folds its row too (the count under the lock differs from its early read: a refold)."""
    import threading

    y, m = this_month(db)
    old = add_months(y, m, -30)
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(*old))
    outcome: dict[str, object] = {}

    holder = psycopg.connect(db_url)  # a writer of the same account, mid-transaction
    try:
        holder.execute("SELECT * FROM meter.allocate('u1', %s, 1, %s)", (ET, UNIT))

        def backdated() -> None:
            try:
                # the SQL API itself: the SDK would retry a deadlock and hide it
                with psycopg.connect(db_url, autocommit=True) as c:
                    outcome["write"] = c.execute(
                        "SELECT balance FROM meter.allocate('u1', %s, 5, %s, p_event_time => %s)",
                        (ET, UNIT, mid_month(*old, day=16)),
                    ).fetchone()[0]
            except Exception as exc:  # reported by the assertion below
                outcome["write_error"] = f"{exc.__class__.__name__}: {exc}"

        def drop() -> None:
            try:
                with psycopg.connect(db_url, autocommit=True) as c:
                    outcome["drop"] = [
                        short(r[0])
                        for r in c.execute("SELECT * FROM meter.drop_old_partitions(24)")
                    ]
            except Exception as exc:
                outcome["drop_error"] = f"{exc.__class__.__name__}: {exc}"

        w = threading.Thread(target=backdated)
        w.start()
        eventually(lambda: waiting(db) >= 1)  # the write queues behind the holder
        d = threading.Thread(target=drop)
        d.start()
        eventually(lambda: waiting(db) >= 2)  # the drop waits for the ledger
        holder.commit()
        w.join(60)
        d.join(60)
    finally:
        holder.close()
    assert "write_error" not in outcome and "drop_error" not in outcome, outcome
    assert outcome["drop"] == [pname(*old)]
    assert checkpoint(db, "u1")["balance"] == D(15)  # both rows of the month folded
    assert bal(client, "u1")["balance"] == D(16)
    assert client.reconcile() == []


def test_a_read_during_the_fold_of_a_month_does_not_deadlock_with_its_drop(client, db, db_url):
    """SPEC 3 items 6 and 7. A read of the ledger (get_ledger here; get_usage, reconcile and
    get_audit_events alike) takes the ledger's ACCESS SHARE lock, then the partitions'. The
    drop used to hold the month's partition while it folded it and then ask for the ledger
    (DROP TABLE): a read arriving during the fold held the ledger and waited for the month,
    and the reader was killed (40P01). Since 045 the drop reads and writes the month's
    fold before it takes the ledger, then the ledger before the month, to its commit: a
    read answers, at once or after the drop. A lock on the account's checkpoint row
    stands in for a fold that takes seconds."""
    import threading

    y, m = this_month(db)
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(*add_months(y, m, -31)))
    db.execute("SELECT * FROM meter.drop_old_partitions(24)").fetchall()  # a checkpoint row
    client.allocate("u1", ET, 7, UNIT, event_time=mid_month(*add_months(y, m, -30)))
    client.allocate("u1", ET, 3, UNIT)
    outcome: dict[str, object] = {}

    slow = psycopg.connect(db_url)  # keeps the fold's upsert waiting: a slow fold
    try:
        slow.execute("SELECT * FROM meter.ledger_checkpoints FOR UPDATE").fetchall()

        def drop() -> None:
            try:
                with psycopg.connect(db_url, autocommit=True) as c:
                    outcome["drop"] = [
                        short(r[0])
                        for r in c.execute("SELECT * FROM meter.drop_old_partitions(24)")
                    ]
            except Exception as exc:  # reported by the assertion below
                outcome["drop_error"] = f"{exc.__class__.__name__}: {exc}"

        def read() -> None:
            try:
                # the SQL API itself: the SDK would retry a deadlock and hide it
                with psycopg.connect(db_url, autocommit=True) as c:
                    outcome["ledger"] = c.execute(
                        "SELECT count(*) FROM meter.get_ledger('u1', %s, %s)", (ET, UNIT)
                    ).fetchone()[0]
            except Exception as exc:
                outcome["read_error"] = f"{exc.__class__.__name__}: {exc}"

        d = threading.Thread(target=drop)
        d.start()
        eventually(lambda: waiting(db) >= 1)  # the fold waits, the month locked
        r = threading.Thread(target=read)
        r.start()
        # the read answers at once (045: the drop reads and writes the month's fold before
        # it locks the ledger) or waits for the drop; it used to wait and be killed
        eventually(lambda: "ledger" in outcome or "read_error" in outcome or waiting(db) >= 2)
        slow.commit()
        d.join(60)
        r.join(60)
    finally:
        slow.close()
    assert "drop_error" not in outcome and "read_error" not in outcome, outcome
    assert outcome["drop"] == [pname(*add_months(y, m, -30))]
    assert outcome["ledger"] in (1, 2)  # read after or before the drop
    assert checkpoint(db, "u1")["balance"] == D(17)
    assert bal(client, "u1")["balance"] == D(20)
    assert client.reconcile() == []


def test_reconcile_waiting_for_a_drop_sees_its_fold(client, db, db_url):
    """SPEC 3 item 7: reconcile() reports nothing on a healthy ledger, before, during and
    after retention. reconcile was STABLE: its query ran on the calling statement's
    snapshot, taken before it waited for the drop's lock, so it read the checkpoint as it
    was before the fold but the ledger without the dropped month, and reported the folded
    10 as a balance_mismatch. Since 045 it is VOLATILE: its snapshot follows its locks."""
    import threading

    y, m = this_month(db)
    old = add_months(y, m, -30)
    client.allocate("u1", ET, 10, UNIT, event_time=mid_month(*old))
    client.allocate("u1", ET, 3, UNIT)
    assert client.reconcile() == []
    outcome: dict[str, object] = {}
    with psycopg.connect(db_url) as dropper:
        dropped = dropper.execute("SELECT * FROM meter.drop_old_partitions(24)").fetchall()
        assert [short(r[0]) for r in dropped] == [pname(*old)]

        def rec() -> None:
            try:
                outcome["rows"] = client.reconcile()
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = f"{exc.__class__.__name__}: {exc}"

        t = threading.Thread(target=rec)
        t.start()
        eventually(lambda: waiting(db) >= 1)  # reconcile waits for the ledger
        dropper.commit()
        t.join(30)
    assert outcome == {"rows": []}, repr(outcome)
    assert checkpoint(db, "u1")["balance"] == D(10)
    assert client.reconcile() == []
