"""Beat end to end: real ``celery -A worker beat`` and ``celery -A worker worker`` processes
against a real PostgreSQL and Redis, every beat interval at 1 s (issue #4).

- a reservation with a 2-second TTL is released by beat within a few seconds;
- an account whose periods were configured three months back (beat "down" since) is rolled
  across the three missed months in one catch-up, to the exact balances and ledger rows,
  while *two* beat processes run at once (each period still produced once);
- partitions exist ``METER_PARTITIONS_AHEAD_MONTHS`` ahead; retention folds and drops a
  30-month-old partition with ``reconcile()`` empty; an old idempotency key is pruned;
- every task's run is recorded in ``meter.maintenance_runs``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_db import ledger_partitions
from tests.system.harness import BeatProcess, WorkerProcess, eventually

pytestmark = [pytest.mark.system]

D = Decimal
ET = "tokens"
UNIT = "tok"

FAST_BEAT = {
    "METER_EXPIRY_INTERVAL_SECONDS": "1",
    "METER_ROLL_INTERVAL_SECONDS": "1",
    "METER_PARTITIONS_INTERVAL_SECONDS": "1",
    "METER_PARTITIONS_AHEAD_MONTHS": "5",
    "METER_LEDGER_RETENTION_MONTHS": "24",
    "METER_RETENTION_INTERVAL_SECONDS": "1",
    "METER_PRUNE_INTERVAL_SECONDS": "1",
}
TASKS = {
    "meter.release_expired",
    "meter.roll_periods",
    "meter.ensure_partitions",
    "meter.retention",
    "meter.prune_idempotency_keys",
}


@pytest.fixture
def start_beat(
    request: pytest.FixtureRequest, worker_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., BeatProcess]]:
    """``start_beat(**env) -> BeatProcess``; all SIGKILLed at the end, logs printed on failure."""
    app = os.environ.get("METER_SYSTEM_CELERY_APP", "worker")
    beats: list[BeatProcess] = []
    counter = itertools.count(1)

    def factory(**env: Any) -> BeatProcess:
        name = f"beat{next(counter)}"
        beat = BeatProcess(
            app, name, {**worker_env, **{k: str(v) for k, v in env.items()}},
            tmp_path / f"{name}.log",
        )  # fmt: skip
        beats.append(beat)
        return beat

    try:
        yield factory
    finally:
        for beat in beats:
            beat.kill()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for beat in beats:
                print(f"--- log of {beat.name} ---\n{beat.tail(60)}")


def month_start(today: date, back: int) -> date:
    y, m = divmod(today.year * 12 + today.month - 1 - back, 12)
    return date(y, m + 1, 1)


def at(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def test_beat_runs_every_maintenance_task(
    client: Any,
    db: psycopg.Connection[Any],
    start_worker: Callable[..., WorkerProcess],
    start_beat: Callable[..., BeatProcess],
) -> None:
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    m0, m1, m2, m3 = (month_start(today, back) for back in (3, 2, 1, 0))
    # Periods configured and opened three months ago, with usage in the first month.
    client.set_period_config("p", ET, UNIT, None, m0, D("100"), D("30"))
    client.open_period("p", ET, UNIT, None, m0)
    client.consume("p", ET, D("20"), UNIT, event_time=at(m0) + timedelta(days=5))
    # A 30-month-old ledger month for retention, and an old idempotency key to prune.
    old_month = month_start(today, 30)
    client.allocate("r", ET, D("10"), UNIT, event_time=at(old_month) + timedelta(days=2))
    client.allocate("r", ET, D("1"), UNIT, idempotency_key="stale")
    db.execute(
        "UPDATE meter.idempotency_keys SET created_at = now() - interval '40 days'"
        " WHERE key = 'stale'"
    )
    client.allocate("h", ET, D("50"), UNIT)

    worker = start_worker(**FAST_BEAT)
    beats = [start_beat(**FAST_BEAT), start_beat(**FAST_BEAT)]  # two by mistake
    worker.wait_ready()
    for beat in beats:
        beat.wait_ready()

    # A hold that expires in 2 seconds, released by beat a few seconds later.
    hold = client.reserve("h", ET, D("20"), UNIT, ttl_seconds=2)
    assert hold["granted"]

    def released() -> bool:
        # the stored figure: reads leave out a hold past its TTL before the sweep's turn
        account = db.execute("SELECT reserved FROM meter.accounts WHERE user_id = 'h'")
        return account.fetchone()["reserved"] == D("0")

    eventually(released, timeout=20, what="the 2-second hold released by beat")
    status = db.execute(
        "SELECT status, completed_actor->>'actor_id' AS actor,"
        " extract(epoch FROM completed_at - created_at) AS after FROM meter.reservations"
    ).fetchone()
    assert (status["status"], status["actor"]) == ("expired", "system:expiry")
    elapsed = float(status["after"])
    assert 2 <= elapsed < 10

    def all_recorded() -> bool:
        rows = db.execute("SELECT * FROM meter.get_maintenance_runs()").fetchall()
        return TASKS <= {r["task"] for r in rows if r["last_ok_at"] is not None}

    eventually(all_recorded, timeout=30, what="every periodic task recorded")

    # The roll: three missed months caught up, each period once despite two beats.
    def rolled() -> bool:
        return client.get_account("p", ET, UNIT)["period_start"] == m3

    eventually(rolled, timeout=20, what="periods rolled to the current month")
    rows = db.execute(
        "SELECT entry_type, amount, event_time FROM meter.ledger WHERE user_id = 'p'"
        " ORDER BY event_time, id"
    ).fetchall()
    end = [at(m) - timedelta(microseconds=1) for m in (m1, m2, m3)]
    assert [(r["entry_type"], r["amount"], r["event_time"]) for r in rows] == [
        ("allocation", D("100"), at(m0)),
        ("consumption", D("-20"), at(m0) + timedelta(days=5)),
        ("expiration", D("-80"), end[0]),
        ("carry_over", D("30"), end[0]),
        ("allocation", D("100"), at(m1)),
        ("expiration", D("-130"), end[1]),
        ("carry_over", D("30"), end[1]),
        ("allocation", D("100"), at(m2)),
        ("expiration", D("-130"), end[2]),
        ("carry_over", D("30"), end[2]),
        ("allocation", D("100"), at(m3)),
    ]
    assert client.get_balance("p", ET, UNIT)["balance"] == D("130")
    assert db.execute("SELECT count(*) AS n FROM meter.periods").fetchone()["n"] == 4

    # Partitions ahead, retention, pruning.
    ahead = {f"ledger_{month_start(today, -i):%Y_%m}" for i in range(6)}
    assert ahead <= ledger_partitions(db)
    assert f"ledger_{old_month:%Y_%m}" not in ledger_partitions(db)
    assert client.get_balance("r", ET, UNIT)["balance"] == D("11")
    assert client.reconcile() == []
    assert (
        db.execute(
            "SELECT count(*) AS n FROM meter.idempotency_keys WHERE key = 'stale'"
        ).fetchone()["n"]
        == 0
    )
    runs = {r["task"]: r for r in db.execute("SELECT * FROM meter.get_maintenance_runs()")}
    assert all(runs[t]["last_error"] is None for t in TASKS), runs
    print(f"2 s hold released {elapsed:.1f} s after it was taken; runs: "
          f"{ {t: runs[t]['runs'] for t in sorted(TASKS)} }")  # fmt: skip


def test_the_sweep_does_not_wait_behind_a_backlog_of_events(
    client: Any,
    db: psycopg.Connection[Any],
    crash_redis: Any,
    start_worker: Callable[..., WorkerProcess],
    start_beat: Callable[..., BeatProcess],
) -> None:
    """Beat's tasks have a queue of their own: a hold is swept while events still queue."""
    import redis

    from meter import wire
    from meter.producer import MeterProducer

    client.allocate("h", ET, D("50"), UNIT)
    hold = client.reserve("h", ET, D("20"), UNIT, ttl_seconds=1)
    assert hold["granted"]
    backlog = 3000  # the sweep came after ~750 events drained (2 children, this machine)
    with MeterProducer(crash_redis.url()) as producer:  # one message per event: slow to drain
        for i in range(backlog):
            producer.consume(f"b{i % 50}", ET, 1, UNIT)
    queue = redis.Redis.from_url(crash_redis.url())
    assert queue.llen(wire.QUEUE) == backlog

    worker = start_worker(METER_EXPIRY_INTERVAL_SECONDS="1", METER_MAX_DELIVERIES="1000")
    beat = start_beat(METER_EXPIRY_INTERVAL_SECONDS="1")
    worker.wait_ready()
    beat.wait_ready()

    def released() -> bool:
        # the stored figure: reads leave out a hold past its TTL before the sweep's turn
        account = db.execute("SELECT reserved FROM meter.accounts WHERE user_id = 'h'")
        return account.fetchone()["reserved"] == D("0")

    eventually(released, timeout=30, what="the expired hold swept")
    assert queue.llen(wire.QUEUE) > backlog // 2, "the sweep waited for the backlog to drain"
