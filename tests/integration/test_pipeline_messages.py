"""Messages the worker cannot even call its task with: never acknowledged unrecorded.

Each of these was acknowledged and dropped, with neither an effect nor a dead letter
(found by a worker review): Celery calls the task function with the message's arguments
as they are, and the ``TypeError`` of a call that does not match the signature failed the
task, which ``task_acks_on_failure`` acknowledges.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis

from meter import wire
from tests.integration.test_pipeline import ET, UNIT, dead_letters, eventually
from worker.transport import TAKE

EVENT = {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "idempotency_key": "k1"}}  # fmt: skip


def _effects(db: psycopg.Connection[Any]) -> list[Any]:
    return [
        db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone(),
        db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone(),
        db.execute("SELECT count(*) AS n FROM meter.reservations").fetchone(),
    ]


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("meter.allocate", (EVENT,), {"trace": "x"}),
        ("meter.allocate", (), {}),
        ("meter.consume", (EVENT, None, None, None, "extra"), {}),
        ("meter.apply_batch", ([EVENT],), {"bogus": 1}),
    ],
    ids=["unknown-kwarg", "no-event", "extra-positional", "batch-unknown-kwarg"],
)
def test_a_message_whose_arguments_do_not_fit_its_task_is_a_dead_letter(
    pipeline, db, name, args, kwargs
):
    before = _effects(db)
    task_id = str(uuid.uuid4())
    pipeline.send_task(name, args=args, kwargs=kwargs, task_id=task_id, ignore_result=False)
    outcome = pipeline.AsyncResult(task_id).get(timeout=30)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MT001"
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"], row["source"]) == (
        "",
        name.removeprefix("meter."),
        "MT001",
        task_id,
    )
    assert row["payload"] == {"args": list(args), "kwargs": kwargs}
    assert "arguments" in row["error_message"]
    assert _effects(db) == before  # nothing applied


def _raw(app: Any, broker_url: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> str:
    """Put a message for task ``name`` on Meter's queue, changed by ``mutate`` first."""
    task_id = str(uuid.uuid4())
    app.send_task(
        name, args=(json.dumps(EVENT),), task_id=task_id, queue="staging", ignore_result=False
    )
    client = redis.Redis.from_url(broker_url)
    try:
        payload = json.loads(client.rpop("staging"))
        payload["properties"]["delivery_info"].update(exchange=wire.QUEUE, routing_key=wire.QUEUE)
        mutate(payload)
        client.lpush(wire.QUEUE, json.dumps(payload))
    finally:
        client.close()
    return task_id


def _bad_body(payload: dict[str, Any]) -> None:
    payload["body"] = base64.b64encode(b"{not json").decode()


def _pickle(payload: dict[str, Any]) -> None:
    payload["content-type"] = "application/x-python-serialize"


def _bad_eta(payload: dict[str, Any]) -> None:
    payload["headers"]["eta"] = "garbage"


def _no_task_header(payload: dict[str, Any]) -> None:
    del payload["headers"]["task"]


@pytest.mark.parametrize(
    ("name", "mutate", "reason"),
    [
        ("meter.frobnicate", lambda _: None, "no task 'meter.frobnicate'"),
        ("meter.allocate", _bad_body, "cannot decode"),
        ("meter.allocate", _pickle, "invalid task message"),
        ("meter.allocate", _bad_eta, "invalid task message"),
        ("meter.allocate", _no_task_header, "not a task message"),
    ],
    ids=["unknown-task", "body-not-json", "content-type-refused", "bad-eta", "no-task-header"],
)
def test_a_message_celery_cannot_run_is_a_dead_letter_not_dropped(
    pipeline, db, broker_url, name, mutate, reason
):
    # Each was logged and acknowledged (or rejected) by Celery's consumer, and lost.
    before = _effects(db)
    task_id = _raw(pipeline, broker_url, name, mutate)
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
    assert reason in row["error_message"] and reason in row["payload"]["reason"]
    if mutate is not _no_task_header:
        assert row["source"].startswith(f"{task_id}/unreadable/")
    assert row["payload"]["body"]  # the message as received, for the operators
    client = redis.Redis.from_url(broker_url)
    try:
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
    assert _effects(db) == before  # nothing applied
    assert len(dead_letters(db)) == 1


def test_a_caller_waiting_on_a_task_this_worker_lacks_gets_its_dead_letter(pipeline, db):
    task_id = str(uuid.uuid4())
    pipeline.send_task("meter.frobnicate", args=(EVENT,), task_id=task_id, ignore_result=False)
    outcome = pipeline.AsyncResult(task_id).get(timeout=30)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MT001"
    (row,) = dead_letters(db)
    assert row["dead_letter_id"] == outcome["dead_letter_id"]


@pytest.mark.parametrize(
    "item",
    [
        "not json",
        "[1, 2]",
        '{"properties": {"delivery_tag": "t-1"}, "x": {"__type__": "bogus", "__value__": 1}}',
        '{"body": "x", "properties": {"delivery_tag": "t-2", "body_encoding": "rot13"}}',
        '{"body": "x"}',
    ],
    ids=["not-json", "array", "kombu-type-marker", "unknown-body-encoding", "no-properties"],
)
def test_a_queue_item_that_is_no_kombu_message_neither_stops_the_worker_nor_vanishes(
    pipeline, db, broker_url, item
):
    # Such an item raised out of the transport's read: Celery stopped the worker
    # ("Unrecoverable error"), the item lost, the messages behind it left unconsumed.
    client = redis.Redis.from_url(broker_url)
    try:
        client.lpush(wire.QUEUE, item)
        (row,) = eventually(lambda: dead_letters(db), timeout=30)
        assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
        assert row["payload"]["body"] == item
        assert "cannot decode" in row["error_message"]
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
    # the worker still runs: a message behind it applies
    task_id = str(uuid.uuid4())
    pipeline.send_task("meter.allocate", args=(EVENT,), task_id=task_id, ignore_result=False)
    assert pipeline.AsyncResult(task_id).get(timeout=30)["status"] == "applied"
    assert len(dead_letters(db)) == 1


def test_a_record_kombu_cannot_read_does_not_keep_a_dead_consumers_messages_from_coming_back(
    pipeline, db, broker_url
):
    # A dead consumer held two messages: one TAKE recorded verbatim (its Lua JSON read it)
    # though kombu's JSON refuses it (a crafted type marker), and a real one. Each sweep
    # raised at the first ("Error in timer", every second), so whichever came after it was
    # never put back: the real message stayed in `unacked` for good.
    client = redis.Redis.from_url(broker_url)
    try:
        task_id = str(uuid.uuid4())
        pipeline.send_task(
            "meter.allocate", args=(EVENT,), task_id=task_id, queue="staging", ignore_result=False
        )
        real = json.loads(client.rpop("staging"))
        real["properties"]["delivery_info"].update(exchange=wire.QUEUE, routing_key=wire.QUEUE)
        bad = (
            '{"properties": {"delivery_tag": "0-bad", "delivery_info": {"exchange": "meter",'
            ' "routing_key": "meter"}}, "x": {"__type__": "bogus", "__value__": 1}}'
        )
        records = {"0-bad": bad, real["properties"]["delivery_tag"]: json.dumps(real)}
        for tag, item in records.items():
            client.hset("unacked", tag, f'[{item},"{wire.QUEUE}","{wire.QUEUE}"]')
            client.hset("unacked_owner", tag, "a-dead-consumer")
            client.zadd("unacked_index", {tag: time.time() - 100})
        assert pipeline.AsyncResult(task_id).get(timeout=30)["status"] == "applied"
        (row,) = eventually(lambda: dead_letters(db), timeout=30)
        assert (row["op"], row["namespace"]) == ("unreadable", "")
        assert json.loads(row["payload"]["body"])["x"] == {"__type__": "bogus", "__value__": 1}
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()


def _body(text: str) -> Callable[[dict[str, Any]], None]:
    def mutate(payload: dict[str, Any]) -> None:
        payload["body"] = base64.b64encode(text.encode()).decode()

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["headers"].update(task=["meter.allocate"]),
        _body('"x"'),
        _body("5"),
        _body('[["{}"], {}, "embed"]'),
        _body('[[], "kw", {}]'),
        _body("[null, {}, {}]"),
        lambda p: p["headers"].update(id=[1]),
        lambda p: p["headers"].update(timelimit="x"),
        lambda p: p["headers"].update(stamped_headers=5),
        lambda p: p["properties"].update(delivery_info="x"),
    ],
    ids=[
        "task-list",
        "body-text",
        "body-number",
        "embed-text",
        "kwargs-text",
        "args-null",
        "id-list",
        "timelimit-text",
        "stamped-headers-number",
        "delivery-info-text",
    ],
)
def test_a_message_of_the_wrong_shape_neither_stops_the_worker_nor_vanishes(
    pipeline, db, broker_url, mutate
):
    # Each raised out of Celery's handler: "Unrecoverable error", the worker stopped, the
    # message put back for the next worker to stop on, and nothing behind it consumed.
    before = _effects(db)
    _raw(pipeline, broker_url, "meter.allocate", mutate)
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
    assert _effects(db) == before
    client = redis.Redis.from_url(broker_url)
    try:
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
    event = {**EVENT, "args": {**EVENT["args"], "idempotency_key": "k2"}}
    task_id = str(uuid.uuid4())
    pipeline.send_task("meter.allocate", args=(event,), task_id=task_id, ignore_result=False)
    assert pipeline.AsyncResult(task_id).get(timeout=30)["status"] == "applied"
    assert len(dead_letters(db)) == 1


def test_a_redelivered_message_on_a_broker_url_redis_py_cannot_open_still_applies(
    pipeline, db, broker_url
):
    # The delivery counter opens its own redis-py client on the broker URL; for a URL
    # redis-py cannot open (sentinel://, which keeps kombu's own transport) that raised
    # ValueError before the task ran: the task failed, was acked, and the event was lost.
    task_id = str(uuid.uuid4())
    pipeline.send_task(
        "meter.allocate", args=(EVENT,), task_id=task_id, queue="staging", ignore_result=False
    )
    real = pipeline.conf.broker_url
    client = redis.Redis.from_url(broker_url)
    try:
        payload = json.loads(client.rpop("staging"))
        payload["headers"]["redelivered"] = True  # as kombu puts a message back
        info = payload["properties"]["delivery_info"]
        info.update(redelivered=True, exchange=wire.QUEUE, routing_key=wire.QUEUE)
        pipeline.conf.broker_url = "sentinel://127.0.0.1:1"  # read by the counter only
        client.lpush(wire.QUEUE, json.dumps(payload))
        outcome = pipeline.AsyncResult(task_id).get(timeout=30)
    finally:
        pipeline.conf.broker_url = real
        client.close()
    assert outcome["status"] == "applied"
    assert dead_letters(db) == []


@pytest.mark.parametrize("name", ["meter.allocate", "meter.apply_batch"])
def test_an_event_message_past_its_expires_header_still_applies(pipeline, db, name):
    # Meter's producer never sets `expires`; a message that carried one in the past (any
    # other Celery client, a crafted header) was revoked by the worker, acknowledged and
    # dropped: no effect, no dead letter.
    task_id = str(uuid.uuid4())
    arg: Any = EVENT if name == "meter.allocate" else [EVENT]
    pipeline.send_task(
        name,
        args=(arg,),
        task_id=task_id,
        expires=datetime.now(UTC) - timedelta(seconds=5),
        ignore_result=False,
    )
    outcome = pipeline.AsyncResult(task_id).get(timeout=30)
    first = outcome[0] if isinstance(outcome, list) else outcome
    assert first["status"] == "applied"
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 1


def test_a_message_claiming_an_exchange_that_routes_nowhere_comes_back_when_its_holder_dies(
    pipeline, db, broker_url
):
    client = redis.Redis.from_url(broker_url)
    try:
        task_id = str(uuid.uuid4())
        pipeline.send_task(
            "meter.allocate", args=(EVENT,), task_id=task_id, queue="staging", ignore_result=False
        )
        message = json.loads(client.rpop("staging"))
        message["properties"]["delivery_info"].update(exchange="nowhere", routing_key="nowhere")
        tag = message["properties"]["delivery_tag"]
        # as TAKE records it, held by a consumer that died: routed by the exchange the
        # message claims, the restore deleted the record and pushed nothing (found by a
        # worker review)
        # (taken from a side list, as if from Meter's queue: the worker would race for it)
        client.lpush("side", json.dumps(message))
        keys = ["unacked", "unacked_index", "unacked_owner", "unacked_consumers", "side"]
        taken = client.eval(TAKE.text, len(keys), *keys, "a-dead-consumer", "1", wire.QUEUE)
        assert taken[2].decode() == tag
        client.zadd("unacked_consumers", {"a-dead-consumer": time.time() - 100})
        eventually(lambda: _effects(db)[0]["n"] == 1, timeout=15)
    finally:
        client.close()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["properties"].update(delivery_info="x"),
        lambda p: p.update(headers=[1]),
    ],
    ids=["delivery-info-text", "headers-list"],
)
def test_a_message_of_the_wrong_shape_held_by_a_dead_consumer_comes_back_as_a_dead_letter(
    pipeline, db, broker_url, mutate
):
    # Restoring it set kombu's `redelivered` flag in a `headers` or `delivery_info` that is
    # no object: TypeError, which kombu logs ("Could not restore message") while the
    # restore transaction still deletes the record: gone, without a dead letter.
    client = redis.Redis.from_url(broker_url)
    try:
        task_id = str(uuid.uuid4())
        pipeline.send_task(
            "meter.allocate", args=(EVENT,), task_id=task_id, queue="staging", ignore_result=False
        )
        message = json.loads(client.rpop("staging"))
        mutate(message)
        client.lpush("side", json.dumps(message))
        keys = ["unacked", "unacked_index", "unacked_owner", "unacked_consumers", "side"]
        taken = client.eval(TAKE.text, len(keys), *keys, "a-dead-consumer", "1", wire.QUEUE)
        assert taken[2].decode() == message["properties"]["delivery_tag"]
        client.zadd("unacked_consumers", {"a-dead-consumer": time.time() - 100})
        (row,) = eventually(lambda: dead_letters(db), timeout=30)
        assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
    assert _effects(db)[0]["n"] == 0


def _embed(embed: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(payload: dict[str, Any]) -> None:
        args, kwargs, _ = json.loads(base64.b64decode(payload["body"]))
        payload["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()

    return mutate


@pytest.mark.parametrize(
    "embed",
    [{"delivery_info": "x"}, {"callbacks": None, "args": 5, "delivery_info": [1]}],
    ids=["delivery-info-text", "args-and-delivery-info"],
)
def test_a_body_whose_embed_breaks_the_trace_is_a_dead_letter_not_lost(
    pipeline, db, broker_url, embed
):
    before = _effects(db)
    task_id = _raw(pipeline, broker_url, "meter.allocate", _embed(embed))
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
    assert row["source"].startswith(f"{task_id}/unreadable/")
    assert _effects(db) == before


def test_a_message_whose_id_no_redis_key_can_hold_is_handed_over_not_requeued_forever(
    pipeline, db, broker_url
):
    # The hand-over kept the message's task id, and a caller waiting for the result made
    # Celery subscribe to the result key of that id: a lone surrogate cannot be encoded,
    # send_task raised, and the message was requeued, then handed over again: thousands of
    # times a second, forever, and never filed.
    def mutate(payload: dict[str, Any]) -> None:
        payload["headers"]["id"] = "\ud800-x"

    _raw(pipeline, broker_url, "meter.frobnicate", mutate)
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"]) == ("", "unreadable", "MT001")
    client = redis.Redis.from_url(broker_url)
    try:
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0)
    finally:
        client.close()
    assert len(dead_letters(db)) == 1


@pytest.mark.parametrize(
    "info",
    [{"exchange": "nowhere", "routing_key": "nowhere"}, {"exchange": "", "routing_key": "else"}],
    ids=["exchange-routing-nowhere", "another-queue"],
)
def test_a_retry_goes_back_to_meters_queue_whatever_exchange_the_message_claims(
    pipeline, db, broker_url, info
):
    # A retry is published by the exchange and routing key the message's delivery_info
    # claims (Celery's signature_from_request): an exchange that routes nowhere dropped it,
    # and another queue left it where no worker takes it. A commit waiting for its reserve
    # retries: the event was never applied, nor filed.
    commit = {"op": "commit", "namespace": "default",
              "args": {"reservation_id": "r-missing", "actual_amount": "1"}}  # fmt: skip
    task_id = str(uuid.uuid4())
    pipeline.send_task("meter.commit", args=(commit,), task_id=task_id, queue="staging")
    client = redis.Redis.from_url(broker_url)
    try:
        payload = json.loads(client.rpop("staging"))
        payload["properties"]["delivery_info"].update(info)
        client.lpush(wire.QUEUE, json.dumps(payload))
        (row,) = eventually(lambda: dead_letters(db), timeout=30)
        assert (row["op"], row["error_sqlstate"], row["source"]) == ("commit", "MT003", task_id)
        assert client.llen("else") == 0
    finally:
        client.close()


def test_two_unreadable_messages_under_one_task_id_are_two_dead_letters(pipeline, db, broker_url):
    # The dead letter of an unreadable message had its task id as source, and a dead letter
    # recorded again under the same source only counts an attempt: a second message
    # reusing the id (crafted, or a task of a newer release retried under its id) was
    # never stored, its body lost; a crafted one could so bury any operator's dead letter.
    task_id = str(uuid.uuid4())
    for body in ("first", "second"):

        def mutate(payload: dict[str, Any], body: str = body) -> None:
            payload["headers"]["id"] = task_id
            payload["body"] = base64.b64encode(json.dumps([[body], {}, None]).encode()).decode()

        _raw(pipeline, broker_url, "meter.frobnicate", mutate)
    rows = eventually(lambda: len(dead_letters(db)) == 2 and dead_letters(db), timeout=15)
    assert sorted(json.loads(row["payload"]["body"])[0][0] for row in rows) == ["first", "second"]
    assert all(row["source"].startswith(task_id) for row in rows)


# Amounts as JSON numbers with more significant digits than a binary float holds (17 and
# up): 032 takes JSON numbers, but kombu's JSON decoded an event object's numbers as
# floats, and the worker applied what the float kept (the 19-digit amount came out as
# 12345678901234567000, the 18-digit ones as 1000000000000000 and 123456.123456789).
_EXACT_AMOUNTS = ["12345678901234567890.5", "1000000000000000.01", "123456.123456789012"]


def _object_body(events: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation for :func:`_raw`: the body becomes ``[[events], {}, embed]`` with each
    ``"@amount@"`` string replaced by its number written out, never through a float."""

    def mutate(payload: dict[str, Any]) -> None:
        _, kwargs, embed = json.loads(base64.b64decode(payload["body"]))
        text = json.dumps([[events], kwargs, embed])
        for amount in _EXACT_AMOUNTS:
            text = text.replace(f'"@{amount}@"', amount)
        payload["body"] = base64.b64encode(text.encode()).decode()

    return mutate


def _applied_or_filed(db: psycopg.Connection[Any], n: int = 1) -> bool:
    row = db.execute(
        "SELECT (SELECT count(*) FROM meter.ledger) + (SELECT count(*) FROM meter.dead_letters)"
        " AS n"
    ).fetchone()
    return bool(row and row["n"] >= n)


def _exact_event(amount: str, key: str) -> dict[str, Any]:
    return {"op": "allocate", "namespace": "default",
            "args": {"user_id": "u1", "event_type": ET, "amount": f"@{amount}@", "unit": UNIT,
                     "idempotency_key": key, "metadata": {"n": f"@{amount}@"}}}  # fmt: skip


@pytest.mark.parametrize("amount", _EXACT_AMOUNTS)
def test_an_event_object_with_a_json_number_amount_applies_it_exactly(
    pipeline, db, broker_url, amount
):
    _raw(pipeline, broker_url, "meter.allocate", _object_body(_exact_event(amount, "k")))
    eventually(lambda: _applied_or_filed(db), timeout=30)
    assert dead_letters(db) == []
    (row,) = db.execute("SELECT amount, metadata->>'n' AS n FROM meter.ledger").fetchall()
    assert row["amount"] == Decimal(amount) and Decimal(row["n"]) == Decimal(amount)


def test_a_batch_of_event_objects_with_json_number_amounts_applies_them_exactly(
    pipeline, db, broker_url
):
    events = [_exact_event(a, f"k{i}") for i, a in enumerate(_EXACT_AMOUNTS)]
    _raw(pipeline, broker_url, "meter.apply_batch", _object_body(events))
    eventually(lambda: _applied_or_filed(db, len(events)), timeout=30)
    assert dead_letters(db) == []
    rows = db.execute("SELECT amount FROM meter.ledger ORDER BY id").fetchall()
    assert [r["amount"] for r in rows] == [Decimal(a) for a in _EXACT_AMOUNTS]
