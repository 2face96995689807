"""``worker.transport`` against a real Redis, through plain kombu (no Celery worker).

The crash behaviour itself (SIGKILL inside the pop/record window) is in
``tests/system/test_crash.py``; here: what each step leaves in Redis, ack/reject/requeue,
the sweep of a dead consumer's messages, blocking without busy polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.utils.json import loads

from worker.transport import TAKE, TRANSPORT, Channel

Q = "tq"
QUEUE = Queue(Q, Exchange(Q), Q)


@pytest.fixture
def r(broker_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(broker_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def connect(broker_url: str) -> Iterator[Any]:
    """``connect(**transport_options)`` -> a kombu Connection on this transport."""
    conns: list[Connection] = []

    def factory(**options: Any) -> Connection:
        conn = Connection(broker_url, transport=TRANSPORT, transport_options=options)
        conns.append(conn)
        return conn

    try:
        yield factory
    finally:
        for conn in conns:
            conn.release()


def publish(broker_url: str, *bodies: Any) -> None:
    """Publish as a producer on kombu's stock transport would (the producers' case)."""
    with Connection(broker_url) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange=QUEUE.exchange, routing_key=Q, declare=[QUEUE])


def records(r: redis.Redis) -> dict[str, Any]:
    return {
        "unacked": {k.decode(): v for k, v in r.hgetall("unacked").items()},
        "index": {k.decode() for k in r.zrange("unacked_index", 0, -1)},
        "owner": {k.decode(): v.decode() for k, v in r.hgetall("unacked_owner").items()},
    }


def test_take_records_the_message_as_kombu_would_and_marks_its_holder(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    publish(broker_url, {"n": 1})
    raw = r.lindex(Q, 0)
    channel = connect().default_channel
    message = channel.basic_get(Q)
    assert message.payload == {"n": 1}
    tag = message.delivery_tag
    rec = records(r)
    assert set(rec["unacked"]) == rec["index"] == set(rec["owner"]) == {tag}
    assert rec["owner"][tag] == channel.consumer_id
    # kombu's format, the message as it was published, byte for byte; routed back to the
    # queue it was taken from (exchange '', routing key: the queue), not by its own claim
    payload, exchange, routing_key = loads(rec["unacked"][tag])
    assert (exchange, routing_key) == ("", Q)
    assert payload == json.loads(raw)
    assert r.zscore("unacked_consumers", channel.consumer_id) is not None
    assert r.llen(Q) == 0


def test_ack_removes_the_records(connect: Any, broker_url: str, r: redis.Redis) -> None:
    publish(broker_url, {"n": 1})
    message = connect().default_channel.basic_get(Q)
    message.ack()
    assert records(r) == {"unacked": {}, "index": set(), "owner": {}}


def test_ack_leaves_a_record_held_by_another_consumer(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    """A consumer presumed dead whose message went to another: its late ack is a no-op."""
    publish(broker_url, {"n": 1})
    message = connect().default_channel.basic_get(Q)
    r.hset("unacked_owner", message.delivery_tag, "someone-else")
    message.ack()
    assert set(records(r)["unacked"]) == {message.delivery_tag}


def test_reject_with_requeue_puts_it_back_flagged_redelivered(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    publish(broker_url, {"n": 1}, {"n": 2})
    channel = connect().default_channel
    first = channel.basic_get(Q)
    first.reject(requeue=True)
    assert records(r) == {"unacked": {}, "index": set(), "owner": {}}
    again = [channel.basic_get(Q, no_ack=True) for _ in range(2)]
    assert [m.payload for m in again] == [{"n": 2}, {"n": 1}]  # requeued at the far end
    assert again[1].delivery_info["redelivered"] is True


def test_reject_without_requeue_drops_it(connect: Any, broker_url: str, r: redis.Redis) -> None:
    publish(broker_url, {"n": 1})
    connect().default_channel.basic_get(Q).reject()
    assert records(r) == {"unacked": {}, "index": set(), "owner": {}}
    assert r.llen(Q) == 0


def test_no_ack_records_nothing(connect: Any, broker_url: str, r: redis.Redis) -> None:
    publish(broker_url, {"n": 1}, {"n": 2})
    channel = connect().default_channel
    assert channel.basic_get(Q, no_ack=True).payload == {"n": 1}
    got: list[Any] = []
    with channel.connection.client.Consumer(
        QUEUE, callbacks=[lambda body, _: got.append(body)], no_ack=True
    ):
        channel.connection.client.drain_events(timeout=5)
    assert got == [{"n": 2}]
    assert records(r)["unacked"] == {}


def test_consumer_receives_and_acks_many(connect: Any, broker_url: str, r: redis.Redis) -> None:
    publish(broker_url, *({"n": n} for n in range(300)))
    got: list[int] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body["n"])
        message.ack()

    conn = connect()
    with conn.Consumer(QUEUE, callbacks=[on_message], prefetch_count=10):
        deadline = time.monotonic() + 30
        while len(got) < 300 and time.monotonic() < deadline:
            conn.drain_events(timeout=5)
    assert sorted(got) == list(range(300))
    assert records(r) == {"unacked": {}, "index": set(), "owner": {}}


def test_dead_consumers_messages_are_swept_back_live_ones_are_not(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    publish(broker_url, {"n": 1}, {"n": 2})
    dead = connect(consumer_heartbeat=0.1).default_channel
    alive = connect(consumer_heartbeat=0.1, consumer_timeout=1).default_channel
    lost, kept = dead.basic_get(Q), alive.basic_get(Q)
    assert lost is not None and kept is not None
    dead._heartbeat.stopped.set()  # as if SIGKILLed: no more heartbeats, no close
    assert r.llen(Q) == 0

    def swept() -> bool:
        alive._swept_at = float("-inf")
        alive.maybe_sweep()
        return r.llen(Q) == 1

    deadline = time.monotonic() + 20
    while not swept():
        assert time.monotonic() < deadline, "the dead consumer's message never came back"
        time.sleep(0.1)
    assert set(records(r)["unacked"]) == {kept.delivery_tag}  # the live one's stays
    back = alive.basic_get(Q)
    assert back.payload == lost.payload
    assert back.delivery_info["redelivered"] is True
    assert records(r)["owner"][back.delivery_tag] == alive.consumer_id
    # the presumed-dead consumer acks late: the message is the other's now
    lost.ack()
    assert back.delivery_tag in records(r)["unacked"]


def test_a_holder_without_heartbeat_entry_counts_as_dead(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    publish(broker_url, {"n": 1})
    dead = connect().default_channel
    dead.basic_get(Q)
    dead._heartbeat.stopped.set()
    r.zrem("unacked_consumers", dead.consumer_id)
    other = connect().default_channel
    other.maybe_sweep()
    assert r.llen(Q) == 1


def test_a_message_held_under_a_live_consumers_id_but_never_received_is_put_back(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    publish(broker_url, {"n": 1}, {"n": 2})
    channel = connect(consumer_heartbeat=0.1, consumer_timeout=1).default_channel
    received = channel.basic_get(Q)  # held and received: the audit leaves it alone
    assert received is not None
    # a TAKE whose reply never reached the channel (lost with its connection): the
    # message is recorded under the channel's id, which keeps beating
    keys, args = channel._take_keys([Q])
    taken = TAKE(r, keys, args)
    assert taken and records(r)["owner"][taken[2].decode()] == channel.consumer_id
    assert r.llen(Q) == 0

    channel._swept_at = float("-inf")
    channel.maybe_sweep()  # recorded less than consumer_timeout ago: not yet
    assert r.llen(Q) == 0
    time.sleep(1.2)
    channel._pending = "EVALSHA"  # a TAKE's reply unread: the audit waits
    channel._swept_at = float("-inf")
    channel.maybe_sweep()
    assert r.llen(Q) == 0
    channel._pending = None
    channel._swept_at = float("-inf")
    channel.maybe_sweep()
    assert r.llen(Q) == 1
    assert set(records(r)["owner"]) == {received.delivery_tag}
    back = channel.basic_get(Q)
    assert back.payload == {"n": 2}
    assert back.delivery_info["redelivered"] is True


def test_idle_consumer_blocks_and_wakes_without_busy_polling(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    """Idle: about one BLMOVE and one TAKE per brpop_timeout; a message wakes it at once."""
    conn = connect(polling_interval=10)  # brpop_timeout: 10 s
    got: list[float] = []
    with conn.Consumer(QUEUE, callbacks=[lambda body, m: (got.append(time.monotonic()), m.ack())]):
        before = commands(r)
        cpu = time.process_time()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=3)
        used = time.process_time() - cpu
        calls = commands(r) - before
        assert calls <= 6, f"{calls} TAKE/BLMOVE calls in 3 s"
        assert used < 0.5, f"{used:.2f} s of CPU in 3 s idle"
        sent = time.monotonic()
        publish(broker_url, {"n": 1})
        conn.drain_events(timeout=30)
    assert got and got[0] - sent < 5  # woken by the message, not by the 10 s timeout


def commands(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "blmove"))


def test_scripts_come_back_after_a_script_flush(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    """Redis restarted without its script cache: EVALSHA fails once, the channel reloads."""
    publish(broker_url, {"n": 1})
    r.script_flush()
    got: list[Any] = []
    conn = connect()
    with conn.Consumer(QUEUE, callbacks=[lambda body, m: (got.append(body), m.ack())]):
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
    assert got == [{"n": 1}]


def test_take_hands_over_an_unreadable_message_unrecorded(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    """What kombu itself cannot read is not recorded (it would come back forever)."""
    r.lpush(Q, b"not json")
    channel: Channel = connect().default_channel
    keys, args = channel._take_keys([Q])
    assert TAKE(r, keys, args) == [Q.encode(), b"not json"]
    assert records(r)["unacked"] == {}


@pytest.mark.parametrize(
    "options",
    [{"global_keyprefix": "app:"}, {"consumer_timeout": 2, "consumer_heartbeat": 1}],
)
def test_unsupported_options_are_refused(connect: Any, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"^worker\.transport: "):
        connect(**options).channel()


def test_one_client_object_per_pool(connect: Any, broker_url: str, r: redis.Redis) -> None:
    """Commands outside the event loop share one redis-py client while the channel's pool
    lasts (kombu built one per command); a new pool (after a fork or a lost connection)
    gets a new client, and the channel keeps working."""
    channel = connect().default_channel
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second and first.connection_pool is channel.pool
    publish(broker_url, {"n": 1})
    message = channel.basic_get(Q)
    message.ack()
    with channel.conn_or_acquire() as third:
        assert third is first
    channel._disconnect_pools()
    with channel.conn_or_acquire() as fresh:
        assert fresh is not first and fresh.connection_pool is channel.pool
    publish(broker_url, {"n": 2})
    message = channel.basic_get(Q)
    assert message.payload == {"n": 2}
    message.ack()
    assert records(r) == {"unacked": {}, "index": set(), "owner": {}}


def test_the_producers_channel_reuses_its_client_too(
    connect: Any, broker_url: str, r: redis.Redis
) -> None:
    """The producers' transport publishes what kombu's would (the workers' take it), through
    one client object."""
    from meter import broker

    with Connection(broker_url, transport=broker.TRANSPORT) as conn:
        channel = conn.default_channel
        producer = conn.Producer()
        for n in range(3):
            producer.publish({"n": n}, exchange=QUEUE.exchange, routing_key=Q, declare=[QUEUE])
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
    consumer = connect().default_channel
    taken = [consumer.basic_get(Q) for _ in range(3)]
    assert sorted(m.payload["n"] for m in taken) == [0, 1, 2]
    for m in taken:
        m.ack()
    assert r.llen(Q) == 0
