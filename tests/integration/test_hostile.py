"""Hostile input across the SDK and the producer (fuzzed with hypothesis).

Identifiers (unicode, control characters, SQL fragments, 1 MB strings, wrong types),
amounts (NaN, infinities, 1e400, -0, huge and tiny scales, strings, booleans), metadata
(deep nesting, arrays, non-JSON values, sizes around 64 KiB) in every position of the
recording and query calls. Each call either returns a correct result (checked against the
stored row) or raises a ``MeterError`` (never ``TypeError``, ``RecursionError``, a raw
``psycopg`` error...) and leaves every table as it was (``snapshot``).

Producer: the same values are refused at the call with a ``MeterError`` and nothing
reaches the broker, or they are accepted and the worker applies them correctly; messages
crafted past the producer are dead-lettered, never applied.

Static: no SQL in ``meter/`` or ``worker/`` is built from input by f-strings, ``%``,
``+`` or ``str.format`` (psycopg's ``sql`` composition aside).
"""

from __future__ import annotations

import ast
import re
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter import types as t
from meter import wire
from meter.errors import MeterError, ValidationError
from tests.examples import examples

D = Decimal
ET, UNIT = "tokens", "tok"
REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------- hostile values

SQL_FRAGMENTS = [
    "'; DROP TABLE meter.ledger; --",
    "u1' OR '1'='1",
    "$$; SELECT pg_sleep(10); $$",
    "\\x00\\'",
    "%s %(x)s {0}",
    "meter.tenant",
    "u1\u200b",  # zero-width space: not white space, a distinct identifier
    "ｕ１",  # full-width
    "\U0001f600",
    "a" * 257,
]

texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=40
)
wrong_types = st.sampled_from(
    [None, 0, -1, 2**70, 1.5, True, b"u1", ["u1"], {"u": 1}, object(), D("1"), ("u1",)]
)
identifiers = st.one_of(
    texts,
    st.sampled_from(SQL_FRAGMENTS),
    st.just("x" * 1_000_000),  # 1 MB
    st.builds(lambda s, c: f"{s}{c}{s}", texts, st.sampled_from(["\n", "\x7f", "\x9f", "\t"])),
    st.builds(lambda s, w: f"{w}{s}", texts, st.sampled_from([" ", "\u00a0", "\u2003"])),
    wrong_types,
)
amounts = st.one_of(
    st.sampled_from(
        [
            float("nan"),
            float("inf"),
            float("-inf"),
            1e400,
            -0.0,
            0,
            -0,
            D("-0"),
            D("NaN"),
            D("sNaN"),
            D("Infinity"),
            D("1e400"),
            D("1E+23"),
            D("1E+24"),
            D("1e-12"),
            D("1e-13"),
            D("0.1000000000000"),
            10**30,
            2**63,
            1 / 3,
            0.1,
            "12.5",
            "1e3",
            " 1",
            "0x10",
            "",
            "NaN",
            "١٢",
            True,
            False,
            None,
            [1],
            b"1",
        ]
    ),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.floats(),
    st.integers(),
)
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), texts,
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
        lambda d: abs(d.adjusted()) < 1000
    ),
)  # fmt: skip
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=20,
)


def _deep(n: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(n):
        node["k"] = {}
        node = node["k"]
    return root


metadatas = st.one_of(
    st.dictionaries(texts, json_values, max_size=5),
    st.sampled_from(
        [
            [1, 2],
            "text",
            5,
            {"x": float("nan")},
            {"x": {1, 2}},
            {1: "int key"},
            {"x": b"bytes"},
            {"x": object()},
            {"x": "\ud800"},
            {"x": "a\x00"},
            {"x": "a" * 70000},
            {"x": D("1E+100000")},
            {"x": D("1e-5000")},
            _deep(50),
            _deep(300),
            _deep(600),
            _deep(900),
            _deep(10_000),
        ]
    ),
)

# ---------------------------------------------------------------- SDK

# valid arguments of each call; the fuzz replaces one
SDK_CALLS: dict[str, dict[str, Any]] = {
    "allocate": {"user_id": "u1", "event_type": ET, "amount": D(5), "unit": UNIT},
    "consume": {"user_id": "u1", "event_type": ET, "amount": D(1), "unit": UNIT},
    "reserve": {"user_id": "u1", "event_type": ET, "amount": D(1), "unit": UNIT},
    "adjust": {"user_id": "u1", "event_type": ET, "amount": D(1), "unit": UNIT},
    "commit": {"reservation_id": "nope", "actual_amount": D(1)},
    "release": {"reservation_id": "nope"},
    "get_balance": {"user_id": "u1", "event_type": ET, "unit": UNIT},
    "get_ledger": {"user_id": "u1", "event_type": ET, "unit": UNIT},
    "get_user_balances": {"user_id": "u1"},
}
OPTIONAL = {
    "allocate": ["resource", "idempotency_key", "metadata"],
    "consume": ["resource", "idempotency_key", "metadata"],
    "reserve": ["resource", "idempotency_key", "metadata", "reservation_id", "ttl_seconds"],
    "adjust": ["resource", "idempotency_key", "metadata", "reference_id"],
    "commit": ["metadata"],
    "get_ledger": ["resource", "limit"],
}
AMOUNT_PARAMS = {"amount", "actual_amount"}
IDENT_PARAMS = {"user_id", "event_type", "unit", "resource", "idempotency_key", "reservation_id"}


@st.composite
def sdk_calls(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    fn = draw(st.sampled_from(sorted(SDK_CALLS)))
    param = draw(st.sampled_from(sorted({*SDK_CALLS[fn], *OPTIONAL.get(fn, [])})))
    if param in AMOUNT_PARAMS:
        value = draw(amounts)
    elif param == "metadata":
        value = draw(metadatas)
    elif param in ("ttl_seconds", "limit", "reference_id"):
        value = draw(st.one_of(st.integers(), amounts, wrong_types))
    else:
        value = draw(identifiers)
    return fn, param, {**SDK_CALLS[fn], param: value}


def _as_decimal(value: Any) -> Decimal:
    return D(repr(value)) if isinstance(value, float) else D(value)


def check_applied(db: psycopg.Connection[Any], fn: str, kwargs: dict[str, Any], got: Any) -> None:
    """A write that succeeded stored exactly what was given."""
    entry_id = got.get("entry_id") if isinstance(got, dict) else None
    if fn == "reserve":
        assert got["granted"] is False or got["reservation_id"] is not None
        return
    if entry_id is None:
        assert fn == "consume" or fn not in ("allocate", "adjust"), (fn, got)
        return
    row = db.execute("SELECT * FROM meter.ledger WHERE id = %s", (entry_id,)).fetchone()
    if fn == "commit":
        # the examples share one database: an earlier example's reserve may have created
        # the reservation this commit names (a long run drew the same hostile id twice)
        assert row["reservation_id"] == kwargs["reservation_id"], row
        assert row["amount"] == -_as_decimal(kwargs["actual_amount"]), row
        return
    for name in ("user_id", "event_type", "unit"):
        assert row[name] == kwargs[name], (name, row[name])
    assert row["resource"] == (kwargs.get("resource") or "")
    sign = -1 if fn == "consume" else 1
    assert row["amount"] == sign * _as_decimal(kwargs["amount"])
    if kwargs.get("metadata") is not None:
        stored = db.execute(
            "SELECT metadata::text AS m FROM meter.ledger WHERE id = %s", (entry_id,)
        ).fetchone()["m"]
        assert t.loads(stored) == t.loads(t.dumps(kwargs["metadata"]))  # numbers exact


@FUZZ
@given(call=sdk_calls())
def test_sdk_hostile_input(client, db, snapshot, call):
    fn, param, kwargs = call
    before = snapshot()
    try:
        got = getattr(client, fn)(**kwargs)
    except MeterError as exc:
        assert snapshot() == before, (fn, param)
        if isinstance(exc, ValidationError) and exc.parameter is not None:
            assert exc.parameter in (param, "amount", "metadata"), (exc.parameter, param)
        return
    check_applied(db, fn, kwargs, got)


def test_a_hostile_commit_may_meet_a_reservation_an_earlier_example_made(client, db):
    # found by METER_PROPERTY_SCALE=40: the fuzz's examples share one database, so a
    # commit can find the hold an earlier reserve made under the same hostile id
    rid = "u1' OR '1'='1"
    client.allocate("u1", ET, D(5), UNIT)
    assert client.reserve("u1", ET, D(2), UNIT, reservation_id=rid)["granted"]
    kwargs = {"reservation_id": rid, "actual_amount": D(1)}
    check_applied(db, "commit", kwargs, client.commit(**kwargs))


@pytest.mark.parametrize("depth", [300, 600, 900, 990, 10_000])
def test_sdk_deeply_nested_metadata(client, db, snapshot, depth):
    """Any depth: stored exactly, or refused with a ValidationError and nothing written."""
    before = snapshot()
    try:
        row = client.allocate("u1", ET, 1, UNIT, metadata=_deep(depth))
    except ValidationError as exc:
        assert exc.parameter == "metadata"
        assert snapshot() == before
        return
    stored = db.execute(
        "SELECT metadata::text AS m FROM meter.ledger WHERE id = %s", (row["entry_id"],)
    ).fetchone()["m"]
    assert stored.count("{") == depth + 1


# ---------------------------------------------------------------- metadata size: SDK == SQL


@settings(max_examples=examples(80), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(value=st.dictionaries(texts, json_values, max_size=6))
def test_metadata_size_is_measured_as_sql_measures_it(db, value):
    text = t.check_metadata(value)
    sql = db.execute("SELECT octet_length(%s::jsonb::text) AS n", (text,)).fetchone()["n"]
    assert t.jsonb_text_size(value) == sql


def test_metadata_at_the_limit_agrees_with_sql(client, db, snapshot):
    # jsonb::text is '{"x": "..."}': 9 bytes around the string
    at_limit = {"x": "a" * (65536 - 9)}
    row = client.allocate("u1", ET, 1, UNIT, metadata=at_limit)
    assert (
        db.execute(
            "SELECT octet_length(metadata::text) AS n FROM meter.ledger WHERE id = %s",
            (row["entry_id"],),
        ).fetchone()["n"]
        == 65536
    )
    # compact JSON of this one is 65535 bytes: it used to pass the SDK and fail in SQL
    before = snapshot()
    with pytest.raises(ValidationError) as exc:
        client.allocate("u1", ET, 1, UNIT, metadata={"x": "a" * (65536 - 8)})
    assert exc.value.parameter == "metadata" and "65537" in str(exc.value)
    with pytest.raises(ValidationError):  # numbers count as numeric writes them
        client.allocate("u1", ET, 1, UNIT, metadata={"x": "a" * 65000, "n": D("1E+600")})
    assert snapshot() == before


# ---------------------------------------------------------------- producer

PRODUCER_CALLS = {k: v for k, v in SDK_CALLS.items() if k in wire.OPS}


def _queue_length(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(wire.QUEUE))
    finally:
        client.close()


@st.composite
def producer_calls(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    fn, param, kwargs = draw(sdk_calls().filter(lambda c: c[0] in PRODUCER_CALLS))
    return fn, param, kwargs


@FUZZ
@given(call=producer_calls())
def test_producer_hostile_input_refused_at_the_call(make_producer, broker_url, call):
    """No worker: whatever is refused reaches no broker; the rest is a well-formed event."""
    fn, param, kwargs = call
    producer = make_producer("default")
    before = _queue_length(broker_url)
    try:
        handle = getattr(producer, fn)(**kwargs)
    except MeterError:
        assert _queue_length(broker_url) == before, (fn, param)
        return
    assert _queue_length(broker_url) == before + 1
    assert handle.op == fn


@settings(max_examples=examples(30), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(call=producer_calls())
def test_producer_accepted_input_is_applied_correctly(pipeline, make_producer, db, call):
    fn, param, kwargs = call
    producer = make_producer("default", results=True)
    try:
        handle = getattr(producer, fn)(**kwargs)
    except MeterError:
        return
    try:
        got = handle.wait(timeout=30)
    except MeterError:  # refused by the database: a dead letter, nothing applied
        rows = db.execute(
            "SELECT count(*) AS n FROM meter.dead_letters WHERE source LIKE %s",
            (f"{handle.task_id}%",),
        ).fetchone()
        assert rows["n"] == 1, (fn, param)
        return
    check_applied(db, fn, kwargs, got)


def test_producer_deep_metadata_survives_the_broker(pipeline, make_producer, db, broker_url):
    """Metadata as deep as the producer accepts is decoded and applied by the worker;
    deeper is refused at the call, with nothing sent."""
    producer = make_producer("default", results=True)
    deep = _deep(800)
    got = producer.allocate("u1", ET, 1, UNIT, metadata=deep).wait(timeout=30)
    assert got["balance"] == D(1)
    with pytest.raises(ValidationError) as ei:
        producer.allocate("u1", ET, 1, UNIT, metadata=_deep(100_000))
    assert ei.value.parameter == "metadata"
    assert _queue_length(broker_url) == 0
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 1


CRAFTED: dict[str, tuple[str, Any]] = {
    "event not an object": ("meter.consume", ["consume"]),
    "args not an object": ("meter.consume", {"op": "consume", "namespace": "default", "args": [1]}),
    "amount a JSON float": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": 0.1, "unit": UNIT}},
    ),
    "amount NaN": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "NaN", "unit": UNIT}},
    ),
    "amount 1e400": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1e400", "unit": UNIT}},
    ),
    "user_id with a control character": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u\x01", "event_type": ET, "amount": "1", "unit": UNIT}},
    ),
    "SQL in an identifier and an unknown argument": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1'; DROP TABLE meter.ledger; --", "event_type": ET,
                  "amount": "1", "unit": UNIT, "p_namespace": "other"}},
    ),
    "1 MB namespace": (
        "meter.allocate",
        {"op": "allocate", "namespace": "n" * 1_000_000,
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT}},
    ),
    "metadata an array": (
        "meter.allocate",
        {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "metadata": [1, 2]}},
    ),
    "unknown op": ("meter.apply_batch", [{"op": "drop", "namespace": "default", "args": {}}]),
    "batch not a list": ("meter.apply_batch", {"op": "allocate"}),
    "batch of junk": ("meter.apply_batch", [None, 1, "x", [], {"op": None}]),
}  # fmt: skip


def test_crafted_messages_are_dead_lettered_never_applied(pipeline, db, snapshot):
    """Messages no producer would send: each bad event is one dead letter, nothing applies.

    The one exception is a JSON number as amount: it is taken as written, so 0.1 is
    exactly 0.1 (and so is a number with more digits than a float holds: worker.codec).
    """
    for name, payload in CRAFTED.values():
        pipeline.send_task(name, args=(payload,), task_id=str(uuid.uuid4()))
    expected = 8 + 1 + 1 + 5  # 9 single events but the float; 3 batches: one per event

    def count() -> int:
        return db.execute("SELECT count(*) AS n FROM meter.dead_letters").fetchone()["n"]

    deadline = time.monotonic() + 30
    while count() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # nothing more arrives
    letters = db.execute("SELECT error_sqlstate FROM meter.dead_letters").fetchall()
    assert [r["error_sqlstate"] for r in letters] == ["MT001"] * expected
    rows = db.execute("SELECT namespace, user_id, amount FROM meter.ledger").fetchall()
    assert rows == [{"namespace": "default", "user_id": "u1", "amount": D("0.1")}]
    assert db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"] == 1
    assert snapshot()["reservations"] == []


# ---------------------------------------------------------------- static: no SQL from input

SQLISH = re.compile(
    # the code base writes SQL keywords in capitals; prose ("could not create") is not SQL
    r"\b(SELECT|INSERT|UPDATE|DELETE|TRUNCATE|CREATE|DROP|ALTER|GRANT|REVOKE)\b|\bmeter\.\w+\("
)
EXECUTORS = {"execute", "executemany", "copy"}


def _sources() -> list[Path]:
    return sorted([*(REPO / "meter").glob("*.py"), *(REPO / "worker").glob("*.py")])


def _literal_text(node: ast.AST) -> str:
    """The literal parts of a string expression (constants and f-string pieces)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal_text(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _literal_text(node.left) + _literal_text(node.right)
    return ""


def _built(node: ast.AST) -> bool:
    """``node`` builds a string at run time: f-string with fields, %, + or str.format."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("format", "join")
    ):
        # psycopg.sql composition (sql.SQL(...).format(...)) quotes what it inserts
        target = node.func.value
        return not (
            isinstance(target, ast.Call)
            and isinstance(target.func, ast.Attribute)
            and target.func.attr in ("SQL", "Composed")
        )
    return False


def _constant_arg(node: ast.AST) -> bool:
    """At module level: a literal, or a (starred) module constant."""
    if isinstance(node, ast.Starred):
        node = node.value
    return isinstance(node, (ast.Constant, ast.Name))


def sql_building_sites() -> list[str]:
    problems: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(REPO)
        builders: set[str] = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            built_locals = {
                target.id
                for node in ast.walk(fn)
                if isinstance(node, ast.Assign) and _built(node.value)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            for node in ast.walk(fn):
                # 1. execute(<built string>) or execute(<local built in this function>)
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in EXECUTORS
                    and node.args
                ):
                    arg = node.args[0]
                    if _built(arg) or (isinstance(arg, ast.Name) and arg.id in built_locals):
                        problems.append(f"{rel}:{node.lineno}: {fn.name} executes built SQL")
                # 2. SQL text assembled at run time inside a function
                if _built(node) and SQLISH.search(_literal_text(node)):
                    builders.add(fn.name)
        # 3. a function assembling SQL text may only run at import, on constants
        if builders:
            inside: set[int] = set()
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inside |= {id(n) for n in ast.walk(fn)}
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in builders
                    and (id(node) in inside or not all(_constant_arg(a) for a in node.args))
                ):
                    problems.append(
                        f"{rel}:{node.lineno}: {node.func.id} builds SQL from non-constants"
                    )
    return problems


def test_no_sql_is_built_from_input():
    assert sql_building_sites() == []


def test_the_static_check_catches_what_it_should(tmp_path, monkeypatch):
    # The scanner itself: each of these must be reported.
    bad = tmp_path / "meter"
    bad.mkdir()
    (tmp_path / "worker").mkdir()
    (bad / "bad.py").write_text(
        "def a(conn, user):\n"
        "    conn.execute(f\"SELECT * FROM meter.get_balance('{user}')\")\n"
        "def b(conn, user):\n"
        '    q = "SELECT * FROM meter.x(%s)" % user\n'
        "    conn.execute(q)\n"
        "def c(conn, user):\n"
        '    conn.execute("SELECT " + user)\n'
        "def d(conn, user):\n"
        '    conn.execute("SELECT {}".format(user))\n'
        "def e(name):\n"
        '    return f"SELECT * FROM meter.{name}()"\n'
        "Q = e('ok')\n"
        "def f(conn, name):\n"
        "    conn.execute(e(name))\n"
        "def g(conn, ident):\n"
        "    from psycopg import sql\n"
        "    conn.execute(sql.SQL('SELECT {}').format(sql.Identifier(ident)))\n"
    )
    monkeypatch.setattr("tests.integration.test_hostile.REPO", tmp_path)
    found = sql_building_sites()
    assert [p.split(": ")[1] for p in found] == [
        "a executes built SQL",
        "b executes built SQL",
        "c executes built SQL",
        "d executes built SQL",
        "e builds SQL from non-constants",
    ], found
