"""Pipeline pieces that need no server: settings, error classes, backoff, wire format."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.exceptions import OperationalError as KombuOperationalError
from psycopg_pool import PoolTimeout

from meter import wire
from meter.errors import MeterConnectionError, PublishError, ValidationError
from meter.producer import MeterProducer
from tests.examples import examples
from worker import worker_config
from worker.retry import backoff, is_transient
from worker.settings import Settings
from worker.tasks import _repeats_a_key, _with_key


def test_settings_from_env():
    s = Settings.from_env(
        {"METER_DATABASE_URL": "postgresql:///m", "METER_ORPHAN_HORIZON_SECONDS": "12.5",
         "METER_MAX_DELIVERIES": "4", "METER_DB_POOL_SIZE": ""}
    )  # fmt: skip
    assert (s.database_url, s.orphan_horizon, s.max_deliveries) == ("postgresql:///m", 12.5, 4)
    assert s.db_pool_size == Settings().db_pool_size
    assert Settings.from_conf(s.as_conf()) == s


@pytest.mark.parametrize("value", ["0", "-1", "lots", "1.5"])
def test_bad_settings_are_refused(value):
    with pytest.raises(ValueError, match="METER_MAX_DELIVERIES"):
        Settings.from_env({"METER_MAX_DELIVERIES": value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("METER_RETRY_BACKOFF_MAX", "nan"),
        ("METER_RETRY_BACKOFF_MAX", "inf"),
        ("METER_RETRY_BACKOFF_BASE", "1e400"),
        ("METER_ORPHAN_HORIZON_SECONDS", "NaN"),
        ("METER_EXPIRY_INTERVAL_SECONDS", "infinity"),
        # a retry waits in its worker, unacknowledged, for its countdown, then runs: longer
        # than the visibility timeout, and Redis hands it out a second time meanwhile
        ("METER_RETRY_BACKOFF_MAX", str(wire.VISIBILITY_TIMEOUT - wire.TASK_TIME_LIMIT + 1)),
    ],
)
def test_settings_that_are_no_finite_number_or_outlast_the_visibility_timeout_are_refused(
    name, value
):
    # nan and inf were taken (nan <= 0 is false): a retry's countdown of nan or inf made
    # Celery's retry fail, the message was put back at once, again and again, and filed as
    # MTW01 ("the worker died") after meter_max_deliveries runs without any back-off.
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_the_longest_allowed_backoff_fits_the_visibility_timeout():
    longest = str(wire.VISIBILITY_TIMEOUT - wire.TASK_TIME_LIMIT)
    s = Settings.from_env({"METER_RETRY_BACKOFF_MAX": longest})
    assert s.retry_backoff_max + wire.TASK_TIME_LIMIT <= wire.VISIBILITY_TIMEOUT


def test_worker_config_delivery_guarantees():
    conf = worker_config(
        broker_url="redis://example:6379/3", database_url="postgresql:///x", env={}
    )
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["task_acks_on_timeout"] is False
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_ignore_result"] is True
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["result_backend"] == conf["broker_url"] == "redis://example:6379/3"
    visibility = conf["broker_transport_options"]["visibility_timeout"]
    assert visibility > conf["task_time_limit"] + Settings().retry_backoff_max
    assert conf["meter_database_url"] == "postgresql:///x"
    assert conf["beat_schedule"]["meter.release-expired"]["schedule"].seconds == 5.0


def test_broker_url_from_env(monkeypatch):
    monkeypatch.delenv("METER_BROKER_URL", raising=False)
    assert wire.broker_url_from_env() == wire.DEFAULT_BROKER_URL
    monkeypatch.setenv("METER_BROKER_URL", "redis://b:1/0")
    assert wire.broker_url_from_env() == "redis://b:1/0"
    assert wire.broker_url_from_env("redis://c:2/0") == "redis://c:2/0"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (psycopg.errors.DeadlockDetected("x"), True),
        (psycopg.errors.SerializationFailure("x"), True),
        (psycopg.errors.LockNotAvailable("x"), True),
        (psycopg.errors.QueryCanceled("x"), True),
        (psycopg.errors.IdleInTransactionSessionTimeout("x"), True),
        (psycopg.errors.lookup("25P04")("x"), True),  # transaction_timeout
        (psycopg.errors.AdminShutdown("x"), True),
        (psycopg.errors.TooManyConnections("x"), True),
        (psycopg.OperationalError("connection refused"), True),
        (psycopg.InterfaceError("the connection is closed"), True),
        (PoolTimeout("no connection"), True),
        (ConnectionResetError(), True),
        (psycopg.errors.UndefinedFunction("x"), False),
        (psycopg.errors.UniqueViolation("x"), False),
        (psycopg.errors.RaiseException("x"), False),
        (KeyError("op"), False),
    ],
)
def test_transient_or_permanent(exc, transient):
    assert is_transient(exc) is transient


def test_backoff_grows_is_capped_and_jittered():
    for attempt in range(40):
        ceiling = min(10.0, 0.2 * 2**attempt)
        assert ceiling / 2 <= backoff(attempt, 0.2, 10.0) <= ceiling
    assert len({backoff(3, 0.2, 10.0) for _ in range(20)}) > 1


def test_keyless_events_get_a_key():
    consume = {"op": "consume", "namespace": "n", "args": {"amount": "1"}}
    assert _with_key(consume, "task:1")["args"]["idempotency_key"] == "task:1"
    assert "idempotency_key" not in consume["args"]  # not mutated
    keyed = {"op": "allocate", "args": {"idempotency_key": "k"}}
    assert _with_key(keyed, "task:1") is keyed
    reserve = {"op": "reserve", "args": {"amount": "1"}}
    assert _with_key(reserve, "task:1")["args"]["reservation_id"] == "task:1"
    commit = {"op": "commit", "args": {"reservation_id": "r"}}
    assert _with_key(commit, "task:1") is commit
    assert _with_key("junk", "task:1") == "junk"


def test_decode_outcome_gives_what_the_sdk_gives():
    out = wire.decode_outcome(
        "reserve",
        {"granted": True, "balance": 10, "available": Decimal("2.5"), "reservation_id": "r",
         "expires_at": "2026-01-01T00:05:00+00:00"},
    )  # fmt: skip
    assert out["balance"] == Decimal(10) and isinstance(out["balance"], Decimal)
    assert out["available"] == Decimal("2.5")
    assert isinstance(out["expires_at"], datetime) and out["expires_at"].tzinfo is not None
    assert wire.decode_outcome("release", {"released": True}) is True
    assert wire.decode_outcome("release", {"released": False}) is False


def test_child_task_ids_are_deterministic():
    assert wire.child_task_id("t", 1) == wire.child_task_id("t", 1)
    assert wire.child_task_id("t", 1) != wire.child_task_id("t", 2)


AMOUNT_TEXTS = st.one_of(
    st.from_regex(r"[+-]?[0-9]{0,27}(\.[0-9]{0,15})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from(["0", "00", "0.0", "1", "01", "1.0", "1.25", " 1.25", "1.25 ", "-1", "+1",
                     "0." + "0" * 11 + "1", "0." + "0" * 12 + "1", "9" * 24, "9" * 25, ".5", "5."]),
)  # fmt: skip


@settings(max_examples=examples(2000), deadline=None)
@given(text=AMOUNT_TEXTS, sign=st.sampled_from(["positive", "nonnegative", "nonzero", "any"]))
def test_the_producers_amount_shortcut_agrees_with_to_amount(text, sign):
    """A string the producer passes through as it is must be exactly what the full
    conversion gives; anything else takes the full conversion, errors included."""
    from meter.producer import _amount_text
    from meter.types import to_amount

    try:
        expected: object = format(to_amount(text, "amount", sign=sign), "f")
    except ValidationError as exc:
        expected = exc
    try:
        got: object = _amount_text(text, "amount", sign)
    except ValidationError as exc:
        got = exc
    if isinstance(expected, ValidationError):
        assert isinstance(got, ValidationError) and str(got) == str(expected)
    else:
        assert got == expected


def test_a_keyed_reserves_id_is_derived_from_namespace_and_key():
    """Review D #8: a reserve with a key and no id gets an id the same call always gets
    (so a retry replays), a valid reservation id, distinct per namespace and per key."""
    from meter import types as t
    from meter.producer import MeterProducer
    from meter.types import keyed_reservation_id

    rid = keyed_reservation_id("acme", "k1")
    assert rid == keyed_reservation_id("acme", "k1") and uuid.UUID(rid).version == 5
    assert t.check_identifier(rid, "reservation_id", min_len=1, max_len=128, nullable=False) == rid
    others = [("acme", "k2"), ("other", "k1"), ("acme/k", "1"), ("acme", "/k1")]
    assert len({rid, *(keyed_reservation_id(ns, key) for ns, key in others)}) == 5
    p = MeterProducer("redis://127.0.0.1:1/0", "acme")
    try:
        args, key, got = p._reserve_args("u1", "tokens", 1, "tok", idempotency_key="k1")
        assert (args["reservation_id"], key, got) == (rid, "k1", rid)
        args, key, got = p._reserve_args("u1", "tokens", 1, "tok")  # keyless: random
        assert uuid.UUID(got).version == 4 and key == got
        args, key, got = p._reserve_args(
            "u1", "tokens", 1, "tok", idempotency_key="k1", reservation_id="mine"
        )
        assert (key, got) == ("k1", "mine")
    finally:
        p.close()


def test_generated_ids_are_uuid4():
    import uuid

    from meter.types import new_id

    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122
    # every variant nibble occurs (the two free bits are random)
    assert {text[19] for text in ids} == set("89ab")


RESEND_CALLS = [
    ("consume", {"user_id": "u1", "event_type": "tok", "amount": Decimal("1.50"), "unit": "t",
                 "resource": "gpt", "check_balance": True,
                 "event_time": datetime.fromisoformat("2026-11-27T10:00:00.123456-05:00"),
                 "metadata": {"a": [1, Decimal("0.1"), None], "b": {"c": "d"}}}),
    ("allocate", {"user_id": None, "event_type": "tok", "amount": 7, "unit": "t",
                  "idempotency_key": "grant-1"}),
    ("adjust", {"user_id": "u1", "event_type": "tok", "amount": "-2", "unit": "t",
                "reference_id": 12}),
    ("reserve", {"user_id": "u1", "event_type": "tok", "amount": 3, "unit": "t",
                 "ttl_seconds": 60}),
    ("reserve", {"user_id": "u1", "event_type": "tok", "amount": 3, "unit": "t",
                 "idempotency_key": "hold-1", "reservation_id": "r-1"}),
    ("commit", {"reservation_id": "r-1", "actual_amount": 0, "metadata": {"x": 1}}),
    ("release", {"reservation_id": "r-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("op", "params"), RESEND_CALLS, ids=[op for op, _ in RESEND_CALLS])
def test_an_event_in_doubt_resends_as_the_same_event(op, params):
    """What a PublishError hands back, passed to send_many, builds the very event that was
    sent: same arguments, same key (a generated one included)."""
    from meter.producer import MeterProducer, _resendable

    producer = MeterProducer("redis://127.0.0.1:1/0")  # never connects: nothing is sent
    try:
        args, key, rid = producer._builders[op](producer, **params)
        item = _resendable({"op": op, "namespace": "default", "args": args})
        assert item.pop("op") == op
        again = producer._builders[op](producer, **item)
        assert again == (args, key, rid)
        if "metadata" in args:  # a copy: changing it leaves the sent event alone
            item["metadata"]["added"] = True
            assert "added" not in args["metadata"]
    finally:
        producer.close()


def test_an_event_in_doubt_nested_deeper_than_deepcopy_still_comes_back():
    from meter.producer import _resendable

    metadata: dict[str, object] = {}
    inner = metadata
    for _ in range(600):  # within the metadata limits, beyond copy.deepcopy's recursion
        inner["a"] = {}
        inner = inner["a"]  # type: ignore[assignment]
    item = _resendable({"op": "consume", "args": {"amount": "1", "metadata": metadata}})
    assert item["metadata"] is metadata and item["amount"] == "1"


class _HeldBroker:
    """Stands in for a producer's ``send_task``: signals ``sending``, waits for
    ``release``, then refuses (``refuse``) or records the message as sent."""

    def __init__(self, producer: object, *, refuse: bool) -> None:
        import threading

        self.sending, self.release = threading.Event(), threading.Event()
        self.refuse = refuse
        self.sent: list[dict[str, object]] = []
        producer._app.send_task = self  # type: ignore[attr-defined]

    def __call__(self, *args: object, **kwargs: object) -> None:
        from kombu.exceptions import OperationalError as KombuOperationalError

        self.sending.set()
        self.release.wait(timeout=30)
        if self.refuse:
            raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")
        self.sent.append(kwargs)


def test_close_racing_calls_that_fill_batches_hands_every_event_back():
    """Batches taken by the calls that filled them while close() flushes (the broker
    refusing): each event comes back in exactly one PublishError; none stays behind in
    the closed producer, where nothing would send it."""
    import threading
    import time

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=2, linger_ms=3_600_000)
    broker = _HeldBroker(producer, refuse=True)
    sending, release = broker.sending, broker.release
    handed: list[str] = []
    errors: list[BaseException] = []

    def record(key: str) -> None:
        try:
            producer.consume("u1", "tokens", 1, "tok", idempotency_key=key)
        except PublishError as exc:
            handed.extend(e["idempotency_key"] for e in exc.events)
        except BaseException as exc:  # checked below
            errors.append(exc)

    def close() -> None:
        try:
            producer.close()
        except PublishError as exc:
            handed.extend(e["idempotency_key"] for e in exc.events)

    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    a = threading.Thread(target=record, args=("k1",))  # fills [k0, k1] and sends it
    a.start()
    assert sending.wait(timeout=10)
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k2")
    c = threading.Thread(target=record, args=("k3",))  # fills [k2, k3]; waits to send
    c.start()
    deadline = time.monotonic() + 10
    while producer._batch is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    d = threading.Thread(target=close)
    d.start()
    while not producer._closed and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # c and close() wait for the send lock
    release.set()
    for thread in (a, c, d):
        thread.join(timeout=30)
    assert errors == []
    assert sorted(handed) == ["k0", "k1", "k2", "k3"]
    assert not producer._unsent and producer._batch is None


def test_close_sends_the_batch_mates_of_a_call_that_failed_otherwise_than_by_the_broker():
    """A call that filled a batch takes it out of the buffer to send it. If close() comes
    meanwhile and that send fails with an error that is not the broker's (so it carries
    no events), close() still sends the call's batch-mates: it waits for the call, which
    puts them back first. They used to be dropped, sent by nobody."""
    import json
    import threading
    import time

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=2, linger_ms=3_600_000)
    broker = _HeldBroker(producer, refuse=False)
    sends = 0

    def send_task(*args: object, **kwargs: object) -> None:
        nonlocal sends
        sends += 1
        if sends == 1:  # the filler's send: held, then failing on its own account
            broker.sending.set()
            broker.release.wait(timeout=30)
            raise ValueError("not the broker's")
        broker.sent.append(kwargs)

    producer._app.send_task = send_task  # type: ignore[method-assign]
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    raised: list[BaseException] = []

    def fill() -> None:
        try:
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k1")
        except BaseException as exc:  # checked below
            raised.append(exc)

    filler = threading.Thread(target=fill)
    filler.start()
    assert broker.sending.wait(timeout=10)
    closer = threading.Thread(target=producer.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not producer._closed and time.monotonic() < deadline:
        time.sleep(0.01)
    closer.join(timeout=0.2)
    assert closer.is_alive()  # close() waits for the filler
    broker.release.set()
    for thread in (filler, closer):
        thread.join(timeout=30)
    assert [type(exc) for exc in raised] == [ValueError]  # the filler's own event: its error
    keys = [
        [event["args"]["idempotency_key"] for event in json.loads(message["args"][0])]
        for message in broker.sent
    ]
    assert keys == [["k0"]]
    assert not producer._unsent and producer._batch is None


def test_a_signal_handler_closing_inside_a_fill_while_another_thread_closes():
    """The main thread has filled a batch and waits to send it (another call is sending);
    a thread closes, which waits for that filling call; then a signal handler on the
    main thread calls close() too. It must not wait for the first close() (which waits
    for it: both would hang), and the batch-mates of the interrupted call must still be
    sent by the first close()."""
    import json
    import signal
    import threading
    import time

    from meter.errors import MeterConnectionError
    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=2, linger_ms=3_600_000)
    held, sending = threading.Event(), threading.Event()
    sent: list[list[str]] = []  # the idempotency keys of each message sent

    def send_task(*args: object, **kwargs: object) -> None:
        if not sending.is_set():  # the first batch's send is held
            sending.set()
            held.wait(timeout=30)
        (payload,) = kwargs["args"]  # type: ignore[misc]
        sent.append([event["args"]["idempotency_key"] for event in json.loads(payload)])

    producer._app.send_task = send_task  # type: ignore[method-assign]
    handled: list[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        try:
            producer.close()
        except MeterConnectionError as exc:
            handled.append(exc)
            raise

    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    closer = threading.Thread(target=producer.close)
    try:
        producer.consume("u1", "tokens", 1, "tok", idempotency_key="a0")
        other = threading.Thread(
            target=producer.consume,
            args=("u1", "tokens", 1, "tok"),
            kwargs={"idempotency_key": "a1"},
        )
        other.start()
        assert sending.wait(timeout=10)
        producer.consume("u1", "tokens", 1, "tok", idempotency_key="b0")

        def drive() -> None:
            deadline = time.monotonic() + 10
            while len(producer._filling) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # the main thread fills [b0, b1] and waits to send it
            closer.start()
            while not producer._closed and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)  # the closer waits for the fillers
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.2)
            held.set()

        driver = threading.Thread(target=drive)
        driver.start()
        with pytest.raises(MeterConnectionError, match="being closed by another thread"):
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="b1")
        driver.join(timeout=30)
        other.join(timeout=30)
        closer.join(timeout=30)
        assert not closer.is_alive() and len(handled) == 1
    finally:
        signal.signal(signal.SIGUSR1, previous)
        held.set()
    assert len(sent) == 2
    assert sent == [["a0", "a1"], ["b0"]]  # b1's call raised: the caller's to send
    assert not producer._unsent and producer._batch is None and producer._filling == []


def test_a_close_made_while_another_sends_returns_after_it():
    """Two close() calls at once: the second must not return while the first is still
    sending the buffer, or its caller would take "returned" for "sent"."""
    import threading

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=10, linger_ms=3_600_000)
    broker = _HeldBroker(producer, refuse=False)
    sending, release = broker.sending, broker.release
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    returned: list[list[str]] = []

    def close_and_look() -> None:
        producer.close()
        returned.append(["k0" for message in broker.sent if "k0" in repr(message)])

    first = threading.Thread(target=producer.close)
    second = threading.Thread(target=close_and_look)
    first.start()
    assert sending.wait(timeout=10)
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and returned == []  # still waiting for the first
    release.set()
    for thread in (first, second):
        thread.join(timeout=30)
    assert returned == [["k0"]]  # it returned once the event had been sent
    producer.close()  # and a later close() returns at once


def test_a_close_made_while_another_fails_raises_too():
    import threading

    from meter.errors import MeterConnectionError
    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=10, linger_ms=3_600_000)
    broker = _HeldBroker(producer, refuse=True)
    sending, release = broker.sending, broker.release
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    errors: list[BaseException] = []

    def close() -> None:
        try:
            producer.close()
        except BaseException as exc:  # checked below
            errors.append(exc)

    first = threading.Thread(target=close)
    first.start()
    assert sending.wait(timeout=10)
    second = threading.Thread(target=close)
    second.start()
    second.join(timeout=0.3)
    release.set()
    for thread in (first, second):
        thread.join(timeout=30)
    [handed] = [e for e in errors if isinstance(e, PublishError)]
    assert [e["idempotency_key"] for e in handed.events] == ["k0"]
    [told] = [e for e in errors if not isinstance(e, PublishError)]
    assert isinstance(told, MeterConnectionError) and "could not send everything" in str(told)
    producer.close()  # a later close() is idempotent: it returns


def test_a_child_forked_while_its_parent_closes_can_close():
    """The child inherits a producer marked closed by a thread that does not exist there:
    its close() must not wait for that thread."""
    import os
    import threading

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=10, linger_ms=3_600_000)
    broker = _HeldBroker(producer, refuse=False)
    sending, release = broker.sending, broker.release
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    closing = threading.Thread(target=producer.close)
    closing.start()
    try:
        assert sending.wait(timeout=10)
        pid = os.fork()
        if pid == 0:  # the child: close() within 5 s, or fail
            done = threading.Thread(target=producer.close, daemon=True)
            done.start()
            done.join(timeout=5)
            os._exit(1 if done.is_alive() else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        closing.join(timeout=30)


def test_wait_inside_a_task_is_not_taken_for_a_lost_connection():
    # Celery refuses result.get() inside a task with a RuntimeError of its own; that is
    # the caller's mistake, not a broker to wait for again.
    from celery.result import _set_task_join_will_block, task_join_will_block

    from meter.errors import MeterConnectionError
    from meter.producer import EventHandle, MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", results=True)
    handle = EventHandle(producer, "consume", "k", None, "task-1", True)
    before = task_join_will_block()
    _set_task_join_will_block(True)
    try:
        with pytest.raises(RuntimeError, match="within a task") as raised:
            handle.wait(timeout=1)
        assert not isinstance(raised.value, MeterConnectionError)
    finally:
        _set_task_join_will_block(before)
        producer.close()


@pytest.mark.parametrize("failure", ["kombu", "result subscription"])
def test_a_failed_close_hands_the_buffer_over_and_keeps_nothing(failure):
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=10, linger_ms=3_600_000)
    sent: list[object] = []

    def refused(*args: object, **kwargs: object) -> None:
        if failure == "kombu":
            raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")
        # Celery subscribes to the result before publishing, and gives up on a broken
        # subscription with a RuntimeError raised from the connection's error
        lost = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        raise RuntimeError("Retry limit exceeded while trying to reconnect") from lost

    producer._app.send_task = refused  # type: ignore[method-assign]
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0", want_result=True)
    with pytest.raises(PublishError) as dropped:
        producer.close()
    assert [e["idempotency_key"] for e in dropped.value.events] == ["k0"]
    producer._app.send_task = lambda *a, **k: sent.append(k)  # type: ignore[method-assign]
    producer.flush()  # handed over: not sent a second time behind the caller's back
    assert sent == []


@pytest.mark.parametrize("value", [0, -1, 3601, 2.5, "30", None])
def test_a_bad_broker_timeout_is_refused_by_name(value):
    from meter.producer import MeterProducer

    with pytest.raises(ValidationError, match=r"^broker_timeout: ") as info:
        MeterProducer("redis://127.0.0.1:1/0", broker_timeout=value)
    assert info.value.parameter == "broker_timeout"


def test_the_broker_timeout_reaches_the_producers_connections_only():
    from meter import wire
    from meter.producer import BROKER_CONNECT_TIMEOUT_SECONDS, MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", broker_timeout=7)
    try:
        options = producer.app.conf.broker_transport_options
        assert options["socket_timeout"] == 7
        assert options["socket_connect_timeout"] == min(7, BROKER_CONNECT_TIMEOUT_SECONDS)
    finally:
        producer.close()
    shared = wire.celery_config("redis://127.0.0.1:1/0")["broker_transport_options"]
    assert "socket_timeout" not in shared  # the worker's consumer keeps kombu's own checks


def test_close_racing_the_linger_thread_hands_every_event_back():
    """close() fails to send while the linger thread waits to send the same buffer: the
    events must come back in close()'s error, not stay in the closed producer. (The
    linger thread is held just before its flush; if it could take the batch close() put
    back before close() lists the buffer, they would be in neither place.)"""
    import threading

    from kombu.exceptions import OperationalError as KombuOperationalError

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=100, linger_ms=50)
    at_flush, go_linger = threading.Event(), threading.Event()
    linger_sending, listed = threading.Event(), threading.Event()
    real_flush, real_list = producer._flush, producer._buffered_events

    def held_flush(**kwargs: bool) -> None:
        if threading.current_thread().name == "meter-producer-linger" and not at_flush.is_set():
            at_flush.set()
            go_linger.wait(10)
        real_flush(**kwargs)

    def listed_after_the_linger_thread_sends() -> list[dict[str, object]]:
        if threading.current_thread().name == "closer":
            linger_sending.wait(1)  # the order that lost events, when it can happen
            events = real_list()
            listed.set()
            return events
        return real_list()

    def refused(*args: object, **kwargs: object) -> None:
        if threading.current_thread().name == "closer":
            go_linger.set()
        else:  # the linger thread's send, holding the batch while close() lists the buffer
            linger_sending.set()
            listed.wait(2)
        raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")

    producer._flush = held_flush  # type: ignore[method-assign]
    producer._buffered_events = listed_after_the_linger_thread_sends  # type: ignore[method-assign]
    producer._app.send_task = refused  # type: ignore[method-assign]
    handles = [
        producer.consume("u1", "tokens", 1, "tok", idempotency_key=f"k{i}") for i in range(3)
    ]
    assert at_flush.wait(5)
    handed: list[str] = []

    def close() -> None:
        try:
            producer.close()
        except PublishError as exc:
            handed.extend(e["idempotency_key"] for e in exc.events)

    closer = threading.Thread(target=close, name="closer")
    closer.start()
    closer.join(timeout=15)
    assert producer._linger_thread is not None
    producer._linger_thread.join(timeout=5)
    assert handed == [h.idempotency_key for h in handles]
    assert not producer._unsent and producer._batch is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sender", ["fill", "flush"])
def test_a_signal_handler_closing_inside_its_own_threads_send_is_refused_not_hung(sender):
    """A signal handler calls close() while the main thread is sending a batch (a call
    that filled it, or flush()), holding the send lock. That close() used to wait for the
    lock its own thread held: the process hung for good. It now raises and changes nothing;
    the interrupted send goes on, and a later close() sends the rest, each event once."""
    import json
    import signal
    import threading

    from meter.errors import MeterConnectionError
    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=2, linger_ms=3_600_000)
    sent: list[list[str]] = []  # the idempotency keys of each message sent
    main = threading.get_ident()

    def send_task(*args: object, **kwargs: object) -> None:
        if not sent:  # the first send: the signal comes in the middle of it
            signal.pthread_kill(main, signal.SIGUSR1)
            for _ in range(1000):  # bytecodes, between which the handler runs
                pass
        (payload,) = kwargs["args"]  # type: ignore[misc]
        sent.append([event["args"]["idempotency_key"] for event in json.loads(payload)])

    producer._app.send_task = send_task  # type: ignore[method-assign]
    handled: list[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        try:
            producer.close()
        except MeterConnectionError as exc:
            handled.append(exc)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
        if sender == "fill":
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k1")
        else:
            producer.flush()
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k1")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(handled) == 1 and "signal handler" in str(handled[0])
    assert producer._closed is False  # the refused close() changed nothing
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k2")
    producer.close()
    expected = [["k0", "k1"], ["k2"]] if sender == "fill" else [["k0"], ["k1", "k2"]]
    assert sent == expected
    assert not producer._unsent and producer._batch is None


@pytest.mark.timeout(60)
def test_calls_made_inside_a_held_producer_lock_are_refused_not_hung():
    """What a signal handler meets when it interrupts the main thread inside the producer's
    own locked code: each call would wait for the lock its thread holds. Inside the
    buffer's lock each is refused, and the buffer is left as it was. Inside a send (the
    send lock only), close() and flush() are refused, but recording buffers as before; a
    batch it fills is left for the linger thread, sent after the interrupted send."""
    import time

    from meter.errors import MeterConnectionError
    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=3, linger_ms=3_600_000)
    sent: list[list[str]] = []

    def send_task(*args: object, **kwargs: object) -> None:
        import json

        (payload,) = kwargs["args"]  # type: ignore[misc]
        sent.append([event["args"]["idempotency_key"] for event in json.loads(payload)])

    producer._app.send_task = send_task  # type: ignore[method-assign]
    producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
    with producer._lock:
        for call in (
            producer.close,
            producer.flush,
            lambda: producer.consume("u1", "tokens", 1, "tok", idempotency_key="no"),
        ):
            with pytest.raises(MeterConnectionError, match="same thread"):
                call()
    assert producer._batch is not None and len(producer._batch.events) == 1
    with producer._send_lock:
        for call in (producer.close, producer.flush):
            with pytest.raises(MeterConnectionError, match="same thread"):
                call()
        producer.consume("u1", "tokens", 1, "tok", idempotency_key="k1")  # buffered
        handle = producer.consume("u1", "tokens", 1, "tok", idempotency_key="k2")  # fills
        assert producer._batch is None and len(producer._unsent) == 1
        time.sleep(0.2)
        assert sent == []  # the linger thread waits for the send lock
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [["k0", "k1", "k2"]] and handle.idempotency_key == "k2"
    assert producer._closed is False
    producer.close()
    assert sent == [["k0", "k1", "k2"]]


class _RefusingBroker:
    """A producer's ``send_task`` whose broker refuses every message, recording the most
    events the producer held at any send: its buffer and the message being sent (the
    batch the filling call took out of it)."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self.attempts = 0
        self.peak = 0
        self.peak_buffer = 0
        self.refuse = True
        self.sent: list[str] = []
        producer._app.send_task = self

    def buffered(self) -> list[str]:
        producer = self.producer
        with producer._lock:
            batches = [*producer._unsent, *([producer._batch] if producer._batch else [])]
            return [e["args"]["idempotency_key"] for b in batches for e in b.events]

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        import json

        from kombu.exceptions import OperationalError as KombuOperationalError

        (payload,) = kwargs["args"]
        message = [e["args"]["idempotency_key"] for e in json.loads(payload)]
        if not self.refuse:
            self.sent.extend(message)
            return
        self.attempts += 1
        buffered = self.buffered()
        self.peak_buffer = max(self.peak_buffer, len(buffered))
        self.peak = max(self.peak, len({*buffered, *message}))
        raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")


def test_a_refusing_broker_holds_the_buffer_to_max_buffered():
    """Guards the review of the buffer's growth: with the broker refusing, each call that
    filled a batch handed its own event back and kept the 4 others: 200 calls left 160
    events in memory, all lost if the process died. With max_buffered=20, a call that
    finds 20 buffered sends the oldest batch itself and, refused, hands its event back
    without buffering it: at most 20 events (+ the batch being sent) are ever held, each
    event is buffered or handed back (once), and the buffer goes once the broker is back."""
    from meter.producer import MeterProducer

    producer = MeterProducer(
        "redis://127.0.0.1:1/0", batch_size=5, linger_ms=3_600_000, max_buffered=20
    )
    broker = _RefusingBroker(producer)
    handed: list[str] = []
    handles = []
    try:
        for i in range(200):
            try:
                handles.append(producer.consume("u1", "tokens", 1, "tok", idempotency_key=f"k{i}"))
            except PublishError as exc:
                handed.extend(event["idempotency_key"] for event in exc.events)
            assert len(broker.buffered()) <= 20
        buffered = broker.buffered()
        assert broker.peak <= 20 + 5 and broker.peak_buffer <= 20
        assert len(buffered) == 20
        assert len(set(handed)) == len(handed) == 180
        assert sorted([*buffered, *handed]) == sorted(f"k{i}" for i in range(200))
        assert sorted(h.idempotency_key for h in handles) == sorted(buffered)
        assert broker.attempts >= 180  # back-pressure: the calls tried to send
        broker.refuse = False  # the broker is back
        producer.flush()
        assert sorted(broker.sent) == sorted(buffered) and broker.buffered() == []
        assert all(h._batch.sent for h in handles)
    finally:
        producer.close()
    assert sorted(broker.sent) == sorted(buffered)  # nothing sent twice


def test_many_threads_against_a_refusing_broker_stay_within_max_buffered():
    """Calls from many threads: the buffer never holds more than max_buffered events, and
    every event is buffered or handed back, exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    from meter.producer import MeterProducer

    producer = MeterProducer("redis://127.0.0.1:1/0", batch_size=5, linger_ms=5, max_buffered=20)
    broker = _RefusingBroker(producer)
    handed: list[str] = []

    def record(i: int) -> None:
        try:
            producer.consume("u1", "tokens", 1, "tok", idempotency_key=f"k{i}")
        except PublishError as exc:
            handed.extend(event["idempotency_key"] for event in exc.events)

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(record, range(400)))
        buffered = broker.buffered()
        assert broker.peak_buffer <= 20 and len(buffered) <= 20
        assert len(set(handed)) == len(handed)
        assert sorted([*buffered, *handed]) == sorted(f"k{i}" for i in range(400))
        broker.refuse = False
    finally:
        producer.close()
    assert sorted(broker.sent) == sorted(buffered)


def test_batch_mates_that_no_longer_fit_are_handed_back():
    """The call that filled a batch fails to send it while other calls filled the buffer:
    its batch-mates would take the buffer past max_buffered, so its error hands them back
    with its own event rather than keep them."""
    import threading

    from meter.producer import MeterProducer

    producer = MeterProducer(
        "redis://127.0.0.1:1/0", batch_size=3, linger_ms=3_600_000, max_buffered=3
    )
    broker = _HeldBroker(producer, refuse=True)
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k2")
        except BaseException as exc:  # checked below
            errors.append(exc)

    try:
        for key in ("k0", "k1"):
            producer.consume("u1", "tokens", 1, "tok", idempotency_key=key)
        filler = threading.Thread(target=fill)
        filler.start()  # takes [k0, k1, k2] out of the buffer, sends it
        assert broker.sending.wait(timeout=10)
        for key in ("k3", "k4"):
            producer.consume("u1", "tokens", 1, "tok", idempotency_key=key)
        broker.release.set()  # refused
        filler.join(timeout=30)
        (error,) = errors
        assert isinstance(error, PublishError)
        assert sorted(e["idempotency_key"] for e in error.events) == ["k0", "k1", "k2"]
        assert [e["args"]["idempotency_key"] for e in producer._batch.events] == ["k3", "k4"]
        assert not producer._unsent
        broker.refuse = False
    finally:
        producer.close()
    (kwargs,) = broker.sent
    assert '"k3"' in kwargs["args"][0] and '"k0"' not in kwargs["args"][0]  # type: ignore[index]


def test_a_full_buffer_inside_its_threads_own_send_hands_the_event_back():
    """A signal handler recording inside this thread's send (the send lock held) cannot
    send the oldest batch to make room: at the cap, its event is handed back at once."""
    from meter.producer import MeterProducer

    producer = MeterProducer(
        "redis://127.0.0.1:1/0", batch_size=2, linger_ms=3_600_000, max_buffered=2
    )
    broker = _RefusingBroker(producer)
    try:
        with producer._send_lock:
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k0")
            producer.consume("u1", "tokens", 1, "tok", idempotency_key="k1")  # fills: waits
            with pytest.raises(PublishError, match="max_buffered=2") as full:
                producer.consume("u1", "tokens", 1, "tok", idempotency_key="k2")
            assert [e["idempotency_key"] for e in full.value.events] == ["k2"]
            assert broker.attempts == 0 and broker.buffered() == ["k0", "k1"]
        broker.refuse = False
    finally:
        producer.close()
    assert broker.sent == ["k0", "k1"]


@pytest.mark.parametrize("value", [0, 4, -1, 10_000_001, 2.5, "20", True])
def test_a_bad_max_buffered_is_refused_by_name(value):
    from meter.producer import MeterProducer

    with pytest.raises(ValidationError, match=r"^max_buffered: ") as info:
        MeterProducer("redis://127.0.0.1:1/0", batch_size=5, max_buffered=value)
    assert info.value.parameter == "max_buffered"


@pytest.mark.parametrize("name", ["batch_size", "chunk_size"])
def test_a_message_of_over_1000_events_is_refused_by_name(name):
    """``meter.apply_events`` refuses a batch of over 1000 events when any goes one by one
    (050: their locks fill the server's shared lock table), so no producer sends one."""
    from meter.producer import MeterProducer

    with pytest.raises(ValidationError, match=rf"^{name}: ") as info:
        MeterProducer("redis://127.0.0.1:1/0", **{name: 1001})  # type: ignore[arg-type]
    assert info.value.parameter == name
    MeterProducer("redis://127.0.0.1:1/0", **{name: 1000}).close()  # type: ignore[arg-type]


# Each call with every argument bad: the first one of the signature is the one named.
_ALL_BAD: dict[str, dict[str, Any]] = {
    "consume": {"user_id": "", "event_type": "", "amount": -1, "unit": "", "resource": " r",
                "check_balance": "yes", "idempotency_key": "", "event_time": "now",
                "metadata": []},
    "allocate": {"user_id": "", "event_type": "", "amount": -1, "unit": "", "resource": " r",
                 "idempotency_key": "", "event_time": "now", "metadata": []},
    "adjust": {"user_id": "", "event_type": "", "amount": 0, "unit": "", "resource": " r",
               "reference_id": "x", "idempotency_key": "", "metadata": []},
    "reserve": {"user_id": "", "event_type": "", "amount": -1, "unit": "", "resource": " r",
                "ttl_seconds": 0, "idempotency_key": "", "metadata": [], "reservation_id": ""},
}  # fmt: skip


@pytest.mark.parametrize(
    ("op", "fixed"), [(op, fixed) for op in sorted(_ALL_BAD) for fixed in range(len(_ALL_BAD[op]))]
)
def test_the_producer_names_the_bad_argument_the_client_names(op, fixed):
    """MeterProducer validates "the same way" as MeterClient: with several arguments bad,
    both name the first bad one in signature order (the producer named the key or the
    reservation id before the account)."""
    from meter import MeterClient
    from meter.producer import MeterProducer

    good = {"user_id": "u", "event_type": "e", "amount": 1, "unit": "t", "resource": None,
            "check_balance": False, "idempotency_key": "k", "event_time": None,
            "metadata": None, "reference_id": None, "ttl_seconds": 60,
            "reservation_id": "r"}  # fmt: skip
    names = list(_ALL_BAD[op])
    # the first `fixed` arguments good, the rest bad
    kwargs = {n: good[n] if i < fixed else _ALL_BAD[op][n] for i, n in enumerate(names)}
    client = MeterClient("postgresql://127.0.0.1:1/none")  # validation needs no server
    producer = MeterProducer("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ValidationError) as by_client:
            getattr(client, op)(**kwargs)
        with pytest.raises(ValidationError) as by_producer:
            getattr(producer, op)(**kwargs)
    finally:
        producer.close()
        client.close()
    assert by_producer.value.parameter == by_client.value.parameter == names[fixed]


@pytest.mark.parametrize("op", ["consume", "allocate"])
@pytest.mark.parametrize(
    "when", [datetime(1899, 12, 31, tzinfo=UTC), datetime.now(UTC) + timedelta(days=2)]
)
def test_an_event_time_out_of_range_is_named_after_the_client_s_own_checks(op, when):
    """The client leaves an event_time's range to the database, which it reaches only once
    every argument passed its own checks: with bad metadata too it names the metadata. The
    producer, which checks the range itself, named the event_time."""
    from meter import MeterClient
    from meter.producer import MeterProducer

    kwargs = {"user_id": "u", "event_type": "e", "amount": 1, "unit": "t",
              "event_time": when, "metadata": []}  # fmt: skip
    client = MeterClient("postgresql://127.0.0.1:1/none")  # validation needs no server
    producer = MeterProducer("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ValidationError) as by_client:
            getattr(client, op)(**kwargs)
        with pytest.raises(ValidationError) as by_producer:
            getattr(producer, op)(**kwargs)
        with pytest.raises(ValidationError, match="event_time") as alone:
            getattr(producer, op)(**{**kwargs, "metadata": None})
    finally:
        producer.close()
        client.close()
    assert by_producer.value.parameter == by_client.value.parameter == "metadata"
    assert alone.value.parameter == "event_time"


def test_max_buffered_defaults_to_ten_batches():
    from meter.producer import MeterProducer

    for kwargs, expected in (({"batch_size": 5}, 50), ({"linger_ms": 10}, 5000)):
        producer = MeterProducer("redis://127.0.0.1:1/0", **kwargs)  # type: ignore[arg-type]
        try:
            assert producer._max_buffered == expected
        finally:
            producer.close()
    exact = MeterProducer("redis://127.0.0.1:1/0", batch_size=5, max_buffered=5)
    assert exact._max_buffered == 5
    exact.close()


def test_holds_type_marker_finds_kombus_marker_objects_at_any_depth():
    # What the worker sends as JSON text rather than as the object (send_child): only an
    # event kombu's JSON decoder would change; every other one goes as the object, which a
    # worker not yet upgraded also reads.
    marker = {"__type__": "decimal", "__value__": "1"}
    assert wire.holds_type_marker(marker)
    assert wire.holds_type_marker({"op": "consume", "args": {"metadata": {"a": [1, marker]}}})
    for plain in (
        {"op": "consume", "args": {"metadata": {"__type__": "x"}}},  # one key alone
        {"__type__": "x", "__value__": 1, "more": 2},  # other keys too
        ["__type__", "__value__"],
        {"args": {"user_id": "u1", "amount": "5"}},
    ):
        assert not wire.holds_type_marker(plain), plain


def test_holds_type_marker_walks_metadata_as_deep_as_the_producer_takes():
    # Review C2: the walk recursed, two frames a level, and raised RecursionError past some
    # 450 levels of the 800 the producer takes: a commit sent before its reserve could
    # not be handed to a task of its own, and went to the dead letters.
    from meter.producer import MAX_METADATA_DEPTH

    marker = {"__type__": "decimal", "__value__": "1"}
    deep: dict[str, Any] = {}
    bottom = deep
    for _ in range(MAX_METADATA_DEPTH):
        bottom["k"] = {}
        bottom = bottom["k"]
    event = {"op": "commit", "args": {"reservation_id": "r", "metadata": deep}}
    assert not wire.holds_type_marker(event)
    bottom["k"] = [marker]
    assert wire.holds_type_marker(event)


def test_nested_deeper_than_counts_levels_below_the_value_without_recursion():
    assert not wire.nested_deeper_than({"a": 1, "b": [1, 2]}, 1)
    assert wire.nested_deeper_than({"a": {"b": [1]}}, 1)
    assert not wire.nested_deeper_than({"a": {"b": [1]}}, 2)
    assert not wire.nested_deeper_than("text", 0)
    deep: list[Any] = []
    for _ in range(10_000):  # far past what a recursive walk goes through
        deep = [deep]
    assert wire.nested_deeper_than(deep, wire.OBJECT_DEPTH)
    assert not wire.nested_deeper_than(deep, 10_000)


def test_dumps_writes_a_value_nested_past_the_recursion_limit_as_it_writes_others():
    # Review B3: both encoders recurse; an event nested deeper than the worker's stack
    # could not be handed to a task of its own, nor stored but as its ascii() text.
    from meter import types as t

    for value in (
        {"a": [1, Decimal("1.50"), "é\n", None, True, {}, []], "b": ({"c": "d"}, 2.5), "": 0},
        [[], [[]], {"x": [{"y": []}]}],
        Decimal("-0.0"),
    ):
        assert wire._dumps_iteratively(value) == t.dumps(value) == wire.dumps(value)
    deep: Any = {"amount": Decimal("1.5")}
    for i in range(10_000):
        deep = {"k": deep} if i % 2 else [deep, "x"]
    text = wire.dumps(deep)
    assert text == wire._dumps_iteratively(deep)
    assert text.startswith('{"k":[{"k":[') and text.endswith(',"x"]}')
    assert '[{"amount":1.5},"x"]' in text
    assert wire.dumps(t.loads(text)) == text
    cycle: list[Any] = [1]
    cycle.append([cycle])
    with pytest.raises(ValueError, match="circular"):
        wire._dumps_iteratively(cycle)
    with pytest.raises(ValueError, match="NUL"):
        wire._dumps_iteratively([[{"x": "a\x00b"}]])
    with pytest.raises(TypeError, match="keys must be str"):
        wire._dumps_iteratively([{1: 2}])
    shared = {"s": 1}
    assert wire._dumps_iteratively([shared, [shared]]) == '[{"s":1},[{"s":1}]]'


def _written(dump: Any, value: Any) -> tuple[str, str]:
    try:
        return "text", dump(value)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities too: refused
    | st.decimals()  # sNaN, NaN and infinities too: refused
    | st.text()  # NUL, lone surrogates, control characters, U+2028
    | st.sampled_from([-0.0, 1e300, 5e-324, 1e16, Decimal("-0"), Decimal("1E+5"), "\x00"])
    | st.sampled_from([b"x", {1}, object()])  # no JSON form: TypeError
)
_JSON_KEYS = st.text() | st.sampled_from(["\x00", "\ud800", 1, None, 1.5, ("k",)])


@settings(max_examples=examples(1500), deadline=None)
@given(
    st.recursive(
        _JSON_SCALARS,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.lists(inner, max_size=4).map(tuple)
            | st.dictionaries(_JSON_KEYS, inner, max_size=4)
        ),
        max_leaves=25,
    )
)
def test_dumps_without_recursion_writes_and_refuses_every_value_as_types_dumps(value: Any):
    # Review R4a: it checked an object's keys when opening it, so of a NUL in a value
    # and a later key not str it named the key (TypeError) where meter.types.dumps names
    # the NUL (ValueError).
    from meter import types as t

    assert _written(wire._dumps_iteratively, value) == _written(t.dumps, value)


def test_dumps_without_recursion_writes_a_mapping_that_makes_its_values_as_it_is_read():
    # Review R4a: the walk kept only the ids of the containers it was in; a value made by
    # a Mapping as it is read was freed while written, the next one made took its id, and
    # was refused as a circular reference that meter.types.dumps writes.
    from collections.abc import Iterator, Mapping

    from meter import types as t

    class Made(Mapping[str, Any]):
        def __init__(self, depth: int) -> None:
            self.depth = depth

        def __getitem__(self, key: str) -> Any:
            if key != "a":
                raise KeyError(key)
            return [Made(self.depth - 1)] if self.depth else []

        def __iter__(self) -> Iterator[str]:
            return iter(["a"])

        def __len__(self) -> int:
            return 1

    assert wire._dumps_iteratively(Made(50)) == t.dumps(Made(50))


# Review H of the buffered mode (max_buffered, fillers, wait(), flush()): a broker stub
# that refuses, recovers, or holds chosen threads; a send lock with a gate.

NOWHERE = "redis://127.0.0.1:1/0"


class _Broker:
    """A producer's ``send_task``: refuses while ``refuse``, takes ``delay`` seconds per
    message, and blocks the threads named in ``hold`` until ``release`` is set. Records
    the keys of every message it accepted (``sent``) and the number of attempts."""

    def __init__(self, producer: MeterProducer, *, refuse: bool = False, delay: float = 0.0):
        self.refuse = refuse
        self.delay = delay
        self.attempts = 0
        self.sent: list[str] = []
        self.messages: list[list[str]] = []
        self.hold: set[int] = set()
        self.sending = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None  # raised instead of a refusal, once
        self._lock = threading.Lock()
        producer._app.send_task = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        (payload,) = kwargs["args"]
        decoded = json.loads(payload)
        events = decoded if isinstance(decoded, list) else [decoded]
        keys = [e["args"].get("idempotency_key") or e["args"]["reservation_id"] for e in events]
        with self._lock:
            self.attempts += 1
        if threading.get_ident() in self.hold:
            self.sending.set()
            assert self.release.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)
        error, self.error = self.error, None
        if error is not None:
            raise error
        if self.refuse:
            raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")
        with self._lock:
            self.sent.extend(keys)
            self.messages.append(keys)


class _GatedRLock:
    """The producer's send lock, with a gate: a thread in ``gated`` waits for ``gate``
    before it tries to take the lock. Models a filler preempted between leaving the
    buffer's lock (its batch taken out of the buffer) and taking the send lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.gated: set[int] = set()
        self.at_gate = threading.Event()
        self.gate = threading.Event()

    def __enter__(self) -> bool:
        if threading.get_ident() in self.gated:
            self.at_gate.set()
            assert self.gate.wait(timeout=30)
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined]


def _keys(events: list[dict[str, Any]]) -> list[str]:
    return [e["idempotency_key"] for e in events]


def _buffered(producer: MeterProducer) -> list[str]:
    with producer._lock:
        batches = [*producer._unsent, *([producer._batch] if producer._batch else [])]
        return [e["args"]["idempotency_key"] for b in batches for e in b.events]


def _consume(producer: MeterProducer, key: str, **kwargs: Any) -> Any:
    return producer.consume("u1", "tokens", 1, "tok", idempotency_key=key, **kwargs)


def _start_filler(producer: MeterProducer, key: str, errors: list[BaseException],
                  handles: list[Any], gated: _GatedRLock | None = None,
                  broker: _Broker | None = None) -> threading.Thread:  # fmt: skip
    """A thread whose call fills the open batch (gated at the send lock / held in the
    broker when asked)."""
    started = threading.Event()

    def run() -> None:
        if gated is not None:
            gated.gated.add(threading.get_ident())
        if broker is not None:
            broker.hold.add(threading.get_ident())
        started.set()
        try:
            handles.append(_consume(producer, key))
        except BaseException as exc:  # checked by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(timeout=10)
    return thread


def _traffic(producer: MeterProducer, stop: threading.Event, prefix: str) -> threading.Thread:
    def run() -> None:
        i = 0
        while not stop.is_set():
            try:
                _consume(producer, f"{prefix}{i}")
            except MeterConnectionError:
                return  # closed
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# Guards: a flush sends what was buffered when it started and stops (it used to loop
# until the buffer was empty, for ever under steady traffic).
def test_flush_returns_while_other_threads_keep_recording():
    """flush() promises to send the events buffered when it is called and return once they
    are in the broker. _flush() loops until the buffer is empty, re-taking the open batch
    each round: while other threads record faster than one send takes (a broker that
    accepts slowly), the buffer is never empty and flush() does not return until the
    traffic stops: a hang for a caller who flushes at a checkpoint of a busy service."""
    producer = MeterProducer(NOWHERE, batch_size=1000, linger_ms=3_600_000)
    broker = _Broker(producer, delay=0.02)  # 20 ms per message: a slow but healthy broker
    stop = threading.Event()
    traffic = [_traffic(producer, stop, p) for p in ("a", "b")]
    try:
        time.sleep(0.2)
        _consume(producer, "mine")
        done = threading.Event()
        flusher = threading.Thread(target=lambda: (producer.flush(), done.set()), daemon=True)
        started = time.monotonic()
        flusher.start()
        returned = done.wait(timeout=3.0)
        elapsed = time.monotonic() - started
        assert "mine" in broker.sent
        assert returned, f"flush() still running after {elapsed:.1f} s of steady traffic"
    finally:
        stop.set()
        for thread in traffic:
            thread.join(timeout=10)
        producer.close()


# Guards: wait() passes its deadline to the flush it starts with.
def test_wait_on_a_buffered_event_honours_its_timeout_under_traffic():
    """EventHandle.wait(timeout) flushes first; under steady traffic that flush never ends,
    so wait(timeout=0.5) blocks for as long as the other threads record (the docstring:
    "timeout: seconds to wait in all")."""
    producer = MeterProducer(NOWHERE, batch_size=1000, linger_ms=3_600_000, results=True)
    _Broker(producer, delay=0.02)

    def fetch(task_id: str, deadline: float | None) -> Any:  # no worker: times out at once
        assert deadline is not None
        time.sleep(max(deadline - time.monotonic(), 0))
        raise TimeoutError(f"no outcome for task {task_id} yet")

    producer._fetch = fetch  # type: ignore[method-assign]
    stop = threading.Event()
    traffic = [_traffic(producer, stop, p) for p in ("a", "b")]
    outcome: list[BaseException] = []
    try:
        time.sleep(0.2)
        handle = _consume(producer, "mine")

        def wait() -> None:
            try:
                handle.wait(timeout=0.5)
            except BaseException as exc:  # TimeoutError expected (no worker)
                outcome.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(timeout=4.0)
        assert not waiter.is_alive(), "wait(timeout=0.5) still blocked (in flush()) after 4 s"
        assert [type(exc) for exc in outcome] == [TimeoutError]
    finally:
        stop.set()
        for thread in traffic:
            thread.join(timeout=10)
        producer.close()


# Guards: flush() waits for the calls that filled a batch before it (as close() does).
def test_flush_waits_for_the_batch_a_filling_call_took_out_of_the_buffer():
    """flush(): "Returns once they are in the broker, including a batch another thread was
    sending." A call that fills a batch takes it out of the buffer, then takes the send
    lock. A flush() that gets the send lock in between sees an empty buffer and returns
    at once: k0, whose call returned before flush() started, is not in the broker (close()
    and wait() wait for such a call; flush() does not)."""
    producer = MeterProducer(NOWHERE, batch_size=2, linger_ms=3_600_000)
    broker = _Broker(producer)
    gated = _GatedRLock()
    producer._send_lock = gated  # type: ignore[assignment]
    errors: list[BaseException] = []
    handles: list[Any] = []
    try:
        _consume(producer, "k0")  # returned: buffered
        filler = _start_filler(producer, "k1", errors, handles, gated=gated)
        assert gated.at_gate.wait(timeout=10)  # [k0, k1] out of the buffer, not yet sending
        returned: list[list[str]] = []  # what the broker held when flush() returned
        flusher = threading.Thread(
            target=lambda: (producer.flush(), returned.append(list(broker.sent))), daemon=True
        )
        flusher.start()
        flusher.join(timeout=0.5)  # (a flush that waits for the filler is still waiting)
        gated.gate.set()
        filler.join(timeout=10)
        flusher.join(timeout=10)
        assert errors == [] and broker.sent == ["k0", "k1"]
        (sent_at_flush,) = returned
        assert "k0" in sent_at_flush, f"flush() returned with {sent_at_flush} in the broker"
    finally:
        gated.gate.set()
        producer.close()


# Guards: wait() calls "never sent" only a batch handed back, not one put back.
def test_wait_for_a_batch_its_filler_put_back_does_not_call_it_never_sent():
    """wait() on k0 while another thread's call, which filled k0's batch, is about to send
    it: _await_filler waits for that call. The send is refused; k0 fits, so it goes back
    to the buffer (to be sent by the next flush, linger or close). wait() then sees
    batch.sent False and raises "the event was never sent ... handed it back in its
    error" with k0 in exc.events: k0 is *not* in the filler's error, it is buffered and
    is sent later, so a caller following the docs resends an event that is also sent."""
    producer = MeterProducer(NOWHERE, batch_size=2, linger_ms=3_600_000, results=True)
    broker = _Broker(producer, refuse=True)
    gated = _GatedRLock()
    producer._send_lock = gated  # type: ignore[assignment]
    errors: list[BaseException] = []
    handles: list[Any] = []
    waited: list[BaseException] = []
    try:
        h0 = _consume(producer, "k0")
        filler = _start_filler(producer, "k1", errors, handles, gated=gated)
        assert gated.at_gate.wait(timeout=10)

        def wait() -> None:
            try:
                h0.wait(timeout=5)
            except BaseException as exc:  # checked below
                waited.append(exc)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        time.sleep(0.3)  # wait(): its flush found nothing; it waits for the filler
        gated.gate.set()
        filler.join(timeout=10)
        waiter.join(timeout=10)
        (error,) = errors
        assert _keys(error.events) == ["k1"]  # the filler handed back only its own event
        assert _buffered(producer) == ["k0"]  # k0 is buffered again
        (raised,) = waited
        assert "never sent" not in str(raised), f"wait() raised {raised!r} for a buffered event"
        broker.refuse = False
    finally:
        gated.gate.set()
        broker.refuse = False
        producer.close()
    assert broker.sent == ["k0"]  # ...and k0 is sent after all


# Guards: a flush that returns has sent every event buffered before it; batch-mates
# their filler handed back meanwhile (no room) are in the flush's error too.
def test_a_flush_that_returns_has_sent_every_event_buffered_before_it():
    """The broker refuses, then recovers. A filling call is sending [k0, k1, k2] when
    flush() is called; other calls buffer k3, k4 meanwhile. The filler is refused and, the
    buffer being full, hands k0 and k1 back in *its* error; flush() then sends [k3, k4]
    and returns without error. flush()'s caller is told that every event buffered before
    it is in the broker (reliability.md promise 1: "buffered mode after flush()"), yet k0
    and k1, whose calls returned before flush(), were never sent and are not in any error
    flush() raised."""
    producer = MeterProducer(NOWHERE, batch_size=3, linger_ms=3_600_000, max_buffered=3)
    broker = _Broker(producer, refuse=True)
    errors: list[BaseException] = []
    handles: list[Any] = []
    flushed: list[BaseException | None] = []
    try:
        _consume(producer, "k0")
        _consume(producer, "k1")
        filler = _start_filler(producer, "k2", errors, handles, broker=broker)
        assert broker.sending.wait(timeout=10)
        _consume(producer, "k3")
        _consume(producer, "k4")

        def flush() -> None:
            try:
                producer.flush()
                flushed.append(None)
            except BaseException as exc:  # checked below
                flushed.append(exc)

        flusher = threading.Thread(target=flush, daemon=True)
        flusher.start()
        time.sleep(0.2)  # flush() waits for the send lock
        broker.refuse = False  # the broker recovers: only the filler's message is refused
        broker.error = KombuOperationalError("Error 111 connecting to the broker")
        broker.release.set()
        filler.join(timeout=10)
        flusher.join(timeout=10)
        (error,) = errors
        assert isinstance(error, PublishError)
        (result,) = flushed
        in_flush_error = _keys(result.events) if isinstance(result, PublishError) else []
        missing = [k for k in ("k0", "k1") if k not in broker.sent and k not in in_flush_error]
        assert missing == [], (
            f"flush() returned {result!r}; sent {broker.sent}; {missing} buffered before it "
            "neither sent nor in its error"
        )
    finally:
        broker.release.set()
        producer.close()


# Guards: wait() on an event handed back raises at once, with that event, sending nothing.
def test_wait_on_a_handed_back_event_raises_at_once_with_that_event():
    """EventHandle.wait(): an event handed back by the call that filled its batch (the
    buffer full) raises PublishError "at once, whatever timeout", whose events hold it
    again. wait() first flushes the *rest* of the buffer: with the broker still refusing,
    it makes another send attempt and raises that flush's error, whose events are the
    other buffered events (k3, k4), not the one waited for (k0)."""
    producer = MeterProducer(
        NOWHERE, batch_size=3, linger_ms=3_600_000, max_buffered=3, results=True
    )
    broker = _Broker(producer, refuse=True)
    errors: list[BaseException] = []
    handles: list[Any] = []
    try:
        h0 = _consume(producer, "k0")
        _consume(producer, "k1")
        filler = _start_filler(producer, "k2", errors, handles, broker=broker)
        assert broker.sending.wait(timeout=10)
        _consume(producer, "k3")
        _consume(producer, "k4")
        broker.release.set()
        filler.join(timeout=10)
        (error,) = errors
        assert sorted(_keys(error.events)) == ["k0", "k1", "k2"]  # k0 handed back
        attempts = broker.attempts
        with pytest.raises(PublishError) as info:
            h0.wait(timeout=5)
        assert _keys(info.value.events) == ["k0"], (
            f"wait() for k0 raised with events {_keys(info.value.events)}: {info.value}"
        )
        assert broker.attempts == attempts  # at once: no send
    finally:
        broker.refuse = False
        producer.close()


# Guards: in a child forked while its parent sends a batch, wait() on a parent's handle
# waits for the task's outcome (the parent sends it), never calls it never sent.
def test_a_forked_childs_wait_does_not_call_its_parents_event_never_sent():
    """A child forked while a parent's thread is sending the batch it filled ([k0, k1]).
    In the child, h0.wait() finds the batch unsent, no filler in its (reset) _filling, and
    raises at once PublishError "the event was never sent ... handed it back in its
    error" with k0 in exc.events: none of that is true, the parent sends k0 (and a child
    that resends exc.events, as told, sends it a second time)."""
    import os

    producer = MeterProducer(NOWHERE, batch_size=2, linger_ms=3_600_000, results=True)
    broker = _Broker(producer)
    errors: list[BaseException] = []
    handles: list[Any] = []
    try:
        h0 = _consume(producer, "k0")
        filler = _start_filler(producer, "k1", errors, handles, broker=broker)
        assert broker.sending.wait(timeout=10)  # the parent's filler is sending [k0, k1]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                try:
                    h0.wait(timeout=1)
                    answer = "returned"
                except BaseException as exc:
                    answer = f"{type(exc).__name__}: {exc}"
                os.write(write, answer.encode()[:4000])
            finally:
                os._exit(0)
        os.close(write)
        broker.release.set()
        filler.join(timeout=10)
        os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read().decode()
        assert errors == [] and broker.sent == ["k0", "k1"]  # the parent sent k0
        assert "never sent" not in answer, f"the child's wait(): {answer}"
        # ...nor loops on a flush of its own buffer (empty): it waits for the task.
        assert "not sent yet" not in answer, f"the child's wait(): {answer}"
    finally:
        broker.release.set()
        producer.close()


# Guards: batch-mates of a filler that failed otherwise than by the broker (a RuntimeError)
# that no longer fit go back in a PublishError chained from that error, not into the
# buffer past max_buffered.
def test_the_buffer_never_holds_more_than_max_buffered():
    """README/docstrings: "The buffer never holds more than max_buffered events". A call
    that filled a batch fails to send it with an error that is not the broker's (here a
    RuntimeError from Celery; a KeyboardInterrupt does the same) while other calls filled
    the buffer: _keep_batch_mates puts the batch-mates back whatever the room, as only a
    PublishError can hand them back. 3 + 2 = 4 events held with max_buffered=3."""
    producer = MeterProducer(NOWHERE, batch_size=3, linger_ms=3_600_000, max_buffered=3)
    broker = _Broker(producer)
    errors: list[BaseException] = []
    handles: list[Any] = []
    try:
        _consume(producer, "k0")
        _consume(producer, "k1")
        filler = _start_filler(producer, "k2", errors, handles, broker=broker)
        assert broker.sending.wait(timeout=10)
        _consume(producer, "k3")
        _consume(producer, "k4")
        broker.error = RuntimeError("not the broker's")
        broker.refuse = True  # then the broker refuses: what is buffered stays buffered
        broker.release.set()
        filler.join(timeout=10)
        (error,) = errors
        held = _buffered(producer)
        assert len(held) <= 3, f"buffer holds {held} with max_buffered=3"
        # Handed back instead, in a PublishError chained from the RuntimeError.
        assert isinstance(error, PublishError) and isinstance(error.__cause__, RuntimeError)
        assert sorted(_keys(error.events)) == ["k0", "k1", "k2"] and held == ["k3", "k4"]
    finally:
        broker.release.set()
        broker.refuse = False
        producer.close()


def test_an_interrupted_filler_keeps_its_batch_mates_whatever_the_room():
    """The documented exception to max_buffered: an interrupt (KeyboardInterrupt) in the
    call sending the batch it filled goes on as it is (never turned into a PublishError),
    so its batch-mates, which it cannot carry, stay buffered (fewer than batch_size over)
    and are sent later: none is lost."""
    producer = MeterProducer(NOWHERE, batch_size=3, linger_ms=3_600_000, max_buffered=3)
    broker = _Broker(producer)
    errors: list[BaseException] = []
    handles: list[Any] = []
    try:
        _consume(producer, "k0")
        _consume(producer, "k1")
        filler = _start_filler(producer, "k2", errors, handles, broker=broker)
        assert broker.sending.wait(timeout=10)
        _consume(producer, "k3")
        _consume(producer, "k4")
        broker.error = KeyboardInterrupt()
        broker.release.set()
        filler.join(timeout=10)
        assert [type(exc) for exc in errors] == [KeyboardInterrupt]
        held = _buffered(producer)  # (or already sent by the linger thread's retry)
        assert sorted({*held, *broker.sent}) == ["k0", "k1", "k3", "k4"]
    finally:
        broker.release.set()
        producer.close()
    assert sorted(broker.sent) == ["k0", "k1", "k3", "k4"]


# ------------------------------------- linger and deadlines (a review of the buffer's fixes)


class _LingerBroker:
    """A producer's ``send_task``: refuses while ``refuse``, takes ``delay`` s per message,
    holds the threads in ``hold`` until ``release``; records accepted keys in ``sent``."""

    def __init__(self, producer: MeterProducer, *, refuse: bool = False, delay: float = 0.0):
        self.refuse = refuse
        self.delay = delay
        self.sent: list[str] = []
        self.messages: list[list[str]] = []
        self.hold: set[int] = set()
        self.sending = threading.Event()
        self.release = threading.Event()
        self.linger_attempt = threading.Event()  # set at each attempt by the linger thread
        self.error: BaseException | None = None  # raised once, instead of sending
        self._lock = threading.Lock()
        producer._app.send_task = self  # type: ignore[method-assign]

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        (payload,) = kwargs["args"]
        decoded = json.loads(payload)
        events = decoded if isinstance(decoded, list) else [decoded]
        keys = [e["args"]["idempotency_key"] for e in events]
        if threading.get_ident() in self.hold:
            self.sending.set()
            assert self.release.wait(timeout=30)
        if self.delay:
            time.sleep(self.delay)
        error, self.error = self.error, None
        if error is not None:
            raise error
        if self.refuse:
            if threading.current_thread().name == "meter-producer-linger":
                self.linger_attempt.set()
            raise KombuOperationalError("Error 111 connecting to the broker: Connection refused")
        with self._lock:
            self.sent.extend(keys)
            self.messages.append(keys)


class _LingerWatchedRLock:
    """The producer's send lock; sets ``linger_waits`` when the linger thread asks for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.linger_waits = threading.Event()

    def _note(self) -> None:
        if threading.current_thread().name == "meter-producer-linger":
            self.linger_waits.set()

    def __enter__(self) -> bool:
        self._note()
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        self._note()
        return self._lock.acquire(*args, **kwargs)

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined]


def _linger_consume(producer: MeterProducer, key: str, **kwargs: Any) -> Any:
    return producer.consume("u1", "tokens", 1, "tok", idempotency_key=key, **kwargs)


def _linger_buffered(producer: MeterProducer) -> list[str]:
    with producer._lock:
        batches = [*producer._unsent, *([producer._batch] if producer._batch else [])]
        return [e["args"]["idempotency_key"] for b in batches for e in b.events]


def test_a_batch_opened_during_another_threads_flush_waits_its_linger():
    """A batch opened while another thread's flush() sends [k0] (a slow broker) waits its
    linger_ms: the linger thread, woken by k1 and seeing a batch in flight as due, sent the
    young open batch right after the flush, an extra one-event message per flush under
    traffic (found by a review of the buffer's fixes)."""
    producer = MeterProducer(NOWHERE, batch_size=100, linger_ms=3_600_000)
    broker = _LingerBroker(producer)
    watched = _LingerWatchedRLock()
    producer._send_lock = watched  # type: ignore[assignment]
    try:
        _linger_consume(producer, "k0")

        def flush() -> None:
            broker.hold.add(threading.get_ident())
            producer.flush()

        flusher = threading.Thread(target=flush, daemon=True)
        flusher.start()
        assert broker.sending.wait(timeout=10)  # flush() is sending [k0]
        _linger_consume(producer, "k1")  # opens a new batch (due in an hour)
        watched.linger_waits.wait(timeout=3)  # the linger thread wants the send lock
        broker.release.set()
        flusher.join(timeout=10)
        time.sleep(0.5)
        assert broker.messages == [["k0"]], (
            f"sent {broker.messages}: [k1] sent at once, linger_ms=3600000 ignored"
        )
        assert _linger_buffered(producer) == ["k1"]
    finally:
        broker.release.set()
        producer.close()


def test_wait_on_a_buffered_event_keeps_its_timeout_while_flushing_a_backlog():
    """wait(timeout) keeps its deadline between the batches it flushes: with 8 batches left
    by refusals and a slow broker back (0.3 s a message), wait(0.5) sent them all and
    returned after ~2.7 s. What is left stays buffered."""
    producer = MeterProducer(NOWHERE, batch_size=50, linger_ms=3_600_000, results=True)
    broker = _LingerBroker(producer, refuse=True)

    def fetch(task_id: str, deadline: float | None) -> Any:  # no worker: times out
        assert deadline is not None
        time.sleep(max(deadline - time.monotonic(), 0))
        raise TimeoutError(f"no outcome for task {task_id} yet")

    producer._fetch = fetch  # type: ignore[method-assign]
    try:
        for i in range(8):
            _linger_consume(producer, f"k{i}")
            with pytest.raises(PublishError):  # refused: the batch stays unsent
                producer.flush()
        handle = _linger_consume(producer, "mine")
        broker.linger_attempt.clear()
        assert broker.linger_attempt.wait(timeout=5)  # the linger thread just failed: sleeps 1 s
        broker.refuse, broker.delay = False, 0.3
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            handle.wait(timeout=0.5)
        elapsed = time.monotonic() - started
        assert elapsed < 1.2, f"wait(timeout=0.5) took {elapsed:.1f} s (sent {broker.messages})"
    finally:
        broker.refuse, broker.delay = False, 0.0
        producer.close()


def test_batch_mates_put_back_are_retried_within_linger_ms():
    """Batch-mates put back after their filler failed otherwise than by the broker (a
    RuntimeError from Celery) wake the linger thread: with linger_ms=10 they waited for its
    1 s nap (no open batch), 100 x linger_ms."""
    producer = MeterProducer(NOWHERE, batch_size=3, linger_ms=10)
    broker = _LingerBroker(producer)
    errors: list[BaseException] = []
    try:
        _linger_consume(producer, "k0")
        _linger_consume(producer, "k1")

        def fill() -> None:
            broker.hold.add(threading.get_ident())
            try:
                _linger_consume(producer, "k2")
            except BaseException as exc:  # checked below
                errors.append(exc)

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        assert broker.sending.wait(timeout=10)
        time.sleep(0.2)  # the linger thread found nothing to send: it waits (1 s)
        broker.error = RuntimeError("not the broker's")
        broker.release.set()
        filler.join(timeout=10)
        assert [type(e) for e in errors] == [RuntimeError]
        put_back = time.monotonic()
        while "k0" not in broker.sent and time.monotonic() - put_back < 3:
            time.sleep(0.005)
        late = time.monotonic() - put_back
        assert late < 0.4, f"k0, k1 put back were sent {late:.2f} s later (linger_ms=10)"
    finally:
        broker.release.set()
        producer.close()


def test_an_unreadable_messages_description_is_bounded_whatever_its_size():
    """An unreadable message goes to its dead letter as text, escaped: a large binary body
    grew up to eightfold, a hand-over Redis could refuse, and the message then came back
    to be handed over for ever. Body and headers are kept to KEPT_CHARACTERS each, with
    the length and SHA-256 of the whole."""
    import hashlib
    from types import SimpleNamespace

    from worker.consumer import KEPT_CHARACTERS, describe

    body = bytes(range(256)) * 40_000  # 10 MB, mostly escapes
    message = SimpleNamespace(
        headers={"id": "t", "x": "y" * (2 * KEPT_CHARACTERS)}, body=body,
        content_type="application/x-binary", content_encoding="binary", delivery_tag="7",
    )  # fmt: skip
    d = describe(message, "message: cannot decode its body")
    whole = body.decode("utf-8", "backslashreplace")
    digest = hashlib.sha256(whole.encode("utf-8", "backslashreplace")).hexdigest()
    assert (
        d["body"]
        == f"{whole[:KEPT_CHARACTERS]}... [{len(whole)} characters in all, sha256 {digest}]"
    )
    assert len(d["headers"]) < KEPT_CHARACTERS + 200 and d["headers"].startswith("{'id': 't'")
    small = describe(SimpleNamespace(headers=None, body=b"\xff{", delivery_tag=1), "r")
    assert (small["body"], small["headers"], small["delivery_tag"]) == ("\\xff{", None, "1")


def _keyed(key: Any, namespace: Any = "n") -> dict[str, Any]:
    return {"op": "consume", "namespace": namespace, "args": {"idempotency_key": key}}


@pytest.mark.parametrize(
    ("events", "repeats"),
    [
        ([_keyed("a"), _keyed("b"), {"op": "consume", "args": {}}], False),
        ([_keyed("a"), _keyed("b"), _keyed("a")], True),
        ([_keyed("a"), _keyed("a", "m")], False),  # one key in two namespaces: two keys
        ([_keyed(["a"]), _keyed("b")], True),  # a key that is no text: the SQL refuses it
        (["not an event", _keyed(None), _keyed(None)], False),
    ],
)
def test_a_batch_repeating_a_key_is_applied_in_parts(events, repeats):
    """A key's second use in a batch goes one by one in the SQL (054 refuses a whole call
    of more than 100 events with one): the worker sends such a batch in parts at once,
    rather than after a refused call."""
    assert _repeats_a_key(events) is repeats


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_the_worker_codec_reads_a_float_as_kombu_does(value: float) -> None:
    # Celery's own fields (time limits, countdowns) and a Python sender's floats: unchanged
    from kombu.utils.json import loads as kombu_loads

    from worker.codec import loads

    text = json.dumps({"x": value, "t": {"__type__": "decimal", "__value__": "1.5"}})
    assert loads(text) == kombu_loads(text)
    assert type(loads(text)["x"]) is type(kombu_loads(text)["x"])


@pytest.mark.parametrize(
    "text", ["12345678901234567890.5", "1000000000000000.01", "0.1000000000000000055", "1e400"]
)
def test_the_worker_codec_keeps_a_number_a_float_would_change(text: str) -> None:
    from worker.codec import loads

    assert loads(f'{{"amount": {text}}}') == {"amount": Decimal(text)}


def test_a_pool_childs_exit_logs_every_producers_unsent_events(monkeypatch, caplog):
    """Review C2: at a Celery prefork child's exit, worker_process_shutdown closes the
    buffered producers and the child then ends with os._exit(). The receiver raised the
    first close()'s error, which Celery logs by its repr, without the events: the events
    of every producer that could not send were unknown, and a second producer's failure
    was not even mentioned. Each is logged, with its events as send_many items."""
    import weakref

    from celery.signals import worker_process_shutdown

    import meter.producer as producer_module

    # only this test's producers, not those other tests left alive
    monkeypatch.setattr(producer_module, "_BUFFERED", weakref.WeakSet())
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    producers = [
        MeterProducer(NOWHERE, batch_size=1000, linger_ms=3_600_000, broker_timeout=1)
        for _ in range(2)
    ]
    _consume(producers[0], "first-key", event_time=when, metadata={"n": Decimal("1.5")})
    _consume(producers[1], "second-key")
    with caplog.at_level("ERROR"):
        worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(p._closed for p in producers)
    assert "first-key" in logged and "second-key" in logged, logged
    line = next(r.getMessage() for r in caplog.records if "first-key" in r.getMessage())
    (item,) = json.loads(
        line[line.index("keys kept: ") + len("keys kept: ") :], parse_float=Decimal
    )
    assert item["event_time"] == when.isoformat() and item["metadata"] == {"n": Decimal("1.5")}
