"""Exact idempotency of writes (SPEC 3 items 1-3, Appendix C "Idempotency")."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from meter import MeterClient
from meter.errors import IdempotencyConflictError, ValidationError

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"
T1 = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
T2 = datetime(2024, 5, 10, 12, 0, 1, tzinfo=UTC)


def n_keys(db, key, namespace="default"):
    return db.execute(
        "SELECT count(*) AS n FROM meter.idempotency_keys WHERE namespace = %s AND key = %s",
        (namespace, key),
    ).fetchone()["n"]


def bal(client, user_id=U, event_type=ET, unit=UNIT, resource=None):
    return client.get_balance(user_id, event_type, unit, resource)["balance"]


# Base requests (keyword arguments) per operation; each test varies one argument.
BASE = {
    "allocate": dict(
        user_id=U,
        event_type=ET,
        amount=D("5"),
        unit=UNIT,
        resource="r1",
        metadata={"a": 1},
        event_time=T1,
    ),
    "consume": dict(
        user_id=U,
        event_type=ET,
        amount=D("5"),
        unit=UNIT,
        resource="r1",
        metadata={"a": 1},
        event_time=T1,
    ),
    "adjust": dict(
        user_id=U, event_type=ET, amount=D("5"), unit=UNIT, resource="r1", metadata={"a": 1}
    ),
    "reserve": dict(
        user_id=U,
        event_type=ET,
        amount=D("5"),
        unit=UNIT,
        resource="r1",
        metadata={"a": 1},
        ttl_seconds=300,
    ),
}

# (operation, argument, other value): a different request under the same key.
VARIANTS = [
    (op, arg, val)
    for op in ("allocate", "consume", "adjust", "reserve")
    for arg, val in [
        ("amount", D("6")),
        ("user_id", "u2"),
        ("event_type", "requests"),
        ("unit", "req"),
        ("resource", "r2"),
        ("resource", None),
        ("metadata", {"a": 2}),
        ("metadata", None),
    ]
] + [
    ("allocate", "event_time", T2),
    ("allocate", "event_time", None),
    ("consume", "event_time", T2),
    ("consume", "event_time", None),
    ("consume", "check_balance", True),
    ("reserve", "ttl_seconds", 301),
]


def _fund(client):
    # Enough everywhere a variant may point, so that every variant would otherwise succeed.
    for user in (U, "u2"):
        for et, unit in ((ET, UNIT), ("requests", "req"), (ET, "req"), ("requests", UNIT)):
            for res in ("r1", "r2", None):
                client.allocate(user, et, D("100"), unit, resource=res)


@pytest.mark.parametrize("op", ["allocate", "consume", "adjust", "reserve"])
def test_replay_returns_original_result_and_writes_nothing(client, db, snapshot, op):
    _fund(client)
    first = getattr(client, op)(**BASE[op], idempotency_key="k-1")
    assert n_keys(db, "k-1") == 1
    client.allocate(U, ET, D("7"), UNIT, resource="r1")  # balance moves on
    before = snapshot()
    again = getattr(client, op)(**BASE[op], idempotency_key="k-1")
    assert again == first
    assert snapshot() == before


@pytest.mark.parametrize("op", ["allocate", "consume", "adjust"])
def test_replay_balance_is_the_original(client, op):
    _fund(client)
    first = getattr(client, op)(**BASE[op], idempotency_key="k-1")
    expected = {"allocate": D("105"), "consume": D("95"), "adjust": D("105")}[op]
    assert first["balance"] == expected
    client.allocate(U, ET, D("7"), UNIT, resource="r1")
    again = getattr(client, op)(**BASE[op], idempotency_key="k-1")
    assert again["balance"] == expected
    assert again["entry_id"] == first["entry_id"]
    assert bal(client, resource="r1") == expected + D("7")


def test_reserve_replay_returns_same_reservation(client, db):
    _fund(client)
    first = client.reserve(**BASE["reserve"], idempotency_key="k-1")
    assert first["granted"] is True
    again = client.reserve(**BASE["reserve"], idempotency_key="k-1")
    assert again["reservation_id"] == first["reservation_id"]
    assert again["expires_at"] == first["expires_at"]
    assert client.get_balance(U, ET, UNIT, "r1")["reserved"] == D("5")
    assert db.execute("SELECT count(*) AS n FROM meter.reservations").fetchone()["n"] == 1


@pytest.mark.parametrize(("op", "arg", "val"), VARIANTS)
def test_different_request_same_key_conflicts(client, snapshot, op, arg, val):
    _fund(client)
    getattr(client, op)(**BASE[op], idempotency_key="k-1")
    before = snapshot()
    req = dict(BASE[op])
    req[arg] = val
    with pytest.raises(IdempotencyConflictError):
        getattr(client, op)(**req, idempotency_key="k-1")
    assert snapshot() == before


@pytest.mark.parametrize(
    ("first_op", "second_op"),
    [
        ("allocate", "adjust"),
        ("adjust", "allocate"),
        ("allocate", "consume"),
        ("consume", "reserve"),
        ("reserve", "consume"),
    ],
)
def test_same_key_other_operation_conflicts(client, snapshot, first_op, second_op):
    _fund(client)
    common = dict(user_id=U, event_type=ET, amount=D("5"), unit=UNIT)
    getattr(client, first_op)(**common, idempotency_key="k-1")
    before = snapshot()
    with pytest.raises(IdempotencyConflictError):
        getattr(client, second_op)(**common, idempotency_key="k-1")
    assert snapshot() == before


@pytest.mark.parametrize("same", [D("5"), "5.000", 5, 5.0, D("5.000000000000"), "5"])
def test_amounts_compared_as_numbers(client, snapshot, same):
    first = client.allocate(U, ET, D("5"), UNIT, idempotency_key="k-1")
    before = snapshot()
    again = client.allocate(U, ET, same, UNIT, idempotency_key="k-1")
    assert again == first
    assert snapshot() == before


def test_resource_none_and_empty_are_the_same_request(client, snapshot):
    first = client.allocate(U, ET, D("5"), UNIT, resource=None, idempotency_key="k-1")
    before = snapshot()
    again = client.allocate(U, ET, D("5"), UNIT, resource="", idempotency_key="k-1")
    assert again == first
    assert snapshot() == before


def test_metadata_key_order_does_not_matter(client, snapshot):
    first = client.allocate(U, ET, D("5"), UNIT, metadata={"a": 1, "b": 2}, idempotency_key="k-1")
    before = snapshot()
    again = client.allocate(U, ET, D("5"), UNIT, metadata={"b": 2, "a": 1}, idempotency_key="k-1")
    assert again == first
    assert snapshot() == before


def test_replay_without_event_time_is_same_request(client, snapshot):
    first = client.consume(U, ET, D("5"), UNIT, idempotency_key="k-1")
    before = snapshot()
    again = client.consume(U, ET, D("5"), UNIT, idempotency_key="k-1")
    assert again == first
    assert snapshot() == before


# ---------------------------------------------------------------- only effects claim a key


def test_refused_consume_stores_no_key(client, db, snapshot):
    client.allocate(U, ET, D("5"), UNIT)
    before = snapshot()
    r = client.consume(U, ET, D("10"), UNIT, check_balance=True, idempotency_key="k-1")
    assert r["success"] is False
    assert snapshot() == before
    assert n_keys(db, "k-1") == 0
    client.allocate(U, ET, D("10"), UNIT)
    ok = client.consume(U, ET, D("10"), UNIT, check_balance=True, idempotency_key="k-1")
    assert ok["success"] is True
    assert ok["balance"] == D("5")
    assert n_keys(db, "k-1") == 1
    # now it is an effect: a replay returns it even though the balance would refuse it
    again = client.consume(U, ET, D("10"), UNIT, check_balance=True, idempotency_key="k-1")
    assert again == ok
    assert bal(client) == D("5")


def test_not_granted_reserve_stores_no_key(client, db, snapshot):
    client.allocate(U, ET, D("5"), UNIT)
    before = snapshot()
    r = client.reserve(U, ET, D("10"), UNIT, idempotency_key="k-1")
    assert r["granted"] is False
    assert snapshot() == before
    assert n_keys(db, "k-1") == 0
    client.allocate(U, ET, D("10"), UNIT)
    ok = client.reserve(U, ET, D("10"), UNIT, idempotency_key="k-1")
    assert ok["granted"] is True
    assert ok["available"] == D("5")


def test_not_granted_reserve_with_chosen_id_can_be_retried(client, db, snapshot):
    client.allocate(U, ET, D("5"), UNIT)
    before = snapshot()
    r = client.reserve(U, ET, D("10"), UNIT, reservation_id="res-A")
    assert r["granted"] is False
    assert r["reservation_id"] is None
    assert snapshot() == before
    client.allocate(U, ET, D("10"), UNIT)
    ok = client.reserve(U, ET, D("10"), UNIT, reservation_id="res-A")
    assert ok["granted"] is True
    assert ok["reservation_id"] == "res-A"


def test_validation_error_stores_no_key(client, db, snapshot):
    before = snapshot()
    with pytest.raises(ValidationError):
        client.allocate(U, ET, D("NaN"), UNIT, idempotency_key="k-1")
    assert snapshot() == before
    r = client.allocate(U, ET, D("5"), UNIT, idempotency_key="k-1")
    assert r["balance"] == D("5")


def test_keys_are_per_namespace(client, make_client, db):
    other = make_client(namespace="other")
    a = client.allocate(U, ET, D("5"), UNIT, idempotency_key="k-1")
    b = other.allocate(U, ET, D("7"), UNIT, idempotency_key="k-1")
    assert a["balance"] == D("5")
    assert b["balance"] == D("7")
    assert a["entry_id"] != b["entry_id"]
    assert n_keys(db, "k-1", "default") == 1
    assert n_keys(db, "k-1", "other") == 1


def test_writes_without_key_are_not_deduplicated(client):
    client.allocate(U, ET, D("5"), UNIT)
    r = client.allocate(U, ET, D("5"), UNIT)
    assert r["balance"] == D("10")


# ---------------------------------------------------------------- client-chosen reservation ids


def test_chosen_reservation_id_used_and_committable(client, db):
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("4"), UNIT, reservation_id="res-A")
    assert r["granted"] is True
    assert r["reservation_id"] == "res-A"
    row = db.execute("SELECT * FROM meter.reservations WHERE reservation_id = 'res-A'").fetchone()
    assert row["amount"] == D("4") and row["status"] == "active"
    c = client.commit("res-A", D("3"))
    assert (c["success"], c["status"], c["balance"]) == (True, "committed", D("7"))


def test_chosen_reservation_id_replay(client, snapshot):
    client.allocate(U, ET, D("10"), UNIT)
    first = client.reserve(U, ET, D("4"), UNIT, metadata={"m": 1}, reservation_id="res-A")
    client.allocate(U, ET, D("1"), UNIT)
    before = snapshot()
    again = client.reserve(U, ET, "4.0", UNIT, metadata={"m": 1}, reservation_id="res-A")
    assert again == first
    assert again["available"] == D("6")
    assert snapshot() == before


def test_chosen_reservation_id_replay_after_commit(client, snapshot):
    client.allocate(U, ET, D("10"), UNIT)
    first = client.reserve(U, ET, D("4"), UNIT, reservation_id="res-A")
    client.commit("res-A", D("4"))
    before = snapshot()
    again = client.reserve(U, ET, D("4"), UNIT, reservation_id="res-A")
    assert again == first
    assert snapshot() == before


@pytest.mark.parametrize(
    ("arg", "val"),
    [
        ("amount", D("5")),
        ("user_id", "u2"),
        ("event_type", "requests"),
        ("unit", "req"),
        ("resource", "r2"),
        ("ttl_seconds", 60),
        ("metadata", {"m": 2}),
    ],
)
def test_chosen_reservation_id_different_request_conflicts(client, snapshot, arg, val):
    _fund(client)
    req = dict(user_id=U, event_type=ET, amount=D("4"), unit=UNIT, metadata={"m": 1})
    client.reserve(**req, reservation_id="res-A")
    before = snapshot()
    req[arg] = val
    with pytest.raises(IdempotencyConflictError):
        client.reserve(**req, reservation_id="res-A")
    assert snapshot() == before


@pytest.mark.parametrize(("arg", "val"), [("amount", D("6")), ("ttl_seconds", 301)])
def test_a_reserve_key_reused_for_another_request_names_the_key(client, db, snapshot, arg, val):
    # 052: the SDK (as the producer) derives a reserve's reservation id from its key when
    # the caller gives none, so the hold of the first request is found by that id, and the
    # conflict named reservation_id and a UUID the caller never saw. The caller's offending
    # parameter is the key, as for every other keyed write (SPEC 4: messages name it).
    _fund(client)
    client.reserve(**BASE["reserve"], idempotency_key="k-1")
    before = snapshot()
    with pytest.raises(IdempotencyConflictError) as raised:
        client.reserve(**{**BASE["reserve"], arg: val}, idempotency_key="k-1")
    assert raised.value.parameter == "idempotency_key"
    assert raised.value.message == (
        "idempotency_key: 'k-1' was already used for a different reserve request"
    )
    assert snapshot() == before
    # the same through SQL, with the id given: both were reused, the key is named
    reserve_sql = (
        "SELECT * FROM meter.reserve('u1', 'tokens', %s, 'tok', p_idempotency_key => 'k-2',"
        " p_reservation_id => 'res-B')"
    )
    with pytest.raises(psycopg.Error) as sql_raised, db.transaction():
        db.execute(reserve_sql, (6,))
        db.execute(reserve_sql, (7,))
    assert (sql_raised.value.sqlstate, sql_raised.value.diag.column_name) == (
        "MT002",
        "idempotency_key",
    )
    # an id reused under no key, or under another key, is still named as the id
    client.reserve(U, ET, D("4"), UNIT, reservation_id="res-C")
    before = snapshot()
    for key in (None, "k-3"):
        with pytest.raises(IdempotencyConflictError) as raised:
            client.reserve(U, ET, D("5"), UNIT, reservation_id="res-C", idempotency_key=key)
        assert raised.value.parameter == "reservation_id"
    assert snapshot() == before


def test_chosen_reservation_ids_are_per_namespace(client, make_client):
    other = make_client(namespace="other")
    client.allocate(U, ET, D("10"), UNIT)
    other.allocate(U, ET, D("10"), UNIT)
    a = client.reserve(U, ET, D("4"), UNIT, reservation_id="res-A")
    b = other.reserve(U, ET, D("3"), UNIT, reservation_id="res-A")
    assert a["granted"] is True and b["granted"] is True
    assert client.commit("res-A", D("4"))["balance"] == D("6")
    assert other.commit("res-A", D("3"))["balance"] == D("7")


# ---------------------------------------------------------------- more keyed arguments


def test_adjust_reference_id_counts(client, snapshot):
    a = client.allocate(U, ET, D("10"), UNIT)
    b = client.allocate(U, ET, D("10"), UNIT)
    first = client.adjust(U, ET, D("-1"), UNIT, reference_id=a["entry_id"], idempotency_key="k")
    before = snapshot()
    assert (
        client.adjust(U, ET, D("-1"), UNIT, reference_id=a["entry_id"], idempotency_key="k")
        == first
    )
    for other in (b["entry_id"], None):
        with pytest.raises(IdempotencyConflictError):
            client.adjust(U, ET, D("-1"), UNIT, reference_id=other, idempotency_key="k")
    assert snapshot() == before


def test_commit_replay_with_other_metadata_conflicts(client, snapshot):
    client.allocate(U, ET, D("10"), UNIT)
    rid = client.reserve(U, ET, D("5"), UNIT)["reservation_id"]
    client.commit(rid, D("3"), metadata={"m": 1})
    before = snapshot()
    for metadata in ({"m": 2}, None):  # the amount is the same: the error names metadata
        with pytest.raises(IdempotencyConflictError, match="other metadata") as conflict:
            client.commit(rid, D("3"), metadata=metadata)
        assert conflict.value.parameter == "metadata"
    with pytest.raises(IdempotencyConflictError, match="actual amount 3") as conflict:
        client.commit(rid, D("4"), metadata={"m": 1})
    assert conflict.value.parameter == "actual_amount"
    assert snapshot() == before


def test_late_commit_replay(client, db, snapshot):
    client.allocate(U, ET, D("10"), UNIT)
    r = client.reserve(U, ET, D("5"), UNIT, ttl_seconds=1)
    deadline = time.monotonic() + 10
    while db.execute("SELECT now() < %s AS w", (r["expires_at"],)).fetchone()["w"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = client.commit(r["reservation_id"], D("3"))
    assert (first["status"], first["balance"]) == ("late", D("7"))
    before = snapshot()
    again = client.commit(r["reservation_id"], D("3"))
    assert (again["success"], again["status"]) == (True, "replayed")
    for col in ("consumed", "released", "reserved_amount", "balance", "entry_id"):
        assert again[col] == first[col], col
    with pytest.raises(IdempotencyConflictError):
        client.commit(r["reservation_id"], D("4"))
    assert snapshot() == before


# ---------------------------------------------------------------- the session's settings


def test_replay_does_not_depend_on_the_sessions_datestyle(client, db_url, snapshot):
    # The fingerprint of an explicit event_time is text: it must not follow DateStyle.
    t = datetime(2024, 5, 10, 12, 0, 0, 500000, tzinfo=UTC)
    first_c = client.consume(U, ET, D("5"), UNIT, idempotency_key="k-c", event_time=t)
    first_a = client.allocate(U, ET, D("7"), UNIT, idempotency_key="k-a", event_time=t)
    before = snapshot()
    other = make_conninfo(db_url, options="-c datestyle=SQL,DMY")
    with psycopg.connect(other) as conn:  # the setting took: dates print the SQL way
        assert conn.execute("SELECT '2024-05-10'::date::text").fetchone() == ("10/05/2024",)
    with MeterClient(other) as c2:
        assert c2.consume(U, ET, D("5"), UNIT, idempotency_key="k-c", event_time=t) == first_c
        assert c2.allocate(U, ET, D("7"), UNIT, idempotency_key="k-a", event_time=t) == first_a
    args = {"user_id": U, "event_type": ET, "unit": UNIT, "event_time": t.isoformat()}
    events = [
        {"op": "consume", "namespace": "default",
         "args": {**args, "amount": "5", "idempotency_key": "k-c"}},
        {"op": "allocate", "namespace": "default",
         "args": {**args, "amount": "7", "idempotency_key": "k-a"}},
    ]  # fmt: skip
    with psycopg.connect(other, autocommit=True) as conn:  # a batch: the set-based path
        rows = conn.execute(
            "SELECT status, error_message FROM meter.apply_events(%s)", (Jsonb(events),)
        ).fetchall()
    assert rows == [("replayed", None), ("replayed", None)]
    assert snapshot() == before
