"""``meter.apply_events``: its two paths agree, and a key claimed concurrently fails a batch.

A batch takes the set-based fast path for valid unchecked consume/allocate/adjust events
that no earlier one-by-one event of their account or key precedes (044); a call with one
event (a single-event task) goes to the one-by-one path, the API function of its op. The
property test applies the same events both ways and compares everything they report and
write; the tests of 044 (review B) check the order of mixed batches, their locks and
their partitions.
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

from meter.errors import IdempotencyConflictError
from tests.examples import examples
from tests.fix_db import ledger_partitions

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
    """An event of any op: consume (checked or not), allocate, adjust, reserve, commit or
    release, mostly valid, else with one invalid field. 044: a batch applies them in their
    order, so any mix agrees with the calls made one by one."""
    op = draw(
        st.sampled_from(
            ["consume", "consume", "allocate", "adjust", "reserve", "commit", "release"]
        )
    )
    args: dict[str, Any]
    if op in ("commit", "release"):
        args = {"reservation_id": draw(st.sampled_from(["r1", "r2", "r3"]))}
        if op == "commit":
            args["actual_amount"] = draw(st.sampled_from(["0", "1.5", "10"]))
            if draw(st.booleans()):
                args["metadata"] = {"c": 1}
    else:
        args = {
            "user_id": draw(
                st.sampled_from(
                    ["u1", "u2"] if op in ("consume", "reserve") else ["u1", "u2", None]
                )
            ),
            "event_type": ET,
            "unit": UNIT,
            "amount": draw(
                st.sampled_from(
                    ["1.5", "2", "0.000001", "10"]
                    + (["-1"] if op == "adjust" else ["30"] if op != "allocate" else [])
                )
            ),
        }
        for name, choices in (
            ("idempotency_key", [_ABSENT, "k1", "k2", "k3", "k4"]),
            (
                "event_time",
                [_ABSENT, _ABSENT, "2001-03-04T05:06Z"]
                if op in ("consume", "allocate")
                else [_ABSENT],
            ),
            ("metadata", [_ABSENT, _ABSENT, {"a": 1}, None]),
            ("resource", [_ABSENT, _ABSENT, "gpu"]),
            ("check_balance", [_ABSENT, _ABSENT, True, False] if op == "consume" else [_ABSENT]),
            ("reservation_id", ["r1", "r2"] if op == "reserve" else [_ABSENT]),
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
        "SELECT key, operation, request_hash, result - 'entry_id' - 'expires_at' AS result"
        " FROM meter.idempotency_keys WHERE namespace = %s ORDER BY key",
        (ns,),
    ).fetchall()
    dead = db.execute(
        "SELECT op, payload - 'namespace' AS payload, error_sqlstate, error_message"
        " FROM meter.dead_letters WHERE namespace = %s ORDER BY dead_letter_id",
        (ns,),
    ).fetchall()
    holds = db.execute(  # the holds of _hold_some are named after their namespace
        "SELECT regexp_replace(reservation_id, '^[bs][0-9]+-', '') AS reservation_id, user_id,"
        " resource, amount, status, actual_amount, idempotency_key, metadata,"
        " reserve_result - 'expires_at' - 'reservation_id' AS reserve_result,"
        " commit_request_hash, commit_result - 'entry_id' AS commit_result"
        " FROM meter.reservations WHERE namespace = %s ORDER BY 1",
        (ns,),
    ).fetchall()
    return {
        "ledger": ledger,
        "accounts": accounts,
        "keys": keys,
        "dead_letters": dead,
        "reservations": holds,
    }


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
            r["result"] = {
                k: v for k, v in r["result"].items() if k not in ("entry_id", "expires_at")
            }
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
    own: the same statuses, results (entry ids and expiry times aside), errors, ledger,
    balances, stored keys, holds and dead letters. Any mix of ops (044: a batch applies its
    events in their order; before, a mix of fast-path and one-by-one events of one account
    or key did not agree, and the test drew only consume, allocate and adjust). With
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


# ---------------------------------------------------------------------------------------
# 044: a batch applies its events in their order. Its fast path (valid unchecked consume,
# allocate and adjust) runs before its one-by-one events; an event takes it only when no
# earlier event of the batch that goes one by one touches its account or uses its key.

APPLY_ROWS = "SELECT * FROM meter.apply_events(%s) ORDER BY idx"


def _batch(db: psycopg.Connection[dict[str, Any]], ns: str, events: list[dict[str, Any]]):
    return db.execute(APPLY_ROWS, (Jsonb([{**e, "namespace": ns} for e in events]),)).fetchall()


def _singles(db: psycopg.Connection[dict[str, Any]], ns: str, events: list[dict[str, Any]]):
    return [_batch(db, ns, [e])[0] for e in events]


def _ev(op: str, **args: Any) -> dict[str, Any]:
    return {"op": op, "args": args}


def _use(user: str, amount: str, **more: Any) -> dict[str, Any]:
    return _ev("consume", user_id=user, event_type=ET, amount=amount, unit=UNIT, **more)


def _give(user: str, amount: str, **more: Any) -> dict[str, Any]:
    return _ev("allocate", user_id=user, event_type=ET, amount=amount, unit=UNIT, **more)


def _balance(db: psycopg.Connection[dict[str, Any]], ns: str, user: str = "u1") -> dict[str, Any]:
    return db.execute(
        "SELECT balance, reserved, total_debited FROM meter.accounts"
        " WHERE namespace = %s AND user_id = %s",
        (ns, user),
    ).fetchone()


def _consumed(db: psycopg.Connection[dict[str, Any]], ns: str) -> Decimal:
    return db.execute(
        "SELECT coalesce(sum(-amount), 0) AS c FROM meter.ledger"
        " WHERE namespace = %s AND entry_type = 'consumption'",
        (ns,),
    ).fetchone()["c"]


def _same(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a caller reads of each row: status, error and result (entry ids and expiry aside)."""
    out = []
    for r in rows:
        result = r["result"]
        if isinstance(result, dict):
            result = {k: v for k, v in result.items() if k not in ("entry_id", "expires_at")}
        out.append((r["ok"], r["status"], result, r["error_sqlstate"], r["error_message"]))
    return out


def _entry(row: dict[str, Any]) -> int:
    return int(row["result"]["entry_id"])


def test_a_reserve_consume_and_commit_of_one_account_apply_in_their_order(db, make_client):
    """Defect 1 (review B): the producer's buffered mode sends one caller's reserve X, an
    unchecked consume and commit X as one batch. One by one, the reserve is granted and the
    commit records its 10. The batch applied the consume first (fast path), then refused
    the reserve, and the commit found no reservation: 10 units of usage never recorded."""
    single = make_client("s")
    for ns in ("s", "b"):
        db.execute("SELECT meter.allocate('u1', %s, 10, %s, p_namespace => %s)", (ET, UNIT, ns))

    r = single.reserve("u1", ET, 10, UNIT, reservation_id="X")
    assert r["granted"]
    single.consume("u1", ET, 5, UNIT)
    c = single.commit("X", 10)
    assert c["status"] == "committed"

    rows = _batch(
        db,
        "b",
        [
            _ev("reserve", user_id="u1", event_type=ET, amount="10", unit=UNIT, reservation_id="X"),
            _use("u1", "5"),
            _ev("commit", reservation_id="X", actual_amount="10"),
        ],
    )
    assert [r["status"] for r in rows] == ["applied", "applied", "applied"]
    assert _consumed(db, "b") == _consumed(db, "s") == D(15)
    assert _balance(db, "b")["balance"] == _balance(db, "s")["balance"] == D(-5)


def test_a_checked_consume_before_an_unchecked_one_is_judged_first(db, make_client):
    """Defect 2 (review B): [consume 10 checked, consume 10 unchecked] on a balance of 10.
    One by one both are recorded (the first fits; the second may go negative). The batch
    applied the unchecked one first and refused the checked one, which came first."""
    single = make_client("s")
    for ns in ("s", "b"):
        db.execute("SELECT meter.allocate('u1', %s, 10, %s, p_namespace => %s)", (ET, UNIT, ns))
    first = single.consume("u1", ET, 10, UNIT, check_balance=True)
    second = single.consume("u1", ET, 10, UNIT)
    assert first["success"] and second["success"]

    rows = _batch(db, "b", [_use("u1", "10", check_balance=True), _use("u1", "10")])
    assert [r["status"] for r in rows] == ["applied", "applied"]
    assert rows[0]["result"]["balance"] == first["balance"] == D(0)
    assert _balance(db, "b") == _balance(db, "s")


def test_the_first_of_two_events_sharing_a_key_is_the_one_applied(db, make_client):
    """Defect 3 (review B): one key on a checked consume of 5 (first) and an unchecked
    consume of 7 (second). One by one the first applies and the second is an idempotency
    conflict. The batch let the second (fast path) claim the key and dead-lettered the
    first as the conflict: 7 consumed instead of 5, and the wrong event filed."""
    single = make_client("s")
    for ns in ("s", "b"):
        db.execute("SELECT meter.allocate('u1', %s, 100, %s, p_namespace => %s)", (ET, UNIT, ns))
    single.consume("u1", ET, 5, UNIT, check_balance=True, idempotency_key="k")
    with pytest.raises(IdempotencyConflictError):
        single.consume("u1", ET, 7, UNIT, idempotency_key="k")

    rows = _batch(
        db, "b", [_use("u1", "5", check_balance=True, idempotency_key="k"),
                  _use("u1", "7", idempotency_key="k")],
    )  # fmt: skip
    assert [(r["status"], r["error_sqlstate"]) for r in rows] == [
        ("applied", None),
        ("error", "MT002"),
    ]
    assert _balance(db, "b") == _balance(db, "s")
    (letter,) = db.execute(
        "SELECT payload->'args'->>'amount' AS amount FROM meter.dead_letters WHERE namespace = 'b'"
    ).fetchall()
    assert letter["amount"] == "7"


def test_a_slow_event_demotes_only_its_own_accounts_later_events(db):
    """A batch of many accounts with a checked consume (one by one) on u1 early: u1's later
    events go one by one behind it, in array order; every other account's events stay on
    the fast path (their ledger rows are written before the one-by-one events'), and the
    results and state equal the same calls made one by one."""
    users = [f"u{i}" for i in range(1, 7)]
    events = [_give(u, "10") for u in users]
    events += [_use("u1", "10", check_balance=True)]  # slow: fits only before the next
    events += [_use(u, "3") for u in users]  # u1's demoted, the others fast
    events += [_give("u1", "1"), _use("u4", "1", check_balance=True)]
    singles = _singles(db, "s", events)
    rows = _batch(db, "b", events)
    assert _same(rows) == _same(singles)
    assert rows[6]["status"] == "applied"  # the checked consume fitted: judged first
    slow = {6, 7, 13, 14}  # u1's checked consume, u1's later events, u4's checked consume
    fast = set(range(len(events))) - slow
    assert max(_entry(rows[i]) for i in fast) < min(_entry(rows[i]) for i in slow)
    # the one-by-one events in array order
    assert [_entry(rows[i]) for i in sorted(slow)] == sorted(_entry(rows[i]) for i in slow)
    for ns_rows in ("b", "s"):
        assert _balance(db, ns_rows, "u1")["balance"] == D(-2)
    assert [_balance(db, "b", u) for u in users] == [_balance(db, "s", u) for u in users]


def test_a_commit_or_release_touches_its_reservations_account(db):
    """A commit or release goes one by one; the account it touches is its reservation's
    (here stored before the batch), so that account's later events follow it. A commit of
    an unknown reservation touches no account: a later event of any account stays fast.
    Results and state equal the calls made one by one."""
    for ns in ("s", "b"):
        for user in ("u1", "u2", "u3"):
            db.execute(
                "SELECT meter.allocate(%s, %s, 10, %s, p_namespace => %s)", (user, ET, UNIT, ns)
            )
        for user, rid in (("u1", "X"), ("u2", "Z")):
            db.execute(
                "SELECT meter.reserve(%s, %s, 10, %s, p_namespace => %s, p_reservation_id => %s)",
                (user, ET, UNIT, ns, rid),
            )
    events = [
        _ev("commit", reservation_id="X", actual_amount="10"),
        _use("u1", "4"),  # after the commit: balance -4 (first, it reported 6)
        _ev("release", reservation_id="Z"),
        _use("u2", "4"),  # after the release: available 6 (first, it reported -4)
        _ev("commit", reservation_id="unknown", actual_amount="1"),
        _use("u3", "4"),  # no account touched before it: fast
        _use("u3", "1", check_balance=True),
    ]
    singles = _singles(db, "s", events)
    rows = _batch(db, "b", events)
    assert _same(rows) == _same(singles)
    assert [r["status"] for r in rows] == [
        "applied", "applied", "applied", "applied", "not_found", "applied", "applied",
    ]  # fmt: skip
    assert rows[1]["result"]["balance"] == D(-4)
    assert rows[3]["result"]["available"] == D(6)
    # u3's unchecked consume was written by the fast path, before every one-by-one event
    assert _entry(rows[5]) < min(_entry(rows[i]) for i in (0, 1, 3, 6))
    for user in ("u1", "u2", "u3"):
        assert _balance(db, "b", user) == _balance(db, "s", user)


def test_two_batches_creating_accounts_in_crossed_orders_do_not_deadlock(db, db_url):
    """Defect 4 (review B), SPEC 3 item 6: batches never deadlock. B1 = [allocate B, adjust
    C1 (with a reference_id, so one by one), adjust A], B2 = [allocate A, adjust C2, adjust
    B], on accounts that do not exist yet. Each batch's fast path created its allocate's
    account, then its one-by-one events created theirs in array order: B1 held B and
    waited for A, B2 held A and waited for B (40P01). Now each queues first for every
    account of the batch, in key order. A third transaction creating C1 and C2 holds both
    batches before that step, so the interleaving is deterministic."""
    ref = db.execute(
        "SELECT entry_id FROM meter.allocate('seed', %s, 1, %s, p_namespace => 'n')", (ET, UNIT)
    ).fetchone()["entry_id"]

    def adj(user: str) -> dict[str, Any]:
        return _ev("adjust", user_id=user, event_type=ET, amount="1", unit=UNIT, reference_id=ref)

    b1 = [_give("B", "1"), adj("C1"), adj("A")]
    b2 = [_give("A", "1"), adj("C2"), adj("B")]

    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT meter.allocate('C1', %s, 1, %s, p_namespace => 'n')", (ET, UNIT))
    blocker.execute("SELECT meter.allocate('C2', %s, 1, %s, p_namespace => 'n')", (ET, UNIT))
    errors: list[str | None] = [None, None]

    def run(i: int, events: list[dict[str, Any]]) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            try:
                conn.execute(APPLY_ROWS, (Jsonb([{**e, "namespace": "n"} for e in events]),))
            except psycopg.Error as exc:
                errors[i] = exc.sqlstate

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate((b1, b2))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while True:  # both batches wait (for the blocker's new accounts, or each other)
            waiting = db.execute(
                "SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted"
            ).fetchone()["n"]
            if waiting >= 2:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        blocker.rollback()
        blocker.close()
        for t in threads:
            t.join(30)
    assert errors == [None, None]
    balances = db.execute(
        "SELECT user_id, balance FROM meter.accounts WHERE namespace = 'n' ORDER BY user_id"
    ).fetchall()
    assert [(b["user_id"], b["balance"]) for b in balances] == [
        ("A", D(2)), ("B", D(2)), ("C1", D(1)), ("C2", D(1)), ("seed", D(1)),
    ]  # fmt: skip


def test_an_invalid_event_in_a_batch_creates_no_partition(db):
    """Defect 5 (review B), SPEC 3 item 5 / Appendix C: bad input changes nothing. One by
    one, an event refused for its amount (or for an event_time without its offset) creates
    nothing. The batch's step 1 created the month of its event_time before validating it:
    any caller could create partitions back to 1900."""
    before = ledger_partitions(db)
    single = _batch(db, "b", [_use("u1", "x", event_time="2004-03-04T05:06:07Z")])
    assert single[0]["error_sqlstate"] == "MT001"
    assert ledger_partitions(db) == before
    rows = _batch(
        db,
        "b",
        [
            _use("u1", "x", event_time="2004-03-04T05:06:07Z"),
            _use("u1", "1", event_time="2003-03-04 05:06:07"),
        ],
    )
    assert [r["error_sqlstate"] for r in rows] == ["MT001", "MT001"]
    assert ledger_partitions(db) == before


def test_a_refused_event_in_a_batch_changes_nothing_not_even_a_partition(db, snapshot):
    """Events the one-by-one path refuses, each dated in a month of its own that has no
    partition: an invalid amount, a checked consume with a malformed check_balance, an
    event of a namespace the caller may not write, and keys used before for another
    request (one on the fast path, one checked). Beside an event that applies, the batch
    writes that event and the dead letters, and creates no other partition."""
    db.execute("SELECT set_config('meter.tenant', 'n', false)")
    db.execute("SELECT meter.allocate('u1', %s, 5, %s, p_namespace => 'n',"
               " p_idempotency_key => 'used')", (ET, UNIT))  # fmt: skip
    db.execute("SELECT meter.allocate('u1', %s, 5, %s, p_namespace => 'n',"
               " p_idempotency_key => 'used2')", (ET, UNIT))  # fmt: skip
    parts = ledger_partitions(db)
    before = snapshot()
    events = [
        {**_use("u1", "x", event_time="2004-03-04T05:06:07Z"), "namespace": "n"},
        {**_use("u1", "1", check_balance="yes", event_time="2005-03-04T05:06:07Z"),
         "namespace": "n"},
        {**_give("u1", "1", event_time="2006-03-04T05:06:07Z"), "namespace": "other"},
        {**_give("u1", "1", event_time="2007-03-04T05:06:07Z", idempotency_key="used"),
         "namespace": "n"},
        {**_use("u1", "1", check_balance=True, event_time="2008-03-04T05:06:07Z",
                idempotency_key="used2"), "namespace": "n"},
        {**_give("u2", "1"), "namespace": "n"},
    ]  # fmt: skip
    rows = db.execute(APPLY_ROWS, (Jsonb(events),)).fetchall()
    assert [r["error_sqlstate"] for r in rows] == ["MT001", "MT001", "MT004", "MT002", "MT002",
                                                   None]  # fmt: skip
    assert ledger_partitions(db) == parts
    after = snapshot()
    assert len(after.pop("dead_letters")) == len(before.pop("dead_letters")) + 5
    for table in ("ledger", "accounts"):  # the one event applied: u2's allocate
        old = before.pop(table)
        (new,) = [r for r in after.pop(table) if r not in old]
        assert "u2" in new
    assert after == before


# ------------------------------------------ order and locks (a review of 044 and 047)


def _status(rows: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    return [(r["status"], r["error_sqlstate"]) for r in rows]


def _next_ledger_id(db: Any) -> int:
    row = db.execute("SELECT last_value, is_called FROM meter.ledger_id_seq").fetchone()
    return int(row["last_value"]) + (1 if row["is_called"] else 0)


def _accounts(db: Any, ns: str) -> list[tuple[Any, ...]]:
    rows = db.execute(
        "SELECT user_id, balance, reserved FROM meter.accounts WHERE namespace = %s"
        " ORDER BY user_id",
        (ns,),
    ).fetchall()
    return [(r["user_id"], r["balance"], r["reserved"]) for r in rows]


def _wait_for_waiters(db: Any, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        waiting = db.execute(
            "SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted"
        ).fetchone()["n"]
        if waiting >= n:
            return
        assert time.monotonic() < deadline, f"expected {n} waiting backends, saw {waiting}"
        time.sleep(0.05)


def test_an_adjust_referring_to_an_entry_a_later_event_writes_is_refused_as_one_by_one(db):
    """An adjust with a reference_id is judged against the whole ledger, so no later event
    takes the fast path (which writes first): one by one, [adjust u2 ref=E, allocate u1]
    refuses the adjust (MT003: no entry E yet) and the allocate gets id E; the batch applied
    the adjust, +1 unit invented on u2 and no dead letter (found by a review of 044)."""
    events_for = lambda ref: [  # noqa: E731
        _ev("adjust", user_id="u2", event_type=ET, amount="1", unit=UNIT, reference_id=ref),
        _give("u1", "10"),
    ]
    single_rows = _singles(db, "s", events_for(_next_ledger_id(db)))
    assert _status(single_rows) == [("error", "MT003"), ("applied", None)]

    batch_rows = _batch(db, "b", events_for(_next_ledger_id(db)))
    assert _status(batch_rows) == _status(single_rows)
    assert _accounts(db, "b") == [("u1", D(10), D(0))]


def test_a_batch_files_its_dead_letters_in_array_order(db):
    """A batch's dead letters are those of the calls one by one, in their order: a fast
    event refused by 3a (its key stored before for another request) was filed before an
    earlier event refused one by one (3a's results come first in v_out)."""
    for ns in ("s", "b"):
        db.execute(
            "SELECT meter.allocate('u2', %s, 5, %s, p_namespace => %s, p_idempotency_key => 'k')",
            (ET, UNIT, ns),
        )
    events = [_use("u1", "x"), _give("u2", "7", idempotency_key="k")]
    _singles(db, "s", events)
    _batch(db, "b", events)

    def letters(ns: str) -> list[Any]:
        return [
            (r["op"], r["error_sqlstate"])
            for r in db.execute(
                "SELECT op, error_sqlstate FROM meter.dead_letters WHERE namespace = %s"
                " ORDER BY dead_letter_id",
                (ns,),
            ).fetchall()
        ]

    assert letters("s") == [("consume", "MT001"), ("allocate", "MT002")]
    assert letters("b") == letters("s")


def test_a_dated_event_whose_key_an_earlier_invalid_event_used_makes_its_month_first(db, db_url):
    """Months first (step 1), then accounts, for every valid dated event, a key's later
    use included: step 1 left out a dated event whose key an earlier invalid event used,
    and step 4 made its month under the accounts' locks. Batch X = [consume u1 'x' key k,
    allocate u1 dated 2002-05 key k, allocate u2]; batch Y = [allocate u1 dated 2002-05,
    allocate u3]: Y made the month, then waited for u1, which X held while it waited for
    the month (40P01). A blocker holding u2 makes the interleaving deterministic."""
    for user in ("u1", "u2", "u3"):
        db.execute("SELECT meter.allocate(%s, %s, 1, %s, p_namespace => 'n')", (user, ET, UNIT))
    month = "2002-05-06T07:08:09Z"
    x = [_use("u1", "x", idempotency_key="k"), _give("u1", "1", event_time=month,
                                                        idempotency_key="k"),
         _give("u2", "1")]  # fmt: skip
    y = [_give("u1", "1", event_time=month), _give("u3", "1")]

    blocker = psycopg.connect(db_url)
    blocker.execute(
        "SELECT 1 FROM meter.accounts WHERE namespace = 'n' AND user_id = 'u2' FOR UPDATE"
    )
    errors: dict[str, str | None] = {}

    def run(name: str, events: list[dict[str, Any]]) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            try:
                conn.execute(APPLY_ROWS, (Jsonb([{**e, "namespace": "n"} for e in events]),))
                errors[name] = None
            except psycopg.Error as exc:
                errors[name] = f"{exc.sqlstate} {exc}"

    tx = threading.Thread(target=run, args=("x", x))
    ty = threading.Thread(target=run, args=("y", y))
    try:
        tx.start()
        _wait_for_waiters(db, 1)  # X holds u1 and waits for u2
        ty.start()
        _wait_for_waiters(db, 2)  # Y made the month and waits for u1
    finally:
        blocker.rollback()
        blocker.close()
        tx.join(30)
        ty.join(30)
    assert errors == {"x": None, "y": None}, [
        v[:300].replace(chr(10), " | ") for v in errors.values() if v
    ]


def test_a_checked_consume_in_a_new_month_takes_the_month_before_its_key(db, db_url):
    """A checked consume dated in a month with no partition (047) takes the month, then its
    key, as every write does (036, 027): it looked its key up first, and the same event
    delivered in a batch of several (step 1: month; 2b: key) and on its own deadlocked
    (40P01). One applies and the other replays, reported 'replayed' (the note _replay
    leaves for _apply_one's status survives 047's subtransaction). A transaction holding
    the month's creation lock orders the two."""
    db.execute("SELECT meter.allocate('u1', %s, 100, %s, p_namespace => 'n')", (ET, UNIT))
    event = _use("u1", "5", check_balance=True, idempotency_key="k",
                 event_time="2001-03-04T05:06:07Z")  # fmt: skip
    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT pg_advisory_xact_lock(19781, 200103)")
    out: dict[str, Any] = {}

    def run(name: str, events: list[dict[str, Any]]) -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            try:
                rows = conn.execute(
                    APPLY_ROWS, (Jsonb([{**e, "namespace": "n"} for e in events]),)
                ).fetchall()
                out[name] = rows[0]["status"]
            except psycopg.Error as exc:
                out[name] = f"{exc.sqlstate} {exc}"

    several = threading.Thread(target=run, args=("batch", [event, _give("u2", "1")]))
    single = threading.Thread(target=run, args=("single", [event]))
    try:
        several.start()
        _wait_for_waiters(db, 1)  # the batch waits to make the month (no key yet)
        single.start()
        _wait_for_waiters(db, 2)  # the single holds the key and waits for the month
    finally:
        blocker.rollback()
        blocker.close()
        several.join(30)
        single.join(30)
    assert sorted(out.values()) == ["applied", "replayed"], out


# ------------------------------------ the locks of a batch that goes one by one (050)


def _locks_held_elsewhere(db: Any) -> int:
    return db.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE pid <> pg_backend_pid()"
    ).fetchone()["n"]


def test_a_batch_of_over_100_with_an_event_one_by_one_is_refused_before_any_lock(db, snapshot):
    """Step 2b takes an advisory lock per one-by-one key and reservation id and per account
    of the batch, in the server's shared lock table: 20,000 checked consumes on distinct
    accounts failed with 53200 "out of shared memory" (and every other session needing a
    lock with them), and at 050's bound of 1000, five such calls at once filled a
    default-sized table. Now (054) a batch of more than 100 events, one of which goes one
    by one, is refused by name before it changes anything; 100 such events, or 1001
    events all on the fast path, apply."""
    db.execute("SELECT set_config('meter.tenant', 'n', false)")
    fast = [{**_give(f"u{i}", "1", idempotency_key=f"k{i}"), "namespace": "n"}
            for i in range(1001)]  # fmt: skip
    checked = {**_use("u0", "1", check_balance=True), "namespace": "n"}
    before = snapshot()
    with pytest.raises(psycopg.Error) as exc:
        db.execute(APPLY_ROWS, (Jsonb([*fast[:100], checked]),)).fetchall()
    assert exc.value.sqlstate == "MT001"
    assert str(exc.value).startswith("events: at most 100 events per call when any goes one")
    assert "got 101 events, 1 of them one by one" in str(exc.value)
    with pytest.raises(psycopg.Error, match="got 1001 events, 1 of them one by one"):
        db.execute(APPLY_ROWS, (Jsonb([*fast[:1000], checked]),)).fetchall()
    assert snapshot() == before

    rows = db.execute(APPLY_ROWS, (Jsonb(fast),)).fetchall()  # all fast: 1001 apply
    assert {r["status"] for r in rows} == {"applied"} and len(rows) == 1001
    rows = db.execute(APPLY_ROWS, (Jsonb([*fast[1:100], checked]),)).fetchall()
    assert [r["status"] for r in rows] == ["replayed"] * 99 + ["applied"]


def test_a_batch_of_100_events_one_by_one_leaves_room_in_the_lock_table(db, db_url):
    """100 reserves on distinct accounts with keys, each of which takes three locks, in a
    transaction kept open: about 300 locks, and another session's batch of 100 applies."""
    events = [{**_ev("reserve", user_id=f"u{i}", event_type=ET, amount="1", unit=UNIT,
                     reservation_id=f"r{i}", idempotency_key=f"k{i}"), "namespace": "n"}
              for i in range(100)]  # fmt: skip
    with psycopg.connect(db_url, row_factory=dict_row) as holder:
        holder.execute("SELECT set_config('meter.tenant', 'n', true)")
        rows = holder.execute(APPLY_ROWS, (Jsonb(events),)).fetchall()
        assert {r["error_sqlstate"] for r in rows} == {None} and len(rows) == 100
        held = holder.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE pid = pg_backend_pid()"
        ).fetchone()["n"]
        assert 300 <= held < 400, held  # its locks, held to its end
        other = [{**e, "namespace": "m"} for e in events]
        rows = db.execute(APPLY_ROWS, (Jsonb(other),)).fetchall()
        assert {r["error_sqlstate"] for r in rows} == {None} and len(rows) == 100
        holder.rollback()


# ------------------------------------ the months a batch creates (050)


def _month_starts(n: int, first_year: int = 1901) -> list[str]:
    """The 15th of ``n`` consecutive months from January of ``first_year``, as event times."""
    return [f"{first_year + i // 12}-{i % 12 + 1:02d}-15T00:00:00Z" for i in range(n)]


def test_a_batch_dated_in_over_100_new_months_is_refused_before_any_lock(db, db_url, snapshot):
    """Step 1 creates the ledger partition of each month the batch dates, in its
    transaction: each new month holds some twelve locks of the server's shared lock table
    to the end. 1000 allocates (a producer's largest batch, all on the fast path, which 050
    does not bound), one per month from 1901, held about 12,000, twice the whole table of a
    default server (and with a smaller table failed with 53200, every other session with
    it). A batch creating more than 100 months is refused by name before it changes
    anything; 100 new months (and any number that exist already) apply."""
    db.execute("SELECT set_config('meter.tenant', 'n', false)")
    times = _month_starts(1000)
    many = [{**_give(f"u{i}", "1", idempotency_key=f"k{i}", event_time=t), "namespace": "n"}
            for i, t in enumerate(times)]  # fmt: skip
    before = snapshot()
    partitions = ledger_partitions(db)
    with pytest.raises(psycopg.Error) as exc:
        db.execute(APPLY_ROWS, (Jsonb(many),)).fetchall()
    assert exc.value.sqlstate == "MT001"
    assert str(exc.value).startswith("events: at most 100 ledger months without a partition")
    assert "got 1000 events dated in 1000 such months" in str(exc.value)
    assert snapshot() == before and ledger_partitions(db) == partitions
    with pytest.raises(psycopg.Error, match="dated in 101 such months"):
        db.execute(APPLY_ROWS, (Jsonb(many[:101]),)).fetchall()

    with psycopg.connect(db_url, row_factory=dict_row) as holder:
        holder.execute("SELECT set_config('meter.tenant', 'n', true)")
        rows = holder.execute(APPLY_ROWS, (Jsonb(many[:100]),)).fetchall()
        assert {r["status"] for r in rows} == {"applied"} and len(rows) == 100
        held = holder.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE pid = pg_backend_pid()"
        ).fetchone()["n"]
        assert held < 3000, held  # 050's bound of a call's locks
        holder.commit()
    # those 100 months exist now: a batch dating them and 100 more applies
    rows = db.execute(APPLY_ROWS, (Jsonb(many[:200]),)).fetchall()
    assert [r["status"] for r in rows] == ["replayed"] * 100 + ["applied"] * 100


def test_concurrent_calls_at_the_bound_leave_room_in_a_default_lock_table() -> None:
    """050 kept a call going one by one to 1000 events, about 3,000 locks of the server's
    shared lock table, held to its end. A default server's table holds some 6,400
    (max_locks_per_transaction 64 x max_connections 100; here 32 x 200, the embedded
    server's connections): five workers each applying a producer's batch of 1000 reserves
    at once filled it, and the fifth, with every other session needing a lock meanwhile,
    failed with 53200 "out of shared memory". 054 keeps such a call to 100 events (the
    worker applies a larger batch in parts of 100): sixteen calls at that bound held open
    at once leave room for a seventeenth session, and a call of 1000 is refused by name
    before it takes any lock."""
    import shutil
    import tempfile
    from pathlib import Path

    from meter.embedded import EmbeddedPostgres
    from meter.migrate import migrate

    # not under pytest's tmp_path, which another session may make unreadable (tests/fix_db.py)
    base = Path(tempfile.mkdtemp(prefix="meter-test-locks-"))
    server = EmbeddedPostgres(base / "data", fast=True)
    server.start()
    holders: list[psycopg.Connection[Any]] = []
    try:
        with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET max_locks_per_transaction = 32")
        server.stop()
        server.start()
        with psycopg.connect(server.url("postgres"), autocommit=True) as admin:
            admin.execute("CREATE DATABASE m")
        migrate(server.url("m"), with_roles=True)
        for k in range(16):
            ns = f"n{k}"
            events = [{**_ev("reserve", user_id=f"u{i}", event_type=ET, amount="1", unit=UNIT,
                             reservation_id=f"r{i}", idempotency_key=f"k{i}"), "namespace": ns}
                      for i in range(100)]  # fmt: skip
            holder = psycopg.connect(server.url("m"), row_factory=dict_row)
            holders.append(holder)
            holder.execute("SELECT set_config('meter.tenant', %s, true)", (ns,))
            rows = holder.execute(APPLY_ROWS, (Jsonb(events),)).fetchall()
            assert {r["error_sqlstate"] for r in rows} == {None} and len(rows) == 100
        with psycopg.connect(server.url("m"), row_factory=dict_row) as other:
            other.execute("SELECT set_config('meter.tenant', 'last', true)")
            events = [{**e, "namespace": "last"} for e in events]
            rows = other.execute(APPLY_ROWS, (Jsonb(events),)).fetchall()
            assert {r["error_sqlstate"] for r in rows} == {None} and len(rows) == 100
            other.rollback()
            with pytest.raises(psycopg.Error, match="at most 100 events per call") as exc:
                other.execute(APPLY_ROWS, (Jsonb(events * 10),)).fetchall()
            assert exc.value.sqlstate == "MT001"
    finally:
        for holder in holders:
            holder.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_an_adjust_naming_an_entry_holds_locks_bounded_by_its_events(db, db_url):
    """054 keeps a call going one by one to 100 events so that it holds about 300 entries
    of the server's shared lock table: 2 to 3 for each event. An adjust naming an entry
    took one for every ledger month besides, whatever the number of events, to its end:
    the look-up of the entry by id reads every month. Since 063 it reads them in a
    subtransaction rolled back once it has its answer, which lets those locks go."""
    db.execute("SELECT set_config('meter.tenant', 'n', false)")
    times = _month_starts(300)
    for k in range(0, 300, 100):  # 050: at most 100 new months per call
        rows = db.execute(APPLY_ROWS, (Jsonb([
            {**_give("u1", "1", idempotency_key=f"m{k + i}", event_time=t), "namespace": "n"}
            for i, t in enumerate(times[k : k + 100])
        ]),)).fetchall()  # fmt: skip
        assert {r["status"] for r in rows} == {"applied"}
    (entry,) = db.execute("SELECT max(id) AS id FROM meter.ledger").fetchall()
    adjust = {**_ev("adjust", user_id="u1", event_type=ET, amount="-1", unit=UNIT,
                    reference_id=entry["id"], idempotency_key="adj"), "namespace": "n"}  # fmt: skip
    with psycopg.connect(db_url, row_factory=dict_row) as holder:
        holder.execute("SELECT set_config('meter.tenant', 'n', true)")
        rows = holder.execute(APPLY_ROWS, (Jsonb([adjust]),)).fetchall()
        assert [r["status"] for r in rows] == ["applied"]
        held = holder.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE pid = pg_backend_pid()"
        ).fetchone()["n"]
        holder.rollback()
    assert held < 100, held


def test_a_fast_batch_and_a_mixed_one_creating_one_account_do_not_deadlock(db, db_url):
    """A batch whose events all take the fast path created its accounts in its upsert, in
    key order, with no queue lock: it created N, then waited for Z, which a batch with
    one-by-one events had locked in step 2b (it exists) before it came to create N in
    array order: each waited for the other (40P01, the known open item of 044). A blocker
    creating C (with no queue lock, as a raw insert) holds the mixed batch after its step
    2b, so the fast batch runs exactly there. Now a fast batch, in a transaction that holds
    no row, queues for its accounts in key order first, as a mixed one does."""
    ref = db.execute(
        "SELECT entry_id FROM meter.allocate('seed', %s, 1, %s, p_namespace => 'n')", (ET, UNIT)
    ).fetchone()["entry_id"]
    db.execute("SELECT meter.allocate('Z', %s, 10, %s, p_namespace => 'n')", (ET, UNIT))
    mixed = [
        _ev("adjust", user_id="C", event_type=ET, amount="1", unit=UNIT, reference_id=ref),
        _give("N", "1"),
        _give("Z", "1"),
    ]
    fast = [_give("N", "2"), _give("Z", "2")]
    before = _deadlocks(db)
    blocker = psycopg.connect(db_url)
    blocker.execute(
        "INSERT INTO meter.accounts (namespace, user_id, event_type, resource, unit)"
        " VALUES ('n', 'C', %s, '', %s)",
        (ET, UNIT),
    )
    errors: dict[str, str | None] = {}

    def run(name: str, events: list[dict[str, Any]]) -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            try:
                conn.execute(APPLY_ROWS, (Jsonb([{**e, "namespace": "n"} for e in events]),))
                errors[name] = None
            except psycopg.Error as exc:
                errors[name] = exc.sqlstate

    t_mixed = threading.Thread(target=run, args=("mixed", mixed))
    t_fast = threading.Thread(target=run, args=("fast", fast))
    try:
        t_mixed.start()
        _wait_for_waiters(db, 1)  # the mixed batch holds Z and waits for C
        t_fast.start()
        _wait_for_waiters(db, 2)  # the fast batch waits (for Z, or for N's queue)
    finally:
        blocker.rollback()  # C is not created: the mixed batch creates it
        blocker.close()
        t_mixed.join(30)
        t_fast.join(30)
    assert errors == {"mixed": None, "fast": None}
    assert _deadlocks(db) == before
    assert {u: b for u, b, _ in _accounts(db, "n")} == {
        "C": D(1), "N": D(3), "seed": D(1), "Z": D(13),
    }  # fmt: skip


def _deadlocks(db: Any) -> int:
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    return int(row["deadlocks"])


def test_a_fast_batch_queues_only_for_the_accounts_it_creates(db, db_url):
    """054's queue locks are entries of the server's shared lock table, held to the end of
    the transaction: a fast batch takes one per account it creates (here two), none for
    the accounts that exist, so a batch over known accounts adds nothing to the table."""
    db.execute("SELECT meter.allocate('old', %s, 10, %s, p_namespace => 'n')", (ET, UNIT))
    with psycopg.connect(db_url) as conn:
        conn.execute(
            APPLY_ROWS,
            (Jsonb([{**e, "namespace": "n"} for e in (_give("old", "1"), _use("old", "2"))]),),
        )
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
        ).fetchone()
        assert held == (0,)
        conn.rollback()
        conn.execute(
            APPLY_ROWS,
            (Jsonb([{**e, "namespace": "n"} for e in (_give("new1", "1"), _give("new2", "1"),
                                                        _use("old", "1"))]),),
        )  # fmt: skip
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
        ).fetchone()
        assert held == (2,)
        conn.rollback()


def test_fast_batches_creating_many_accounts_at_once_leave_room_in_the_lock_table(db, db_url):
    """054's queue locks are entries of the server's shared lock table, held to the end of
    the transaction, and it took up to 1000 (one per account a fast batch creates): some
    two dozen producer batches of 1000 new accounts under way at once filled the table of
    this server (max_connections 200; half that on a default one), and the next, and every
    other session needing a lock, failed with 53200 "out of shared memory". A fast batch
    now queues only when it creates at most 300 accounts (054's bound on a call going one
    by one: about 300 entries), so these hold none."""
    per_slot = int(
        db.execute("SHOW max_locks_per_transaction").fetchone()["max_locks_per_transaction"]
    )
    slots = int(db.execute("SHOW max_connections").fetchone()["max_connections"])
    calls = 3 * per_slot * slots // 1000 + 1  # past the table, with room to spare, at 1000 each
    conns: list[psycopg.Connection[Any]] = []
    try:
        for c in range(calls):
            conn = psycopg.connect(db_url)
            conns.append(conn)
            events = [{**_give(f"c{c}-{i}", "1"), "namespace": "n"} for i in range(1000)]
            conn.execute(APPLY_ROWS, (Jsonb(events),))  # held open: its locks too
        held = db.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'"
        ).fetchone()["n"]
    finally:
        for conn in conns:
            conn.rollback()
            conn.close()
    assert held == 0
    assert db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"] == 0
