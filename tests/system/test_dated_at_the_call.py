"""A producer's consume or allocate without ``event_time`` is dated at its call (sql 068).

Each event is sent while no worker runs, and a ``celery -A worker worker`` process starts
seconds later: before 068 the row was dated when the worker applied it (after a backlog
across a month end, usage counted in the next month and billing period). The call's time
travels as the event's ``occurred_at`` and counts in no idempotency fingerprint.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from meter import wire
from meter.producer import MeterProducer
from tests.system.harness import CrashableRedis, eventually

ET, UNIT = "tokens", "tok"
GAP = 2.0  # seconds between the calls and the worker's start: what apply-time dating shows


@pytest.fixture
def producer(crash_redis: CrashableRedis) -> Iterator[MeterProducer]:
    p = MeterProducer(crash_redis.url(), "default", results=True)
    try:
        yield p
    finally:
        p.close()


def _call(fn: Any) -> tuple[datetime, datetime]:
    """The bracket of one call: the times just before and just after it."""
    before = datetime.now(UTC)
    fn()
    return before, datetime.now(UTC)


def _rows(db: psycopg.Connection[Any], n: int) -> list[dict[str, Any]]:
    """The ledger's rows once there are ``n`` (and no dead letter), by key."""

    def ready() -> list[dict[str, Any]] | None:
        dead = db.execute("SELECT error_sqlstate, error_message FROM meter.dead_letters")
        assert dead.fetchall() == []
        rows = db.execute(
            "SELECT idempotency_key AS key, user_id, entry_type, event_time FROM meter.ledger"
            " ORDER BY idempotency_key"
        ).fetchall()
        return rows if len(rows) >= n else None

    return eventually(ready, 60)


def _publish(producer: MeterProducer, events: list[dict[str, Any]]) -> None:
    """Crafted events, sent signed as the producer sends them (one: its single task)."""
    name = wire.APPLY_BATCH if len(events) > 1 else wire.task_name(events[0]["op"])
    producer._publish(name, events, f"crafted-{time.monotonic_ns()}", False, "<crafted>")


def _event(op: str, key: str, user: str = "u1", **extra: Any) -> dict[str, Any]:
    args = {"user_id": user, "event_type": ET, "amount": "1", "unit": UNIT, "idempotency_key": key}
    args.update(extra.pop("args", {}))
    return {"op": op, "namespace": "default", "args": args, **extra}


def test_an_event_queued_while_no_worker_runs_is_dated_at_its_call_and_a_resend_replays_it(
    start_worker: Any, producer: MeterProducer, db: psycopg.Connection[Any]
) -> None:
    handles: list[Any] = []
    consumed = _call(
        lambda: handles.append(producer.consume("u1", ET, 3, UNIT, idempotency_key="c1"))
    )
    allocated = _call(
        lambda: handles.append(producer.allocate(None, ET, 5, UNIT, idempotency_key="a1"))
    )
    time.sleep(GAP)
    started = datetime.now(UTC)
    start_worker().wait_ready()
    first = [h.wait(timeout=60) for h in handles]
    rows = _rows(db, 2)
    by_key = {r["key"]: r["event_time"] for r in rows}
    assert consumed[0] <= by_key["c1"] <= consumed[1] < started, (consumed, by_key)
    assert allocated[0] <= by_key["a1"] <= allocated[1] < started, (allocated, by_key)
    # The caller's own resend, with the key, at a later call time: the same request (the
    # call's time counts in no fingerprint), so a replay of the first, not a conflict.
    again = [
        producer.consume("u1", ET, 3, UNIT, idempotency_key="c1").wait(timeout=60),
        producer.allocate(None, ET, 5, UNIT, idempotency_key="a1").wait(timeout=60),
    ]
    assert [r["entry_id"] for r in again] == [r["entry_id"] for r in first]
    rows = _rows(db, 2)
    assert [(r["key"], r["entry_type"]) for r in rows] == [
        ("a1", "allocation"),
        ("c1", "consumption"),
    ]  # one row each, dated at the first call
    assert {r["key"]: r["event_time"] for r in rows} == by_key
    balance = db.execute("SELECT balance FROM meter.accounts WHERE user_id = 'u1'").fetchone()
    assert balance["balance"] == -3


def test_a_buffered_batch_keeps_each_event_s_own_call_time(
    start_worker: Any, crash_redis: CrashableRedis, db: psycopg.Connection[Any]
) -> None:
    # One apply_batch message: the fast path (consume, allocate) and the one-by-one path
    # (a checked consume, after the allocate of its account) each date by their own call.
    p = MeterProducer(crash_redis.url(), "default", batch_size=4, linger_ms=60_000)
    try:
        brackets = {
            "k1": _call(lambda: p.consume("u1", ET, 1, UNIT, idempotency_key="k1")),
        }
        time.sleep(0.3)
        brackets["k2"] = _call(lambda: p.allocate("u2", ET, 10, UNIT, idempotency_key="k2"))
        time.sleep(0.3)
        brackets["k3"] = _call(
            lambda: p.consume("u2", ET, 4, UNIT, check_balance=True, idempotency_key="k3")
        )
        time.sleep(0.3)
        brackets["k4"] = _call(lambda: p.consume("u1", ET, 1, UNIT, idempotency_key="k4"))
    finally:
        p.close()  # (the batch is full: sent by the fourth call already)
    # send_many: one time for the call, every consume and allocate of it
    many = MeterProducer(crash_redis.url(), "default")
    try:
        sent = _call(
            lambda: many.send_many(
                [{"op": "consume", "user_id": "u3", "event_type": ET, "amount": 1, "unit": UNIT,
                  "idempotency_key": f"m{i}"} for i in range(3)]
            )
        )  # fmt: skip
    finally:
        many.close()
    time.sleep(GAP)
    started = datetime.now(UTC)
    start_worker().wait_ready()
    rows = {r["key"]: r["event_time"] for r in _rows(db, 7)}
    for key, (before, after) in brackets.items():
        assert before <= rows[key] <= after < started, (key, before, rows[key], after)
    for i in range(3):
        assert sent[0] <= rows[f"m{i}"] <= sent[1], (i, sent, rows[f"m{i}"])
    assert len(set(rows.values())) == 5  # four own times, and send_many's one


def test_a_crafted_stamp_dates_within_event_time_s_rules_and_an_explicit_time_wins(
    start_worker: Any, producer: MeterProducer, db: psycopg.Connection[Any]
) -> None:
    past = "2025-12-31T23:59:59.250000+00:00"  # a month with no partition yet
    explicit = "2026-01-15T12:00:00+00:00"
    single = _event("consume", "s1", occurred_at=past)
    batch = [
        _event("allocate", "b1", args={"amount": "10"}, occurred_at=past),
        _event("consume", "b2", occurred_at="2026-01-01T00:00:00Z"),
        _event("consume", "b3", args={"check_balance": True}, occurred_at=past),  # one by one
        # A stamp that breaks event_time's rules is ignored: applied, dated by now()
        # (the producer's clock is not the caller's request).
        _event("consume", "bad1", occurred_at="2999-01-01T00:00:00Z"),
        _event("consume", "bad2", occurred_at="1899-12-31T23:59:59Z"),
        _event("consume", "bad3", occurred_at="not a time"),
        _event("consume", "bad4", occurred_at="2026-01-01 00:00:00"),  # no offset
        _event("consume", "bad5", occurred_at=1767225600),
        # An explicit event_time wins over a stamp, and still counts in the fingerprint.
        _event("consume", "x1", args={"event_time": explicit}, occurred_at=past),
        # Other ops ignore the field: an adjust is dated when it applies.
        _event("adjust", "adj", occurred_at=past),
    ]
    _publish(producer, [single])
    _publish(producer, batch)
    time.sleep(GAP)
    started = datetime.now(UTC)
    start_worker().wait_ready()
    rows = {r["key"]: r["event_time"] for r in _rows(db, 1 + len(batch))}
    at = datetime.fromisoformat
    assert rows["s1"] == rows["b1"] == rows["b3"] == at(past)
    assert rows["b2"] == at("2026-01-01T00:00:00+00:00")
    assert rows["x1"] == at(explicit)
    for key in ("bad1", "bad2", "bad3", "bad4", "bad5", "adj"):
        assert started <= rows[key] <= datetime.now(UTC), (key, rows[key])
    # Sent again at another call time: replays; with another explicit time: a conflict.
    _publish(producer, [_event("consume", "s1", occurred_at="2026-02-01T00:00:00Z")])
    _publish(
        producer,
        [_event("consume", "x1", args={"event_time": "2026-01-16T12:00:00+00:00"}),
         _event("consume", "b2", occurred_at="2026-03-01T00:00:00Z")],
    )  # fmt: skip

    def conflict() -> list[Any] | None:
        dead = db.execute("SELECT op, error_sqlstate, payload FROM meter.dead_letters").fetchall()
        return dead or None

    dead = eventually(conflict, 30)
    assert [(d["op"], d["error_sqlstate"], d["payload"]["args"]["idempotency_key"])
            for d in dead] == [("consume", "MT002", "x1")]  # fmt: skip
    time.sleep(1)  # the single s1's resend too
    after = db.execute(
        "SELECT idempotency_key AS key, event_time FROM meter.ledger"
        " WHERE idempotency_key IN ('s1', 'b2', 'x1')"
    ).fetchall()
    assert {r["key"]: r["event_time"] for r in after} == {
        "s1": at(past),
        "b2": at("2026-01-01T00:00:00+00:00"),
        "x1": at(explicit),
    }
    assert (
        db.execute(
            "SELECT count(*) AS n FROM pg_class WHERE relname = 'ledger_2025_12'"
        ).fetchone()["n"]
        == 1
    )
