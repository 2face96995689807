"""Edges of the worker found by a review: an orphan given up while the database fails,
a far ETA, a hand-over Redis refuses (real worker thread, real Redis and PostgreSQL)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
import redis

from meter import wire
from tests.integration.test_pipeline import ET, UNIT, balance, dead_letters, eventually

EVENT = {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "idempotency_key": "k1"}}  # fmt: skip


def _waiting_on_dead_letters(db: psycopg.Connection[Any], call: str) -> int | None:
    row = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE %s AND pid <> pg_backend_pid()",
        (f"%{call}%",),
    ).fetchone()
    return row["pid"] if row else None


def test_an_orphan_given_up_as_the_database_fails_is_still_settled_by_its_late_reserve(
    pipeline, db, db_url, client
):
    # The commit's retries run out (1 here) and meter.record_orphan fails transiently (its
    # connection terminated) at that moment: the give-up went through the transient path,
    # whose retries had run out too, and filed a dead letter of the connection error
    # (57P01, "gave up after 1 retries"), which the late reserve does not settle: the
    # commit never applied, the hold expired unused.
    pipeline.conf.meter_max_retries = 1
    client.allocate("u1", ET, 10, UNIT)
    commit = {"op": "commit", "namespace": "default",
              "args": {"reservation_id": "r-lost", "actual_amount": "2"}}  # fmt: skip
    with psycopg.connect(db_url, autocommit=False) as locker:
        # record_orphan files its dead letter in meter.dead_letters: hold that table so the
        # worker's call waits there, then end its session
        locker.execute("LOCK TABLE meter.dead_letters IN ACCESS EXCLUSIVE MODE")
        pipeline.send_task("meter.commit", args=(json.dumps(commit),), task_id="t-orphan")
        pid = eventually(lambda: _waiting_on_dead_letters(db, "record_orphan"), timeout=30)
        db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.5)  # the worker meets the error and files what it files
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["op"], row["error_sqlstate"]) == ("commit", "MT003"), row
    client.reserve("u1", ET, 5, UNIT, reservation_id="r-lost")
    assert balance(client) == {"balance": D(8), "reserved": D(0), "available": D(8)}
    assert dead_letters(db) == [] and len(dead_letters(db, "retried")) == 1


def test_an_orphan_whose_give_up_is_retried_while_the_database_still_fails_is_an_mt003(
    pipeline, db, db_url, client
):
    # The give-up (meter.record_orphan) fails transiently and is retried; the retry looks
    # for the reservation again first (meter.apply_events), which failed too, the database
    # still away: with its retries spent, it was filed as that failure (57P01, "gave up
    # after 1 retries"), not as the orphan its late reserve applies (MT003), the very end
    # the retried give-up was for. An operator told to fix its cause and retry or discard it
    # could discard the commit.
    pipeline.conf.meter_max_retries = 1
    client.allocate("u1", ET, 10, UNIT)
    commit = {"op": "commit", "namespace": "default",
              "args": {"reservation_id": "r-away", "actual_amount": "2"}}  # fmt: skip
    with (
        psycopg.connect(db_url, autocommit=False) as tables,
        psycopg.connect(db_url, autocommit=False) as reservation,
    ):
        tables.execute("LOCK TABLE meter.dead_letters IN ACCESS EXCLUSIVE MODE")
        pipeline.send_task("meter.commit", args=(json.dumps(commit),), task_id="t-away")
        orphan_pid = eventually(lambda: _waiting_on_dead_letters(db, "record_orphan"), timeout=30)
        # queued behind record_orphan's read of the reservations, so it holds them next
        pid = reservation.info.backend_pid
        threading.Thread(
            target=reservation.execute,
            args=("LOCK TABLE meter.reservations IN ACCESS EXCLUSIVE MODE",),
            daemon=True,
        ).start()
        eventually(lambda: _waiting_on_dead_letters(db, "LOCK TABLE") == pid, timeout=10)
        db.execute("SELECT pg_terminate_backend(%s)", (orphan_pid,))
        # the give-up's retry waits for the reservation id in meter.apply_events: end it too
        retry_pid = eventually(lambda: _waiting_on_dead_letters(db, "apply_events"), timeout=30)
        db.execute("SELECT pg_terminate_backend(%s)", (retry_pid,))
        time.sleep(0.5)  # the worker meets the error and files what it files
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["op"], row["error_sqlstate"]) == ("commit", "MT003"), row
    client.reserve("u1", ET, 5, UNIT, reservation_id="r-away")
    assert balance(client) == {"balance": D(8), "reserved": D(0), "available": D(8)}
    assert dead_letters(db) == [] and len(dead_letters(db, "retried")) == 1


@pytest.mark.parametrize(
    "eta",
    [
        lambda now: now + timedelta(days=3650),
        lambda now: datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
        lambda now: now + timedelta(seconds=3360),  # the bound: 3300 s
    ],
    ids=["ten-years", "year-9999", "past-the-bound"],
)
def test_an_event_message_with_an_eta_past_the_visibility_timeout_applies_now(
    pipeline, db, broker_url, eta
):
    # Held unacknowledged until its ETA, the message was handed out again by the broker's
    # visibility timeout every hour, never applied (nor filed) for years; one whose ETA no
    # timestamp could hold was rejected, marked failed and dropped.
    task_id = str(uuid.uuid4())
    eta = eta(datetime.now(UTC))
    pipeline.send_task("meter.allocate", args=(EVENT,), task_id=task_id, eta=eta,
                       ignore_result=False)  # fmt: skip
    assert pipeline.AsyncResult(task_id).get(timeout=30)["status"] == "applied"
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 1
    assert dead_letters(db) == []
    client = redis.Redis.from_url(broker_url)
    try:
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()


def test_an_eta_within_the_visibility_timeout_is_still_honoured(pipeline, db):
    # Meter's own retries wait for their countdown (at most METER_RETRY_BACKOFF_MAX, which
    # the same bound caps): the bound must not run them early.
    task_id = str(uuid.uuid4())
    sent = time.monotonic()
    pipeline.send_task("meter.allocate", args=(EVENT,), task_id=task_id, countdown=2,
                       ignore_result=False)  # fmt: skip
    assert pipeline.AsyncResult(task_id).get(timeout=30)["status"] == "applied"
    assert time.monotonic() - sent >= 1.5


def test_a_hand_over_redis_refuses_is_requeued_after_a_back_off_not_at_once(
    pipeline, db, broker_url, monkeypatch
):
    # The hand-over of an unreadable message failed (Redis refusing the publish), and the
    # message was put back at once, taken again, refused again: a loop as fast as the
    # worker runs, for as long as the refusal lasts. Injected here: the publish of the
    # hand-over raises what Redis answers a write it refuses.
    attempts: list[float] = []
    refusing = True
    send_task = pipeline.send_task

    def refused_send_task(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "meter.unreadable":
            attempts.append(time.monotonic())
            if refusing:
                raise redis.exceptions.ResponseError("OOM command not allowed")
        return send_task(name, *args, **kwargs)

    monkeypatch.setattr(pipeline, "send_task", refused_send_task)
    client = redis.Redis.from_url(broker_url)
    try:
        client.lpush(wire.QUEUE, "not json")
        eventually(lambda: attempts, timeout=15)
        time.sleep(3)
        # the test back-off: 0.05 s doubling to 0.5 s, so some ten attempts in 3 s
        assert len(attempts) <= 20, len(attempts)
        refusing = False
        (row,) = eventually(lambda: dead_letters(db), timeout=15)
        assert (row["op"], row["error_sqlstate"]) == ("unreadable", "MT001")
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
