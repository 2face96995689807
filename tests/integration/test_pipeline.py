"""The pipeline end to end: producer -> real Redis -> Celery worker -> real PostgreSQL.

Workers are ``celery.contrib.pytest`` worker threads (``solo`` pool) running Meter's tasks
with test settings (``tests/fix_pipeline.py``: orphans give up after 3 s, retries come back
within 0.5 s, poison after 3 deliveries). SIGKILL and crash safety are system tests.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final

import psycopg
import psycopg.errors
import pytest
import redis
from celery import states
from celery.signals import task_prerun
from click.testing import CliRunner

from meter import wire
from meter.cli import main as cli
from meter.errors import (
    IdempotencyConflictError,
    MeterConnectionError,
    MeterError,
    NotFoundError,
    PublishError,
    ValidationError,
)
from worker import db as worker_db


def _refused(*args: Any, **kwargs: Any) -> Any:
    """A producer's send_task whose broker refuses the connection."""
    from kombu.exceptions import OperationalError as KombuOperationalError

    raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")


D = Decimal
ET = "tokens"
UNIT = "tok"


def eventually(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        time.sleep(interval)


def ledger(db: psycopg.Connection[Any], user: str = "u1") -> list[dict[str, Any]]:
    return db.execute(
        "SELECT entry_type, amount, idempotency_key, reservation_id, metadata FROM meter.ledger"
        " WHERE user_id = %s ORDER BY id",
        (user,),
    ).fetchall()


def balance(client: Any, user: str = "u1") -> dict[str, Decimal]:
    return client.get_balance(user, ET, UNIT)


def dead_letters(db: psycopg.Connection[Any], status: str = "dead") -> list[dict[str, Any]]:
    return db.execute(
        "SELECT * FROM meter.dead_letters WHERE status = %s ORDER BY dead_letter_id", (status,)
    ).fetchall()


def queue_length(broker_url: str) -> int:
    client = redis.Redis.from_url(broker_url)
    try:
        return int(client.llen(wire.QUEUE))
    finally:
        client.close()


def send_raw(app: Any, name: str, *args: Any, task_id: str | None = None, **kwargs: Any) -> Any:
    """Publish a task message as any Celery client would (no producer-side validation)."""
    return app.send_task(
        name, args=args, kwargs=kwargs, task_id=task_id or str(uuid.uuid4()), ignore_result=False
    )


# ------------------------------------------------------------------ producer, no worker


def test_handle_fields(make_producer, broker_url):
    p = make_producer()
    h = p.consume("u1", ET, 1, UNIT)
    assert h.op == "consume" and h.reservation_id is None
    assert uuid.UUID(h.idempotency_key) and uuid.UUID(h.task_id)
    assert p.consume("u1", ET, 1, UNIT, idempotency_key="k-1").idempotency_key == "k-1"

    r = p.reserve("u1", ET, 5, UNIT)
    assert uuid.UUID(r.reservation_id) and r.idempotency_key == r.reservation_id
    r2 = p.reserve("u1", ET, 5, UNIT, reservation_id="res-1", idempotency_key="rk")
    assert (r2.reservation_id, r2.idempotency_key) == ("res-1", "rk")
    c = p.commit("res-1", "2.5")
    assert (c.reservation_id, c.idempotency_key) == ("res-1", "res-1")
    assert p.release("res-1").reservation_id == "res-1"
    assert len({h.task_id, r.task_id, r2.task_id, c.task_id}) == 4
    assert queue_length(broker_url) == 6

    with pytest.raises(RuntimeError, match="results=True"):
        h.wait(0.1)


GOOD_EVENT = {"op": "consume", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT}


@pytest.mark.parametrize(
    ("call", "parameter"),
    [
        (lambda p: p.consume("u1", ET, 0, UNIT), "amount"),
        (lambda p: p.consume("u1", ET, float("nan"), UNIT), "amount"),
        (lambda p: p.consume("u1", ET, "1e-13", UNIT), "amount"),
        (lambda p: p.consume(None, ET, 1, UNIT), "user_id"),
        (lambda p: p.allocate("u1", ET, 1, " tok"), "unit"),
        (lambda p: p.adjust("u1", ET, 0, UNIT), "amount"),
        (lambda p: p.reserve("u1", ET, 1, UNIT, ttl_seconds=0), "ttl_seconds"),
        (lambda p: p.reserve("u1", ET, 1, UNIT, reservation_id="x" * 129), "reservation_id"),
        (lambda p: p.commit("r", -1), "actual_amount"),
        (lambda p: p.release(""), "reservation_id"),
        (lambda p: p.consume("u1", ET, 1, UNIT, metadata=[1]), "metadata"),
        (lambda p: p.consume("u1", ET, 1, UNIT, event_time=datetime(2026, 1, 1)), "event_time"),
        (lambda p: p.send_many([GOOD_EVENT, {**GOOD_EVENT, "amount": -1}]), "amount"),
        (lambda p: p.send_many([{"op": "transfer"}]), "op"),
        (lambda p: p.send_many([{"op": "release", "reservation_id": "r", "x": 1}]), "event"),
    ],
)
def test_bad_input_raises_at_once_and_enqueues_nothing(make_producer, broker_url, call, parameter):
    p = make_producer()
    with pytest.raises(ValidationError) as info:
        call(p)
    assert info.value.parameter == parameter
    assert queue_length(broker_url) == 0


@pytest.mark.parametrize(
    "event_time",
    [
        datetime(1899, 12, 31, 12, tzinfo=UTC),
        # 1900-01-01 00:30 at +01:00 is still 1899 in UTC
        datetime(1900, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        datetime.now(UTC) + timedelta(days=400),
        datetime.now(UTC) + timedelta(hours=24, minutes=5),
    ],
    ids=["before-1900", "1899-in-utc", "400-days-ahead", "24h05-ahead"],
)
def test_an_event_time_the_database_always_refuses_is_refused_at_the_call(
    make_producer, broker_url, event_time
):
    """Guards review D #3: an event_time before 1900 or more than 24 h ahead (by the
    producer's clock) used to be enqueued and dead-lettered by the worker; the producer
    refuses it at the call, naming event_time, with nothing enqueued (send_many too)."""
    p = make_producer()
    with pytest.raises(ValidationError) as info:
        p.consume("u1", ET, 1, UNIT, event_time=event_time)
    assert info.value.parameter == "event_time"
    with pytest.raises(ValidationError, match=r"^events\[0\]: event_time: ") as info:
        p.send_many([{**GOOD_EVENT, "event_time": event_time}])
    assert info.value.parameter == "event_time"
    assert queue_length(broker_url) == 0


def test_send_many_error_names_the_event(make_producer):
    with pytest.raises(ValidationError, match=r"^events\[1\]: actual_amount: "):
        make_producer().send_many(
            [{"op": "release", "reservation_id": "r"}, {"op": "commit", "reservation_id": "r",
                                                       "actual_amount": "x"}]
        )  # fmt: skip
    # not a list of events at all: named, not a TypeError from the loop
    for events in (5, None, "consume", {"op": "release", "reservation_id": "r"}):
        with pytest.raises(ValidationError, match=r"^events: must be an iterable") as refused:
            make_producer().send_many(events)
        assert refused.value.parameter == "events"


# ------------------------------------------------------------------ single events


def test_wait_returns_the_sql_result(pipeline, make_producer, client):
    p = make_producer(results=True)
    assert p.allocate("u1", ET, 10, UNIT).wait() == {"balance": D(10), "entry_id": 1}
    consumed = p.consume("u1", ET, "2.5", UNIT, check_balance=True).wait()
    assert consumed == {"success": True, "balance": D("7.5"), "available": D("7.5"), "entry_id": 2}
    refused = p.consume("u1", ET, 100, UNIT, check_balance=True).wait()
    assert refused["success"] is False and refused["entry_id"] is None

    res = p.reserve("u1", ET, 5, UNIT)
    reserved = res.wait()
    assert reserved["granted"] is True and reserved["reservation_id"] == res.reservation_id
    assert isinstance(reserved["expires_at"], datetime)
    committed = p.commit(res.reservation_id, 3).wait()
    assert committed["status"] == "committed" and committed["consumed"] == D(3)
    assert committed["released"] == D(2) and committed["reserved_amount"] == D(5)

    res2 = p.reserve("u1", ET, 1, UNIT)
    assert p.release(res2.reservation_id).wait() is True
    assert p.release(res2.reservation_id).wait() is False  # not active any more
    adjusted = p.adjust("u1", ET, -1, UNIT, reference_id=2).wait()
    assert adjusted["balance"] == D("3.5")
    assert balance(client) == {"balance": D("3.5"), "reserved": D(0), "available": D("3.5")}


def test_want_result_per_call(pipeline, make_producer):
    p = make_producer()  # results off by default
    assert p.allocate("u1", ET, 1, UNIT, want_result=True).wait()["balance"] == D(1)
    h = make_producer(results=True).allocate("u1", ET, 1, UNIT, want_result=False)
    with pytest.raises(RuntimeError):
        h.wait(0.1)


def test_a_keyed_reserve_sent_again_replays_as_through_the_sdk(pipeline, make_producer, client, db):
    """Guards review D #8: a reserve with the caller's idempotency_key and no
    reservation_id got a new random id per call, so the caller's retry with its key was
    another request (IdempotencyConflictError, a dead letter, a handle whose hold never
    exists). The id is derived from namespace and key: the retry replays, as
    MeterClient.reserve(idempotency_key=k) does, and another request under the key is
    still a conflict."""
    client.allocate("u1", ET, 100, UNIT)
    sdk = client.reserve("u1", ET, 5, UNIT, idempotency_key="sdk-key")
    assert client.reserve("u1", ET, 5, UNIT, idempotency_key="sdk-key") == sdk  # the SDK
    p = make_producer(results=True)
    first = p.reserve("u1", ET, 5, UNIT, idempotency_key="caller-key")
    first_result = first.wait(timeout=20)
    assert first_result["granted"] is True
    again = p.reserve("u1", ET, 5, UNIT, idempotency_key="caller-key")  # the caller's retry
    assert again.reservation_id == first.reservation_id
    assert again.wait(timeout=20) == first_result
    assert first_result["reservation_id"] == first.reservation_id
    assert balance(client)["reserved"] == D(10)  # the SDK's hold and this one, once
    other = p.reserve("u1", ET, 6, UNIT, idempotency_key="caller-key")
    with pytest.raises(IdempotencyConflictError):
        other.wait(timeout=20)
    assert balance(client)["reserved"] == D(10)
    assert [d["error_sqlstate"] for d in dead_letters(db)] == ["MT002"]
    p.commit(first.reservation_id, 4).wait(timeout=20)
    assert balance(client)["balance"] == D(96)


def test_wait_raises_the_mapped_error_of_a_dead_letter(pipeline, make_producer, db, snapshot):
    p = make_producer(results=True)
    p.allocate("u1", ET, 1, UNIT, idempotency_key="k").wait()
    before = snapshot()
    with pytest.raises(IdempotencyConflictError, match="idempotency_key"):
        p.allocate("u1", ET, 2, UNIT, idempotency_key="k").wait()
    with pytest.raises(NotFoundError):
        p.adjust("u1", ET, 1, UNIT, reference_id=999).wait()
    after = snapshot()
    # the refused events changed nothing but the dead letters that record them
    assert {k: v for k, v in after.items() if k != "dead_letters"} == {
        k: v for k, v in before.items() if k != "dead_letters"
    }
    rows = dead_letters(db)
    assert [(r["op"], r["error_sqlstate"]) for r in rows] == [
        ("allocate", "MT002"),
        ("adjust", "MT003"),
    ]
    assert rows[0]["payload"]["args"]["amount"] == "2"


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_wait_refuses_the_outcome_of_another_message_under_its_task_id(
    pipeline, make_producer, client, monkeypatch, batch
):
    """Another message (crafted, or another producer's) that reused an event's task id and
    ran first had its outcome stored there, which wait() returned as the event's own (the
    result backend keeps the first outcome stored). Now the outcome echoes the digest of
    its message, and wait() raises on another's, at once; the event itself still applies."""
    from meter import types as t

    task_id = str(uuid.uuid4())
    other = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u2", "event_type": ET, "amount": "7", "unit": UNIT,
                      "idempotency_key": "other"}}  # fmt: skip
    name = wire.APPLY_BATCH if batch else "meter.allocate"
    pipeline.send_task(name, args=(wire.dumps([other] if batch else other),), task_id=task_id,
                       ignore_result=False)  # fmt: skip
    eventually(
        lambda: pipeline.backend.get_task_meta(task_id, cache=False)["status"] == states.SUCCESS
    )
    p = make_producer(results=True)
    monkeypatch.setattr(t, "new_id", lambda: task_id)  # the message's task id (keys given)
    if batch:
        mine = {"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 3, "unit": UNIT}
        (handle,) = p.send_many([{**mine, "idempotency_key": "mine"}])
    else:
        handle = p.allocate("u1", ET, 3, UNIT, idempotency_key="mine")
    monkeypatch.undo()
    with pytest.raises(MeterError, match="another message's"):
        handle.wait(timeout=15)
    eventually(lambda: balance(client)["balance"] == D(3))
    assert balance(client, "u2")["balance"] == D(7)
    # an event's own outcome passes the check (the deferred path: test_batch_defers_...)
    assert p.allocate("u1", ET, 1, UNIT).wait(timeout=15)["balance"] == D(4)


def test_wait_takes_the_dead_letter_of_its_own_unreadable_message_not_anothers(
    pipeline, make_producer
):
    """A message the worker cannot run (here: a task it does not have) is filed by
    meter.unreadable under its task id; its outcome echoes the digest of the payload its
    body holds, so the producer that sent it reads its dead letter, and a producer whose
    task id another such message reused is told so."""
    from meter.producer import EventHandle

    p = make_producer(results=True)
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                      "idempotency_key": "k-unreadable"}}  # fmt: skip
    own = str(uuid.uuid4())
    digest = p._publish("meter.frobnicate", [event], own, True, "[frobnicate]")
    with pytest.raises(ValidationError, match=r"no task 'meter\.frobnicate'"):
        EventHandle(p, "allocate", "k-unreadable", None, own, True, digest=digest).wait(15)
    reused = str(uuid.uuid4())
    other = {**event, "args": {**event["args"], "amount": "2"}}
    pipeline.send_task("meter.frobnicate", args=(wire.dumps(other),), task_id=reused,
                       ignore_result=False)  # fmt: skip
    eventually(
        lambda: pipeline.backend.get_task_meta(reused, cache=False)["status"] == states.SUCCESS
    )
    digest = p._publish("meter.allocate", [event], reused, True, "[allocate]")
    with pytest.raises(MeterError, match="another message's"):
        EventHandle(p, "allocate", "k-unreadable", None, reused, True, digest=digest).wait(15)


def _resend(app: Any, name: str, payload: Any, task_id: str) -> Any:
    """Deliver the same message (same task id, same payload) again; its outcome.

    Read from the stored result, not with ``AsyncResult.get()``: Celery's Redis result
    consumer may hand a ``get()`` on this task id the result message published by the
    previous delivery. That message stays unread on the consumer's pub/sub connection when
    the previous ``get()`` found the result already stored (the worker was faster than the
    caller, as under load), and ``forget()`` does not drop it. Deleting the stored result
    before sending makes the next one stored this delivery's.
    """
    app.backend.forget(task_id)
    send_raw(app, name, payload, task_id=task_id)

    def stored() -> dict[str, Any] | None:
        meta = app.backend.get_task_meta(task_id, cache=False)
        return meta if meta["status"] in states.READY_STATES else None

    meta = eventually(stored, timeout=15)
    assert meta["status"] == states.SUCCESS, meta
    return meta["result"]


OPS_TWICE = [
    ("allocate", {"user_id": "u1", "event_type": ET, "amount": "5", "unit": UNIT}),
    ("consume", {"user_id": "u1", "event_type": ET, "amount": "1.5", "unit": UNIT}),
    ("adjust", {"user_id": "u1", "event_type": ET, "amount": "-2", "unit": UNIT}),
    ("reserve", {"user_id": "u1", "event_type": ET, "amount": "4", "unit": UNIT,
                 "reservation_id": "r-twice"}),
    ("commit", {"reservation_id": "r-held", "actual_amount": "3"}),
    ("release", {"reservation_id": "r-held"}),
]  # fmt: skip


@pytest.mark.parametrize(("op", "args"), OPS_TWICE, ids=[op for op, _ in OPS_TWICE])
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "keyless"])
def test_same_message_delivered_twice_applies_once(
    pipeline, client, snapshot, op, args, keyed
):  # fmt: skip
    client.allocate("u1", ET, 100, UNIT)
    client.reserve("u1", ET, 10, UNIT, reservation_id="r-held")
    args = dict(args)
    if keyed and op in ("allocate", "consume", "adjust"):
        args["idempotency_key"] = f"key-{op}"
    event = {"op": op, "namespace": "default", "args": args}
    task_id = str(uuid.uuid4())

    first = _resend(pipeline, wire.task_name(op), event, task_id)
    assert first["ok"] and first["status"] == "applied", first
    after_first = snapshot()
    second = _resend(pipeline, wire.task_name(op), event, task_id)
    assert second["ok"] and second["status"] == "replayed", second
    assert snapshot() == after_first
    if op in ("allocate", "consume", "adjust"):  # a replay returns the original figures
        assert second["result"] == first["result"]


def _release_status(db: psycopg.Connection[Any], rid: str) -> str:
    return db.execute(
        "SELECT status FROM meter.reservations WHERE reservation_id = %s", (rid,)
    ).fetchone()["status"]


RELEASE_FATES = ["released by this message", "released by another caller",
                 "released by another message", "committed", "expired"]  # fmt: skip


@pytest.mark.parametrize("fate", RELEASE_FATES)
def test_wait_on_a_release_delivered_again_after_its_reply_was_lost_is_true_only_for_its_own(
    pipeline, make_producer, client, db, broker_url, snapshot, fate
):
    """The worker committed a release, then died before storing its result (and acking): the
    message came back, found the hold no longer active, and stored false, so wait() read
    False for a release that happened. Now it is True for the message that released the
    hold (sql 067: the hold records the event's key), and still False for a hold another
    caller released, committed or that expired."""
    from meter.producer import EventHandle

    client.allocate("u1", ET, 100, UNIT)
    rid = f"r-{fate.replace(' ', '-')}"
    ttl = 1 if fate == "expired" else 300
    client.reserve("u1", ET, 10, UNIT, reservation_id=rid, ttl_seconds=ttl)
    event = {"op": "release", "namespace": "default", "args": {"reservation_id": rid}}
    task_id = str(uuid.uuid4())
    if fate == "released by this message":
        # the first delivery applies; its reply is lost (nothing stored)
        pipeline.send_task("meter.release", args=(event,), task_id=task_id, ignore_result=True)
    elif fate == "released by another caller":
        assert client.release(rid) is True
    elif fate == "released by another message":
        pipeline.send_task("meter.release", args=(event,), task_id=str(uuid.uuid4()),
                           ignore_result=True)  # fmt: skip
    elif fate == "committed":
        client.commit(rid, 4)
    else:
        time.sleep(1.2)
    if fate != "expired":
        eventually(lambda: _release_status(db, rid) != "active")
    before = snapshot()
    _redeliver(broker_url, pipeline, "meter.release", (event,), task_id)
    handle = EventHandle(make_producer(results=True), "release", rid, rid, task_id, True)
    assert handle.wait(timeout=15) is (fate == "released by this message")
    if fate != "expired":  # (the release, past the TTL, expired the hold)
        assert snapshot() == before


def test_keyless_events_get_a_key_from_their_task(pipeline, db):
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}}  # fmt: skip
    task_id = str(uuid.uuid4())
    _resend(pipeline, "meter.allocate", event, task_id)
    assert [r["idempotency_key"] for r in ledger(db)] == [f"task:{task_id}"]


def test_worker_as_the_maintenance_role(pipeline, make_producer, make_client, db, maint_url):
    """What deployments run: a login role that is only a member of meter_maintenance."""
    pipeline.conf.meter_database_url = maint_url
    p = make_producer("tenant-a", results=True)
    assert p.allocate("u1", ET, 5, UNIT).wait()["balance"] == D(5)
    handles = p.send_many(
        [{"op": "consume", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT,
          "idempotency_key": "k"},
         {"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT,
          "idempotency_key": "k"}]
    )  # fmt: skip
    assert handles[0].wait()["success"] is True
    with pytest.raises(IdempotencyConflictError):
        handles[1].wait()
    hold = p.reserve("u1", ET, 2, UNIT)
    assert p.commit(hold.reservation_id, 2).wait()["status"] == "committed"
    send_raw(pipeline, wire.APPLY_BATCH, "garbage").get(timeout=15)  # record_dead_letter
    assert make_client("tenant-a").get_balance("u1", ET, UNIT)["balance"] == D(2)
    assert sorted((r["namespace"], r["error_sqlstate"]) for r in dead_letters(db)) == [
        ("", "MT001"),
        ("tenant-a", "MT002"),
    ]


# ------------------------------------------------------------------ batches


def test_send_many_applies_in_chunks(pipeline, make_producer, client):
    p = make_producer(results=True, chunk_size=3)
    events = [{"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 10, "unit": UNIT}]
    events += [
        {"op": "consume", "user_id": "u1", "event_type": ET, "amount": "0.5", "unit": UNIT}
    ] * 6
    handles = p.bulk(events)
    assert len(handles) == 7 and len({h.task_id for h in handles}) == 3
    assert [h.op for h in handles] == ["allocate"] + ["consume"] * 6
    assert len({h.idempotency_key for h in handles}) == 7
    outcomes = [h.wait() for h in handles]
    assert outcomes[0]["balance"] == D(10)
    assert all(o["success"] for o in outcomes[1:])
    assert balance(client)["balance"] == D(7)


def test_batch_with_a_poison_event_dead_letters_it_alone(pipeline, make_producer, client, db):
    p = make_producer(results=True)
    p.allocate("u2", ET, 1, UNIT, idempotency_key="used").wait()
    good = [
        {"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 10, "unit": UNIT},
        {"op": "consume", "user_id": "u1", "event_type": ET, "amount": 3, "unit": UNIT},
        # the same key as a different request: an idempotency conflict, forever
        {"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 7, "unit": UNIT,
         "idempotency_key": "used"},
        {"op": "adjust", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT,
         "reference_id": 424242},
        {"op": "consume", "user_id": "u1", "event_type": ET, "amount": 2, "unit": UNIT},
    ]  # fmt: skip
    handles = p.send_many(good)
    with pytest.raises(IdempotencyConflictError):
        handles[2].wait()
    with pytest.raises(NotFoundError):
        handles[3].wait()
    assert handles[4].wait()["success"] is True
    assert balance(client)["balance"] == D(5)
    rows = dead_letters(db)
    assert [(r["op"], r["error_sqlstate"]) for r in rows] == [
        ("allocate", "MT002"),
        ("adjust", "MT003"),
    ]
    payload = dict(rows[0]["payload"])
    datetime.fromisoformat(payload.pop("occurred_at"))  # the call's time, kept for a retry (068)
    assert payload == {"op": "allocate", "namespace": "default",
                       "args": {"user_id": "u1", "event_type": ET, "amount": "7",
                                "unit": UNIT, "idempotency_key": "used"}}  # fmt: skip
    assert "idempotency_key" in rows[0]["error_message"]


def test_malformed_events_in_a_raw_batch(pipeline, client, db):
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "4", "unit": UNIT}},
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "lots", "unit": UNIT}},
        "not an event",
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}},
    ]  # fmt: skip
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, events).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["applied", "error", "error", "applied"]
    assert balance(client)["balance"] == D(3)
    assert sorted(r["error_sqlstate"] for r in dead_letters(db)) == ["MT001", "MT001"]


def test_a_message_that_is_not_a_batch_is_a_dead_letter(pipeline, db):
    outcome = send_raw(pipeline, wire.APPLY_BATCH, {"op": "consume"}).get(timeout=15)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MT001"
    assert dead_letters(db)[0]["payload"] == {"op": "consume"}


def test_a_batch_message_carries_its_events_as_json_text(make_producer, broker_url):
    """What a producer publishes for a batch: the JSON text of its events, which the worker
    can pass to ``apply_events`` as it is (no worker here: the message stays queued)."""
    from kombu import Connection

    p = make_producer(batch_size=2, linger_ms=60_000)
    a = p.consume("u1", ET, "1.5", UNIT, metadata={"ratio": D("0.1")})
    b = p.allocate("u2", ET, 3, UNIT)
    with Connection(broker_url) as conn:
        message = conn.default_channel.basic_get(wire.QUEUE, no_ack=True)
    assert message is not None and message.headers["task"] == wire.APPLY_BATCH
    (text,), kwargs, _ = message.decode()
    assert isinstance(text, str)
    assert text == wire.dumps(json.loads(text, parse_float=D))  # its canonical text
    events = json.loads(text, parse_float=D)
    assert [e["args"]["idempotency_key"] for e in events] == [a.idempotency_key, b.idempotency_key]
    assert events[0]["args"]["metadata"] == {"ratio": D("0.1")}  # exact, a JSON number
    assert '"ratio":0.1' in text
    assert kwargs["auth"]["namespace"] == "default"


def test_a_batch_as_json_text_applies_and_keys_its_keyless_events(pipeline, client, db, snapshot):
    """A batch sent as JSON text (the producers' form): events without a key get their
    task's; a bad event is a dead letter alone; text that is not JSON is one dead letter."""
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "4", "unit": UNIT}},
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "lots", "unit": UNIT}},
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "idempotency_key": "own"}},
    ]  # fmt: skip
    task_id = str(uuid.uuid4())
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events), task_id=task_id).get(
        timeout=15
    )
    assert [o["status"] for o in outcomes] == ["applied", "error", "applied"]
    assert balance(client)["balance"] == D(3)
    keys = db.execute(
        "SELECT idempotency_key FROM meter.ledger WHERE namespace = 'default' ORDER BY id"
    ).fetchall()
    assert [k["idempotency_key"] for k in keys] == [f"task:{task_id}:0", "own"]
    # delivered again (same task id): replayed, nothing doubles
    again = _resend(pipeline, wire.APPLY_BATCH, json.dumps(events), task_id)
    assert [o["status"] for o in again] == ["replayed", "error", "replayed"]
    assert balance(client)["balance"] == D(3)
    before = snapshot()
    outcome = send_raw(pipeline, wire.APPLY_BATCH, "[{").get(timeout=15)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MT001"
    assert "not valid JSON text" in outcome["error_message"]
    assert [r["payload"] for r in dead_letters(db) if r["op"] == "apply_batch"] == ["[{"]
    after = snapshot()  # only its dead letter is new
    assert len(after.pop("dead_letters")) == len(before.pop("dead_letters")) + 1
    assert after == before


def test_a_batch_as_text_with_a_nul_escape_is_split(pipeline, client, db):
    """jsonb refuses the NUL escape, so the server refuses the text as a whole: the batch
    is split and each event meets its own fate, the NUL one as a dead letter."""
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "4", "unit": UNIT,
                  "idempotency_key": "good"}},
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "idempotency_key": "nul", "metadata": {"x": "a\u0000b"}}},
    ]  # fmt: skip
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events)).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["deferred", "deferred"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
        balance(client)["balance"] == D(4) and len(dead_letters(db)) == 1
    ):
        time.sleep(0.1)
    assert balance(client)["balance"] == D(4)
    # jsonb cannot hold the NUL: the dead letter keeps the event's ascii() text instead of
    # failing to record it (which would retry it until the message was dropped)
    (letter,) = dead_letters(db)
    assert set(letter["payload"]) == {"unstorable"}
    assert "'nul'" in letter["payload"]["unstorable"]
    assert "a\\x00b" in letter["payload"]["unstorable"]


def test_a_batch_dated_in_too_many_new_months_is_applied_in_parts_in_order(pipeline, db):
    """``apply_events`` refuses a batch that would create over 100 ledger months (050: their
    locks fill the server's lock table). The worker split it into single-event tasks, in
    no order: a commit at its end was deferred, and could run before its reserve. Now it
    applies the batch in parts of at most 100 events, in order, and each event applies
    exactly once (sent again, it replays whole)."""
    times = [f"{1901 + i // 12}-{i % 12 + 1:02d}-15T00:00:00Z" for i in range(101)]
    args = {"user_id": "u1", "event_type": ET, "unit": UNIT}
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {**args, "amount": "1", "idempotency_key": f"m{i}", "event_time": t}}
        for i, t in enumerate(times)
    ]  # fmt: skip
    events.insert(1, {"op": "reserve", "namespace": "default",
                      "args": {**args, "amount": "1", "reservation_id": "r1"}})  # fmt: skip
    events.append({"op": "commit", "namespace": "default",
                   "args": {"reservation_id": "r1", "actual_amount": "1"}})  # fmt: skip
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events)).get(timeout=30)
    assert [o["status"] for o in outcomes] == ["applied"] * 103
    assert outcomes[-1]["result"]["status"] == "committed"
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events)).get(timeout=30)
    assert [o["status"] for o in outcomes] == ["replayed"] * 103
    entries = ledger(db)
    assert len(entries) == 102 and not dead_letters(db)
    assert sorted(e["idempotency_key"] for e in entries if e["entry_type"] == "allocation") == (
        sorted(f"m{i}" for i in range(101))
    )


def test_a_batch_that_may_go_one_by_one_is_applied_in_parts_of_100_in_order(pipeline, db):
    """A call going one by one holds about three entries of the server's shared lock table
    per event to its end (054 bounds it at 100 events): the worker applies a producer-sized
    batch of reserves and commits in transactions of at most 100 events, in order, so that
    each commit finds the reserve sent before it, and each event applies once."""
    args = {"user_id": "u1", "event_type": ET, "unit": UNIT}
    events = [{"op": "allocate", "namespace": "default",
               "args": {**args, "amount": "1000", "idempotency_key": "a"}}]  # fmt: skip
    events += [{"op": "reserve", "namespace": "default",
                "args": {**args, "amount": "2", "reservation_id": f"r{i}"}}
               for i in range(150)]  # fmt: skip
    events += [{"op": "commit", "namespace": "default",
                "args": {"reservation_id": f"r{i}", "actual_amount": "1"}}
               for i in range(150)]  # fmt: skip
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events)).get(timeout=60)
    assert [o["status"] for o in outcomes] == ["applied"] * 301
    assert {o["result"]["status"] for o in outcomes[151:]} == {"committed"}
    # the commits' ledger rows by transaction (created_at is its start): events 100-199
    # (reserves r99..r149, commits r0..r48), 200-299 (r49..r148), 300 (r149)
    rows = db.execute(
        "SELECT created_at FROM meter.ledger WHERE entry_type <> 'allocation' ORDER BY id"
    ).fetchall()
    assert [n for _, n in Counter(r["created_at"] for r in rows).items()] == [49, 100, 1]
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events)).get(timeout=60)
    assert [o["status"] for o in outcomes] == ["replayed"] * 301
    assert db.execute(
        "SELECT balance, reserved FROM meter.accounts WHERE user_id = 'u1'"
    ).fetchone() == {"balance": Decimal(850), "reserved": Decimal(0)}
    assert not dead_letters(db)


def _part_lost_once(tid: str, start: int, real: Callable[..., Any], calls: list[Any]) -> Any:
    """``apply_events`` whose call for part ``start`` of batch ``tid`` commits, the first
    time, and then loses its reply (the connection dropped: a transient error)."""

    def in_doubt(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[3])
        rows = real(*args, **kwargs)
        if args[3] == f"{tid}@{start}" and calls.count(args[3]) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return rows

    return in_doubt


def test_a_batch_retried_after_one_of_its_parts_committed_applies_each_event_once(
    pipeline, db, monkeypatch
):
    """A batch applied in parts (054) is retried whole when a part fails transiently, here
    after it committed: the parts before it, and it, replay. Events without keys are keyed
    by their index in the message (a reserve without an id gets ``task:<id>:<index>``, which
    the commits in the next part name), a key used in two parts replays or conflicts as in
    one transaction, and the caller gets every event's outcome once."""
    tid = str(uuid.uuid4())
    acc = {"user_id": "u1", "event_type": ET, "unit": UNIT}
    events = [{"op": "allocate", "namespace": "default", "args": {**acc, "amount": "1000"}}]
    events += [{"op": "reserve", "namespace": "default", "args": {**acc, "amount": "2"}}
               for _ in range(120)]  # fmt: skip
    events[50] = {"op": "consume", "namespace": "default",
                  "args": {**acc, "amount": "1", "idempotency_key": "dup"}}  # fmt: skip
    events += [{"op": "commit", "namespace": "default",
                "args": {"reservation_id": f"task:{tid}:{i}", "actual_amount": "1"}}
               for i in range(1, 121) if i != 50]  # fmt: skip
    events += [
        {"op": "consume", "namespace": "default", "args": {**acc, "amount": "1",
                                                           "check_balance": True}},
        {"op": "consume", "namespace": "default", "args": {**acc, "amount": "1",
                                                           "idempotency_key": "dup"}},
        {"op": "consume", "namespace": "default", "args": {**acc, "amount": "2",
                                                           "idempotency_key": "dup"}},
    ]  # fmt: skip
    assert len(events) == 243
    calls: list[Any] = []
    monkeypatch.setattr(
        worker_db, "apply_events", _part_lost_once(tid, 100, worker_db.apply_events, calls)
    )
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, json.dumps(events), task_id=tid).get(timeout=60)
    assert calls == [f"{tid}@0", f"{tid}@100", f"{tid}@0", f"{tid}@100", f"{tid}@200"]
    statuses = [o["status"] for o in outcomes]
    assert statuses == ["replayed"] * 200 + ["applied"] * 41 + ["replayed", "error"]
    assert outcomes[-1]["error_sqlstate"] == "MT002"
    assert {o["result"]["status"] for o in outcomes[200:240]} == {"committed"}
    assert db.execute(
        "SELECT balance, reserved FROM meter.accounts WHERE user_id = 'u1'"
    ).fetchone() == {"balance": D(1000 - 119 - 2), "reserved": D(0)}
    counts = db.execute(
        "SELECT entry_type, count(*) AS n, sum(amount) AS total FROM meter.ledger"
        " GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert counts == [
        {"entry_type": "allocation", "n": 1, "total": D(1000)},
        {"entry_type": "consumption", "n": 121, "total": D(-121)},
    ]
    assert db.execute(
        "SELECT status, count(*) AS n FROM meter.reservations GROUP BY 1"
    ).fetchall() == [{"status": "committed", "n": 119}]
    (letter,) = dead_letters(db)
    assert (letter["source"], letter["error_sqlstate"], letter["attempts"]) == (
        f"{tid}@200/42",
        "MT002",
        1,
    )


def test_a_signed_batch_in_parts_hands_a_deferred_commit_to_a_signed_task(
    pipeline, make_producer, client, db, monkeypatch
):
    """A signed batch applied in parts: a commit in its first part whose reserve is in the
    second waits in a task of its own, signed, and applies once the reserve has; the batch,
    retried after its second part committed unseen, replays both."""
    from meter import signing

    client.allocate("u1", ET, 1000, UNIT)
    calls: list[Any] = []
    real = worker_db.apply_events

    def in_doubt(*args: Any, **kwargs: Any) -> Any:
        return _part_lost_once(str(args[3]).partition("@")[0], 100, real, calls)(*args, **kwargs)

    monkeypatch.setattr(worker_db, "apply_events", in_doubt)
    evs: list[dict[str, Any]] = [{"op": "commit", "reservation_id": "r-x", "actual_amount": 2}]
    evs += [{"op": "reserve", "user_id": "u1", "event_type": ET, "unit": UNIT, "amount": 1,
             "reservation_id": f"r{i}"} for i in range(1, 150)]  # fmt: skip
    evs[140] = {"op": "reserve", "user_id": "u1", "event_type": ET, "unit": UNIT,
                "amount": 5, "reservation_id": "r-x"}  # fmt: skip
    pipeline.conf.meter_signing_secret = SECRET
    try:
        p = make_producer(signing_key=signing.derive_key(SECRET, "default"), results=True)
        handles = p.send_many(evs)
        results = [h.wait(timeout=30) for h in handles]
    finally:
        pipeline.conf.meter_signing_secret = ""
    assert results[0]["status"] in ("committed", "replayed")
    assert results[140]["granted"] is True
    assert sum(1 for c in calls if str(c).endswith("@100")) == 2
    assert dead_letters(db) == []
    assert db.execute(
        "SELECT status, count(*) AS n FROM meter.reservations GROUP BY 1 ORDER BY 1"
    ).fetchall() == [{"status": "active", "n": 148}, {"status": "committed", "n": 1}]
    assert db.execute("SELECT balance FROM meter.accounts WHERE user_id = 'u1'").fetchone() == {
        "balance": D(998)
    }


def test_a_crafted_event_postgresql_cannot_store_is_still_a_dead_letter(pipeline, db, snapshot):
    """PostgreSQL stores no NUL and no lone surrogate: the dead letter escapes them (and
    files a namespace holding one with the operators) instead of failing to be recorded,
    which retried it until the message was dropped."""
    crafted = [
        ("meter.allocate", {"op": "allocate", "namespace": "a\x00b",
                            "args": {"user_id": "u1", "event_type": ET, "amount": "1",
                                     "unit": UNIT}}),
        ("meter.apply_batch", [{"op": "drop\x00", "namespace": "default", "args": {}}]),
        # a lone surrogate, in a batch's text: jsonb refuses it, the batch is split
        ("meter.apply_batch", '[{"op": "consume", "namespace": "\\ud800", "args": {}}]'),
    ]  # fmt: skip
    before = snapshot()
    for name, payload in crafted:
        pipeline.send_task(name, args=(payload,), task_id=str(uuid.uuid4()))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(dead_letters(db)) < 3:
        time.sleep(0.1)
    after = snapshot()  # nothing applied: three dead letters, nothing else
    assert len(after.pop("dead_letters")) == len(before.pop("dead_letters")) + 3
    assert after == before
    letters = {r["op"]: r for r in dead_letters(db)}
    assert set(letters) == {"allocate", "drop\\x00", "consume"}
    assert letters["consume"]["namespace"] == ""
    assert "\\ud800" in letters["consume"]["payload"]["unstorable"]
    assert letters["allocate"]["namespace"] == ""
    assert "a\\x00b" in letters["allocate"]["payload"]["unstorable"]
    assert letters["drop\\x00"]["namespace"] == "default"


@pytest.mark.parametrize("form", ["object", "text", "batch"])
@pytest.mark.parametrize(
    ("field", "token"),
    [("amount", "NaN"), ("amount", "-Infinity"), ("metadata", '{"x": [Infinity]}')],
    ids=["amount-NaN", "amount-infinity", "metadata-infinity"],
)
def test_a_bare_nan_or_infinity_in_a_crafted_event_is_refused_naming_its_argument(
    pipeline, db, snapshot, form, field, token
):
    """A bare NaN or Infinity token (which Python's JSON, kombu's included, reads as a
    float) was filed as XX000 naming nothing: the event could not be written for the
    database. Now it is a validation refusal, MT001 naming the argument, and nothing of
    it applies, whether the event came as an object, as text or in a batch's text."""
    amount = token if field == "amount" else '"1"'
    extra = f', "metadata": {token}' if field == "metadata" else ""
    text = (
        '{"op": "allocate", "namespace": "default", "args": {"user_id": "u1", '
        f'"event_type": "{ET}", "amount": {amount}, "unit": "{UNIT}"{extra}}}}}'
    )
    name, payload = {
        "object": ("meter.allocate", json.loads(text)),  # kombu writes the float as NaN
        "text": ("meter.allocate", text),
        "batch": (wire.APPLY_BATCH, f"[{text}]"),
    }[form]
    before = snapshot()
    pipeline.send_task(name, args=(payload,), task_id=str(uuid.uuid4()))
    (letter,) = eventually(lambda: dead_letters(db))
    time.sleep(0.3)  # nothing more comes
    assert (letter["op"], letter["error_sqlstate"]) == ("allocate", "MT001")
    assert letter["error_message"].startswith(f"{field}: must ")
    bad = token if field == "amount" else "Infinity"
    assert letter["error_message"].endswith(f"got {bad}")
    after = snapshot()
    assert len(after.pop("dead_letters")) == len(before.pop("dead_letters")) + 1
    assert after == before


# ------------------------------------------------------------------ ordering


def test_commit_and_release_before_their_reserve(pipeline, make_producer, client, db):
    p = make_producer(results=True)
    commit = p.commit("r-late", "3.25")
    release = p.release("r-gone")
    time.sleep(0.3)  # both have met "not_found" by now and are waiting for their reserve
    p.allocate("u1", ET, 10, UNIT).wait()
    assert p.reserve("u1", ET, 5, UNIT, reservation_id="r-late").wait()["granted"]
    assert p.reserve("u1", ET, 2, UNIT, reservation_id="r-gone").wait()["granted"]

    committed = commit.wait()
    assert committed["status"] == "committed" and committed["consumed"] == D("3.25")
    assert release.wait() is True
    assert balance(client) == {"balance": D("6.75"), "reserved": D(0), "available": D("6.75")}
    assert dead_letters(db) == []


def test_batch_defers_orphans_to_their_own_tasks(pipeline, make_producer, client):
    p = make_producer(results=True)
    handles = p.send_many(
        [
            {"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 10, "unit": UNIT},
            {"op": "commit", "reservation_id": "r-b", "actual_amount": 4},
            {"op": "consume", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT},
        ]
    )
    # The batch completes without waiting for the orphan...
    outcomes = pipeline.AsyncResult(handles[0].task_id).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["applied", "deferred", "applied"]
    assert outcomes[1]["task_id"] == wire.child_task_id(handles[0].task_id, 1)
    assert balance(client)["balance"] == D(9)
    # ... which takes effect once its reserve arrives.
    p.reserve("u1", ET, 6, UNIT, reservation_id="r-b").wait()
    assert handles[1].wait()["status"] == "committed"
    assert balance(client) == {"balance": D(5), "reserved": D(0), "available": D(5)}


def test_orphan_past_the_horizon_is_dead_lettered_until_its_reserve_arrives(
    pipeline, make_producer, client, db, db_url
):
    p = make_producer(results=True)
    started = time.monotonic()
    with pytest.raises(NotFoundError, match="r-never"):
        p.commit("r-never", 2).wait(timeout=15)
    assert time.monotonic() - started >= 2.5  # the test horizon is 3 s
    (row,) = dead_letters(db)
    assert (row["op"], row["error_sqlstate"]) == ("commit", "MT003")
    assert "applied when the reserve arrives" in row["error_message"]

    runner = CliRunner()
    env = {"METER_DATABASE_URL": db_url}
    listed = runner.invoke(cli, ["dead-letters", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    assert [d["dead_letter_id"] for d in json.loads(listed.output)] == [row["dead_letter_id"]]

    # Still no reserve: the retry fails, exit 1, the dead letter stays.
    failed = runner.invoke(cli, ["dead-letters", "retry", str(row["dead_letter_id"])], env=env)
    assert failed.exit_code == 1 and "still failing" in failed.output
    assert dead_letters(db)[0]["attempts"] == 2

    # The reserve arrives (late, here through the SDK): it applies the commit in its own
    # transaction, once, and settles the dead letter; nothing is left to retry by hand.
    client.allocate("u1", ET, 10, UNIT)
    client.reserve("u1", ET, 5, UNIT, reservation_id="r-never")
    assert balance(client) == {"balance": D(8), "reserved": D(0), "available": D(8)}
    assert dead_letters(db) == [] and len(dead_letters(db, "retried")) == 1
    again = runner.invoke(cli, ["dead-letters", "retry", str(row["dead_letter_id"])], env=env)
    assert again.exit_code == 1
    assert [r["entry_type"] for r in ledger(db)] == ["allocation", "consumption"]
    assert client.reconcile() == []


def test_a_late_reserve_through_the_pipeline_settles_its_orphans(
    pipeline, make_producer, client, db
):
    p = make_producer(results=True)
    with pytest.raises(NotFoundError):
        p.commit("r-late-c", "1.5").wait(timeout=15)
    with pytest.raises(NotFoundError):
        p.release("r-late-r").wait(timeout=15)
    assert sorted(r["op"] for r in dead_letters(db)) == ["commit", "release"]
    p.allocate("u1", ET, 10, UNIT).wait()
    assert p.reserve("u1", ET, 4, UNIT, reservation_id="r-late-c").wait()["granted"]
    assert p.reserve("u1", ET, 3, UNIT, reservation_id="r-late-r").wait()["granted"]
    # committed (1.5 consumed, the rest of the hold returned) and released
    assert balance(client) == {"balance": D("8.5"), "reserved": D(0), "available": D("8.5")}
    assert dead_letters(db) == [] and len(dead_letters(db, "retried")) == 2
    rows = db.execute("SELECT reservation_id, status FROM meter.reservations").fetchall()
    statuses = {r["reservation_id"]: r["status"] for r in rows}
    assert statuses == {"r-late-c": "committed", "r-late-r": "released"}


# ------------------------------------------------------------------ exactness


def test_decimals_stay_exact_through_the_pipeline(pipeline, make_producer, client, db):
    p = make_producer(results=True)
    for _ in range(3):
        p.allocate("u1", ET, "0.1", UNIT).wait()
    assert p.consume("u1", ET, 0.3, UNIT).wait()["balance"] == D(0)  # float 0.3 is "0.3"
    big = "123456789012345678901234.123456789012"
    assert p.allocate("u2", ET, big, UNIT).wait()["balance"] == D(big)
    meta = {"price": D("0.1"), "ratio": 0.1, "n": 10**30}
    p.consume("u1", ET, "0.000000000001", UNIT, metadata=meta).wait()
    assert [r["amount"] for r in ledger(db)] == [D("0.1")] * 3 + [D("-0.3"), D("-1E-12")]
    assert balance(client)["balance"] == D("-0.000000000001")
    assert balance(client, "u2")["balance"] == D(big)
    stored = db.execute(
        "SELECT metadata::text AS m FROM meter.ledger WHERE metadata IS NOT NULL"
    ).fetchone()
    assert stored["m"] == '{"n": 1000000000000000000000000000000, "price": 0.1, "ratio": 0.1}'


def test_event_time_travels_with_its_offset(pipeline, make_producer, db):
    p = make_producer(results=True)
    when = datetime(2026, 1, 15, 12, 30, tzinfo=UTC) - timedelta(days=0)
    p.allocate("u1", ET, 1, UNIT, event_time=when).wait()
    row = db.execute("SELECT event_time FROM meter.ledger").fetchone()
    assert row["event_time"] == when


def test_an_event_time_with_a_sub_minute_offset_is_sent_in_utc_and_applied(
    pipeline, make_producer, client, db
):
    """Guards review D #3: an offset with microseconds (MeterClient takes it: psycopg sends
    UTC) was sent as '+00:00:00.000001', a text apply_events refuses (a dead letter).
    The producer sends every event_time in UTC: the same instant, applied."""
    when = datetime(2025, 6, 1, tzinfo=timezone(timedelta(microseconds=1)))
    p = make_producer(results=True)
    h = p.allocate("u1", ET, 1, UNIT, event_time=when)
    assert h.wait(timeout=20)["balance"] == D(1)
    client.allocate("u2", ET, 1, UNIT, event_time=when)  # the SDK, for comparison
    rows = db.execute("SELECT user_id, event_time FROM meter.ledger ORDER BY user_id").fetchall()
    assert [(r["user_id"], r["event_time"]) for r in rows] == [("u1", when), ("u2", when)]
    assert dead_letters(db) == []


# Metadata MeterClient stores as it is: plain JSON objects whose keys happen to be the two
# that kombu's JSON decoder takes for a type marker.
MARKER_METADATA = [
    {"tag": {"__type__": "decimal", "__value__": "1"}},
    {"tag": {"__type__": "bytes", "__value__": "abc"}},
    {"tag": {"__type__": "no-such-type", "__value__": 1}},
]
SECRET = "pipeline-secret"


def test_a_single_event_message_carries_its_event_as_json_text(make_producer, broker_url):
    """A single event travels as the JSON text of its object (meter.wire), so that kombu's
    JSON never decodes event content (review D #1, #2); its signature covers that text."""
    from kombu import Connection

    from meter import signing

    key = signing.derive_key(SECRET, "default")
    h = make_producer(signing_key=key).consume("u1", ET, "1.5", UNIT, metadata=MARKER_METADATA[0])
    with Connection(broker_url) as conn:
        message = conn.default_channel.basic_get(wire.QUEUE, no_ack=True)
    assert message is not None and message.headers["task"] == "meter.consume"
    (text,), kwargs, _ = message.decode()
    assert isinstance(text, str) and text == wire.dumps(json.loads(text, parse_float=D))
    event = json.loads(text)
    assert event["args"]["idempotency_key"] == h.idempotency_key
    assert event["args"]["metadata"] == MARKER_METADATA[0]
    assert signing.verify(SECRET, kwargs["auth"], text, max_age=3600) == "default"


@pytest.mark.parametrize("metadata", MARKER_METADATA, ids=["decimal", "bytes", "unknown"])
def test_metadata_with_kombus_type_marker_keys_reaches_the_ledger_unchanged(
    pipeline, make_producer, client, db, metadata
):
    """Guards review D #1: metadata holding {"__type__", "__value__"} objects was decoded
    by kombu's JSON into a Python value (changed: {"tag": 1}), or made it refuse the
    message, acked and dropped (a lost unit). Sent as JSON text, it arrives unchanged."""
    client.allocate("u1", ET, 10, UNIT)
    p = make_producer(results=True)
    h = p.consume("u1", ET, 1, UNIT, metadata=metadata)
    assert h.wait(timeout=20)["balance"] == D(9)
    row = db.execute(
        "SELECT metadata FROM meter.ledger WHERE idempotency_key = %s", (h.idempotency_key,)
    ).fetchone()
    assert row["metadata"] == metadata
    assert dead_letters(db) == []


def test_a_signed_event_with_type_marker_metadata_verifies(pipeline, make_producer, db):
    """Guards review D #2: kombu decoded such metadata into another value on the worker's
    side, so a correctly signed message failed verification (MT004). The signature now
    covers the event's text as sent, which kombu carries unchanged."""
    from meter import signing

    pipeline.conf.meter_signing_secret = SECRET
    try:
        p = make_producer("a", signing_key=signing.derive_key(SECRET, "a"), results=True)
        meta = {"tag": {"__type__": "decimal", "__value__": "1"}}
        assert p.allocate("u1", ET, 10, UNIT, metadata=meta).wait(timeout=20)["balance"] == 10
    finally:
        pipeline.conf.meter_signing_secret = ""
    rows = db.execute("SELECT metadata::text AS m FROM meter.ledger").fetchall()
    assert rows == [{"m": '{"tag": {"__type__": "decimal", "__value__": "1"}}'}]
    assert dead_letters(db) == []


def test_a_deferred_batch_event_with_type_marker_metadata_reaches_the_ledger_unchanged(
    pipeline, make_producer, client, db
):
    """Review D #1, the worker's side: a batch event handed to a task of its own (a commit
    before its reserve; a split batch likewise) is sent as JSON text too, signed, so
    kombu does not decode its metadata."""
    from meter import signing

    meta = {"tag": {"__type__": "no-such-type", "__value__": 1}}
    client.allocate("u1", ET, 10, UNIT)
    pipeline.conf.meter_signing_secret = SECRET
    try:
        p = make_producer(signing_key=signing.derive_key(SECRET, "default"), results=True)
        (commit,) = p.send_many(
            [{"op": "commit", "reservation_id": "r-m", "actual_amount": 2, "metadata": meta}]
        )
        time.sleep(0.3)  # the batch has run: the commit waits in a task of its own
        p.reserve("u1", ET, 5, UNIT, reservation_id="r-m").wait(timeout=20)
        assert commit.wait(timeout=20)["status"] == "committed"
    finally:
        pipeline.conf.meter_signing_secret = ""
    row = db.execute(
        "SELECT metadata FROM meter.ledger WHERE entry_type = 'consumption'"
    ).fetchone()
    assert row["metadata"] == meta
    assert dead_letters(db) == []


# ------------------------------------------------------------------ buffered mode


def test_buffered_producer_sends_on_flush(pipeline, make_producer, client, broker_url):
    p = make_producer(batch_size=100, linger_ms=60_000, results=True)
    p.allocate("u1", ET, 100, UNIT)
    handles = [p.consume("u1", ET, 1, UNIT) for _ in range(9)]
    assert len({h.task_id for h in handles}) == 1
    time.sleep(0.3)
    assert balance(client)["balance"] == D(0)  # still in the producer's buffer
    p.flush()
    assert handles[-1].wait()["success"] is True
    assert balance(client)["balance"] == D(91)


def test_buffered_producer_sends_full_batches_and_lingers(pipeline, make_producer, client):
    p = make_producer(batch_size=4, linger_ms=200)
    p.allocate("u1", ET, 100, UNIT)
    handles = [p.consume("u1", ET, "0.5", UNIT) for _ in range(9)]
    assert len({h.task_id for h in handles}) == 3  # 4 + 4 + 2 (the 10th is the allocate)
    eventually(lambda: balance(client)["balance"] == D("95.5"), timeout=10)


def test_buffered_producer_close_and_wait_flush(pipeline, make_producer, client, broker_url):
    p = make_producer(batch_size=1000, linger_ms=60_000)
    p.allocate("u1", ET, 5, UNIT)
    h = p.consume("u1", ET, 2, UNIT, want_result=True)
    assert h.wait()["balance"] == D(3)  # wait() flushes what it waits for
    p.consume("u1", ET, 1, UNIT)
    p.close()
    eventually(lambda: balance(client)["balance"] == D(2))
    with pytest.raises(Exception, match="closed"):
        p.consume("u1", ET, 1, UNIT)


_FORK_PRODUCER: Any = None  # the parent's producer, used by a forked child


def _consume_in_child() -> None:
    _FORK_PRODUCER.consume("u1", ET, 1, UNIT, idempotency_key="from-child")


@pytest.mark.timeout(60)
def test_a_child_forked_by_multiprocessing_sends_its_buffer_when_it_exits(
    make_producer, broker_url
):
    """Guards review D #5: a child started by multiprocessing (fork) ends with os._exit(),
    which runs no atexit hook, so what it buffered with the parent's producer was dropped.
    A multiprocessing finalizer, registered anew in the child, sends it."""
    import multiprocessing

    global _FORK_PRODUCER
    _FORK_PRODUCER = make_producer(batch_size=100, linger_ms=60_000)
    try:
        child = multiprocessing.get_context("fork").Process(target=_consume_in_child)
        child.start()
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        _FORK_PRODUCER = None
    assert queue_length(broker_url) == 1  # the child's event; the parent buffered nothing


@pytest.mark.timeout(60)
def test_a_buffered_producer_dropped_without_close_still_sends_its_events(broker_url):
    """Guards review D #6: the linger thread held the producer only while it waited, so a
    producer its caller dropped was collected at the end of that wait, with the batch due
    that very round. It now holds the producer while the buffer holds events; once they
    are sent, the producer is collected and the thread ends."""
    import gc
    import weakref

    from meter.producer import MeterProducer

    p = MeterProducer(broker_url, batch_size=100, linger_ms=300)
    p.consume("u1", ET, 1, UNIT, idempotency_key="dropped")
    thread = p._linger_thread
    ref = weakref.ref(p)
    time.sleep(0.1)  # the linger thread is waiting for the batch to be due
    del p
    gc.collect()
    eventually(lambda: queue_length(broker_url) == 1, timeout=10)
    assert thread is not None
    thread.join(timeout=10)  # nothing buffered: it lets the producer go, and ends
    gc.collect()
    assert not thread.is_alive() and ref() is None


@pytest.mark.timeout(60)
def test_wait_on_an_event_a_failed_close_handed_back_raises_at_once(
    make_producer, broker_url, monkeypatch
):
    """Guards review D #7: after close() failed and handed the buffer back (exc.events),
    wait() flushed nothing and waited for a task that does not exist: with timeout=None,
    for ever. It raises PublishError at once, the event in its events."""
    p = make_producer(batch_size=10, linger_ms=3_600_000, results=True)
    h = p.consume("u1", ET, 1, UNIT)
    monkeypatch.setattr(p._app, "send_task", _refused)
    with pytest.raises(PublishError) as closing:
        p.close()
    monkeypatch.undo()  # the broker is back
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            h.wait(timeout=None)
        except BaseException as exc:  # checked below
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout=12)
    assert not waiter.is_alive(), "wait(None) still waiting for an event that was never sent"
    (error,) = outcome
    assert isinstance(error, PublishError), error
    assert error.events == closing.value.events
    assert error.events[0]["idempotency_key"] == h.idempotency_key
    assert queue_length(broker_url) == 0


def test_buffered_producer_is_thread_safe(pipeline, make_producer, client):
    from concurrent.futures import ThreadPoolExecutor

    p = make_producer(batch_size=50, linger_ms=100)
    with ThreadPoolExecutor(8) as pool:
        handles = list(pool.map(lambda i: p.allocate("u1", ET, "0.01", UNIT), range(400)))
    p.flush()
    assert len({h.idempotency_key for h in handles}) == 400
    eventually(lambda: balance(client)["balance"] == D(4), timeout=20)


# ------------------------------------------------------------------ failures


def test_transient_errors_are_retried(pipeline, make_producer, client, monkeypatch):
    real = worker_db.apply_events
    failures = iter(
        [
            psycopg.errors.DeadlockDetected("deadlock detected"),
            psycopg.errors.SerializationFailure("could not serialize access"),
            psycopg.OperationalError("server closed the connection unexpectedly"),
        ]
    )

    def flaky(*args: Any, **kwargs: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_db, "apply_events", flaky)
    p = make_producer(results=True)
    assert p.allocate("u1", ET, 3, UNIT).wait()["balance"] == D(3)
    assert next(failures, None) is None


def test_an_unexpected_error_is_dead_lettered_not_retried(pipeline, make_producer, db, monkeypatch):
    calls = []

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise psycopg.errors.UndefinedFunction("function meter.apply_events(jsonb) does not exist")

    monkeypatch.setattr(worker_db, "apply_events", broken)
    p = make_producer(results=True)
    with pytest.raises(Exception, match="does not exist"):
        p.allocate("u1", ET, 3, UNIT).wait()
    assert len(calls) == 1
    (row,) = dead_letters(db)
    assert (row["op"], row["error_sqlstate"]) == ("allocate", "42883")
    assert row["source"] is not None


def _redeliver(broker_url: str, app: Any, name: str, args: tuple[Any, ...], task_id: str) -> None:
    """Put a message on the queue the way kombu's Redis transport puts one *back*.

    The message is published to a side queue no worker reads, then moved to Meter's queue
    with the ``redelivered`` flags that kombu's ``_do_restore_message`` sets.
    """
    app.send_task(name, args=args, task_id=task_id, queue="staging", ignore_result=False)
    client = redis.Redis.from_url(broker_url)
    try:
        payload = json.loads(client.rpop("staging"))
        payload["headers"]["redelivered"] = True
        info = payload["properties"]["delivery_info"]
        info.update(redelivered=True, exchange=wire.QUEUE, routing_key=wire.QUEUE)
        client.lpush(wire.QUEUE, json.dumps(payload))
    finally:
        client.close()


def test_a_message_that_keeps_killing_workers_is_dead_lettered(pipeline, db, broker_url):
    event = {"op": "consume", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}}  # fmt: skip
    task_id = str(uuid.uuid4())
    client = redis.Redis.from_url(broker_url)
    # Two earlier redeliveries ended with the worker dead (test setting: 3 deliveries at most).
    client.set(f"meter:deliveries:{task_id}:0", 2)
    _redeliver(broker_url, pipeline, "meter.consume", (event,), task_id)
    outcome = pipeline.AsyncResult(task_id).get(timeout=15)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MTW01"
    (row,) = dead_letters(db)
    keyed = {**event, "args": {**event["args"], "idempotency_key": f"task:{task_id}"}}
    assert (row["op"], row["source"], row["payload"]) == ("consume", task_id, keyed)
    assert ledger(db) == []  # never ran
    assert client.exists(f"meter:deliveries:{task_id}:0") == 0
    client.close()


def test_retrying_a_worker_lost_dead_letter_replays_what_its_first_delivery_applied(
    pipeline, db, broker_url, client
):
    # The first delivery commits; its worker is killed before the ack; the redeliveries
    # reach the bound and the event becomes a dead letter (MTW01). That dead letter used
    # to hold the event without the key derived from its task, so retrying it applied
    # the allocate a second time (found by a review, with a reproduction).
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "5", "unit": UNIT}}  # fmt: skip
    task_id = str(uuid.uuid4())
    first = pipeline.send_task("meter.allocate", args=(event,), task_id=task_id,
                               ignore_result=False)  # fmt: skip
    assert first.get(timeout=15)["status"] == "applied"
    redis.Redis.from_url(broker_url).set(f"meter:deliveries:{task_id}:0", 2)
    _redeliver(broker_url, pipeline, "meter.allocate", (event,), task_id)
    eventually(lambda: dead_letters(db))
    (row,) = dead_letters(db)
    assert row["error_sqlstate"] == "MTW01"
    retried = db.execute(
        "SELECT status FROM meter.retry_dead_letter(%s)", (row["dead_letter_id"],)
    ).fetchone()
    assert retried["status"] == "replayed"
    assert balance(client)["balance"] == D(5)
    assert len(ledger(db)) == 1


def test_a_dead_letter_its_namespace_cannot_hold_is_filed_with_the_operators(pipeline, db):
    # 1024 characters of four bytes each: a namespace within the character bound that no
    # index key can hold (54000). The event fails, and so did its dead letter, every time:
    # the message re-sent itself with its verdict forever (found by a review).
    ns = "".join(chr(0x20000 + i) for i in range(1024))
    event = {"op": "allocate", "namespace": ns,
             "args": {"user_id": "u1", "event_type": ET, "amount": "5", "unit": UNIT}}  # fmt: skip
    task_id = str(uuid.uuid4())
    send_raw(pipeline, "meter.allocate", event, task_id=task_id, auth={"namespace": ns})
    (row,) = eventually(lambda: dead_letters(db))
    assert (row["namespace"], row["source"], row["error_sqlstate"]) == ("", task_id, "54000")
    assert "filed with the operators" in row["error_message"]
    assert row["payload"]["namespace"] == ns
    assert db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"] == 0


@pytest.mark.parametrize(
    "verdict", [{"sqlstate": {"x": 1}, "message": "m"}, {"message": ["m"]}, "MT002"]
)
def test_a_malformed_verdict_is_itself_the_dead_letter(pipeline, db, verdict):
    # The verdict argument is not signed: a crafted one that psycopg cannot send used to be
    # retried forever.
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}}  # fmt: skip
    outcome = send_raw(pipeline, "meter.allocate", event, verdict=verdict).get(timeout=15)
    assert outcome["error_sqlstate"] == "MT001"
    (row,) = dead_letters(db)
    assert row["error_message"] == "message: malformed verdict argument"
    assert ledger(db) == []


@pytest.mark.parametrize(
    "since", ["yesterday", [1], {"t": 1}, "nan", True, pytest.param(10**400, id="huge_int")]
)
def test_a_malformed_orphan_since_starts_the_wait_afresh(pipeline, db, since):
    # A commit waiting for its reserve carries when it began waiting; a crafted value made
    # the task raise, and the message was acked and lost (found by a review).
    event = {"op": "commit", "namespace": "default",
             "args": {"reservation_id": "r-never", "actual_amount": "3"}}  # fmt: skip
    outcome = send_raw(pipeline, "meter.commit", event, orphan_since=since).get(timeout=30)
    assert outcome["error_sqlstate"] == "MT003"  # after the horizon, settled by its reserve
    (row,) = dead_letters(db)
    assert row["payload"] == event


@pytest.mark.parametrize("namespace", [5, True, [1], {"n": 1}])
def test_an_event_whose_namespace_is_not_a_string_is_refused(pipeline, db, namespace):
    # ->> in the SQL read 5 as the namespace "5" and applied the event there.
    event = {"op": "allocate", "namespace": namespace,
             "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}}  # fmt: skip
    outcome = send_raw(pipeline, "meter.allocate", event).get(timeout=15)
    assert outcome["error_sqlstate"] == "MT001"
    assert outcome["error_message"].startswith("namespace: must be a string")
    good = {**event, "namespace": "default"}
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, [event, good]).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["error", "applied"]
    assert outcomes[0]["error_sqlstate"] == "MT001"
    assert [r["namespace"] for r in dead_letters(db)] == ["", ""]
    assert [a["namespace"] for a in db.execute("SELECT namespace FROM meter.accounts")] == [
        "default"
    ]


def test_a_dead_letter_waits_out_a_read_only_database(pipeline, db, db_url, client):
    # A failover: the database answers but refuses writes (25006). The event and its dead
    # letter both fail; a first version of the operators' fallback then failed the task,
    # and Celery acked it: lost (found by a review). The verdict is retried until the
    # database writes again, and the dead letter, retried, applies the event once.
    name = db.execute("SELECT current_database() AS d").fetchone()["d"]
    db.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    worker_db.close_all()
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "5", "unit": UNIT}}  # fmt: skip
    try:
        result = send_raw(pipeline, "meter.allocate", event)
        time.sleep(2)
        assert not result.ready()  # retrying, not given up
    finally:
        db.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        worker_db.close_all()
    assert result.get(timeout=30)["error_sqlstate"] == "25006"
    (row,) = dead_letters(db)
    assert ledger(db) == []
    retried = db.execute(
        "SELECT status FROM meter.retry_dead_letter(%s)", (row["dead_letter_id"],)
    ).fetchone()
    assert retried["status"] == "applied"
    assert balance(client)["balance"] == D(5)


def test_a_crafted_task_id_or_verdict_cannot_keep_a_dead_letter_from_being_recorded(pipeline, db):
    # A task id longer than PostgreSQL can index (a dead letter's source), and a verdict
    # whose SQLSTATE holds a NUL: the dead letter failed to record, under its namespace
    # and the operators' alike, and the message was lost (found by a review).
    bad = {"op": "allocate", "namespace": "default",
           "args": {"user_id": "u1", "event_type": ET, "amount": "-1", "unit": UNIT}}  # fmt: skip
    long_id = secrets.token_urlsafe(3000)  # incompressible: PostgreSQL compresses keys
    send_raw(pipeline, "meter.allocate", bad, task_id=long_id)
    send_raw(pipeline, "meter.allocate", bad, verdict={"sqlstate": "\x00MT001x", "message": "m"})
    rows = eventually(lambda: (r := dead_letters(db)) and len(r) == 2 and r)
    by_state = {r["error_sqlstate"]: r for r in rows}
    # the SQL's own dead letter of the refusal (source <task id>/0) is stored with its
    # source hashed (049): its own reason, in its namespace (the call failed as a whole,
    # 54000, and the worker filed that instead)
    assert by_state["MT001"]["source"].startswith("sha256:")
    assert by_state["MT001"]["namespace"] == "default"
    assert by_state["MT001"]["payload"]["args"]["amount"] == "-1"
    assert by_state["\\x00M"]["error_message"] == "m"
    assert ledger(db) == []


def test_a_batch_with_a_crafted_task_id_ends_without_looping(pipeline, db, broker_url):
    # A refused event of a batch whose task id is too long to index: its dead letter failed
    # to record, and the batch was put back on the queue at once, for ever (found by a
    # review: 2,469 deliveries in 10 s).
    good = {"op": "allocate", "namespace": "default",
            "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                     "idempotency_key": "k1"}}  # fmt: skip
    outcomes = send_raw(
        pipeline,
        wire.APPLY_BATCH,
        [{**good, "namespace": 5}, good],
        task_id=secrets.token_urlsafe(3000),
    ).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["error", "applied"]
    (row,) = dead_letters(db)
    assert (row["namespace"], row["error_sqlstate"]) == ("", "MT001")
    assert len(ledger(db)) == 1


HUGE = "1E+1000000"  # JSON the worker parses (a Decimal) and PostgreSQL cannot store (22003)


def _deliveries(broker_url: str) -> int:
    client = redis.Redis.from_url(broker_url)
    try:
        return sum(int(client.get(k) or 0) for k in client.keys("meter:deliveries:*"))
    finally:
        client.close()


def test_crafted_batches_end_as_dead_letters_without_looping(pipeline, db, broker_url):
    # Each of these looped (found by a third review): a refused event holding a number
    # jsonb cannot store, put back on the queue at once (2,702 deliveries in 8 s); the same
    # in a batch split one by one (2,317); a batch that is no array, retried without end; an
    # event nested too deeply for PostgreSQL and for the broker's serializer. Each now ends
    # as a dead letter (the payload kept as text with the operators where jsonb cannot hold
    # it), and the good event of the first batch applies.
    good = {"op": "allocate", "namespace": "default",
            "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                     "idempotency_key": "k1"}}  # fmt: skip
    deep = "[" * 200_000 + "]" * 200_000
    deep_event = {**good, "args": {**good["args"], "user_id": "u2", "idempotency_key": "kd"}}
    texts = [
        "[" + json.dumps(good) + ',{"op":"allocate","namespace":"other","x":' + HUGE + "}]",
        '[{"op":"nope","namespace":"default","x":' + HUGE + "}]",
        '{"op":"allocate","namespace":"default","x":' + HUGE + "}",
        "[" + json.dumps(deep_event)[:-1] + ',"x":' + deep + "}]",
    ]
    results = [send_raw(pipeline, wire.APPLY_BATCH, text) for text in texts]
    outcomes = [r.get(timeout=60) for r in results]
    assert [o["status"] for o in outcomes[0]] == ["applied", "error"]
    rows = eventually(lambda: (r := dead_letters(db)) and len(r) == 4 and r, timeout=60)
    assert all("filed with the operators" in r["error_message"] for r in rows)
    assert all(r["namespace"] == "" and set(r["payload"]) == {"unstorable"} for r in rows)
    # Review B3: the deep one goes to a task of its own (the worker writes any depth), which
    # meets PostgreSQL's own refusal (its stack), and is filed as that
    (deepest,) = [r for r in rows if r["error_sqlstate"] == "54001"]
    assert deepest["payload"] == {"unstorable": "<nested too deeply to show>"}
    assert [r["idempotency_key"] for r in ledger(db)] == ["k1"]
    assert ledger(db, "u2") == []
    assert _deliveries(broker_url) < 10


@pytest.mark.parametrize("retries", ["x", -(10**9)], ids=["text", "negative"])
def test_a_crafted_retries_header_neither_loses_nor_spins_a_message(pipeline, db, retries):
    # The retries header is not signed. Text made the task fail, acked and lost; a negative
    # count made every back-off 0 s (found by a fourth review). Both count as 0 now: the
    # commit waits for its reserve as any other, then is a dead letter.
    event = {"op": "commit", "namespace": "default",
             "args": {"reservation_id": "r-never", "actual_amount": "3"}}  # fmt: skip
    task_id = str(uuid.uuid4())
    runs: list[str] = []

    def count(task_id: str, **_: Any) -> None:
        runs.append(task_id)

    task_prerun.connect(count, weak=False)  # the worker runs in this process
    try:
        pipeline.send_task("meter.commit", args=(event,), task_id=task_id, retries=retries)
        (row,) = eventually(lambda: dead_letters(db), timeout=30)
    finally:
        task_prerun.disconnect(count)
    assert row["error_sqlstate"] == "MT003"
    # waited out the 3 s horizon with back-offs of 0.05-0.5 s, not thousands of 0 s runs
    assert 2 <= runs.count(task_id) <= 40, runs.count(task_id)


def test_a_batch_verdict_is_filed_with_the_operators_whatever_it_names(pipeline, db, db_url):
    # A crafted verdict naming the message's namespace filed the batch, whose events name
    # another tenant, under that namespace (found by a fourth review).
    event = {"op": "allocate", "namespace": "b",
             "args": {"user_id": "victim", "event_type": ET, "amount": "5", "unit": UNIT}}  # fmt: skip
    send_raw(
        pipeline, wire.APPLY_BATCH, [event], auth={"namespace": "a"},
        verdict={"sqlstate": "MT001", "message": "x", "namespace": "a"},
    ).get(timeout=15)  # fmt: skip
    (row,) = dead_letters(db)
    assert row["namespace"] == ""
    assert ledger(db, "victim") == []


def test_a_task_id_that_is_no_text_still_gets_its_dead_letter(pipeline, db):
    pipeline.send_task("meter.consume", args=("not an object",), task_id=12345, ignore_result=True)
    (row,) = eventually(lambda: dead_letters(db))
    assert (row["source"], row["error_sqlstate"]) == ("12345", "MT001")


def test_a_redelivered_message_is_counted_and_runs(pipeline, client, broker_url):
    event = {"op": "allocate", "namespace": "default",
             "args": {"user_id": "u1", "event_type": ET, "amount": "2", "unit": UNIT}}  # fmt: skip
    task_id = str(uuid.uuid4())
    _redeliver(broker_url, pipeline, "meter.allocate", (event,), task_id)
    assert pipeline.AsyncResult(task_id).get(timeout=15)["status"] == "applied"
    assert balance(client)["balance"] == D(2)


def test_a_batch_that_keeps_killing_workers_is_split(pipeline, client, db, broker_url):
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "5", "unit": UNIT}},
        {"op": "consume", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "2", "unit": UNIT}},
    ]  # fmt: skip
    task_id = str(uuid.uuid4())
    redis.Redis.from_url(broker_url).set(f"meter:deliveries:{task_id}:0", 5)
    _redeliver(broker_url, pipeline, wire.APPLY_BATCH, (events,), task_id)
    outcomes = pipeline.AsyncResult(task_id).get(timeout=15)
    assert [o["status"] for o in outcomes] == ["deferred", "deferred"]
    for o in outcomes:
        assert pipeline.AsyncResult(o["task_id"]).get(timeout=15)["status"] == "applied"
    assert balance(client)["balance"] == D(3)
    assert dead_letters(db) == []


# ------------------------------------------------------------------ beat


def test_expiry_sweep_task(pipeline, client):
    client.allocate("u1", ET, 10, UNIT)
    client.reserve("u1", ET, 4, UNIT, ttl_seconds=1)
    time.sleep(1.1)
    send_raw(pipeline, wire.RELEASE_EXPIRED).get(timeout=15)
    eventually(lambda: balance(client)["reserved"] == D(0))
    assert pipeline.conf.beat_schedule["meter.release-expired"]["task"] == wire.RELEASE_EXPIRED


# ------------------------------------------------------------------ CLI


def test_cli_dead_letters_list_retry_discard(pipeline, make_producer, db, db_url, client):
    p = make_producer(results=True)
    p.allocate("u1", ET, 1, UNIT, idempotency_key="k").wait()
    for amount in (2, 3):
        with pytest.raises(IdempotencyConflictError):
            p.allocate("u1", ET, amount, UNIT, idempotency_key="k").wait()
    first, second = (r["dead_letter_id"] for r in dead_letters(db))
    runner = CliRunner()
    env = {"METER_DATABASE_URL": db_url}

    table = runner.invoke(cli, ["dead-letters", "list"], env=env)
    assert table.exit_code == 0 and "MT002" in table.output and "allocate" in table.output

    assert runner.invoke(cli, ["dead-letters", "discard", str(first)], env=env).exit_code == 0
    assert runner.invoke(cli, ["dead-letters", "discard", str(first)], env=env).exit_code == 1
    assert runner.invoke(cli, ["dead-letters", "discard", "99999"], env=env).exit_code == 1
    assert runner.invoke(cli, ["dead-letters", "retry", "99999"], env=env).exit_code == 1

    listed = runner.invoke(cli, ["dead-letters", "list", "--status", "all", "--json"], env=env)
    statuses = {d["dead_letter_id"]: d["status"] for d in json.loads(listed.output)}
    assert statuses == {first: "discarded", second: "dead"}

    # --all retries what waits; still a conflict: exit 1, nothing changes.
    result = runner.invoke(cli, ["dead-letters", "retry", "--all"], env=env)
    assert result.exit_code == 1 and "retried 0 of 1" in result.output
    assert balance(client)["balance"] == D(1)

    usage = runner.invoke(cli, ["dead-letters", "retry"], env=env)
    assert usage.exit_code == 2


def test_record_orphan_applies_when_the_reservation_came_meanwhile(client, db, snapshot):
    def record(rid: str, op: str = "commit") -> dict[str, Any]:
        args = {"reservation_id": rid} | ({"actual_amount": "2"} if op == "commit" else {})
        payload = {"op": op, "namespace": "default", "args": args}
        return db.execute(
            "SELECT * FROM meter.record_orphan(%s::jsonb, 'gave up', 'task-1')",
            [json.dumps(payload)],
        ).fetchone()

    client.allocate("u1", ET, 10, UNIT)
    client.reserve("u1", ET, 5, UNIT, reservation_id="r-here")
    # the reserve was applied between the last look and the decision to give up: applied
    here = record("r-here")
    assert (here["applied"], here["status"], here["dead_letter_id"]) == (True, "applied", None)
    assert here["result"]["consumed"] == 2
    assert balance(client) == {"balance": D(8), "reserved": D(0), "available": D(8)}
    assert dead_letters(db) == []
    # no reservation: filed, to be settled by its reserve
    gone = record("r-not-yet", "release")
    assert (gone["applied"], gone["status"]) == (False, "error")
    (row,) = dead_letters(db)
    assert (row["dead_letter_id"], row["op"], row["error_sqlstate"], row["source"]) == (
        gone["dead_letter_id"], "release", "MT003", "task-1",
    )  # fmt: skip

    # anything but a commit or release naming its reservation: refused, nothing written
    before = snapshot()
    for bad in [
        {"op": "consume", "namespace": "default", "args": {"reservation_id": "r"}},
        {"op": "commit", "args": {"reservation_id": "r"}},
        {"op": "commit", "namespace": "default", "args": {}},
        ["commit"],
    ]:
        with pytest.raises(psycopg.Error, match="payload") as refused:
            db.execute("SELECT * FROM meter.record_orphan(%s::jsonb, 'x')", [json.dumps(bad)])
        assert refused.value.sqlstate == "MT001"
    assert snapshot() == before


def test_a_late_reserve_keeps_an_orphan_that_still_fails_and_is_granted(client, db, snapshot):
    # an orphan commit that cannot apply (a negative actual amount: record_orphan refuses
    # it with that error, so it is filed as a plain dead letter here) stays a dead letter
    # with one more attempt; the reserve itself goes through
    client.allocate("u1", ET, 10, UNIT)
    payload = json.dumps({"op": "commit", "namespace": "default",
                          "args": {"reservation_id": "r-bad", "actual_amount": "-1"}})  # fmt: skip
    before = snapshot()
    with pytest.raises(psycopg.Error, match="actual_amount") as refused:
        db.execute("SELECT * FROM meter.record_orphan(%s::jsonb, 'gave up')", [payload])
    assert refused.value.sqlstate == "MT001"
    assert snapshot() == before
    db.execute(
        "SELECT meter.record_dead_letter('commit', %s::jsonb, 'MT003', 'gave up', NULL, 'default')",
        [payload],
    )
    assert client.reserve("u1", ET, 5, UNIT, reservation_id="r-bad")["granted"]
    (row,) = dead_letters(db)
    assert (row["attempts"], row["error_sqlstate"]) == (2, "MT001")
    assert "actual_amount" in row["error_message"]
    assert balance(client) == {"balance": D(10), "reserved": D(5), "available": D(5)}


def test_record_orphan_waits_for_a_reserve_in_flight(client, db, db_url):
    import threading

    client.allocate("u1", ET, 10, UNIT)
    payload = {"op": "commit", "namespace": "default",
               "args": {"reservation_id": "r-race", "actual_amount": "3"}}  # fmt: skip
    out: dict[str, Any] = {}
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as reserving:
        # the reserve has created its reservation but not committed (it holds the lock)
        reserving.execute(
            "SELECT * FROM meter.reserve('u1', %s, 5, %s, p_reservation_id => 'r-race')",
            [ET, UNIT],
        )

        def give_up() -> None:
            with psycopg.connect(db_url, autocommit=True, row_factory=psycopg.rows.dict_row) as c:
                out["row"] = c.execute(
                    "SELECT * FROM meter.record_orphan(%s::jsonb, 'gave up')", [json.dumps(payload)]
                ).fetchone()

        t = threading.Thread(target=give_up)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waiting for the reservation's lock, not filing a dead letter
        reserving.commit()
    t.join(10)
    assert out["row"]["applied"] is True and out["row"]["status"] == "applied"
    assert dead_letters(db) == []
    assert balance(client) == {"balance": D(7), "reserved": D(0), "available": D(7)}


def _every_sqlstate() -> list[str]:
    """Every SQLSTATE psycopg has a class for (all of PostgreSQL's), plus Meter's own."""
    codes = {
        cls.sqlstate
        for cls in vars(psycopg.errors).values()
        if isinstance(cls, type) and issubclass(cls, psycopg.Error) and cls.sqlstate
    }
    return sorted(codes | {"MT001", "MT002", "MT003", "MT004"})


def test_apply_events_and_the_worker_agree_on_what_is_transient(db):
    """``apply_events`` re-raises a transient error so that the worker retries the whole
    batch; ``worker.retry.is_transient`` decides that retry. The two lists are written
    twice (SQL and Python); here they are compared on every SQLSTATE there is."""
    from worker.retry import is_transient

    source = db.execute(
        "SELECT pg_get_functiondef('meter.apply_events(jsonb, text, boolean)'::regprocedure) AS src"
    ).fetchone()["src"]
    # the one IF of the function that re-raises: its condition, evaluated over all codes
    conditions = re.findall(r"IF (v_state IN \(.*?)\s+THEN\s+RAISE;", source, re.S)
    assert len(conditions) == 1, conditions
    codes = _every_sqlstate()
    rows = db.execute(
        f"SELECT v_state, {conditions[0].replace('%', '%%')} AS transient"
        " FROM unnest(%s::text[]) v_state",
        [codes],
    ).fetchall()
    in_sql = {r["v_state"] for r in rows if r["transient"]}
    in_python = {  # Meter's own codes have no psycopg class (checked below on the SQL side)
        c for c in codes if not c.startswith("MT") and is_transient(psycopg.errors.lookup(c)("x"))
    }
    assert in_sql == in_python
    # and the list is the intended one, not two equal mistakes
    assert {"40001", "40P01", "55P03", "57014", "08006", "57P01", "53100", "25P03", "25P04"} <= (
        in_sql
    )
    assert not in_sql & {"23505", "22P02", "42501", "MT001", "MT002", "MT003", "MT004"}


def test_a_commit_settled_by_its_late_reserve_is_not_the_reserve_callers_act(db, db_url):
    """The reserve's caller did not send the commit it settles: the commit's ledger row
    names no actor, and the caller's own context is back for the rest of its transaction
    (a caller calling the SQL itself: the SDK puts a caller's context back after each call
    in any case)."""
    from meter import MeterClient

    payload = {"op": "commit", "namespace": "default",
               "args": {"reservation_id": "r-late", "actual_amount": "2"}}  # fmt: skip
    filed = db.execute(
        "SELECT * FROM meter.record_orphan(%s::jsonb, 'gave up')", [json.dumps(payload)]
    ).fetchone()
    assert filed["applied"] is False
    with psycopg.connect(db_url) as conn, conn.transaction():  # the caller's, spanning calls
        alice = MeterClient(conn, "default")
        alice.set_actor(actor_id="alice", request_id="req-9", reason="top-up")
        alice.allocate("u1", ET, 10, UNIT)
        conn.execute(
            "SELECT set_config('meter.tenant', 'default', true),"
            " set_config('meter.actor_id', 'alice', true),"
            " set_config('meter.request_id', 'req-9', true),"
            " set_config('meter.on_behalf_of', '', true), set_config('meter.reason', 'top-up', true)"
        )
        granted = conn.execute(
            "SELECT granted FROM meter.reserve('u1', %s, 5, %s, p_reservation_id => 'r-late')",
            (ET, UNIT),
        ).fetchone()
        assert granted == (True,)
        context = conn.execute(
            "SELECT current_setting('meter.actor_id'), current_setting('meter.request_id'),"
            " current_setting('meter.on_behalf_of'), current_setting('meter.reason')"
        ).fetchone()
        assert context == ("alice", "req-9", "", "top-up")
    rows = db.execute(
        "SELECT entry_type, amount, actor_id, request_id, reason FROM meter.ledger"
        " WHERE user_id = 'u1' ORDER BY id"
    ).fetchall()
    assert [tuple(r.values()) for r in rows] == [
        ("allocation", D(10), "alice", "req-9", "top-up"),
        ("consumption", D(-2), None, None, None),  # the settled commit
    ]
    assert dead_letters(db) == [] and len(dead_letters(db, "retried")) == 1


def test_a_batch_nobody_waits_for_applies_without_fetching_its_results(db, db_url):
    """``results=False`` (a message sent with results off) leaves out the result documents
    only: the events apply, each with the status and errors the full call reports."""

    def event(user: str, amount: str, key: str) -> dict[str, Any]:
        return {"op": "allocate", "namespace": "default",
                "args": {"user_id": user, "event_type": ET, "amount": amount, "unit": UNIT,
                         "idempotency_key": key}}  # fmt: skip

    with_results = worker_db.apply_events(
        db_url, 1, [event("u1", "1.5", "a"), event("u1", "x", "b")]
    )
    without = worker_db.apply_events(
        db_url,
        1,
        [event("u2", "1.5", "a2"), event("u2", "x", "b2"), event("u1", "1.5", "a")],
        results=False,
    )
    assert with_results[0]["result"] == {"balance": D("1.5"), "entry_id": 1}
    assert [r["result"] for r in without] == [None, None, None]
    strip = [{k: v for k, v in r.items() if k not in ("result", "idx")} for r in with_results]
    assert [
        {k: v for k, v in r.items() if k not in ("result", "idx")} for r in without[:2]
    ] == strip
    assert without[2]["status"] == "replayed"  # the first call's key, seen again
    balances = db.execute("SELECT user_id, balance FROM meter.accounts ORDER BY user_id").fetchall()
    assert balances == [
        {"user_id": "u1", "balance": D("1.5")},
        {"user_id": "u2", "balance": D("1.5")},
    ]


def test_a_buffered_call_that_raises_has_enqueued_nothing(
    pipeline, make_producer, client, monkeypatch
):
    # The call whose event fills the batch sends it; the broker refuses once (takes
    # nothing). A caller that calls again without the key the PublishError offers gets a
    # new generated key: the first event must not have stayed in the buffer as well, or
    # that retry doubles it.

    client.allocate("u1", ET, 100, UNIT)
    p = make_producer(batch_size=2, linger_ms=60_000)
    p.consume("u1", ET, 5, UNIT)
    real = p._app.send_task
    monkeypatch.setattr(p._app, "send_task", _refused)
    with pytest.raises(MeterConnectionError):
        p.consume("u1", ET, 7, UNIT)
    monkeypatch.setattr(p._app, "send_task", real)
    p.consume("u1", ET, 7, UNIT)  # the retry: 5 and 7 go, together or apart
    # The linger thread sends a batch the broker refused again at once, so the 5 may go
    # alone before the retry and the 7 start a batch of its own: flush sends what is left.
    p.flush()
    eventually(lambda: balance(client)["balance"] == D(88), timeout=10)
    time.sleep(0.5)
    assert balance(client)["balance"] == D(88)
    assert client.get_usage("u1", None, None)[0]["event_count"] == 2


def test_events_buffered_while_a_send_fails_keep_their_handles(
    pipeline, make_producer, client, monkeypatch
):
    # While the call that filled a batch is failing to send it, another thread buffers an
    # event into the next batch: every handle must still reach its own result.
    from kombu.exceptions import OperationalError as KombuOperationalError

    client.allocate("u1", ET, 100, UNIT)
    p = make_producer(batch_size=2, linger_ms=60_000, results=True)
    first = p.consume("u1", ET, 1, UNIT)
    real = p._app.send_task
    meanwhile: list[Any] = []

    def refused(*args, **kwargs):
        t = threading.Thread(target=lambda: meanwhile.append(p.consume("u1", ET, 3, UNIT)))
        t.start()
        t.join()
        raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")

    monkeypatch.setattr(p._app, "send_task", refused)
    with pytest.raises(MeterConnectionError):
        p.consume("u1", ET, 2, UNIT)  # fills the batch; not enqueued
    monkeypatch.setattr(p._app, "send_task", real)
    assert meanwhile[0].wait(timeout=20)["balance"] in (D(96), D(98))
    assert first.wait(timeout=20)["success"] is True
    eventually(lambda: balance(client)["balance"] == D(96), timeout=10)


def _taken_then_lost(real: Callable[..., Any], fail: Callable[[int], bool] = bool) -> Any:
    """A send_task that hands the message to the broker, then raises as a lost reply does.

    ``fail(n)``: whether the n-th call (from 1) raises after sending.
    """
    from kombu.exceptions import OperationalError as KombuOperationalError

    calls = 0

    def send(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = real(*args, **kwargs)
        if fail(calls):
            raise KombuOperationalError("Error 104 while reading from the broker: reset by peer")
        return result

    return send


def _settled(client: Any, db: psycopg.Connection[Any], expected: Decimal) -> Counter[str]:
    """Wait for the balance, give stray deliveries time to land; the ledger's keys."""
    eventually(lambda: balance(client)["balance"] == expected, timeout=20)
    time.sleep(0.5)
    assert balance(client)["balance"] == expected
    return Counter(row["idempotency_key"] for row in ledger(db))


def test_events_in_doubt_sent_again_with_their_keys_apply_once(
    pipeline, make_producer, client, db, monkeypatch
):
    # The broker takes every message but the producer sees an error, as when the reply to
    # a publish is lost. What each PublishError says is in doubt, sent again, must not
    # double: the events carry the keys they were first sent with.
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    direct = make_producer()
    monkeypatch.setattr(direct._app, "send_task", _taken_then_lost(direct._app.send_task))
    with pytest.raises(PublishError) as consumed:
        direct.consume("u1", ET, 5, UNIT)
    with pytest.raises(PublishError) as reserved:
        direct.reserve("u1", ET, 10, UNIT, ttl_seconds=600)
    many = make_producer(chunk_size=2)
    monkeypatch.setattr(
        many._app, "send_task", _taken_then_lost(many._app.send_task, lambda n: n == 2)
    )
    events = [
        {"op": "consume", "user_id": "u1", "event_type": ET, "amount": n, "unit": UNIT,
         "metadata": {"n": n}, "event_time": datetime.now(UTC) - timedelta(minutes=n)}
        for n in (1, 2, 3, 4, 6)
    ]  # fmt: skip
    with pytest.raises(PublishError) as chunked:
        many.send_many(events)
    # what is in doubt: the call's own event; from the failed chunk on
    (consume,) = consumed.value.events
    assert consume["op"] == "consume" and consume["amount"] == "5" and consume["idempotency_key"]
    (reserve,) = reserved.value.events
    assert reserve["op"] == "reserve" and reserve["reservation_id"]
    assert [e["metadata"] for e in chunked.value.events] == [{"n": 3}, {"n": 4}, {"n": 6}]
    assert chunked.value.events[0]["event_time"] == events[2]["event_time"]

    again = make_producer(results=True)
    handles = again.send_many(
        [*consumed.value.events, *reserved.value.events, *chunked.value.events]
    )
    for handle in handles:
        handle.wait(timeout=20)  # raises if the event was refused
    keys = _settled(client, db, D(100) - 5 - (1 + 2 + 3 + 4 + 6))
    assert keys[consume["idempotency_key"]] == 1
    assert sorted(keys.values()) == [1] * 7  # the grant, 5, and the five of send_many
    holds = db.execute("SELECT reservation_id, amount FROM meter.reservations").fetchall()
    assert holds == [{"reservation_id": reserve["reservation_id"], "amount": D(10)}]
    assert balance(client)["reserved"] == D(10)


def test_an_event_handed_back_by_a_publish_error_keeps_its_call_s_time(
    pipeline, make_producer, client, db, monkeypatch, snapshot
):
    # PublishError.events went back through send_many without the time of the call that
    # first sent them, so a consume resent after a broker outage was dated at the resend
    # (sql 068 dates a producer's undated consume at its call): across a month's end, in
    # the next month and period. The items now carry it as occurred_at.
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    direct = make_producer()
    buffered = make_producer(batch_size=2, linger_ms=60_000)
    many = make_producer()
    for p in (direct, buffered, many):
        monkeypatch.setattr(p._app, "send_task", _refused)
    called = datetime.now(UTC)
    with pytest.raises(PublishError) as single:
        direct.consume("u1", ET, 1, UNIT)
    buffered.allocate("u1", ET, 2, UNIT)
    with pytest.raises(PublishError) as filled:
        buffered.consume("u1", ET, 3, UNIT)
    with pytest.raises(PublishError) as chunk:
        many.send_many([{"op": "consume", "user_id": "u1", "event_type": ET, "amount": 4,
                         "unit": UNIT}])  # fmt: skip
    returned = datetime.now(UTC)
    monkeypatch.undo()
    handed = [*single.value.events, *filled.value.events, *chunk.value.events]
    assert all(called <= e["occurred_at"] <= returned for e in handed)
    buffered.close()  # the buffered allocate goes as it was, dated at its call too
    time.sleep(1.1)  # the resend's own time is clearly later
    again = make_producer(results=True)
    for handle in again.send_many(handed):
        handle.wait(timeout=20)
    eventually(lambda: balance(client)["balance"] == D(100) - 1 + 2 - 3 - 4, timeout=20)
    rows = db.execute(
        "SELECT amount, event_time FROM meter.ledger WHERE idempotency_key <> 'grant'"
    ).fetchall()
    assert sorted(r["amount"] for r in rows) == [-4, -3, -1, 2]
    assert all(called <= r["event_time"] <= returned for r in rows), rows
    # only a consume or allocate has a call time to keep
    before = snapshot()
    with pytest.raises(ValidationError) as refused:
        again.send_many([{"op": "reserve", "user_id": "u1", "event_type": ET, "amount": 1,
                          "unit": UNIT, "occurred_at": called}])  # fmt: skip
    assert refused.value.parameter == "occurred_at"
    time.sleep(0.5)
    assert snapshot() == before


def test_a_buffered_event_in_doubt_is_its_callers_to_send_again(
    pipeline, make_producer, client, db, monkeypatch
):
    # The call that fills the batch sends it; the broker takes it, the reply is lost. The
    # other events stay buffered (sent again by the next flush, with their keys); the
    # call's own event is the PublishError's, for the caller to send again.
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    p = make_producer(batch_size=2, linger_ms=60_000)
    first = p.consume("u1", ET, 1, UNIT)
    real = p._app.send_task
    monkeypatch.setattr(p._app, "send_task", _taken_then_lost(real))
    with pytest.raises(PublishError) as doubt:
        p.consume("u1", ET, 2, UNIT)
    (mine,) = doubt.value.events
    assert mine["amount"] == "2" and mine["idempotency_key"] != first.idempotency_key
    monkeypatch.setattr(p._app, "send_task", real)
    p.flush()  # the first event again
    p.send_many(doubt.value.events)
    keys = _settled(client, db, D(97))
    assert keys == Counter({"grant": 1, first.idempotency_key: 1, mine["idempotency_key"]: 1})


@pytest.mark.parametrize("path", ["release()", "send_many", "close()"])
def test_a_release_sent_again_in_a_new_message_after_it_applied_is_true_only_for_itself(
    pipeline, make_producer, client, db, snapshot, monkeypatch, path
):
    """The broker took a release's message but the producer saw a PublishError (its reply
    lost), and the message applied. The event sent again from the error's ``events`` went
    in a new message keyed by its new task, not by the key the hold recorded, so wait()
    read False for a release that happened. Now each release() call has a key of its own,
    carried by every resend of that event; another release() call of the same hold is
    another request, and reports false (SPEC C: the hold is no longer active)."""
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    client.reserve("u1", ET, 10, UNIT, reservation_id="r-doubt")
    if path == "close()":
        p = make_producer(batch_size=10, linger_ms=60_000, results=True)
        first = p.release("r-doubt")
        monkeypatch.setattr(p._app, "send_task", _taken_then_lost(p._app.send_task))
        with pytest.raises(PublishError) as doubt:
            p.close()
        with pytest.raises(PublishError):  # handed back: the handle's resend path
            first.wait(timeout=5)
    else:
        p = make_producer(results=True)
        monkeypatch.setattr(p._app, "send_task", _taken_then_lost(p._app.send_task))
        with pytest.raises(PublishError) as doubt:
            if path == "release()":
                p.release("r-doubt")
            else:
                p.send_many([{"op": "release", "reservation_id": "r-doubt"}])
    (event,) = doubt.value.events
    assert event["op"] == "release" and event["idempotency_key"]
    eventually(lambda: _release_status(db, "r-doubt") == "released")
    before = snapshot()

    (again,) = make_producer(results=True).send_many(doubt.value.events)
    assert again.idempotency_key == event["idempotency_key"]
    assert again.wait(timeout=15) is True
    by_hand = make_producer(results=True).release("r-doubt", event["idempotency_key"])
    assert by_hand.wait(timeout=15) is True
    other = make_producer(results=True).release("r-doubt")
    assert other.idempotency_key != event["idempotency_key"]
    assert other.wait(timeout=15) is False
    assert snapshot() == before
    assert balance(client)["reserved"] == D(0)


def test_close_that_cannot_send_hands_over_the_buffer(
    pipeline, make_producer, client, db, monkeypatch
):
    # close() drops the buffer when the broker refuses it: the error must carry what the
    # buffer held, so that nothing recorded is lost.

    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    p = make_producer(batch_size=10, linger_ms=60_000)
    handles = [p.consume("u1", ET, n, UNIT) for n in (1, 2)]
    handles.append(p.reserve("u1", ET, 4, UNIT, reservation_id="r-buffered"))
    monkeypatch.setattr(p._app, "send_task", _refused)
    with pytest.raises(PublishError) as dropped:
        p.close()
    held = dropped.value.events
    assert [e.get("idempotency_key", e.get("reservation_id")) for e in held] == [
        h.idempotency_key for h in handles
    ]
    with pytest.raises(MeterConnectionError, match="closed"):
        p.consume("u1", ET, 1, UNIT)
    make_producer().send_many(held)
    keys = _settled(client, db, D(97))
    assert keys == Counter(
        {"grant": 1, handles[0].idempotency_key: 1, handles[1].idempotency_key: 1}
    )
    assert balance(client)["reserved"] == D(4)


def test_a_full_buffer_hands_events_back_and_sends_the_rest_once_the_broker_is_back(
    pipeline, make_producer, client, db, monkeypatch
):
    """Guards the review of the buffer's growth (160 of 200 events held while the broker
    refused): with max_buffered=20 the buffer holds at most 20, every other event comes
    back in a PublishError; once the broker is back, flush() sends the buffered ones, their
    handles answer, and with the handed-back ones sent again each of the 200 events is
    applied exactly once."""
    p = make_producer(batch_size=5, linger_ms=3_600_000, max_buffered=20, results=True)
    held: list[int] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        with p._lock:
            held.append(
                sum(len(b.events) for b in p._unsent) + len(p._batch.events if p._batch else [])
            )
        return _refused()

    monkeypatch.setattr(p._app, "send_task", refused)
    handles, handed = [], []
    for i in range(200):
        try:
            handles.append(p.allocate("u1", ET, 1, UNIT, idempotency_key=f"e{i}"))
        except PublishError as exc:
            handed.extend(exc.events)
    assert held and max(held) <= 20
    assert len(handles) == 20 and len(handed) == 180
    keys = [h.idempotency_key for h in handles] + [e["idempotency_key"] for e in handed]
    assert sorted(keys) == sorted(f"e{i}" for i in range(200))
    monkeypatch.undo()  # the broker is back
    p.flush()
    outcomes = [h.wait(timeout=20) for h in handles]  # raises if an event was refused
    assert sorted(o["balance"] for o in outcomes) == [D(n) for n in range(1, 21)]
    make_producer().send_many(handed)
    p.close()
    applied = _settled(client, db, D(200))
    assert applied == Counter(f"e{i}" for i in range(200))


def store_outcome(
    broker_url: str, task_id: str, balance: str = "-1", *, publish: bool = True
) -> None:
    """Store an applied consume's outcome for ``task_id`` as a worker would (no worker runs
    on the tests' own Redis); ``publish=False``: without telling the subscribers."""
    from celery import Celery

    backend = Celery("results", set_as_current=False)
    backend.conf.update(wire.celery_config(broker_url))
    store = backend.backend
    if not publish:  # Celery's _set writes the key and publishes it in one pipeline
        store._set = lambda key, value, expires=None: store.client.set(key, value)
    outcome = {"ok": True, "status": "applied", "result": {
        "success": True, "balance": balance, "available": balance, "entry_id": 1}}  # fmt: skip
    store.store_result(task_id, outcome, "SUCCESS")


def test_with_results_a_broker_that_stops_answering_ends_the_publish_and_the_wait(tmp_path):
    # With results, Celery subscribes to the result (publish) and reads it (wait) through
    # the result backend's own connections: a paused Redis held both for 20 x 120 s.
    import gc
    import os
    import signal

    from meter.embedded import EmbeddedRedis
    from meter.producer import MeterProducer

    with EmbeddedRedis(tmp_path / "redis") as server:
        running = server._running()
        assert running is not None
        pid = running[0]
        producer = MeterProducer(server.url(), "default", broker_timeout=1, results=True)
        try:
            sent = producer.consume("u1", ET, 1, UNIT, idempotency_key="sent")
            outcomes: dict[str, BaseException] = {}

            def call(name: str, fn: Callable[[], Any]) -> threading.Thread:
                def run() -> None:
                    try:
                        fn()
                    except BaseException as exc:  # checked below
                        outcomes[name] = exc

                thread = threading.Thread(target=run, daemon=True)
                thread.start()
                return thread

            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                calls = [
                    call("wait", lambda: sent.wait(timeout=5)),
                    call("publish", lambda: producer.consume("u1", ET, 2, UNIT)),
                ]
                for thread in calls:
                    thread.join(timeout=60)
                waited = time.monotonic() - started
                assert not any(t.is_alive() for t in calls), f"still waiting after {waited:.0f} s"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert isinstance(outcomes["wait"], MeterConnectionError), outcomes
            assert "the event was sent" in str(outcomes["wait"])
            doubt = outcomes["publish"]
            assert isinstance(doubt, PublishError), outcomes
            assert [e["amount"] for e in doubt.events] == ["2"]

            # Redis answers again: the same producer waits for an outcome, as a worker
            # stores it (here stored by hand: no worker runs on this Redis).
            timer = threading.Timer(0.5, store_outcome, (server.url(), sent.task_id))
            timer.start()
            assert sent.wait(timeout=10)["balance"] == Decimal(-1)
            timer.join()
            print(f"publish and wait gave up within {waited:.1f} s")
            outcomes.clear()  # the failed wait's AsyncResult is unsubscribed when collected:
            gc.collect()  # while Redis is up
        finally:
            producer.close()


def test_a_wait_without_timeout_ends_when_redis_stops_answering_and_finds_a_missed_outcome(
    tmp_path,
):
    # A wait reads its outcome from a subscription. Redis stopping to answer while the wait
    # is under way, or an outcome published while the subscription could not hear it (a
    # connection silently dead), used to leave a wait(timeout=None) waiting for good.
    import gc
    import os
    import signal

    from meter.embedded import EmbeddedRedis
    from meter.producer import MeterProducer

    with EmbeddedRedis(tmp_path / "redis") as server:
        running = server._running()
        assert running is not None
        pid = running[0]
        producer = MeterProducer(server.url(), "default", broker_timeout=1, results=True)
        try:
            # 1. The outcome is stored but its publication is lost: found all the same.
            missed = producer.consume("u1", ET, 1, UNIT, idempotency_key="missed")
            got: dict[str, Any] = {}
            waiter = threading.Thread(
                target=lambda: got.update(result=missed.wait(timeout=None)), daemon=True
            )
            waiter.start()
            time.sleep(0.5)  # the wait is subscribed and reading
            store_outcome(server.url(), missed.task_id, publish=False)
            waiter.join(timeout=30)
            assert not waiter.is_alive(), "a stored outcome was not found within 30 s"
            assert got["result"]["balance"] == Decimal(-1)

            # 2. Redis stops answering while a wait is under way: it ends, saying so.
            sent = producer.consume("u1", ET, 2, UNIT, idempotency_key="sent")
            raised: list[BaseException] = []

            def wait() -> None:
                try:
                    sent.wait(timeout=None)
                except BaseException as exc:  # checked below
                    raised.append(exc)

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            time.sleep(0.5)
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                waiter.join(timeout=60)
                waited = time.monotonic() - started
                assert not waiter.is_alive(), f"still waiting after {waited:.0f} s"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert isinstance(raised[0], MeterConnectionError), raised
            assert "the event was sent" in str(raised[0])
            raised.clear()  # its AsyncResult is unsubscribed when collected: while Redis is up
            gc.collect()
            print(f"a wait under way gave up {waited:.1f} s after Redis stopped answering")
        finally:
            producer.close()


def test_a_wait_keeps_to_its_timeout_and_rides_out_a_restart_between_its_reads(
    tmp_path, monkeypatch
):
    # A wait re-reads its stored outcome every 5 s (above). That read must neither carry a
    # wait past its own timeout when Redis stops answering, nor end a wait because Redis
    # was restarting at that moment: the subscription rides such a restart out.
    import gc
    import os
    import signal

    from celery.result import AsyncResult

    from meter.embedded import EmbeddedRedis, free_port
    from meter.producer import MeterProducer

    port = free_port()
    servers = [EmbeddedRedis(tmp_path / "redis", port=port).start()]
    try:
        url = servers[0].url()
        # 1. Redis stops answering 2 s into wait(timeout=6): TimeoutError at 6 s, not after
        #    one more read of broker_timeout (10 s).
        patient = MeterProducer(url, "default", broker_timeout=10, results=True)
        try:
            handle = patient.consume("u1", ET, 1, UNIT, idempotency_key="patient")
            running = servers[0]._running()
            assert running is not None
            threading.Timer(2.0, os.kill, (running[0], signal.SIGSTOP)).start()
            started = time.monotonic()
            try:
                with pytest.raises(TimeoutError) as timed_out:
                    handle.wait(timeout=6)
                waited = time.monotonic() - started
            finally:
                time.sleep(0.1)
                os.kill(running[0], signal.SIGCONT)
            assert waited < 7.5, f"wait(timeout=6) ended after {waited:.1f} s"
            del timed_out
        finally:
            patient.close()
        # Celery unsubscribes a result waited for in vain when the result, or the closed
        # producer's app that keeps it, is collected: now, while Redis answers, not in the
        # restart below or after the server stopped (it would retry, then warn)
        del patient
        gc.collect()

        # 2. Redis is down for 1 s just as the wait's second read starts: ridden out.
        producer = MeterProducer(url, "default", broker_timeout=1, results=True)
        try:
            handle = producer.consume("u1", ET, 1, UNIT, idempotency_key="restart")
            reads: list[float] = []
            get = AsyncResult.get

            def restart_at_the_second_read(self: AsyncResult, *args: Any, **kw: Any) -> Any:
                reads.append(time.monotonic())
                if len(reads) == 2:
                    servers[0].stop()

                    def start() -> None:
                        time.sleep(1.0)
                        servers[0] = EmbeddedRedis(tmp_path / "redis", port=port).start()

                    threading.Thread(target=start, daemon=True).start()
                return get(self, *args, **kw)

            monkeypatch.setattr(AsyncResult, "get", restart_at_the_second_read)

            timer = threading.Timer(8.0, store_outcome, (url, handle.task_id))
            timer.start()
            assert handle.wait(timeout=30)["balance"] == Decimal(-1)
            timer.join()
            assert len(reads) >= 2
        finally:
            producer.close()
        del producer
        gc.collect()
    finally:
        servers[0].stop()


def test_a_wait_that_timed_out_waits_again_and_spoils_no_other_wait(tmp_path):
    # A wait that ends without its outcome leaves Celery's bookkeeping of waiters as Celery
    # keeps it: the outcome arriving later is read by the next wait for the task, and does
    # not disturb a wait for another task that is reading the subscription meanwhile.

    from meter.embedded import EmbeddedRedis
    from meter.producer import MeterProducer

    with EmbeddedRedis(tmp_path / "redis") as server:
        producer = MeterProducer(server.url(), "default", broker_timeout=1, results=True)
        try:
            first = producer.consume("u1", ET, 1, UNIT, idempotency_key="first")
            other = producer.consume("u1", ET, 2, UNIT, idempotency_key="other")
            with pytest.raises(TimeoutError):
                first.wait(timeout=0.5)
            for delay, handle, balance in ((1.0, first, "-1"), (2.0, other, "-3")):
                threading.Timer(
                    delay, store_outcome, (server.url(), handle.task_id, balance)
                ).start()
            assert other.wait(timeout=10)["balance"] == Decimal(-3)
            assert first.wait(timeout=10)["balance"] == Decimal(-1)
        finally:
            producer.close()


def test_a_broker_that_stops_answering_leaves_the_publish_in_doubt(tmp_path):
    # A paused Redis keeps its connections open: without a socket timeout the publish
    # would wait for good. It must give up with the event and its key, and whatever the
    # broker took meanwhile carries that key.
    import base64
    import os
    import signal

    from meter.embedded import EmbeddedRedis
    from meter.producer import MeterProducer

    with EmbeddedRedis(tmp_path / "redis") as server:
        running = server._running()
        assert running is not None
        pid = running[0]
        producer = MeterProducer(server.url(), "default", broker_timeout=1)
        try:
            producer.consume("u1", ET, 1, UNIT, idempotency_key="before")
            outcome: list[BaseException] = []

            def publish() -> None:
                try:
                    producer.consume("u1", ET, 2, UNIT)
                except BaseException as exc:  # checked below
                    outcome.append(exc)

            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                call = threading.Thread(target=publish, daemon=True)
                call.start()
                call.join(timeout=30)
                waited = time.monotonic() - started
                assert not call.is_alive(), f"the publish still waits after {waited:.0f} s"
            finally:
                os.kill(pid, signal.SIGCONT)
            assert waited >= 1
            (doubt,) = outcome
            assert isinstance(doubt, PublishError), doubt
            (event,) = doubt.events
            assert event["amount"] == "2"
            client = redis.Redis.from_url(server.url())
            try:
                messages = [json.loads(m) for m in client.lrange(wire.QUEUE, 0, -1)]
            finally:
                client.close()
            keys = {  # each body's first argument: the event's JSON text
                json.loads(json.loads(base64.b64decode(m["body"]))[0][0])["args"]["idempotency_key"]
                for m in messages
            }
            assert "before" in keys and keys <= {"before", event["idempotency_key"]}, keys
            print(f"gave up after {waited:.1f} s; {len(messages)} messages in the queue")
        finally:
            producer.close()


# ------------------------------------------------ a review of the producer's fixes


class _LateLock:
    """The producer's send lock, acquired late by one named thread: the scheduler running
    that thread a little later, nothing else changes."""

    def __init__(self, lock: Any, late_thread: str, delay: float) -> None:
        self._lock, self._late, self._delay = lock, late_thread, delay

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        if threading.current_thread().name == self._late:
            time.sleep(self._delay)
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()


@pytest.mark.timeout(60)
def test_wait_on_a_batch_mate_while_its_filler_is_about_to_send_is_no_false_publish_error(
    make_producer, broker_url
):
    """wait() for an event whose batch another call has just filled and is about to send
    waits for that call: it raised 'the event was never sent' (PublishError, handing the
    event back to be sent again), as flush() sees only batches in the buffer or under the
    send lock and the filler was between the two; the event was then sent all the same."""
    p = make_producer(batch_size=2, linger_ms=3_600_000, results=True)
    p._send_lock = _LateLock(p._send_lock, "filler", 0.5)
    h1 = p.consume("u1", ET, 1, UNIT, idempotency_key="mate")
    filler = threading.Thread(
        target=lambda: p.consume("u1", ET, 1, UNIT, idempotency_key="filler"), name="filler"
    )
    filler.start()
    time.sleep(0.1)  # the filler took the full batch out of the buffer; not sent yet
    raised: BaseException | None = None
    try:
        h1.wait(timeout=2)
    except BaseException as exc:  # checked below
        raised = exc
    filler.join(timeout=10)
    assert queue_length(broker_url) == 1  # the batch, with h1's event, was sent
    assert not isinstance(raised, PublishError), f"false 'never sent': {raised}"
    assert isinstance(raised, TimeoutError)  # no worker: the outcome simply is not there yet


def test_a_keyed_reserve_made_through_the_sdk_replays_through_the_producer(
    pipeline, make_producer, client, db
):
    """The same reserve under the same key through MeterClient, then through the producer,
    replays (SPEC 3.1): both derive the id from the namespace and the key. The database drew
    the SDK's id, and the request's fingerprint covers it: an IdempotencyConflictError and
    a dead letter."""
    client.allocate("u1", ET, 100, UNIT)
    first = client.reserve("u1", ET, 5, UNIT, idempotency_key="shared-key")
    p = make_producer(results=True)
    again = p.reserve("u1", ET, 5, UNIT, idempotency_key="shared-key")
    outcome = again.wait(timeout=20)  # raises IdempotencyConflictError on the code reviewed
    assert outcome["granted"] and outcome["reservation_id"] == first["reservation_id"]
    assert again.reservation_id == first["reservation_id"]  # commit/release by the handle
    assert dead_letters(db) == []


def _nested(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return root


@pytest.mark.timeout(120)
def test_the_deepest_metadata_the_producer_takes_is_sent_and_applied_with_its_batch(
    pipeline, make_producer, db
):
    """Review P3 #2: the producer took metadata as deep as its own check could write, from
    the caller's stack, but the message nests it 3 levels deeper ([event {args {...}}]) and
    is written a few frames further down: the call that filled the batch raised a bare
    RecursionError (no ``exc.events``: its good event dropped, in no buffer), and a flush
    would fail the same way every time. What the producer takes now travels."""
    from meter.errors import ValidationError as VE

    producer = make_producer(batch_size=2, linger_ms=60_000)

    def takes(depth: int) -> None:  # called from here, as consume() calls it
        producer._consume_args("u1", ET, 1, UNIT, metadata=_nested(depth))

    lo, hi = 1, 3000  # the deepest metadata the producer takes, from this very stack
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            takes(mid)
            lo = mid
        except VE:
            hi = mid - 1
    producer.consume("u1", ET, 1, UNIT, idempotency_key="deep", metadata=_nested(lo))
    producer.consume("u1", ET, 2, UNIT, idempotency_key="good")  # fills the batch: sends it
    rows = eventually(lambda: (r := ledger(db)) and len(r) == 2 and r, timeout=60)
    assert sorted(r["idempotency_key"] for r in rows) == ["deep", "good"]
    assert dead_letters(db) == []


def test_metadata_deeper_than_the_producer_takes_is_refused_and_sends_nothing(
    pipeline, make_producer, db
):
    """A refusal changes nothing: the call raises ValidationError naming metadata, its event
    is in no buffer and no message, and the buffer's other events go on as they were."""
    from meter.errors import ValidationError as VE
    from meter.producer import MAX_METADATA_DEPTH

    producer = make_producer(batch_size=2, linger_ms=60_000)
    producer.consume("u1", ET, 1, UNIT, idempotency_key="before")  # buffered
    with pytest.raises(VE) as exc:
        producer.consume(
            "u1", ET, 5, UNIT, idempotency_key="deep", metadata=_nested(MAX_METADATA_DEPTH + 1)
        )
    assert exc.value.parameter == "metadata"
    producer.consume("u1", ET, 2, UNIT, idempotency_key="after")  # fills the batch: sends it
    rows = eventually(lambda: (r := ledger(db)) and len(r) == 2 and r, timeout=60)
    assert sorted(r["idempotency_key"] for r in rows) == ["after", "before"]
    assert dead_letters(db) == []


@pytest.mark.timeout(120)
def test_a_commit_with_the_deepest_metadata_the_producer_takes_waits_for_its_reserve(
    pipeline, make_producer, client, db
):
    """Review C2: a commit sent before its reserve goes on in a task of its own, and the
    worker first looked for kombu's type markers in it with a recursive walk, which ran out
    of stack past some 450 levels: the batch was delivered three times, split, and the
    commit (metadata the producer had taken, 800 levels) dead-lettered with MT001, never
    applied."""
    from meter.producer import MAX_METADATA_DEPTH

    client.allocate("u1", ET, 10, UNIT)
    p = make_producer(results=True)
    meta = _nested(MAX_METADATA_DEPTH)
    (commit,) = p.send_many(
        [{"op": "commit", "reservation_id": "r-deep", "actual_amount": 2, "metadata": meta}]
    )
    time.sleep(0.3)  # the batch has run: the commit waits in a task of its own
    p.reserve("u1", ET, 5, UNIT, reservation_id="r-deep").wait(timeout=20)
    assert commit.wait(timeout=30)["status"] == "committed"
    assert balance(client)["balance"] == D(8)
    assert dead_letters(db) == []


def _queued_keys(broker_url: str) -> list[str]:
    import base64

    client = redis.Redis.from_url(broker_url)
    try:
        messages = [json.loads(m) for m in client.lrange(wire.QUEUE, 0, -1)]
    finally:
        client.close()
    keys = []
    for message in messages:  # each body's first argument: the events' JSON text
        payload = json.loads(json.loads(base64.b64decode(message["body"]))[0][0])
        keys += [
            e["args"]["idempotency_key"]
            for e in (payload if isinstance(payload, list) else [payload])
        ]
    return sorted(keys)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("buffered", [False, True])
def test_a_broker_slower_than_the_timeout_while_the_queue_is_declared_is_ridden_out(
    make_producer, broker_url, buffered
):
    """Review P3 #3: Redis not answering writes for longer than ``broker_timeout`` while a
    publish declared its queue (a producer's first publish, or the first after a lost
    connection) made kombu's declare retry collect the connection, closing the channel
    the publish then used: AttributeError, no retry, no PublishError; a buffered close()
    raised it with its buffer neither sent nor handed back (lost). The closed channel now
    raises a connection error, so the publish's own retry sends on a new one."""
    options = {"batch_size": 10, "linger_ms": 60_000} if buffered else {}
    producer = make_producer(broker_timeout=1, **options)  # its first publish declares
    if buffered:
        producer.consume("u1", ET, 1, UNIT, idempotency_key="k1")
    client = redis.Redis.from_url(broker_url)
    try:
        client.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        try:
            if buffered:
                producer.consume("u1", ET, 1, UNIT, idempotency_key="k2")
                producer.close()
            else:
                producer.consume("u1", ET, 1, UNIT, idempotency_key="k1")
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
    finally:
        client.close()
    assert _queued_keys(broker_url) == (["k1", "k2"] if buffered else ["k1"])


def _nested_text(depth: int) -> str:
    """JSON text of an object nested ``depth`` levels, built without recursion."""
    return '{"k":' * depth + "{}" + "}" * depth


# Deeper than json.dumps writes on any worker's stack (it ran out near 900 levels in a
# prefork pool process), and than the producer takes; apply_events takes it (jsonb nests
# as deep as PostgreSQL's stack allows).
_DEEPER: Final = 3000


@pytest.mark.timeout(120)
def test_a_deferred_commit_nested_deeper_than_json_writes_waits_for_its_reserve(
    pipeline, client, db
):
    """Review B3: a batch's commit sent before its reserve goes on in a task of its own,
    whose text the worker wrote with json.dumps (or meter.types.dumps), both recursive: past
    some 900 levels the hand-over raised RecursionError, the batch was delivered again until
    it was split, and the commit was dead-lettered as "unstorable" (its ascii() text, which
    its late reserve does not settle and no retry applies): the commit was lost."""
    client.allocate("u1", ET, 10, UNIT)
    text = (
        '[{"op":"commit","namespace":"default","args":{"reservation_id":"r-deeper",'
        f'"actual_amount":"2","metadata":{_nested_text(_DEEPER)}}}}}]'
    )
    (outcome,) = send_raw(pipeline, wire.APPLY_BATCH, text).get(timeout=60)
    assert outcome["status"] == "deferred", outcome
    client.reserve("u1", ET, 5, UNIT, reservation_id="r-deeper")
    eventually(
        lambda: (
            db.execute(
                "SELECT status FROM meter.reservations WHERE reservation_id = 'r-deeper'"
            ).fetchone()["status"]
            == "committed"
        ),
        timeout=30,
    )
    assert balance(client) == {"balance": D(8), "reserved": D(0), "available": D(8)}
    assert dead_letters(db) == []
    assert client.reconcile() == []


@pytest.mark.timeout(120)
def test_a_split_batch_applies_an_event_nested_deeper_than_json_writes(pipeline, client, db):
    """Review B3: a batch split (here for a NUL escape, which jsonb refuses whole) sends
    each event as a task of its own; one nested deeper than json.dumps writes raised
    RecursionError there and was dead-lettered as "unstorable", never applied."""
    events = (
        '[{"op":"allocate","namespace":"default","args":{"user_id":"u1",'
        f'"event_type":"{ET}","amount":"4","unit":"{UNIT}","idempotency_key":"deep",'
        f'"metadata":{_nested_text(_DEEPER)}}}}},'
        '{"op":"allocate","namespace":"default","args":{"user_id":"u1",'
        f'"event_type":"{ET}","amount":"1","unit":"{UNIT}","idempotency_key":"nul",'
        '"metadata":{"x":"a\\u0000b"}}}]'
    )
    outcomes = send_raw(pipeline, wire.APPLY_BATCH, events).get(timeout=60)
    assert [o["status"] for o in outcomes] == ["deferred", "deferred"], outcomes
    eventually(lambda: balance(client)["balance"] == D(4) and len(dead_letters(db)) == 1)
    (letter,) = dead_letters(db)
    assert "'nul'" in letter["payload"]["unstorable"]
    keys = db.execute("SELECT idempotency_key FROM meter.ledger").fetchall()
    assert keys == [{"idempotency_key": "deep"}]  # (its metadata too deep for this test's reader)


def test_wait_on_a_buffered_event_whose_batch_went_again_without_its_filler(
    pipeline, make_producer, client, db, monkeypatch
):
    """The call that fills a batch sends it; the broker takes it, the reply is lost: its own
    event goes in the PublishError, its batch-mates stay buffered and go again in the same
    batch (same task id) without it. The first message applied and its outcome is the one
    stored under the task id, echoing the digest of the first message's text, not of the
    resent one: wait() on a batch-mate raised MeterError ("another message's") for an
    event applied once, as it should be. Each digest the batch was published with is the
    batch's own."""
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    p = make_producer(batch_size=2, linger_ms=60_000, results=True)
    first = p.consume("u1", ET, 1, UNIT)
    real = p._app.send_task
    monkeypatch.setattr(p._app, "send_task", _taken_then_lost(real))
    with pytest.raises(PublishError) as doubt:
        p.consume("u1", ET, 2, UNIT)
    eventually(lambda: balance(client)["balance"] == D(97))  # the first message applied
    monkeypatch.setattr(p._app, "send_task", real)
    p.flush()  # the batch-mate again, alone, under the same task id
    outcome = first.wait(timeout=15)
    assert outcome["success"] is True and outcome["balance"] in (D(97), D(99))
    (again,) = make_producer(results=True).send_many(doubt.value.events)
    assert again.wait(timeout=15)["success"] is True
    keys = _settled(client, db, D(97))
    assert keys == Counter({"grant": 1, first.idempotency_key: 1, again.idempotency_key: 1})
