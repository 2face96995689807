"""``meter.apply_events``: its two paths agree, and a key claimed concurrently fails a batch.

A batch takes the set-based fast path for valid consume/allocate/adjust events; a call with
one event (a single-event task) goes to the one-by-one path, the API function of its op.
The property test applies the same events both ways and compares everything they report
and write.
"""

from __future__ import annotations

import itertools
import threading
import time
from decimal import Decimal
from typing import Any

import psycopg
import psycopg.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.examples import examples

D = Decimal
ET = "tokens"
UNIT = "tok"
_namespaces = itertools.count()
_ABSENT = object()

APPLY = (
    "SELECT *, result IS NOT NULL AS has_result FROM meter.apply_events(%s, NULL, %s) ORDER BY idx"
)


# one way each to make an event invalid (the one-by-one path names the parameter)
_CORRUPT: list[tuple[str, Any]] = [
    ("amount", "x"), ("amount", "0"), ("amount", "1e-13"), ("user_id", " u1"),
    ("event_type", "bad\ntype"), ("event_time", "not a time"), ("event_time", "2999-01-01"),
    ("metadata", [1]), ("resource", "bad\tresource"), ("unknown", 1),
    # 032: forms PostgreSQL's input takes but the wire format does not
    ("event_time", "now"), ("event_time", "2001-03-04 05:06:07"), ("amount", "0x10"),
    ("amount", "1_000"), ("user_id", 7), ("unit", ["tok"]), ("idempotency_key", True),
]  # fmt: skip


@st.composite
def event(draw: st.DrawFn) -> dict[str, Any]:
    """A consume, allocate or adjust event: mostly valid, else with one invalid field."""
    op = draw(st.sampled_from(["consume", "allocate", "adjust"]))
    args: dict[str, Any] = {
        "user_id": draw(st.sampled_from(["u1", "u2"] if op == "consume" else ["u1", "u2", None])),
        "event_type": ET,
        "unit": UNIT,
        "amount": draw(
            st.sampled_from(["1.5", "2", "0.000001", "10"] + (["-1"] if op == "adjust" else []))
        ),
    }
    for name, choices in (
        ("idempotency_key", [_ABSENT, "k1", "k2", "k3", "k4"]),
        ("event_time", [_ABSENT] if op == "adjust" else [_ABSENT, _ABSENT, "2001-03-04T05:06Z"]),
        ("metadata", [_ABSENT, _ABSENT, {"a": 1}, None]),
        ("resource", [_ABSENT, _ABSENT, "gpu"]),
    ):
        value = draw(st.sampled_from(choices))
        if value is not _ABSENT:
            args[name] = value
    if draw(st.integers(0, 3)) == 0:
        name, value = draw(st.sampled_from(_CORRUPT))
        args[name] = value
    return {"op": op, "args": args}


def _written(db: psycopg.Connection[dict[str, Any]], ns: str) -> dict[str, Any]:
    """What a namespace holds: ledger (ids and times of now aside), balances, keys, dead
    letters."""
    ledger = db.execute(
        "SELECT user_id, resource, entry_type, amount, balance_after, idempotency_key,"
        " metadata, CASE WHEN event_time < '2020-01-01' THEN event_time END AS old_time"
        # by account, then id: a batch numbers its rows account by account, in array
        # order within each (ids are unique, not an order across accounts)
        " FROM meter.ledger WHERE namespace = %s ORDER BY user_id, resource, id",
        (ns,),
    ).fetchall()
    accounts = db.execute(
        "SELECT user_id, resource, balance, reserved, total_credited, total_debited"
        " FROM meter.accounts WHERE namespace = %s ORDER BY user_id, resource",
        (ns,),
    ).fetchall()
    keys = db.execute(
        "SELECT key, operation, request_hash, result - 'entry_id' AS result"
        " FROM meter.idempotency_keys WHERE namespace = %s ORDER BY key",
        (ns,),
    ).fetchall()
    dead = db.execute(
        "SELECT op, payload - 'namespace' AS payload, error_sqlstate, error_message"
        " FROM meter.dead_letters WHERE namespace = %s ORDER BY dead_letter_id",
        (ns,),
    ).fetchall()
    return {"ledger": ledger, "accounts": accounts, "keys": keys, "dead_letters": dead}


def _hold_some(db: psycopg.Connection[dict[str, Any]], ns: str) -> None:
    """u1: 100 allocated, a hold of 30 past its TTL and an active one of 20; u2: 50, a hold
    of 5 past its TTL. (The TTLs are moved back, so as not to wait a second per example.)"""
    for user, amount in (("u1", 100), ("u2", 50)):
        db.execute(
            "SELECT meter.allocate(%s, %s, %s, %s, p_namespace => %s)", (user, ET, amount, UNIT, ns)
        )
    for user, amount, due in (("u1", 30, True), ("u1", 20, False), ("u2", 5, True)):
        rid = f"{ns}-{user}-{amount}"
        db.execute(
            "SELECT meter.reserve(%s, %s, %s, %s, p_namespace => %s, p_reservation_id => %s)",
            (user, ET, amount, UNIT, ns, rid),
        )
        if due:
            db.execute(
                "UPDATE meter.reservations SET expires_at = now() - interval '1 second'"
                " WHERE namespace = %s AND reservation_id = %s",
                (ns, rid),
            )


def _reported(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        r = dict(r)
        del r["idx"]
        if isinstance(r["result"], dict):
            r["result"] = {k: v for k, v in r["result"].items() if k != "entry_id"}
        out.append(r)
    return out


@st.composite
def events_with_repeats(draw: st.DrawFn) -> list[dict[str, Any]]:
    """2-12 events, some of them sent again later (replays, when keyed)."""
    out = draw(st.lists(event(), min_size=2, max_size=10))
    for _ in range(draw(st.integers(0, 2))):
        again = out[draw(st.integers(0, len(out) - 1))]
        out.insert(draw(st.integers(0, len(out))), again)
    return out


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=events_with_repeats(), results=st.booleans(), holds=st.booleans())
def test_a_batch_and_its_events_one_by_one_agree(db, events, results, holds):
    """The same events as one batch and as one-event calls, each set in a namespace of its
    own: the same statuses, results (entry ids aside), errors, ledger, balances, stored
    keys and dead letters. Valid events only, or ones refused: their effects then come in
    array order both ways (a batch applies its fast-path events before the others). With
    ``holds``, both namespaces start with the same holds, active and past their TTL (028:
    both paths report ``available`` without the latter, and store the same results)."""
    n = next(_namespaces)
    batch_ns, single_ns = f"b{n}", f"s{n}"
    if holds:
        for ns in (batch_ns, single_ns):
            _hold_some(db, ns)
    batch_rows = db.execute(
        APPLY, (Jsonb([{**e, "namespace": batch_ns} for e in events]), results)
    ).fetchall()
    single_rows = [
        db.execute(APPLY, (Jsonb([{**e, "namespace": single_ns}]), results)).fetchone()
        for e in events
    ]
    assert [r["idx"] for r in batch_rows] == list(range(len(events)))
    assert _reported(batch_rows) == _reported(single_rows)
    if not results:  # SQL NULLs: nothing for the client to parse (a JSON null would be)
        assert all(r["result"] is None and r["has_result"] is False for r in batch_rows)
        assert all(r["result"] is None and r["has_result"] is False for r in single_rows)
    assert _written(db, batch_ns) == _written(db, single_ns)


def test_a_key_claimed_concurrently_fails_the_batch_with_40001_and_changes_nothing(
    db, db_url, snapshot
):
    """A key claimed by another transaction after the batch looked its keys up: the batch
    waits for that transaction, then fails as a whole with a serialization failure (the
    caller retries it) and writes nothing; retried, the event replays and the rest apply."""

    def ev(user: str, key: str) -> dict[str, Any]:
        return {"op": "allocate", "namespace": "default",
                "args": {"user_id": user, "event_type": ET, "amount": "2", "unit": UNIT,
                         "idempotency_key": key}}  # fmt: skip

    batch = Jsonb([ev("u2", "other"), ev("u1", "shared")])
    holder = psycopg.connect(db_url, row_factory=dict_row)
    outcome: dict[str, Any] = {}
    try:
        # the holder claims "shared" and keeps its transaction open
        holder.execute(APPLY, (Jsonb([ev("u1", "shared"), ev("u3", "x")]), True)).fetchall()
        before = snapshot()

        def run_batch() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                outcome["pid"] = conn.info.backend_pid
                try:
                    conn.execute(APPLY, (batch, True)).fetchall()
                except psycopg.Error as exc:
                    outcome["error"] = exc

        thread = threading.Thread(target=run_batch)
        thread.start()
        deadline = time.monotonic() + 10
        waiting = False
        while not waiting and time.monotonic() < deadline:
            time.sleep(0.02)
            row = db.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                (outcome.get("pid"),),
            ).fetchone()
            waiting = row is not None and row["wait_event_type"] == "Lock"
        assert waiting, "the batch never waited for the holder's claim"
        holder.commit()
        thread.join(10)
        assert not thread.is_alive()
    finally:
        holder.close()
    err = outcome.get("error")
    assert isinstance(err, psycopg.errors.SerializationFailure), err
    assert "claimed concurrently" in str(err)
    after = snapshot()
    # nothing of the failed batch: only the holder's two events (u1, u3), now committed
    written = ("ledger", "accounts", "idempotency_keys")
    for table in written:
        assert len(after[table]) == len(before[table]) + 2, table
        assert not [r for r in after[table] if "other" in r or "u2" in r], table
    assert {k: v for k, v in after.items() if k not in written} == {
        k: v for k, v in before.items() if k not in written
    }
    rows = db.execute(APPLY, (batch, True)).fetchall()
    assert [r["status"] for r in rows] == ["applied", "replayed"]
    balances = db.execute(
        "SELECT user_id, balance FROM meter.accounts WHERE namespace = 'default' ORDER BY 1"
    ).fetchall()
    assert balances == [
        {"user_id": "u1", "balance": D(2)},
        {"user_id": "u2", "balance": D(2)},
        {"user_id": "u3", "balance": D(2)},
    ]


def test_a_unique_violation_of_another_table_is_not_taken_for_a_key_claim(db, snapshot):
    """Only the key table's primary key means "claimed concurrently"; the trap re-raises
    any other unique violation as it is (here: a ledger id taken ahead of the sequence)."""
    when = "2020-05-05T00:00:00Z"

    def events(*users: str) -> Jsonb:
        return Jsonb([
            {"op": "allocate", "namespace": "default",
             "args": {"user_id": u, "event_type": ET, "amount": "1", "unit": UNIT,
                      "idempotency_key": f"k-{u}", "event_time": when}}
            for u in users
        ])  # fmt: skip

    db.execute(APPLY, (events("first"), False)).fetchall()  # its month's partition
    taken = db.execute("SELECT last_value + 2 AS id FROM meter.ledger_id_seq").fetchone()["id"]
    db.execute(
        "INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource,"
        " unit, entry_type, amount, balance_after, event_time)"
        " VALUES (%s, 'default', -1, 'zz', %s, '', %s, 'allocation', 1, 1, %s)",
        (taken, ET, UNIT, when),
    )
    before = snapshot()
    with pytest.raises(psycopg.errors.UniqueViolation) as exc:
        db.execute(APPLY, (events("a", "b", "c"), False)).fetchall()
    assert "ledger" in str(exc.value)
    assert exc.value.diag.constraint_name != "idempotency_keys_pkey"
    assert snapshot() == before


def test_results_null_is_refused_and_changes_nothing(db, snapshot):
    """``results`` is true or false; NULL is refused, naming it, before any event applies."""
    events = Jsonb(
        [{"op": "allocate", "namespace": "default",
          "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}}]
    )  # fmt: skip
    before = snapshot()
    with pytest.raises(psycopg.Error) as exc:
        db.execute(APPLY, (events, None)).fetchall()
    assert exc.value.sqlstate == "MT001"
    assert str(exc.value).startswith("results: must be true or false")
    assert snapshot() == before


@pytest.mark.parametrize("ttl", [86401, 2**31, 2**32, -(2**31) - 1])
def test_a_ttl_past_integers_range_is_refused_by_name(db, snapshot, ttl):
    """It was cast to integer and failed with 22003 "integer out of range", naming no
    parameter in the dead letter; now every out-of-range TTL gets reserve's own refusal."""
    events = Jsonb(
        [{"op": "reserve", "namespace": "default",
          "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                   "ttl_seconds": ttl}}]
    )  # fmt: skip
    before = snapshot()
    (row,) = db.execute(APPLY, (events, True)).fetchall()
    assert (row["ok"], row["error_sqlstate"]) == (False, "MT001")
    assert row["error_message"] == f"ttl_seconds: must be between 1 and 86400, got {ttl}"
    after = snapshot()
    (letter,) = after.pop("dead_letters")  # a refused event is filed, by design
    assert "ttl_seconds" in str(letter)
    before.pop("dead_letters")
    assert after == before


# 032: each value PostgreSQL's input functions take but the wire format does not, with the
# start of the refusal naming its argument
_NOT_WIRE_FORMS: list[tuple[str, Any, str]] = [
    ("event_time", "now", "event_time: must be an ISO 8601 timestamp with its UTC offset"),
    ("event_time", "today", "event_time: must be an ISO 8601 timestamp with its UTC offset"),
    ("event_time", "epoch", "event_time: must be an ISO 8601 timestamp with its UTC offset"),
    ("event_time", "2026-01-02 03:04:05", "event_time: must be an ISO 8601 timestamp"),
    ("event_time", "Jan 2 2026 03:04 UTC", "event_time: must be an ISO 8601 timestamp"),
    ("event_time", 1767323045, "event_time: must be a string, got a JSON number"),
    ("amount", "0x10", "amount: must be decimal digits (as 12.5 or 1e3), got 0x10"),
    ("amount", "0o20", "amount: must be decimal digits"),
    ("amount", "0b10000", "amount: must be decimal digits"),
    ("amount", "1_000", "amount: must be decimal digits"),
    ("amount", True, "amount: must be a number or a string, got a JSON boolean"),
    ("user_id", 7, "user_id: must be a string, got a JSON number"),
    ("user_id", ["u1"], "user_id: must be a string, got a JSON array"),
    ("event_type", {"a": 1}, "event_type: must be a string, got a JSON object"),
    ("unit", 1, "unit: must be a string, got a JSON number"),
    ("resource", False, "resource: must be a string, got a JSON boolean"),
    ("idempotency_key", 12, "idempotency_key: must be a string, got a JSON number"),
]  # fmt: skip


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize(("name", "value", "refusal"), _NOT_WIRE_FORMS)
def test_a_value_outside_the_wire_format_is_refused_by_name(
    db, snapshot, batch, name, value, refusal
):
    """Such a value was read by PostgreSQL's input functions: 'now' made a time that
    changed between deliveries (a redelivered batch dead-lettered its own keys as
    conflicts), '0x10' was 16, {"user_id": 7} wrote to the account "7". Now it is
    refused, MT001 naming it, alone in a batch too (the fast path leaves it to the
    one-by-one path), and changes nothing but its dead letter."""
    good = {"user_id": "u1", "event_type": ET, "amount": "2", "unit": UNIT}
    bad = {**good, "idempotency_key": "k-bad", name: value}
    events = [{"op": "allocate", "namespace": "default", "args": bad}]
    if batch:  # with a valid event beside it, so that the batch path is taken
        keyed = {**good, "idempotency_key": "k-good"}
        events.insert(0, {"op": "allocate", "namespace": "default", "args": keyed})
        db.execute(APPLY, (Jsonb(events[:1]), True)).fetchall()  # applied first, replayed below
    before = snapshot()
    rows = db.execute(APPLY, (Jsonb(events), True)).fetchall()
    if batch:
        assert (rows[0]["ok"], rows[0]["status"]) == (True, "replayed")
    row = rows[-1]
    assert (row["ok"], row["error_sqlstate"]) == (False, "MT001")
    assert row["error_message"].startswith(refusal), row["error_message"]
    after = snapshot()
    (letter,) = after.pop("dead_letters")  # a refused event is filed, by design
    assert any(isinstance(v, str) and v.startswith(refusal) for v in letter), letter
    before.pop("dead_letters")
    assert after == before


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_the_wire_forms_of_times_and_amounts_apply_and_replay(db, batch):
    """What the SDK and other clients send still applies, on both paths, and a second
    delivery of the same events replays them."""
    forms = [
        ("2001-03-04T05:06:07.123456+05:30", "12.5"),
        ("2001-03-04 05:06:07Z", " 1e3 "),
        ("2001-03-04T05:06z", 1e-06),  # a JSON number
        ("2001-03-04T05:06:07-0800", ".5"),
        ("2001-03-04T05:06:07+00:00:30", "+3."),
    ]
    events = [
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": f"u{i}", "event_type": ET, "amount": amount, "unit": UNIT,
                  "event_time": time, "idempotency_key": f"k{i}"}}
        for i, (time, amount) in enumerate(forms)
    ]  # fmt: skip
    runs = [events, events] if batch else [[e] for e in events] * 2
    statuses = [r["status"] for run in runs for r in db.execute(APPLY, (Jsonb(run), True))]
    half = len(statuses) // 2
    assert statuses[:half] == ["applied"] * half
    assert statuses[half:] == ["replayed"] * half
    balances = db.execute(
        "SELECT user_id, balance FROM meter.accounts WHERE namespace = 'default' ORDER BY user_id"
    ).fetchall()
    assert [(b["user_id"], b["balance"]) for b in balances] == [
        ("u0", D("12.5")), ("u1", D("1000")), ("u2", D("0.000001")), ("u3", D("0.5")),
        ("u4", D("3")),
    ]  # fmt: skip
