"""Concurrency: real threads, each with its own client and connection (SPEC 3 items 1 and 6).

- a hot account never overdraws under check_balance;
- an idempotency key is applied once however many callers race on it, and a different
  request racing on the same key is refused with IdempotencyConflictError;
- reserve/commit/release traffic with short TTLs while the expiry sweep loops never
  deadlocks and leaves reconcile() empty.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from meter import MeterClient
from meter.errors import IdempotencyConflictError
from tests.fix_db import ledger_partitions, wait_until_expired
from tests.integration.test_pipeline import eventually

D = Decimal
ET = "tokens"
UNIT = "tok"
DEADLOCK = "40P01"


# ---------------------------------------------------------------- helpers


def run_threads(
    n: int,
    url: str,
    target: Callable[[int, MeterClient], Any],
    *,
    namespace: str = "default",
    timeout: float = 60.0,
) -> tuple[list[Any], list[tuple[int, BaseException]]]:
    """Run ``target(i, client)`` in ``n`` threads, each with its own client, all released at
    once by a barrier. Returns the results (by thread) and the exceptions raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[tuple[int, BaseException]] = []

    def wrap(i: int) -> None:
        try:
            with MeterClient(url, namespace=namespace) as c:
                # One round trip first, so that connecting is not part of the race.
                c.get_balance("warm-up", ET, UNIT)
                barrier.wait(timeout=30)
                results[i] = target(i, c)
        except BaseException as e:  # collected and asserted on by the caller
            errors.append((i, e))
            barrier.abort()

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    assert alive == 0, f"{alive} of {n} threads still running after {timeout}s (deadlock?)"
    return results, errors


def sqlstate(e: BaseException) -> str | None:
    return getattr(e, "sqlstate", None) or getattr(e.__cause__, "sqlstate", None)


def assert_no_errors(errors: list[tuple[int, BaseException]]) -> None:
    deadlocks = [e for _, e in errors if sqlstate(e) == DEADLOCK]
    assert not deadlocks, f"deadlocks surfaced: {deadlocks!r}"
    assert not errors, f"threads failed: {errors!r}"


def ledger(db, user_id: str, namespace: str = "default") -> list[dict]:
    return db.execute(
        "SELECT * FROM meter.ledger WHERE namespace = %s AND user_id = %s ORDER BY id",
        (namespace, user_id),
    ).fetchall()


def account(db, user_id: str, namespace: str = "default") -> dict:
    return db.execute(
        "SELECT * FROM meter.accounts WHERE namespace = %s AND user_id = %s AND event_type = %s"
        " AND unit = %s AND resource = ''",
        (namespace, user_id, ET, UNIT),
    ).fetchone()


# ---------------------------------------------------------------- hot account


@pytest.mark.slow
def test_hot_account_never_overdraws(db_url, client, db):
    client.allocate("hot", ET, 1000, UNIT)

    def worker(i: int, c: MeterClient) -> list[dict]:
        done = []
        while True:
            r = c.consume("hot", ET, 7, UNIT, check_balance=True)
            if not r["success"]:
                # A refusal reports the state it saw and changes nothing.
                assert r["entry_id"] is None
                assert D("0") <= r["available"] < D("7"), r
                return done
            assert r["balance"] >= 0, r
            done.append(r)

    results, errors = run_threads(32, db_url, worker)
    assert_no_errors(errors)
    successes = [r for per_thread in results for r in per_thread]
    assert sum(1 for per_thread in results if per_thread) > 1  # the callers really interleaved

    # 1000 = 142 * 7 + 6: exactly 142 consumes fit, whoever made them.
    assert len(successes) == 142
    assert sum(D("7") for _ in successes) == D("1000") - D("6")
    # Each success saw its own balance: the consumes were applied one after another.
    assert sorted((r["balance"] for r in successes), reverse=True) == [
        D("1000") - 7 * k for k in range(1, 143)
    ]
    assert len({r["entry_id"] for r in successes}) == 142

    assert client.get_balance("hot", ET, UNIT) == {
        "balance": D("6"),
        "reserved": D("0"),
        "available": D("6"),
    }
    rows = ledger(db, "hot")
    assert len(rows) == 1 + 142
    assert [r["entry_type"] for r in rows].count("consumption") == 142
    assert sum(r["amount"] for r in rows) == D("6")
    assert min(r["balance_after"] for r in rows) == D("6")
    assert {r["id"] for r in rows if r["entry_type"] == "consumption"} == {
        r["entry_id"] for r in successes
    }
    acc = account(db, "hot")
    assert (acc["total_credited"], acc["total_debited"]) == (D("1000"), D("994"))
    assert client.reconcile() == []


# ---------------------------------------------------------------- one key, many callers


@pytest.mark.slow
def test_same_key_replayed_concurrently_applies_once(db_url, client, db):
    client.allocate("u", ET, 1000, UNIT)
    expected_balance = D("1000")
    for round_no in range(4):
        key = f"consume-{round_no}"
        results, errors = run_threads(
            8, db_url, lambda i, c, key=key: c.consume("u", ET, 10, UNIT, idempotency_key=key)
        )
        assert_no_errors(errors)
        expected_balance -= 10
        assert results[0]["success"] is True
        assert results[0]["balance"] == expected_balance
        assert all(r == results[0] for r in results), results

        key = f"allocate-{round_no}"
        results, errors = run_threads(
            8, db_url, lambda i, c, key=key: c.allocate("u", ET, 25, UNIT, idempotency_key=key)
        )
        assert_no_errors(errors)
        expected_balance += 25
        assert results[0]["balance"] == expected_balance
        assert all(r == results[0] for r in results), results

    assert client.get_balance("u", ET, UNIT)["balance"] == D("1060")
    rows = ledger(db, "u")
    keyed = [r["idempotency_key"] for r in rows if r["idempotency_key"] is not None]
    assert sorted(keyed) == sorted(
        [f"consume-{n}" for n in range(4)] + [f"allocate-{n}" for n in range(4)]
    )
    assert len(rows) == 1 + 8
    stored = db.execute(
        "SELECT key FROM meter.idempotency_keys WHERE namespace = 'default' ORDER BY key"
    ).fetchall()
    assert [r["key"] for r in stored] == sorted(keyed)
    assert client.reconcile() == []


@pytest.mark.slow
def test_same_reservation_id_and_commit_raced(db_url, client, db):
    client.allocate("u", ET, 100, UNIT)

    results, errors = run_threads(
        8,
        db_url,
        lambda i, c: c.reserve("u", ET, 30, UNIT, ttl_seconds=600, reservation_id="hold-1"),
    )
    assert_no_errors(errors)
    assert all(r == results[0] for r in results), results
    assert (results[0]["granted"], results[0]["reservation_id"]) == (True, "hold-1")
    assert results[0]["available"] == D("70")
    assert client.get_balance("u", ET, UNIT) == {
        "balance": D("100"),
        "reserved": D("30"),
        "available": D("70"),
    }

    results, errors = run_threads(8, db_url, lambda i, c: c.commit("hold-1", 12))
    assert_no_errors(errors)
    assert sorted(r["status"] for r in results) == ["committed"] + ["replayed"] * 7
    figures = {
        (
            r["success"],
            r["consumed"],
            r["released"],
            r["reserved_amount"],
            r["balance"],
            r["entry_id"],
        )
        for r in results
    }
    assert len(figures) == 1, figures
    (success, consumed, released, reserved_amount, balance, entry_id) = figures.pop()
    assert (success, consumed, released, reserved_amount, balance) == (
        True,
        D("12"),
        D("18"),
        D("30"),
        D("88"),
    )
    rows = ledger(db, "u")
    assert [(r["entry_type"], r["amount"], r["reservation_id"]) for r in rows] == [
        ("allocation", D("100"), None),
        ("consumption", D("-12"), "hold-1"),
    ]
    assert rows[1]["id"] == entry_id
    assert client.get_balance("u", ET, UNIT) == {
        "balance": D("88"),
        "reserved": D("0"),
        "available": D("88"),
    }
    assert client.reconcile() == []


def _race_pair(db_url, calls):
    """Run two different calls at once; return [(result or exception)] per call."""

    def worker(i, c):
        try:
            return calls[i](c)
        except IdempotencyConflictError as e:
            return e

    results, errors = run_threads(2, db_url, worker)
    assert_no_errors(errors)
    return results


@pytest.mark.slow
def test_same_key_different_requests_raced(db_url, client, db):
    client.allocate("u", ET, 10000, UNIT)
    balance = D("10000")
    for n in range(8):
        key = f"k-{n}"
        amounts = (D("3"), D("4"))
        results = _race_pair(
            db_url,
            [
                lambda c, a=amounts[0], key=key: c.consume("u", ET, a, UNIT, idempotency_key=key),
                lambda c, a=amounts[1], key=key: c.consume("u", ET, a, UNIT, idempotency_key=key),
            ],
        )
        winners = [(a, r) for a, r in zip(amounts, results, strict=True) if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, IdempotencyConflictError)]
        assert len(winners) == 1 and len(losers) == 1, results
        amount, won = winners[0]
        balance -= amount
        assert (won["success"], won["balance"]) == (True, balance)

        key = f"a-{n}"
        amounts = (D("5"), D("6"))
        results = _race_pair(
            db_url,
            [
                lambda c, a=amounts[0], key=key: c.allocate("u", ET, a, UNIT, idempotency_key=key),
                lambda c, a=amounts[1], key=key: c.allocate("u", ET, a, UNIT, idempotency_key=key),
            ],
        )
        winners = [(a, r) for a, r in zip(amounts, results, strict=True) if isinstance(r, dict)]
        losers = [r for r in results if isinstance(r, IdempotencyConflictError)]
        assert len(winners) == 1 and len(losers) == 1, results
        amount, won = winners[0]
        balance += amount
        assert won["balance"] == balance

    assert client.get_balance("u", ET, UNIT)["balance"] == balance
    rows = ledger(db, "u")
    assert len(rows) == 1 + 16
    assert sum(r["amount"] for r in rows) == balance
    assert client.reconcile() == []


@pytest.mark.slow
def test_commit_of_one_hold_with_different_amounts_raced(db_url, client, db):
    client.allocate("u", ET, 1000, UNIT)
    expected = D("1000")
    for n in range(6):
        rid = f"h-{n}"
        assert client.reserve("u", ET, 20, UNIT, ttl_seconds=600, reservation_id=rid)["granted"]
        amounts = (D("7"), D("9"))
        results = _race_pair(
            db_url,
            [
                lambda c, a=amounts[0], rid=rid: c.commit(rid, a),
                lambda c, a=amounts[1], rid=rid: c.commit(rid, a),
            ],
        )
        winners = [(a, r) for a, r in zip(amounts, results, strict=True) if isinstance(r, dict)]
        assert len(winners) == 1, results
        amount, won = winners[0]
        expected -= amount
        assert (won["status"], won["consumed"], won["released"], won["balance"]) == (
            "committed",
            amount,
            D("20") - amount,
            expected,
        )
    assert client.get_balance("u", ET, UNIT) == {
        "balance": expected,
        "reserved": D("0"),
        "available": expected,
    }
    assert len(ledger(db, "u")) == 1 + 6
    assert client.reconcile() == []


@pytest.mark.slow
def test_commit_and_release_of_one_hold_raced(db_url, client, db):
    client.allocate("u", ET, 1000, UNIT)
    expected = D("1000")
    for n in range(8):
        rid = f"h-{n}"
        assert client.reserve("u", ET, 20, UNIT, ttl_seconds=600, reservation_id=rid)["granted"]
        results, errors = run_threads(
            2, db_url, lambda i, c, rid=rid: c.commit(rid, 5) if i == 0 else c.release(rid)
        )
        assert_no_errors(errors)
        committed, released = results
        if committed["status"] == "committed":
            assert released is False
            expected -= 5
        else:
            assert committed["status"] == "released" and committed["success"] is False
            assert released is True
        row = db.execute(
            "SELECT status FROM meter.reservations WHERE reservation_id = %s", (rid,)
        ).fetchone()
        assert row["status"] == committed["status"]
    assert client.get_balance("u", ET, UNIT) == {
        "balance": expected,
        "reserved": D("0"),
        "available": expected,
    }
    assert client.reconcile() == []


# ---------------------------------------------------------------- traffic and the sweep


USERS = [f"t{n}" for n in range(4)]
GRANT = D("1000000")


@pytest.mark.slow
def test_reserve_commit_release_traffic_with_sweep_never_deadlocks(db_url, client, db, maint_url):
    for u in USERS:
        client.allocate(u, ET, GRANT, UNIT)
    # Eight callers on four accounts, commits of holds the sweep is expiring at that very
    # moment, releases racing the sweep, and two sweeps (per namespace and across all).
    duration = 6.0
    stop = threading.Event()
    sweep_errors: list[BaseException] = []
    swept = [0]

    def sweeper() -> None:
        try:
            with (
                MeterClient(db_url) as c,
                psycopg.connect(maint_url, autocommit=True, row_factory=dict_row) as maint,
            ):
                while not stop.is_set():
                    swept[0] += c.release_expired_reservations()
                    # The cross-namespace sweep in small batches, as beat runs it.
                    swept[0] += maint.execute(
                        "SELECT meter.release_expired_reservations(NULL, 3) AS n"
                    ).fetchone()["n"]
                    time.sleep(0.01)
        except BaseException as e:
            sweep_errors.append(e)

    def worker(i: int, c: MeterClient) -> dict:
        rng = random.Random(i)
        consumed: dict[str, Decimal] = defaultdict(Decimal)
        outcomes: dict[str, int] = defaultdict(int)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            user = rng.choice(USERS)
            hold = D(rng.randint(1, 20))
            ttl = rng.choice((1, 2))
            started = time.monotonic()
            r = c.reserve(user, ET, hold, UNIT, ttl_seconds=ttl)
            assert r["granted"] is True, r
            rid = r["reservation_id"]
            action = rng.choice(("commit", "commit", "release", "abandon", "late", "late-release"))
            if action in ("late", "late-release"):
                time.sleep(ttl + 0.1 + rng.random() * 0.3)
            actual = D(rng.randint(0, 30))
            if action in ("commit", "late"):
                cm = c.commit(rid, actual)
                assert cm["success"] is True, cm
                assert cm["consumed"] == actual and cm["reserved_amount"] == hold, cm
                if action == "late":
                    assert cm["status"] == "late", cm
                if cm["status"] == "late":
                    assert cm["released"] == 0, cm
                else:
                    assert cm["status"] == "committed", cm
                    assert cm["released"] == max(hold - actual, D("0")), cm
                consumed[user] += actual
                outcomes[cm["status"]] += 1
            elif action in ("release", "late-release"):
                ok = c.release(rid)
                if action == "late-release":
                    assert ok is False  # past its TTL: swept or not, not releasable
                elif time.monotonic() - started < ttl - 0.5:
                    assert ok is True
                outcomes[f"{action}:{ok}"] += 1
            else:
                outcomes["abandon"] += 1
        return {"consumed": consumed, "outcomes": outcomes}

    sweep_thread = threading.Thread(target=sweeper, daemon=True)
    sweep_thread.start()
    try:
        results, errors = run_threads(8, db_url, worker, timeout=duration + 30)
    finally:
        stop.set()
        sweep_thread.join(30)
    assert not sweep_thread.is_alive(), "the sweep did not finish (deadlock?)"
    assert_no_errors(errors + [(-1, e) for e in sweep_errors])

    consumed: dict[str, Decimal] = defaultdict(Decimal)
    outcomes: dict[str, int] = defaultdict(int)
    for r in results:
        for u, v in r["consumed"].items():
            consumed[u] += v
        for k, v in r["outcomes"].items():
            outcomes[k] += v
    # The traffic really exercised every path.
    for k in ("committed", "late", "release:True", "late-release:False", "abandon"):
        assert outcomes[k] > 0, dict(outcomes)
    assert swept[0] > 0

    def check_accounts() -> None:
        assert client.reconcile() == []
        for u in USERS:
            acc = account(db, u)
            holds = db.execute(
                "SELECT coalesce(sum(amount), 0) AS s FROM meter.reservations"
                " WHERE namespace = 'default' AND user_id = %s AND status = 'active'",
                (u,),
            ).fetchone()["s"]
            assert acc["reserved"] == holds, u
            assert acc["balance"] == GRANT - consumed[u], u
            assert sum(r["amount"] for r in ledger(db, u)) == acc["balance"], u
            committed = db.execute(
                "SELECT coalesce(sum(actual_amount), 0) AS s FROM meter.reservations"
                " WHERE namespace = 'default' AND user_id = %s AND status = 'committed'",
                (u,),
            ).fetchone()["s"]
            assert committed == consumed[u], u

    check_accounts()

    # Once every TTL has passed, a sweep leaves no hold behind.
    time.sleep(2.2)
    while client.release_expired_reservations() > 0:
        pass
    check_accounts()
    left = db.execute(
        "SELECT count(*) AS n FROM meter.reservations WHERE status = 'active'"
    ).fetchone()["n"]
    assert left == 0
    for u in USERS:
        b = client.get_balance(u, ET, UNIT)
        assert b == {"balance": GRANT - consumed[u], "reserved": D("0"), "available": b["balance"]}
    assert client.get_stats()["active_reservations"] == 0


def _waiting_on_a_lock(db, pid: int) -> bool:
    row = db.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    return row is not None and row["wait_event_type"] == "Lock"


def test_a_batch_that_commits_a_hold_never_deadlocks_with_the_sweep(db_url, client, db):
    # The batch's fast path locks ux; its one-by-one events then commit R1. The sweep locks
    # R1 (expired) and then needs ux. A third session holds an advisory lock that the batch
    # meets in between, so the sweep runs exactly there.
    client.allocate("ux", ET, 100, UNIT)
    hold = client.reserve("ux", ET, 10, UNIT, ttl_seconds=1, reservation_id="R1")
    wait_until_expired(db, hold["expires_at"])
    events = [
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "ux", "event_type": ET, "amount": "1", "unit": UNIT}},
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "uy", "event_type": ET, "amount": "1", "unit": UNIT}},
        {"op": "reserve", "namespace": "default",
         "args": {"user_id": "uz", "event_type": ET, "amount": "1", "unit": UNIT,
                  "reservation_id": "BLOCK"}},
        {"op": "commit", "namespace": "default",
         "args": {"reservation_id": "R1", "actual_amount": "5"}},
    ]  # fmt: skip
    errors: dict[str, BaseException] = {}
    results: dict[str, Any] = {}
    with (
        psycopg.connect(db_url) as blocker,
        psycopg.connect(db_url, autocommit=True) as batch_conn,
        psycopg.connect(db_url, autocommit=True) as sweep_conn,
    ):
        blocker.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended("
            "'reservation' || chr(31) || 'default' || chr(31) || 'BLOCK', 0))"
        )

        def batch() -> None:
            try:
                results["batch"] = batch_conn.execute(
                    "SELECT idx, status, error_sqlstate FROM meter.apply_events(%s)",
                    (psycopg.types.json.Jsonb(events),),
                ).fetchall()
            except BaseException as exc:
                errors["batch"] = exc

        def sweep() -> None:
            try:
                results["sweep"] = sweep_conn.execute(
                    "SELECT meter.release_expired_reservations('default')"
                ).fetchone()[0]
            except BaseException as exc:
                errors["sweep"] = exc

        tb = threading.Thread(target=batch)
        tb.start()
        eventually(lambda: _waiting_on_a_lock(db, batch_conn.info.backend_pid))
        ts = threading.Thread(target=sweep)
        ts.start()
        eventually(lambda: not ts.is_alive() or _waiting_on_a_lock(db, sweep_conn.info.backend_pid))
        blocker.commit()  # the batch goes on
        tb.join(30)
        ts.join(30)
    assert errors == {}
    assert results["sweep"] in (0, 1)
    statuses = {r[0]: (r[1], r[2]) for r in results["batch"]}
    assert statuses[0] == statuses[1] == ("applied", None)
    assert statuses[3] == ("applied", None)  # a late commit: the sweep had expired R1
    assert (
        db.execute("SELECT status FROM meter.reservations WHERE reservation_id = 'R1'").fetchone()[
            "status"
        ]
        == "committed"
    )
    assert client.get_balance("ux", ET, UNIT) == {
        "balance": D("94"), "reserved": D("0"), "available": D("94"),
    }  # fmt: skip
    assert client.reconcile() == []


@pytest.mark.parametrize("first", ["commit", "consume", "allocate", "release"])
def test_the_sweep_passes_over_an_account_a_caller_s_transaction_holds(db_url, client, db, first):
    # A caller's transaction writes to u1 (it holds the account), then commits u1's hold
    # that is past its TTL. The sweep in between used to take that hold and wait for u1:
    # once the caller came to commit the hold, a deadlock, whose victim was the sweep and
    # its whole batch. It now leaves u1 and its holds to the next round and expires the
    # rest. (Without the fix this sweep waits for u1: lock_timeout ends the test.)
    client.allocate("u1", ET, 100, UNIT)
    client.allocate("u2", ET, 100, UNIT)
    other = client.reserve("u1", ET, 1, UNIT, ttl_seconds=300)["reservation_id"]
    due = client.reserve("u1", ET, 10, UNIT, ttl_seconds=1)
    due_u2 = client.reserve("u2", ET, 10, UNIT, ttl_seconds=1)
    wait_until_expired(db, max(due["expires_at"], due_u2["expires_at"]))
    deadlocks = _deadlocks(db)
    with (
        psycopg.connect(db_url) as mine,
        psycopg.connect(db_url, autocommit=True) as sweeper,
    ):
        sweeper.execute("SET lock_timeout = '5s'")
        me = MeterClient(mine)
        mine.execute("SELECT 1")  # the caller's transaction is open from here
        if first == "commit":
            assert me.commit(other, 1)["status"] == "committed"
        elif first == "consume":
            assert me.consume("u1", ET, 3, UNIT)["success"]
        elif first == "allocate":
            me.allocate("u1", ET, 3, UNIT)
        else:
            assert me.release(other) is True
        swept = sweeper.execute("SELECT meter.release_expired_reservations(NULL)").fetchone()[0]
        assert swept == 1  # u2's hold; u1's is left for the next round
        late = me.commit(due["reservation_id"], 10)
        mine.commit()
    assert late["status"] == "late"
    assert late["released"] == 0
    assert _deadlocks(db) == deadlocks
    statuses = {
        r["reservation_id"]: r["status"]
        for r in db.execute("SELECT reservation_id, status FROM meter.reservations").fetchall()
    }
    assert statuses[due["reservation_id"]] == "committed"
    assert statuses[due_u2["reservation_id"]] == "expired"
    held = {"commit": 0, "release": 0, "consume": 1, "allocate": 1}[first]
    moved = {"commit": -1, "release": 0, "consume": -3, "allocate": 3}[first]
    assert client.get_balance("u1", ET, UNIT) == {
        "balance": D(90 + moved), "reserved": D(held), "available": D(90 + moved - held),
    }  # fmt: skip
    assert client.get_balance("u2", ET, UNIT)["reserved"] == 0
    assert client.reconcile() == []


@pytest.mark.parametrize("amount", [100, 8], ids=["hopeless", "expiring_frees_enough"])
def test_refused_checked_consumes_in_crossed_transactions_never_deadlock(
    db_url, client, db, amount
):
    # Two caller's transactions, each a checked consume of `a` (10 units, a hold of 5 past
    # its TTL) and a write to `b`, in opposite orders. A first version of 040 locked `a` in
    # the first refusal even when expiring could not free enough, and had the second (which
    # held `b`) wait for it: a deadlock where both had committed (found by a review). Now a
    # hopeless refusal takes no lock, and a transaction that holds rows passes over a held
    # account instead of waiting for it.
    client.allocate("a", ET, 10, UNIT)
    client.allocate("b", ET, 10, UNIT)
    due = client.reserve("a", ET, 5, UNIT, ttl_seconds=1)
    wait_until_expired(db, due["expires_at"])
    deadlocks = _deadlocks(db)
    out: dict[str, Any] = {}
    with psycopg.connect(db_url) as c1, psycopg.connect(db_url) as c2:
        t1, t2 = MeterClient(c1), MeterClient(c2)
        # both callers' transactions are open from here; a wait for a lock (the defect)
        # ends in an error rather than a hung test
        c1.execute("SET LOCAL lock_timeout = '10s'")
        c2.execute("SET LOCAL lock_timeout = '3s'")
        first = t1.consume("a", ET, amount, UNIT, check_balance=True)
        assert t2.consume("b", ET, 1, UNIT)["success"]

        def second() -> None:
            try:
                out["t2"] = t2.consume("a", ET, amount, UNIT, check_balance=True)
                c2.commit()
            except BaseException as exc:
                out["t2"] = exc
                c2.rollback()  # lets the first transaction have `b`

        th = threading.Thread(target=second)
        th.start()
        th.join(5)  # it neither waits for `a` nor ...
        assert not th.is_alive()
        assert t1.consume("b", ET, 1, UNIT)["success"]  # ... keeps `b` from the first
        c1.commit()
    assert _deadlocks(db) == deadlocks
    assert not isinstance(out["t2"], BaseException), out["t2"]
    assert out["t2"]["success"] is False
    assert first["success"] is (amount == 8)  # expiring the hold frees 10 >= 8
    assert client.get_balance("b", ET, UNIT)["balance"] == D(8)
    assert client.get_balance("a", ET, UNIT)["balance"] == D(10 - (8 if amount == 8 else 0))
    assert client.reconcile() == []


def test_a_refusal_short_under_the_lock_lets_its_account_go(db_url, client, db):
    # x and y: 100 each, a due hold of 60 (available 40). A writer holds each with a
    # consume of 50. Two callers' transactions each refuse a checked consume of 80 of one
    # (40 + 60 would do: it waits for the account), then write the other. Under the lock
    # (the writer committed: 50 - 60 + 60 < 80) the refusal stands; a first version of 040
    # kept the account locked to the end of the caller's transaction, and the two
    # deadlocked (found by a third review). The refusal now lets it go.
    for u in ("x", "y"):
        client.allocate(u, ET, 100, UNIT)
        due = client.reserve(u, ET, 60, UNIT, ttl_seconds=1)
    wait_until_expired(db, due["expires_at"])
    deadlocks = _deadlocks(db)
    out: dict[str, Any] = {}
    barrier = threading.Barrier(2, timeout=20)
    blockers = [psycopg.connect(db_url) for _ in range(2)]
    callers = [psycopg.connect(db_url) for _ in range(2)]
    try:
        for conn in blockers + callers:
            conn.execute("SET LOCAL lock_timeout = '10s'")  # the transactions are open
        for conn, u in zip(blockers, ("x", "y"), strict=True):
            MeterClient(conn).consume(u, ET, 50, UNIT)

        def caller(me: str, other: str, conn: psycopg.Connection[Any]) -> None:
            mine = MeterClient(conn)
            try:
                out[me + "_refusal"] = mine.consume(me, ET, 80, UNIT, check_balance=True)
                barrier.wait()
                mine.consume(other, ET, 1, UNIT)
                conn.commit()
                out[me] = "committed"
            except BaseException as exc:
                conn.rollback()
                out[me] = exc

        threads = [
            threading.Thread(target=caller, args=("x", "y", callers[0])),
            threading.Thread(target=caller, args=("y", "x", callers[1])),
        ]
        for t in threads:
            t.start()
        for conn in callers:
            pid = conn.info.backend_pid
            eventually(lambda pid=pid: _waiting_on_a_lock(db, pid))
        for conn in blockers:
            conn.commit()
        for t in threads:
            t.join(30)
    finally:
        for conn in blockers + callers:
            conn.close()
    assert (out["x"], out["y"]) == ("committed", "committed")
    assert out["x_refusal"]["success"] is False and out["y_refusal"]["success"] is False
    assert _deadlocks(db) == deadlocks
    for u in ("x", "y"):
        assert client.get_balance(u, ET, UNIT)["balance"] == D(49)
    assert client.reconcile() == []


@pytest.mark.parametrize("op", ["consume", "reserve"])
def test_two_checked_writes_each_enough_are_both_granted_past_a_due_hold(db_url, client, op):
    # Balance 100, one hold of 60 past its TTL: a checked consume (or reserve) of 50 and
    # one of 45, at the same moment, are both granted in either order. The second, refused
    # on the figures before the first committed, found the due hold locked by the first
    # (SKIP LOCKED) or already expired, and gave up: a refusal whose own `available` covered
    # its amount (found by a review: 295 of 600; 040 tries again instead).
    n = 60
    for i in range(n):
        client.allocate(f"u{i}", ET, 100, UNIT)
        client.reserve(f"u{i}", ET, 60, UNIT, ttl_seconds=1)
    time.sleep(1.1)
    results: dict[tuple[int, int], Any] = {}
    barrier = threading.Barrier(2)

    def worker(k: int, amount: int) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            me = MeterClient(conn)
            for i in range(n):
                barrier.wait()
                if op == "consume":
                    r = me.consume(f"u{i}", ET, amount, UNIT, check_balance=True)
                    results[(i, k)] = r["success"]
                else:
                    results[(i, k)] = me.reserve(f"u{i}", ET, amount, UNIT)["granted"]

    threads = [threading.Thread(target=worker, args=a) for a in ((0, 50), (1, 45))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 2 * n
    assert [key for key, granted in sorted(results.items()) if not granted] == []
    assert client.reconcile() == []


@pytest.mark.parametrize("same", [True, False], ids=["replay", "conflict"])
def test_a_reserve_racing_its_id_under_repeatable_read_replays_or_conflicts(
    db_url, client, db, same
):
    # 043: the second reserve of one client-chosen id waited for the first's lock, then
    # looked the id up in its REPEATABLE READ snapshot, missed the committed hold and
    # failed on the table's key: a raw 23505 naming nothing. Now the insert's conflict is a
    # serialization failure, which the SDK retries (the call is its own transaction): the
    # retry replays the same request, or refuses another by name, as READ COMMITTED does.
    client.allocate("a", ET, 100, UNIT)
    client.allocate("b", ET, 100, UNIT)
    rr = "-c default_transaction_isolation=repeatable\\ read"
    out: dict[str, Any] = {}
    with (
        psycopg.connect(db_url, options=rr) as first_conn,
        psycopg.connect(db_url, autocommit=True, options=rr) as second_conn,
    ):
        first_conn.execute("SELECT 1")  # the caller's transaction is open from here
        first = MeterClient(first_conn).reserve("a", ET, 10, UNIT, reservation_id="R")

        def second() -> None:
            try:
                user, amount = ("a", 10) if same else ("b", 20)
                out["r"] = MeterClient(second_conn).reserve(
                    user, ET, amount, UNIT, reservation_id="R"
                )
            except BaseException as exc:
                out["r"] = exc

        t = threading.Thread(target=second)
        t.start()
        eventually(lambda: _waiting_on_a_lock(db, second_conn.info.backend_pid))
        first_conn.commit()
        t.join(30)
    if same:
        assert out["r"] == first
    else:
        assert isinstance(out["r"], IdempotencyConflictError), out["r"]
        assert out["r"].parameter == "reservation_id"
    holds = db.execute("SELECT reservation_id, user_id FROM meter.reservations").fetchall()
    assert holds == [{"reservation_id": "R", "user_id": "a"}]
    assert client.get_balance("b", ET, UNIT)["reserved"] == 0
    assert client.reconcile() == []


def test_holds_on_a_held_account_do_not_use_up_the_sweep_s_batch(db_url, client, db):
    # The oldest due holds all belong to an account a caller's transaction holds. A first
    # version of 036 chose its batch before passing over held accounts: with the batch
    # full of those, every round expired nothing, in every namespace, for as long as the
    # caller held the account.
    client.allocate("hot", ET, 100, UNIT)
    client.allocate("cold", ET, 100, UNIT)
    for _ in range(2):
        client.reserve("hot", ET, 1, UNIT, ttl_seconds=1)
    time.sleep(0.05)
    cold = client.reserve("cold", ET, 5, UNIT, ttl_seconds=1)
    wait_until_expired(db, cold["expires_at"])
    with psycopg.connect(db_url) as caller:
        caller.execute("SELECT 1")
        MeterClient(caller).allocate("hot", ET, 1, UNIT)  # holds 'hot' until it commits
        swept = db.execute("SELECT meter.release_expired_reservations(NULL, 2) AS n").fetchone()
        assert swept["n"] == 1  # cold's, past the two of 'hot'
        caller.commit()
    assert client.get_balance("cold", ET, UNIT)["reserved"] == 0
    assert db.execute("SELECT meter.release_expired_reservations(NULL, 2) AS n").fetchone() == {
        "n": 2
    }
    assert client.reconcile() == []


@pytest.mark.parametrize("refused", ["checked consume", "reserve"])
def test_a_refused_write_that_expires_holds_waits_for_the_account_first(
    db_url, client, db, refused
):
    # A caller's transaction writes to u1 (it holds the account), then commits u1's hold
    # that is past its TTL. In between, a checked consume or a reserve on u1 is refused on
    # the figures before the caller's write (it does not wait for a row it will not
    # change), and expires u1's due holds to try again. 019's _expire_due took those holds
    # first, then waited for the account: once the caller came to commit the hold, a
    # deadlock. It now waits for the account before it takes any hold, and tries again
    # once it has it. (Without the fix, one of the two fails with 40P01.)
    client.allocate("u1", ET, 100, UNIT)
    due = client.reserve("u1", ET, 95, UNIT, ttl_seconds=1)
    wait_until_expired(db, due["expires_at"])
    deadlocks = _deadlocks(db)
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as mine,
        psycopg.connect(db_url, autocommit=True) as other_conn,
    ):
        me = MeterClient(mine)
        other = MeterClient(other_conn)
        mine.execute("SELECT 1")  # the caller's transaction is open from here
        assert me.consume("u1", ET, 1, UNIT)["success"]  # holds u1 until mine.commit()

        def refused_write() -> None:
            try:
                if refused == "checked consume":
                    results["r"] = other.consume("u1", ET, 50, UNIT, check_balance=True)
                else:
                    results["r"] = other.reserve("u1", ET, 50, UNIT, ttl_seconds=300)
            except BaseException as exc:
                errors["r"] = exc

        t = threading.Thread(target=refused_write)
        t.start()
        eventually(lambda: _waiting_on_a_lock(db, other_conn.info.backend_pid))
        try:
            late = me.commit(due["reservation_id"], 10)
            mine.commit()
        except BaseException as exc:
            errors["mine"] = exc
        t.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert late["status"] == "late"
    # The write saw the account once it had it: 100 - 1 - 10 = 89 available, enough for 50.
    if refused == "checked consume":
        assert results["r"]["success"] is True
        expected = {"balance": D(39), "reserved": D(0), "available": D(39)}
    else:
        assert results["r"]["granted"] is True
        expected = {"balance": D(89), "reserved": D(50), "available": D(39)}
    assert client.get_balance("u1", ET, UNIT) == expected
    assert client.reconcile() == []


def test_the_sweep_and_the_period_roll_never_deadlock(db_url, client, db):
    # b is created first (smaller account_id), a has the smaller key: both must take them
    # in the same order. A third session holds a while both start.
    start = (datetime.now(UTC).date().replace(day=1) - timedelta(days=1)).replace(day=1)
    holds = []
    for user in ("b", "a"):
        client.set_period_config(user, ET, UNIT, None, start, 5, None)
        client.allocate(user, ET, 10, UNIT)
        holds.append(client.reserve(user, ET, 1, UNIT, ttl_seconds=1)["expires_at"])
    wait_until_expired(db, max(holds))
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as holder,
        psycopg.connect(db_url, autocommit=True) as sweep_conn,
        psycopg.connect(db_url, autocommit=True) as roll_conn,
    ):
        holder.execute("SELECT 1 FROM meter.accounts WHERE user_id = 'a' FOR UPDATE")

        def call(name: str, conn: psycopg.Connection[Any], sql: str) -> None:
            try:
                conn.execute(sql).fetchall()
            except BaseException as exc:
                errors[name] = exc

        threads = []
        for name, conn, sql in (
            ("sweep", sweep_conn, "SELECT meter.release_expired_reservations('default')"),
            ("roll", roll_conn, "SELECT * FROM meter.roll_periods('default')"),
        ):
            threads.append(threading.Thread(target=call, args=(name, conn, sql)))
            threads[-1].start()
            # (the sweep passes over a held account: it may be done already, 036)
            eventually(
                lambda c=conn, t=threads[-1]: (
                    not t.is_alive() or _waiting_on_a_lock(db, c.info.backend_pid)
                )
            )
        holder.commit()
        for th in threads:
            th.join(30)
    assert errors == {}
    assert (
        db.execute(
            "SELECT count(*) AS n FROM meter.reservations WHERE status = 'active'"
        ).fetchone()["n"]
        == 0
    )
    assert client.reconcile() == []


RECORD_DEAD_LETTER = (
    "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT002', 'key reused',"
    " 'task-1/0', 'default')"
)


def test_two_deliveries_dead_lettering_one_message_at_once_file_one_letter(db, db_url):
    # A Redis restart can hand an unacknowledged message to a second worker while the
    # first still runs it. Both file its dead letter at once: one letter, two attempts
    # (not a unique violation that the second worker then files as a second letter).
    outcome: dict[str, Any] = {}
    with psycopg.connect(db_url) as first, psycopg.connect(db_url, autocommit=True) as second:

        def deliver_again() -> None:
            try:
                outcome["id"] = second.execute(RECORD_DEAD_LETTER).fetchone()[0]
            except psycopg.Error as exc:
                outcome["error"] = exc

        with first.transaction():
            first_id = first.execute(RECORD_DEAD_LETTER).fetchone()[0]
            racer = threading.Thread(target=deliver_again)
            racer.start()
            time.sleep(0.5)
            assert racer.is_alive(), outcome  # waits for the first delivery's letter
        racer.join(10)
    assert outcome == {"id": first_id}
    rows = db.execute(
        "SELECT dead_letter_id, attempts FROM meter.dead_letters WHERE source = 'task-1/0'"
    ).fetchall()
    assert [(r["dead_letter_id"], r["attempts"]) for r in rows] == [(first_id, 2)]


@pytest.mark.parametrize(
    "op, args",
    [
        ("consume", {"amount": "3", "idempotency_key": "dup-c"}),
        ("allocate", {"amount": "3", "idempotency_key": "dup-a"}),
        ("reserve", {"amount": "3", "reservation_id": "dup-r"}),
    ],
)
def test_a_delivery_that_waited_for_the_same_event_is_reported_replayed(
    db_url, client, db, op, args
):
    # Two deliveries of one event at once (a redelivery, two worker children): the second
    # waits for the first's key lock and replays its result. It used to be reported
    # 'applied' (its look-up came before the lock), though nothing was applied twice.
    client.allocate("u1", ET, 10, UNIT)
    event = {
        "op": op,
        "namespace": "default",
        "args": {"user_id": "u1", "event_type": ET, "unit": UNIT, **args},
    }
    apply = "SELECT status FROM meter.apply_events(%s)"
    second: dict[str, Any] = {}

    def deliver_again(conn: psycopg.Connection[Any]) -> None:
        try:
            second["status"] = [r["status"] for r in conn.execute(apply, (Jsonb([event]),))]
        except BaseException as exc:
            second["status"] = exc

    with (
        psycopg.connect(db_url, row_factory=dict_row) as first,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as other,
    ):
        assert [r["status"] for r in first.execute(apply, (Jsonb([event]),))] == ["applied"]
        thread = threading.Thread(target=deliver_again, args=(other,))
        thread.start()
        eventually(lambda: _waiting_on_a_lock(db, other.info.backend_pid))
        first.commit()
        thread.join(30)
    assert second["status"] == ["replayed"]
    assert len(ledger(db, "u1")) == (1 if op == "reserve" else 2)
    if op == "reserve":
        assert client.get_balance("u1", ET, UNIT)["reserved"] == D("3")


def test_a_single_event_task_takes_the_month_lock_before_the_key_lock(db_url, client, db):
    # A session creates a new month (a backdated consume) and holds it; a single-event
    # batch dated in that month with key K waits for it; the session then uses K itself.
    # The batch must not hold K's lock while it waits for the month (a deadlock): it takes
    # the locks in the API functions' order, the month first.
    event = {
        "op": "consume",
        "namespace": "default",
        "args": {"user_id": "u1", "event_type": ET, "unit": UNIT, "amount": "1",
                 "idempotency_key": "K", "event_time": "2020-01-15T00:00:00Z"},
    }  # fmt: skip
    outcome: dict[str, Any] = {}

    def deliver(conn: psycopg.Connection[Any]) -> None:
        try:
            outcome["batch"] = [
                r["status"]
                for r in conn.execute(
                    "SELECT status FROM meter.apply_events(%s)", (Jsonb([event]),)
                )
            ]
        except BaseException as exc:
            outcome["batch"] = exc

    with (
        psycopg.connect(db_url, row_factory=dict_row) as first,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as other,
    ):
        backdated = datetime(2020, 1, 10, tzinfo=UTC)
        first.execute("SELECT 1")  # the caller's transaction: the SDK's call nests in it
        MeterClient(first).consume("u1", ET, 1, UNIT, idempotency_key="other", event_time=backdated)
        thread = threading.Thread(target=deliver, args=(other,))
        thread.start()
        eventually(lambda: _waiting_on_a_lock(db, other.info.backend_pid))
        reply = first.execute(
            "SELECT success FROM meter.consume('u1', %s, 1, %s, NULL, false, 'K',"
            " '2020-01-15Z', NULL, 'default')",
            (ET, UNIT),
        ).fetchall()
        first.commit()
        thread.join(30)
    assert reply == [{"success": True}]
    assert outcome["batch"] == ["replayed"]
    assert len([r for r in ledger(db, "u1") if r["idempotency_key"] == "K"]) == 1


_WRITES_ON_U1 = {
    "consume": "SELECT available FROM meter.consume('u1', %s, 10, %s, NULL, true, 'w1')",
    "reserve": "SELECT available FROM meter.reserve('u1', %s, 10, %s, NULL, 60, 'w1')",
    "batch": "SELECT result->'available' AS available FROM meter.apply_events(%s) ORDER BY idx",
}


@pytest.mark.parametrize("write", sorted(_WRITES_ON_U1))
def test_a_write_that_waited_for_the_sweep_reports_what_the_sweep_left(db_url, client, db, write):
    # u1 has a hold of 30 past its TTL and an active one of 20. The sweep has expired the
    # first and holds u1; a write waits for u1. Since 028 a write reports `available`
    # without holds past their TTL: it must read them after the wait, which shows the
    # sweep's work, not in the statement that waited (its snapshot is from before the
    # sweep committed, and would take the expired hold out a second time: 100).
    client.allocate("u1", ET, 100, UNIT)
    client.allocate("u2", ET, 100, UNIT)
    due = client.reserve("u1", ET, 30, UNIT, ttl_seconds=1)
    client.reserve("u1", ET, 20, UNIT)
    wait_until_expired(db, due["expires_at"])
    sql = _WRITES_ON_U1[write]
    params: tuple[Any, ...] = (ET, UNIT)
    if write == "batch":  # two events: the batch path, not the one-by-one
        params = (Jsonb([
            {"op": "consume", "namespace": "default",
             "args": {"user_id": u, "event_type": ET, "unit": UNIT, "amount": "10",
                      "idempotency_key": f"w-{u}"}}
            for u in ("u1", "u2")
        ]),)  # fmt: skip
    reply: dict[str, Any] = {}

    def run(conn: psycopg.Connection[Any]) -> None:
        try:
            reply["available"] = [D(str(r["available"])) for r in conn.execute(sql, params)]
        except BaseException as exc:
            reply["available"] = exc

    with (
        psycopg.connect(db_url, row_factory=dict_row) as sweep,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as other,
    ):
        assert sweep.execute("SELECT meter.release_expired_reservations() AS n").fetchone() == {
            "n": 1
        }
        thread = threading.Thread(target=run, args=(other,))
        thread.start()
        eventually(lambda: _waiting_on_a_lock(db, other.info.backend_pid))
        sweep.commit()
        thread.join(30)
    expected = {"consume": [D("70")], "reserve": [D("70")], "batch": [D("70"), D("90")]}[write]
    assert reply["available"] == expected
    assert client.get_balance("u1", ET, UNIT)["available"] == expected[0]
    assert client.reconcile() == []


def _lock_wait(db, pid: int) -> str | None:
    row = db.execute(
        "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()
    if row is None or row["wait_event_type"] != "Lock":
        return None
    return str(row["wait_event"])


def test_writes_to_one_account_queue_on_its_advisory_lock(db_url, client, db):
    # 035: a write whose transaction holds no row waits for a busy account on the
    # account's advisory lock, not on the row (where every waiter wakes at each commit).
    client.allocate("u1", ET, 100, UNIT)
    waited: dict[str, Any] = {}
    with (
        psycopg.connect(db_url, row_factory=dict_row) as holder,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as waiter,
    ):
        holder.execute("SELECT 1")  # the caller's transaction, no row locked yet
        MeterClient(holder).consume("u1", ET, 1, UNIT)  # holds u1 until holder commits
        held = db.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE pid = %s AND locktype = 'advisory'"
            " AND granted",
            (holder.info.backend_pid,),
        ).fetchone()
        assert held == {"n": 1}

        def write() -> None:
            waited["row"] = MeterClient(waiter).consume("u1", ET, 2, UNIT)

        thread = threading.Thread(target=write)
        thread.start()
        eventually(lambda: _lock_wait(db, waiter.info.backend_pid) is not None)
        assert _lock_wait(db, waiter.info.backend_pid) == "advisory"
        holder.commit()
        thread.join(30)
    assert waited["row"]["balance"] == D("97")
    assert client.reconcile() == []


def test_a_transaction_holding_the_account_does_not_queue_behind_its_waiter(db_url, client, db):
    # The caller's own transaction holds u1's row without its advisory lock (a reserve locks
    # the row directly); a single call then queues for u1 (takes u1's advisory lock, waits
    # for the row); the transaction's next write on u1 already holds the row. Had that
    # write queued for the advisory lock, each would wait for the other (40P01): 035 takes
    # it only in a transaction that has locked no row.
    client.allocate("u1", ET, 100, UNIT)
    other: dict[str, Any] = {}
    deadlocks = _deadlocks(db)
    with (
        psycopg.connect(db_url, row_factory=dict_row) as mine,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as single,
    ):
        mine.execute("SELECT 1")  # the caller's transaction: the SDK's calls nest in it
        me = MeterClient(mine)
        me.reserve("u1", ET, 1, UNIT)

        def write() -> None:
            try:
                other["row"] = MeterClient(single).consume("u1", ET, 2, UNIT)
            except BaseException as exc:
                other["row"] = exc

        thread = threading.Thread(target=write)
        thread.start()
        eventually(lambda: _lock_wait(db, single.info.backend_pid) is not None)
        second = me.consume("u1", ET, 4, UNIT)  # would deadlock if it queued
        mine.commit()
        thread.join(30)
    assert second["balance"] == D("96")
    assert not isinstance(other["row"], BaseException), other["row"]
    assert other["row"]["balance"] == D("94")
    assert _deadlocks(db) == deadlocks  # (the SDK retries a 40P01: the count tells)
    assert client.reconcile() == []


def _deadlocks(db) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(row["deadlocks"])


@pytest.mark.parametrize("keyed", [False, True], ids=["crossed", "keyed"])
def test_refused_checked_writes_leave_no_queue_lock_behind(db_url, client, db, keyed):
    # Two caller transactions each make a checked consume that is refused (no account, no
    # row written: no transaction id), then write the other's account. Had the refusals
    # kept their accounts' advisory locks (035's first version), each second write waited
    # for the other transaction: 40P01 (found by a review). Keyed: S1's write to bob holds
    # key k1, S2 then uses k1 for another request and must get its conflict, not 40P01.
    deadlocks = _deadlocks(db)
    sql = "SELECT success FROM meter.consume(%s, %s, %s, %s, NULL, %s, %s)"
    outcome: dict[str, Any] = {}
    with (
        psycopg.connect(db_url, row_factory=dict_row) as s1,
        psycopg.connect(db_url, row_factory=dict_row) as s2,
    ):
        assert s1.execute(sql, ("alice", ET, 5, UNIT, True, None)).fetchone() == {"success": False}
        assert s2.execute(sql, ("bob", ET, 5, UNIT, True, None)).fetchone() == {"success": False}

        def first() -> None:
            try:
                outcome["s1"] = s1.execute(sql, ("bob", ET, 1, UNIT, False, "k1")).fetchone()
                s1.commit()
            except BaseException as exc:
                outcome["s1"] = exc

        thread = threading.Thread(target=first)
        thread.start()
        time.sleep(0.3)  # S1 writes bob first (it does not wait: bob is free)
        second = (
            ("carol", ET, 1, UNIT, False, "k1") if keyed else ("alice", ET, 1, UNIT, False, None)
        )
        try:
            outcome["s2"] = s2.execute(sql, second).fetchone()
            s2.commit()
        except psycopg.Error as exc:
            outcome["s2"] = exc.sqlstate
            s2.rollback()
        thread.join(30)
    assert outcome["s1"] == {"success": True}
    assert outcome["s2"] == ("MT002" if keyed else {"success": True})
    assert _deadlocks(db) == deadlocks
    assert client.reconcile() == []


@pytest.mark.parametrize("dated", ["1999-06-15", "2000-12-15"], ids=["other_month", "same_month"])
def test_the_period_roll_and_a_write_making_a_month_never_deadlock(db_url, client, db, dated):
    # The roll holds the accounts it has rolled (a) to its end; a later account (z, set up
    # from 2001, whose months have no partition) makes its months as its step begins,
    # which takes the ledger's SHARE UPDATE EXCLUSIVE lock (ATTACH PARTITION). A consume of
    # a dated in a month with no partition made that month (holding the same lock to its
    # end), then waited for a, which the roll held: each waited for the other (40P01).
    # A third session holds m (between a and z) so that the write comes exactly there.
    # Same month: the write dated in z's first month, which both make; create_partition
    # took that month's advisory lock before the ledger's lock, and waited for the roll
    # holding it while the roll waited for it to make the same month.
    today = datetime.now(UTC).date()
    start = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    for user, first in (("a", start), ("m", start), ("z", date(2001, 1, 1))):
        client.allocate(user, ET, 10, UNIT)
        db.execute(
            "SELECT meter.set_period_config(%s, %s, %s, NULL, %s, 5, NULL, 'default',"
            " interval '1 year')",
            (user, ET, UNIT, first),
        )
    for day in (start - timedelta(days=1), start):  # a's and m's months: the roll makes none
        db.execute("SELECT meter.create_partition(%s, %s)", (day.year, day.month))
    months = {f"ledger_{dated[:4]}_{dated[5:7]}", "ledger_2000_12", "ledger_2001_01"}
    assert not months & ledger_partitions(db)
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as holder,
        psycopg.connect(db_url, autocommit=True) as roll_conn,
        psycopg.connect(db_url, autocommit=True) as write_conn,
    ):
        holder.execute("SELECT 1 FROM meter.accounts WHERE user_id = 'm' FOR UPDATE")

        def call(name: str, conn: psycopg.Connection[Any], sql: str) -> None:
            try:
                conn.execute(sql).fetchall()
            except BaseException as exc:
                errors[name] = exc

        roll = threading.Thread(
            target=call,
            args=("roll", roll_conn, "SELECT * FROM meter.roll_periods('default')"),
        )
        roll.start()
        eventually(lambda: _waiting_on_a_lock(db, roll_conn.info.backend_pid))  # for m
        write = threading.Thread(
            target=call,
            args=(
                "write",
                write_conn,
                f"SELECT * FROM meter.consume('a', '{ET}', 1, '{UNIT}',"
                f" p_event_time => '{dated} 00:00:00+00')",
            ),
        )
        write.start()
        # waiting for a (before 055), or for the roll's partition lock, holding no account
        eventually(lambda: _waiting_on_a_lock(db, write_conn.info.backend_pid))
        holder.commit()
        roll.join(30)
        write.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert months <= ledger_partitions(db)
    assert client.reconcile() == []


def test_a_roll_making_no_month_holds_no_partition_lock_for_months_retention_dropped(
    db_url, client, db
):
    # 055's roll takes the ledger's partition lock before its first account when a month
    # its steps may date rows in has no partition. It counted those months from the
    # earliest period the account ever had, and retention drops such months (no step of
    # the roll dates a row there again): so a roll that makes no month took the lock at
    # every run once an account's history was older than the retention window. A caller's
    # transaction that held the account the roll waited for, and then made a month (the
    # case 055's header meant to spare: "not taken when every month exists"), waited for
    # the roll while the roll waited for it (40P01). Here d has daily periods from 100
    # days back, rolled up to yesterday (due today), and its first months are dropped.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    start = today - timedelta(days=100)
    client.allocate("d", ET, 10, UNIT)
    db.execute(
        "SELECT meter.set_period_config('d', %s, %s, NULL, %s, 5, NULL, 'default',"
        " interval '1 day')",
        (ET, UNIT, start),
    )
    yesterday = datetime.combine(today - timedelta(days=1), datetime.min.time(), UTC)
    db.execute(
        "SELECT * FROM meter.roll_periods('default', %s, 1000)", (yesterday + timedelta(hours=1),)
    ).fetchall()
    dropped = {r["drop_old_partitions"] for r in db.execute(
        "SELECT * FROM meter.drop_old_partitions(1)"
    ).fetchall()}  # fmt: skip
    assert f"ledger_{start:%Y_%m}" in dropped
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as app,
        psycopg.connect(db_url, autocommit=True) as roll_conn,
    ):
        app.execute(f"SELECT * FROM meter.consume('d', '{ET}', 1, '{UNIT}')")  # holds d

        def run_roll() -> None:
            try:
                roll_conn.execute("SELECT * FROM meter.roll_periods('default')").fetchall()
            except BaseException as exc:
                errors["roll"] = exc

        roll = threading.Thread(target=run_roll)
        roll.start()
        eventually(lambda: _waiting_on_a_lock(db, roll_conn.info.backend_pid))  # for d
        try:
            # a month made while holding d: it waited for the roll's partition lock
            app.execute(
                f"SELECT * FROM meter.consume('e', '{ET}', 1, '{UNIT}',"
                " p_event_time => '1999-06-15 00:00:00+00')"
            )
            app.commit()
        except psycopg.Error as exc:
            errors["app"] = exc
            app.rollback()
        roll.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert "ledger_1999_06" in ledger_partitions(db)
    assert client.reconcile() == []


def test_a_roll_opening_a_new_plan_after_an_old_history_holds_no_partition_lock(db_url, client, db):
    # 060's first version counted the months a roll's steps may date rows in from the day before the
    # latest period opened whenever that was earlier than the configured start; the roll
    # moves back to it only when the start lies inside recorded periods (042's case 0). A
    # start after every recorded period (a plan change) is case 1: the period running is
    # closed the day before the start, and nothing earlier is dated. Here d had a yearly
    # period from 200 days back, and a new plan from today: the months of the old start
    # are dropped, the roll makes no month, and took the ledger's partition lock anyway:
    # a caller's transaction that held d and then made a month deadlocked with it.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    start = today - timedelta(days=200)
    client.allocate("d", ET, 10, UNIT)
    db.execute(
        "SELECT meter.set_period_config('d', %s, %s, NULL, %s, 5, NULL, 'default',"
        " interval '1 year')",
        (ET, UNIT, start),
    )
    started = datetime.combine(start, datetime.min.time(), UTC) + timedelta(hours=1)
    db.execute("SELECT * FROM meter.roll_periods('default', %s)", (started,)).fetchall()
    db.execute(
        "SELECT meter.set_period_config('d', %s, %s, NULL, %s, 7, NULL, 'default',"
        " interval '1 year')",
        (ET, UNIT, today),
    )
    dropped = {r["drop_old_partitions"] for r in db.execute(
        "SELECT * FROM meter.drop_old_partitions(1)"
    ).fetchall()}  # fmt: skip
    assert f"ledger_{start - timedelta(days=1):%Y_%m}" in dropped
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as app,
        psycopg.connect(db_url, autocommit=True) as roll_conn,
    ):
        app.execute(f"SELECT * FROM meter.consume('d', '{ET}', 1, '{UNIT}')")  # holds d
        rolled: list[Any] = []

        def run_roll() -> None:
            try:
                rolled.extend(
                    roll_conn.execute("SELECT * FROM meter.roll_periods('default')").fetchall()
                )
            except BaseException as exc:
                errors["roll"] = exc

        roll = threading.Thread(target=run_roll)
        roll.start()
        eventually(lambda: _waiting_on_a_lock(db, roll_conn.info.backend_pid))  # for d
        try:
            # a month made while holding d: it waited for the roll's partition lock
            app.execute(
                f"SELECT * FROM meter.consume('e', '{ET}', 1, '{UNIT}',"
                " p_event_time => '1998-06-15 00:00:00+00')"
            )
            app.commit()
        except psycopg.Error as exc:
            errors["app"] = exc
            app.rollback()
        roll.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert "ledger_1998_06" in ledger_partitions(db)
    # the roll made no month: it closed the old period the day before and opened today's
    assert [(r[5], r[6], r[9]) for r in rolled] == [("rolled", today - timedelta(days=1), today)]
    assert f"ledger_{start - timedelta(days=1):%Y_%m}" not in ledger_partitions(db)
    assert client.reconcile() == []


@pytest.mark.parametrize(
    "committed", ["before_the_roll_comes_to_it", "while_the_roll_waits_for_it"]
)
def test_a_start_moved_back_during_a_roll_never_deadlocks_it(db_url, client, db, committed):
    # The roll reads its candidates' starts once, before its first account, and takes the
    # ledger's partition lock only if a month from those starts is missing. b's start is
    # moved back into a month that has none while the roll waits for a2 (held by z): the
    # roll then made that month holding a, for which x, which made a month, waits (40P01).
    # Since 064 it reads b's start again under b's lock, finds x's lock taken, and ends
    # there. Read without b's lock (064's first version), a set_period_config holding b
    # uncommitted when the roll comes to b still showed the old start; the step waited
    # for b and, once it committed, made b's month under a, a2 and b (40P01 again): the
    # window is the whole transaction of a configuration, not a moment.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    for user in ("a", "a2", "b"):
        client.allocate(user, ET, 10, UNIT)
        db.execute(
            "SELECT meter.set_period_config(%s, %s, %s, NULL, %s, 5, NULL, 'default')",
            (user, ET, UNIT, today),
        )
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    rolled: list[tuple[Any, ...]] = []
    with (
        psycopg.connect(db_url) as z,
        psycopg.connect(db_url) as x,
        psycopg.connect(db_url) as config,
        psycopg.connect(db_url, autocommit=True) as roll_conn,
    ):
        z.execute(f"SELECT * FROM meter.consume('a2', '{ET}', 1, '{UNIT}')")  # holds a2

        def run_roll() -> None:
            try:
                rolled.extend(
                    roll_conn.execute("SELECT * FROM meter.roll_periods('default')").fetchall()
                )
            except BaseException as exc:
                errors["roll"] = exc

        def run_x() -> None:
            try:
                x.execute(f"SELECT * FROM meter.consume('a', '{ET}', 1, '{UNIT}')")
                x.commit()
            except BaseException as exc:
                errors["x"] = exc
                x.rollback()

        roll = threading.Thread(target=run_roll)
        roll.start()
        eventually(lambda: _waiting_on_a_lock(db, roll_conn.info.backend_pid))  # for a2
        config.execute(
            "SELECT meter.set_period_config('b', %s, %s, NULL, date '1997-03-10', 5, NULL,"
            " 'default')",
            (ET, UNIT),
        )  # holds b
        if committed == "before_the_roll_comes_to_it":
            config.commit()
        x.execute(
            f"SELECT * FROM meter.consume('e', '{ET}', 1, '{UNIT}',"
            " p_event_time => '1998-06-15 00:00:00+00')"
        )  # x made a month: it holds the ledger's partition lock
        xt = threading.Thread(target=run_x)
        xt.start()
        eventually(lambda: _waiting_on_a_lock(db, x.info.backend_pid))  # for a
        z.commit()
        if committed == "while_the_roll_waits_for_it":
            # for b: blocked by config itself (a wait for a2 may still show a moment after
            # z's commit, and config committing before the roll came to b is the other case)
            eventually(
                lambda: (
                    config.info.backend_pid
                    in db.execute(
                        "SELECT pg_blocking_pids(%s) AS p", (roll_conn.info.backend_pid,)
                    ).fetchone()["p"]
                )
            )
            config.commit()
        roll.join(30)
        xt.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert not any(r[5] == "error" for r in rolled), rolled
    # the roll ended before b, whose month x's lock kept it from making; the next roll
    # takes the lock first and rolls b from its new start
    assert "b" not in {r[1] for r in rolled} and {"a", "a2"} <= {r[1] for r in rolled}
    again = db.execute("SELECT * FROM meter.roll_periods('default', p_batch_size => 5)")
    assert [r["user_id"] for r in again.fetchall()] == ["b"] * 5
    assert "ledger_1997_03" in ledger_partitions(db)
    assert client.reconcile() == []


@pytest.mark.parametrize("off_grid", ["opened_by_hand", "interval_changed"])
def test_a_configuration_catching_up_the_roll_never_deadlocks_with_a_write_making_a_month(
    db_url, client, db, off_grid
):
    # set_period_config rolls its account up to today first when the roll is behind (026,
    # 029). It made the months of the periods' grid (from the start, by the shortest
    # interval the account had) before the roll's first step locked the account; a later
    # step dated rows in a month off that grid (a period opened by hand on another day; a
    # grid of 5 months where the roll goes by years) and made it holding the account,
    # waiting for the ledger's partition lock. A write that had made a month (holding
    # that lock) and then wrote to the account waited for it: 40P01. Every month but
    # those off the grid exists here, so nothing was made before the account was locked.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    y = today.year
    first = date(y - 3, 3, 15)
    client.allocate("a", ET, 10, UNIT)
    if off_grid == "interval_changed":
        db.execute(
            "SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default',"
            " interval '5 months')",
            (ET, UNIT, first),
        )
    db.execute(
        "SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default',"
        " interval '1 year')",
        (ET, UNIT, first),
    )
    began = datetime.combine(first, datetime.min.time(), UTC) + timedelta(hours=1)
    db.execute("SELECT * FROM meter.roll_periods('default', %s)", (began,)).fetchall()
    if off_grid == "opened_by_hand":
        # past the roll (037): left to it, which closes the period before at Jun 30 and
        # goes on from Jul 1, a year at a time
        db.execute("SELECT meter.open_period('a', %s, %s, NULL, %s)", (ET, UNIT, date(y - 2, 7, 1)))
        missing = {f"ledger_{y - 1}_06", f"ledger_{y - 1}_07"}
        target = date(y - 1, 8, 1)  # past the limit (the next start after Jul 1): rolls first
        rolled = [first, date(y - 2, 3, 15), date(y - 2, 7, 1), date(y - 1, 7, 1), date(y, 7, 1)]
    else:
        missing = {f"ledger_{y - 1}_03"}  # (y - 2, 3, 15) + 1 year: no multiple of 5 months
        target = date(y - 1, 4, 1)
        rolled = [first, date(y - 2, 3, 15), date(y - 1, 3, 15), date(y, 3, 15)]
    month = date(y - 3, 1, 1)
    while month <= today:
        name = f"ledger_{month:%Y_%m}"
        if name not in missing:
            db.execute("SELECT meter.create_partition(%s, %s)", (month.year, month.month))
        month = (month + timedelta(days=32)).replace(day=1)
    assert not missing & ledger_partitions(db)
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as writer,
        psycopg.connect(db_url, autocommit=True) as config,
    ):
        writer.execute(
            f"SELECT * FROM meter.consume('e', '{ET}', 1, '{UNIT}',"
            " p_event_time => '1998-06-15 00:00:00+00')"
        )  # the writer made a month: it holds the ledger's partition lock

        def configure() -> None:
            try:
                config.execute(
                    "SELECT meter.set_period_config('a', %s, %s, NULL, %s, 7, NULL,"
                    " 'default', interval '1 year')",
                    (ET, UNIT, target),
                )
            except BaseException as exc:
                errors["config"] = exc

        def write() -> None:
            try:
                writer.execute(f"SELECT * FROM meter.consume('a', '{ET}', 1, '{UNIT}')")
                writer.commit()
            except BaseException as exc:
                errors["writer"] = exc
                writer.rollback()

        ct = threading.Thread(target=configure)
        ct.start()
        # for the ledger's partition lock, which the writer holds
        eventually(
            lambda: (
                writer.info.backend_pid
                in db.execute(
                    "SELECT pg_blocking_pids(%s) AS p", (config.info.backend_pid,)
                ).fetchone()["p"]
            )
        )
        wt = threading.Thread(target=write)
        wt.start()
        ct.join(30)
        wt.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert missing <= ledger_partitions(db)
    # the configuration took, after the roll caught up through the month it had to make
    assert account(db, "a")["period_allocation"] == D(7)
    starts = [r["period_start"] for r in db.execute(
        "SELECT period_start FROM meter.periods WHERE user_id = 'a' ORDER BY 1"
    ).fetchall()]  # fmt: skip
    assert starts == [s for s in rolled if s <= today]
    assert client.reconcile() == []


def test_a_configuration_catching_up_after_another_moved_the_start_back_never_deadlocks(
    db_url, client, db
):
    # 065 read the earliest day the catch-up's steps may date a row in before the account's
    # lock. A set_period_config that held the account (its transaction not committed) and
    # moved the start back into a month with no partition (after the period running, within
    # the limit: no catch-up of its own) was not seen by a second one that catches up (its
    # start past the limit): the second took no partition lock, its first step waited for
    # the account, then read the new start and made its month holding the account, waiting
    # for the ledger's partition lock held by a writer that had made a month and then
    # waited for the account (40P01).
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    every = "interval '300 days'"
    opened = today - timedelta(days=400)  # its next start is today - 100: the roll is behind
    client.allocate("a", ET, 10, UNIT)
    db.execute(
        f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default', {every})",
        (ET, UNIT, opened),
    )
    began = datetime.combine(opened, datetime.min.time(), UTC) + timedelta(hours=1)
    db.execute("SELECT * FROM meter.roll_periods('default', %s)", (began,)).fetchall()
    configured = today - timedelta(days=110)  # within the limit: no catch-up, not opened
    db.execute(
        f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default', {every})",
        (ET, UNIT, configured),
    )
    back = today - timedelta(days=250)  # within the limit too; its months have no partition
    missing = {f"ledger_{back - timedelta(days=1):%Y_%m}", f"ledger_{back:%Y_%m}"}
    for day in (opened - timedelta(days=1), opened, today - timedelta(days=101)):
        db.execute("SELECT meter.create_partition(%s, %s)", (day.year, day.month))
    month = (configured - timedelta(days=1)).replace(day=1)
    while month <= today:
        db.execute("SELECT meter.create_partition(%s, %s)", (month.year, month.month))
        month = (month + timedelta(days=32)).replace(day=1)
    assert not missing & ledger_partitions(db)
    deadlocks = _deadlocks(db)
    errors: dict[str, BaseException] = {}
    with (
        psycopg.connect(db_url) as first,
        psycopg.connect(db_url) as writer,
        psycopg.connect(db_url, autocommit=True) as second,
    ):
        first.execute(
            f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default', {every})",
            (ET, UNIT, back),
        )  # holds a, not committed
        writer.execute(
            f"SELECT * FROM meter.consume('e', '{ET}', 1, '{UNIT}',"
            " p_event_time => '1998-06-15 00:00:00+00')"
        )  # the writer made a month: it holds the ledger's partition lock

        def configure() -> None:
            try:
                second.execute(
                    f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 7, NULL,"
                    f" 'default', {every})",
                    (ET, UNIT, today - timedelta(days=99)),  # past the limit: catches up
                )
            except BaseException as exc:
                errors["second"] = exc

        def write() -> None:
            try:
                writer.execute(f"SELECT * FROM meter.consume('a', '{ET}', 1, '{UNIT}')")
                writer.commit()
            except BaseException as exc:
                errors["writer"] = exc
                writer.rollback()

        def blocked_by(pid: int, by: int) -> bool:
            row = db.execute("SELECT pg_blocking_pids(%s) AS p", (pid,)).fetchone()
            return by in row["p"]

        ct = threading.Thread(target=configure)
        ct.start()
        eventually(lambda: blocked_by(second.info.backend_pid, first.info.backend_pid))
        wt = threading.Thread(target=write)
        wt.start()
        # for a: behind first, or behind second queued for it
        eventually(lambda: _waiting_on_a_lock(db, writer.info.backend_pid))
        first.commit()
        ct.join(30)
        wt.join(30)
    assert errors == {}
    assert _deadlocks(db) == deadlocks
    assert missing <= ledger_partitions(db)
    assert account(db, "a")["period_allocation"] == D(7)
    starts = [r["period_start"] for r in db.execute(
        "SELECT period_start FROM meter.periods WHERE user_id = 'a' AND opened_at IS NOT NULL"
        " ORDER BY 1"
    ).fetchall()]  # fmt: skip
    assert starts == [opened, back]
    assert client.reconcile() == []


def test_a_configuration_refused_after_its_catch_up_locked_the_ledger_changes_nothing(
    db_url, client, db, snapshot
):
    # The catch-up takes the ledger's partition lock when a month from the start to today
    # has no partition (065), here one no step dates a row in, so none is made. A start
    # still past the limit once the roll caught up is refused: the roll's periods, the
    # configuration and the lock go with the refusal.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    every = "interval '300 days'"
    opened = today - timedelta(days=400)  # its next start is today - 100: the roll is behind
    client.allocate("a", ET, 10, UNIT)
    db.execute(
        f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 5, NULL, 'default', {every})",
        (ET, UNIT, opened),
    )
    began = datetime.combine(opened, datetime.min.time(), UTC) + timedelta(hours=1)
    db.execute("SELECT * FROM meter.roll_periods('default', %s)", (began,)).fetchall()
    gap = f"ledger_{today - timedelta(days=250):%Y_%m}"
    month = (opened - timedelta(days=1)).replace(day=1)
    while month <= today:
        if f"ledger_{month:%Y_%m}" != gap:
            db.execute("SELECT meter.create_partition(%s, %s)", (month.year, month.month))
        month = (month + timedelta(days=32)).replace(day=1)
    partitions = ledger_partitions(db)
    assert gap not in partitions
    before = snapshot()
    with (
        psycopg.connect(db_url) as config,
        psycopg.connect(db_url, autocommit=True) as other,
    ):
        with pytest.raises(psycopg.Error) as ei:
            config.execute(
                f"SELECT meter.set_period_config('a', %s, %s, NULL, %s, 7, NULL, 'default',"
                f" {every})",
                (ET, UNIT, today + timedelta(days=302)),  # past today + 200 after the roll
            )
        assert ei.value.sqlstate == "MT001" and "period_start" in str(ei.value)
        config.rollback()
        other.execute("SET lock_timeout = '1s'")
        with other.transaction():
            other.execute("LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE NOWAIT")
    assert snapshot() == before
    assert ledger_partitions(db) == partitions
