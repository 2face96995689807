"""Crafted messages against a real ``celery -A worker worker`` (prefork pool).

The integration tests run the solo pool in a thread, where what raises on the way to the
task raises in the consumer's own handler; in a prefork pool the same raises in the child,
which reports a failure that ``task_acks_on_failure`` acknowledges.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery

from meter import wire
from tests.system.harness import CrashableRedis, eventually

EVENT = {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": "tokens", "amount": "1", "unit": "tok",
                  "idempotency_key": "k1"}}  # fmt: skip


def _message(broker_url: str, body: Any) -> dict[str, Any]:
    """A ``meter.allocate`` task message as kombu writes it, with ``body`` as its body."""
    app = Celery("meter-test", set_as_current=False)
    app.conf.update(wire.celery_config(broker_url))
    client = redis.Redis.from_url(broker_url)
    try:
        app.send_task(wire.task_name("allocate"), args=(EVENT,), queue="staging")
        payload = json.loads(client.rpop("staging"))
    finally:
        client.close()
        app.close()
    payload["properties"]["delivery_info"].update(exchange=wire.QUEUE, routing_key=wire.QUEUE)
    payload["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return payload


def test_a_body_whose_embed_is_no_object_is_a_dead_letter_in_a_prefork_worker(
    start_worker: Any, crash_redis: CrashableRedis, db: psycopg.Connection[Any]
) -> None:
    # `[args, kwargs, "embed"]`: Celery merges the embed into the request in the child,
    # where `**"embed"` raised; the failure was acked, and the event neither applied nor
    # filed (the solo pool's handler caught it, so the integration test passed).
    worker = start_worker()
    worker.wait_ready()
    url = crash_redis.url()
    payload = _message(url, [[EVENT], {}, "embed"])
    client = redis.Redis.from_url(url)
    try:
        client.lpush(wire.QUEUE, json.dumps(payload))
        deadline = time.monotonic() + 30
        rows: list[Any] = []
        while time.monotonic() < deadline and not rows:
            rows = db.execute("SELECT op, error_sqlstate FROM meter.dead_letters").fetchall()
            time.sleep(0.2)
        assert [(r["op"], r["error_sqlstate"]) for r in rows] == [("unreadable", "MT001")]
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0, 15)
    finally:
        client.close()
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 0


@pytest.mark.parametrize(
    ("timelimit", "applied"),
    [([-1, None], True), ([1e-9, None], True), ([None, "x"], False)],
    ids=["hard-negative", "hard-tiny", "soft-text"],
)
def test_a_crafted_time_limit_neither_kills_every_delivery_nor_breaks_the_limits(
    start_worker: Any,
    crash_redis: CrashableRedis,
    db: psycopg.Connection[Any],
    timelimit: list[Any],
    applied: bool,
) -> None:
    # The `timelimit` header (not signed) set the task's limits: a hard limit of -1 or 1e-9
    # s killed the pool process before the task ran, every delivery, once a second, never
    # counted nor filed; a text in the pair raised in the pool's timeout handler instead.
    worker = start_worker()
    worker.wait_ready()
    url = crash_redis.url()
    payload = _message(url, [[EVENT], {}, None])
    payload["headers"]["timelimit"] = timelimit
    client = redis.Redis.from_url(url)
    try:
        client.lpush(wire.QUEUE, json.dumps(payload))

        def outcome() -> tuple[int, int] | None:
            n = db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"]
            d = db.execute("SELECT count(*) AS n FROM meter.dead_letters").fetchone()["n"]
            return (n, d) if n + d else None

        assert eventually(outcome, 20) == ((1, 0) if applied else (0, 1))
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0, 15)
    finally:
        client.close()
    log = worker.log.read_text()
    assert "Hard time limit" not in log and "TypeError" not in log, worker.tail(40)


def test_a_crafted_time_limit_on_a_maintenance_task_does_not_kill_every_delivery(
    start_worker: Any, crash_redis: CrashableRedis
) -> None:
    # As for event tasks: a hard limit of -1 s killed the pool process before the sweep
    # ran, once a second, forever.
    worker = start_worker()
    worker.wait_ready()
    url = crash_redis.url()
    app = Celery("meter-test", set_as_current=False)
    app.conf.update(wire.celery_config(url))
    client = redis.Redis.from_url(url)
    try:
        app.send_task(wire.RELEASE_EXPIRED, queue="staging")
        payload = json.loads(client.rpop("staging"))
        payload["headers"]["timelimit"] = [-1, None]
        info = payload["properties"]["delivery_info"]
        info.update(exchange=wire.MAINTENANCE_QUEUE, routing_key=wire.MAINTENANCE_QUEUE)
        client.lpush(wire.MAINTENANCE_QUEUE, json.dumps(payload))
        eventually(lambda: "meter.release_expired" in worker.log.read_text()
                   and "succeeded" in worker.log.read_text(), 20)  # fmt: skip
    finally:
        client.close()
        app.close()
    assert "Hard time limit" not in worker.log.read_text(), worker.tail(40)


def test_a_crafted_time_limit_on_a_celery_builtin_task_does_not_kill_every_delivery(
    start_worker: Any, crash_redis: CrashableRedis
) -> None:
    # Celery registers its own tasks (celery.backend_cleanup, celery.chord_unlock,
    # celery.accumulate...) in every worker, with Celery's request, which took the
    # unsigned `timelimit` header: a hard limit of -1 s killed the pool process before the
    # task ran, every delivery, once a second, forever, as it did for Meter's own tasks.
    worker = start_worker()
    worker.wait_ready()
    url = crash_redis.url()
    app = Celery("meter-test", set_as_current=False)
    app.conf.update(wire.celery_config(url))
    client = redis.Redis.from_url(url)
    try:
        app.send_task("celery.accumulate", args=(1, 2), queue="staging")
        payload = json.loads(client.rpop("staging"))
        payload["headers"]["timelimit"] = [-1, None]
        payload["properties"]["delivery_info"].update(exchange=wire.QUEUE, routing_key=wire.QUEUE)
        client.lpush(wire.QUEUE, json.dumps(payload))
        eventually(lambda: "celery.accumulate" in worker.log.read_text()
                   and "succeeded" in worker.log.read_text(), 20)  # fmt: skip
        eventually(lambda: client.llen(wire.QUEUE) == 0 and client.hlen("unacked") == 0, 15)
    finally:
        client.close()
        app.close()
    assert "Hard time limit" not in worker.log.read_text(), worker.tail(40)


@pytest.mark.timeout(180)
def test_a_commit_with_the_deepest_metadata_waits_for_its_reserve_in_a_prefork_worker(
    start_worker: Any, crash_redis: CrashableRedis, db: psycopg.Connection[Any], db_url: str
) -> None:
    # Review C2: a commit sent before its reserve goes on in a task of its own, which the
    # worker sent as the event's object; the prefork parent pickles that decoded body to its
    # pool process, which ran out of stack on metadata the producer takes (800 levels):
    # the commit was dead-lettered (MT001 "unreadable"), never applied. (The solo pool of
    # the integration tests pickles nothing.)
    from meter.client import MeterClient
    from meter.producer import MAX_METADATA_DEPTH, MeterProducer

    worker = start_worker()
    worker.wait_ready()
    meta: dict[str, Any] = {}
    node = meta
    for _ in range(MAX_METADATA_DEPTH):
        node["k"] = {}
        node = node["k"]
    with MeterClient(db_url, "default") as client:
        client.allocate("u1", "tokens", 10, "tok")
    with MeterProducer(crash_redis.url(), results=True) as producer:
        (commit,) = producer.send_many(
            [{"op": "commit", "reservation_id": "r-deep", "actual_amount": 2, "metadata": meta}]
        )
        time.sleep(1)  # the batch has run: the commit waits in a task of its own
        producer.reserve("u1", "tokens", 5, "tok", reservation_id="r-deep").wait(timeout=30)
        assert commit.wait(timeout=60)["status"] == "committed"
    assert db.execute("SELECT count(*) AS n FROM meter.dead_letters").fetchone()["n"] == 0


@pytest.mark.timeout(180)
def test_a_signed_deferred_commit_with_the_deepest_metadata_and_a_fraction_is_applied(
    start_worker: Any, crash_redis: CrashableRedis, db: psycopg.Connection[Any], db_url: str
) -> None:
    # Review B3 (held): metadata holding a fraction comes out of the worker's reading as a
    # Decimal, which json.dumps cannot write: the deferred event's text is then written by
    # meter.types.dumps in the pool process, and signed there as of its batch.
    from decimal import Decimal

    from meter import signing
    from meter.client import MeterClient
    from meter.producer import MAX_METADATA_DEPTH, MeterProducer

    secret = "b3-secret"
    worker = start_worker(METER_SIGNING_SECRET=secret)
    worker.wait_ready()
    meta: dict[str, Any] = {}
    node = meta
    for _ in range(MAX_METADATA_DEPTH):
        node["k"] = {}
        node = node["k"]
    node["cost"] = Decimal("1.5")
    with MeterClient(db_url, "default") as client:
        client.allocate("u1", "tokens", 10, "tok")
    key = signing.derive_key(secret, "default")
    with MeterProducer(crash_redis.url(), results=True, signing_key=key) as producer:
        (commit,) = producer.send_many(
            [{"op": "commit", "reservation_id": "r-deep", "actual_amount": 2, "metadata": meta}]
        )
        time.sleep(1)  # the batch has run: the commit waits in a task of its own
        producer.reserve("u1", "tokens", 5, "tok", reservation_id="r-deep").wait(timeout=30)
        assert commit.wait(timeout=60)["status"] == "committed", worker.tail(60)
    assert db.execute("SELECT count(*) AS n FROM meter.dead_letters").fetchone()["n"] == 0
    with MeterClient(db_url, "default") as client:
        assert client.get_balance("u1", "tokens", "tok")["balance"] == Decimal(8)
