"""Bad input gets a clear error and changes nothing (SPEC 3 item 5, Appendix C).

Every refusal must raise the right typed error naming the parameter and leave every meter
table unchanged. The SQL layer is also exercised directly (bypassing the SDK's own checks):
it validates authoritatively with SQLSTATE MT001.
"""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal

import psycopg
import pytest
from psycopg.types.json import Jsonb

from meter.errors import ValidationError

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"
RID = "res-1"

# ---------------------------------------------------------------- calls under test

# Valid keyword arguments for each SDK method; each test replaces one of them.
CALLS = {
    "allocate": dict(user_id=U, event_type=ET, amount=D("1"), unit=UNIT),
    "consume": dict(user_id=U, event_type=ET, amount=D("1"), unit=UNIT),
    "reserve": dict(user_id=U, event_type=ET, amount=D("1"), unit=UNIT),
    "adjust": dict(user_id=U, event_type=ET, amount=D("1"), unit=UNIT),
    "commit": dict(reservation_id=RID, actual_amount=D("1")),
    "release": dict(reservation_id=RID),
    "get_balance": dict(user_id=U, event_type=ET, unit=UNIT),
    "get_account": dict(user_id=U, event_type=ET, unit=UNIT),
    "get_ledger": dict(user_id=U, event_type=ET, unit=UNIT),
    "get_user_balances": dict(user_id=U),
    "get_usage": dict(user_id=U, start_time=None, end_time=None),
    "set_period_config": dict(
        user_id=U,
        event_type=ET,
        unit=UNIT,
        resource=None,
        period_start=date(2024, 1, 1),
        period_allocation=D("10"),
    ),
    "open_period": dict(
        user_id=U,
        event_type=ET,
        unit=UNIT,
        resource=None,
        period_start=date(2024, 1, 1),
        allocation=D("10"),
    ),
    "close_period": dict(
        user_id=U, event_type=ET, unit=UNIT, resource=None, period_end=date(2024, 1, 31)
    ),
    "get_audit_events": dict(),
    "get_periods": dict(user_id=U),
}

ACCOUNT_FNS = [
    "allocate",
    "consume",
    "reserve",
    "adjust",
    "get_balance",
    "get_account",
    "get_ledger",
    "set_period_config",
    "open_period",
    "close_period",
]
TAKES = {
    "user_id": [*ACCOUNT_FNS, "get_user_balances", "get_usage", "get_audit_events", "get_periods"],
    "event_type": [*ACCOUNT_FNS, "get_periods"],
    "unit": [*ACCOUNT_FNS, "get_periods"],
    "resource": [*ACCOUNT_FNS, "get_periods"],
    "idempotency_key": ["allocate", "consume", "reserve", "adjust"],
    "reservation_id": ["commit", "release", "reserve"],
    "metadata": ["allocate", "consume", "reserve", "adjust", "commit"],
    "event_time": ["allocate", "consume"],
}
MAX_LEN = {
    "user_id": 256,
    "event_type": 256,
    "resource": 256,
    "unit": 64,
    "idempotency_key": 256,
    "reservation_id": 128,
}
AMOUNT_PARAMS = [
    ("allocate", "amount"),
    ("consume", "amount"),
    ("reserve", "amount"),
    ("adjust", "amount"),
    ("commit", "actual_amount"),
    ("set_period_config", "period_allocation"),
    ("set_period_config", "carry_over_limit"),
    ("open_period", "allocation"),
]

BAD_TEXT = {
    "nul": "a\x00b",
    "us": "a\x1fb",
    "newline": "a\nb",
    "del": "a\x7fb",
    "nel": "a\x85b",
    "apc": "a\x9fb",
    "lead-space": " a",
    "trail-space": "a ",
    "lead-tab": "\ta",
    "lead-nbsp": "\u00a0a",
    "trail-nbsp": "a\u00a0",
    "lead-ideographic": "\u3000a",
    "trail-ideographic": "a\u3000",
    "only-space": " ",
    "lead-line-sep": "\u2028a",
    "trail-em-space": "a\u2003",
    "trail-newline": "a\n",
}
WRONG_TYPE = {"int": 123, "list": ["a"], "bytes": b"abc"}

BAD_AMOUNTS = {
    "nan": D("NaN"),
    "snan": D("sNaN"),
    "inf": D("Infinity"),
    "-inf": D("-Infinity"),
    "float-nan": float("nan"),
    "float-inf": float("inf"),
    "str-nan": "NaN",
    "str-inf": "Infinity",
    "25-int-digits": D("1" * 25),
    "25-int-digits-str": "1" * 25,
    "13-frac-digits": D("0.0000000000001"),
    "13-frac-digits-str": "1.0000000000001",
    "25-digits-exponent": D("1E+24"),
    "13-frac-exponent": D("1E-13"),
    "float-1e25": 1e25,
    "float-1/3": 1 / 3,
    "not-a-number": "abc",
    "empty-str": "",
    "list": [1],
    # str() of an int past 4,300 digits raises ValueError: the message must not need it
    "int-of-5001-digits": 10**5000,
    "negative-int-of-5001-digits": -(10**5000),
}


def _identifier_values(param):
    values = dict(BAD_TEXT)
    values.update(WRONG_TYPE)
    values["too-long"] = "a" * (MAX_LEN[param] + 1)
    values["too-long-unicode"] = "\u00e9" * (MAX_LEN[param] + 1)
    if param != "resource":
        values["empty"] = ""
    return values


# One database per (function, parameter); every bad value is tried in it and all the
# misses are reported together (one database per value would take many minutes).
IDENTIFIER_CASES = [
    pytest.param(fn, param, id=f"{fn}-{param}")
    for param, fns in TAKES.items()
    if param not in ("metadata", "event_time")
    for fn in fns
]
AMOUNT_CASES = [pytest.param(fn, param, id=f"{fn}-{param}") for fn, param in AMOUNT_PARAMS]


@pytest.fixture
def seeded(client):
    """An account with money and one active reservation RID, for every call to act on."""
    client.allocate(U, ET, D("100"), UNIT)
    r = client.reserve(U, ET, D("5"), UNIT, reservation_id=RID)
    assert r["granted"] is True
    return client


def refusal_problem(call, snapshot, param, exc=ValidationError):
    """None when ``call`` raises ``exc`` naming ``param`` and changes nothing, else why not."""
    before = snapshot()
    try:
        result = call()
    except exc as err:
        problems = []
        if not (err.parameter == param or param in str(err)):
            problems.append(f"error does not name {param!r}: {err!r}")
        if snapshot() != before:
            problems.append("tables changed")
        return "; ".join(problems) or None
    except Exception as err:  # reported as a miss
        changed = "; tables changed" if snapshot() != before else ""
        return f"raised {type(err).__name__}: {err!r} instead of {exc.__name__}{changed}"
    changed = "; tables changed" if snapshot() != before else ""
    return f"accepted, returned {result!r}{changed}"


def assert_refused(call, snapshot, param, exc=ValidationError):
    problem = refusal_problem(call, snapshot, param, exc)
    assert problem is None, problem


def assert_all_refused(calls, snapshot, param, exc=ValidationError):
    """``calls``: {label: zero-argument callable}; every one must be refused cleanly."""
    misses = {}
    for label, call in calls.items():
        problem = refusal_problem(call, snapshot, param, exc)
        if problem is not None:
            misses[label] = problem
    assert misses == {}


def invoke(client, fn, **override):
    kwargs = dict(CALLS[fn])
    kwargs.update(override)
    return getattr(client, fn)(**kwargs)


def _bind(client, fn, param, value):
    return lambda: invoke(client, fn, **{param: value})


# ---------------------------------------------------------------- identifiers


@pytest.mark.parametrize(("fn", "param"), IDENTIFIER_CASES)
def test_bad_identifier_refused(seeded, snapshot, fn, param):
    calls = {
        label: _bind(seeded, fn, param, value) for label, value in _identifier_values(param).items()
    }
    assert_all_refused(calls, snapshot, param)


BAD_NAMESPACES = {
    "empty": "",
    "too-long": "a" * 1025,
    "lead-space": " default",
    "trail-space": "default ",
    "nul": "de\x00fault",
    "us": "de\x1ffault",
    "del": "de\x7ffault",
    "nel": "de\x85fault",
    "apc": "de\x9ffault",
    "lead-ideographic": "\u3000ns",
    "trail-nbsp": "ns\u00a0",
    "int": 5,
}


@pytest.mark.parametrize("fn", ["allocate", "get_balance", "get_stats"])
def test_bad_namespace_refused(make_client, seeded, snapshot, fn):
    def bind(value):
        def call():
            c = make_client(namespace=value)
            return getattr(c, fn)(**CALLS.get(fn, {}))

        return call

    assert_all_refused({k: bind(v) for k, v in BAD_NAMESPACES.items()}, snapshot, "namespace")


BAD_ACTOR = {
    "too-long": "a" * 257,
    "nul": "a\x00",
    "us": "a\x1f",
    "del": "a\x7f",
    "apc": "a\x9f",
    "nel": "a\x85",
    "lead-space": " a",
    "trail-space": "a ",
    "trail-ideo": "a\u3000",
    "lead-nbsp": "\u00a0a",
    "int": 7,
}


@pytest.mark.parametrize("field", ["actor_id", "request_id", "on_behalf_of", "reason"])
def test_bad_actor_field_refused(make_client, seeded, snapshot, field):
    def bind(value):
        def call():
            c = make_client()
            c.set_actor(**{field: value})
            return c.allocate(U, ET, D("1"), UNIT)

        return call

    assert_all_refused({k: bind(v) for k, v in BAD_ACTOR.items()}, snapshot, field)


def test_identifiers_at_max_length_accepted(client, db):
    user, et, res, unit = "u" * 256, "e" * 256, "r" * 256, "t" * 64
    key = "k" * 256
    r = client.allocate(user, et, D("5"), unit, resource=res, idempotency_key=key)
    assert r["balance"] == D("5")
    rid = "x" * 128
    g = client.reserve(user, et, D("1"), unit, resource=res, reservation_id=rid)
    assert (g["granted"], g["reservation_id"]) == (True, rid)
    assert client.commit(rid, D("1"))["balance"] == D("4")
    assert client.get_balance(user, et, unit, res)["balance"] == D("4")
    # non-ASCII characters count as characters, not bytes
    assert client.allocate("\u00e9" * 256, ET, D("1"), UNIT)["balance"] == D("1")


def _incompressible(n: int, seed: int) -> str:
    """``n`` four-byte characters that PostgreSQL's index compression cannot shrink."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x10000, 0x10FFF)) for _ in range(n))


def test_identifiers_too_big_to_index_together_are_refused_by_name(make_client, snapshot):
    # Within their limits in characters (Appendix C), but more bytes together than a B-tree
    # entry holds: PostgreSQL's 54000 "index row size ... exceeds", a MeterError naming
    # nothing. The SDK names the call's largest identifier.
    wide = make_client(namespace=_incompressible(1024, 1))
    before = snapshot()
    with pytest.raises(ValidationError) as refused:
        wide.allocate(U, ET, D("1"), UNIT)
    assert (refused.value.parameter, refused.value.sqlstate) == ("namespace", "MT001")
    assert refused.value.message.startswith("namespace: ")
    narrow = make_client(namespace="n" * 100)
    with pytest.raises(ValidationError) as refused:
        narrow.consume(
            _incompressible(256, 2), _incompressible(200, 3), D("1"), UNIT,
            resource=_incompressible(250, 4),
        )  # fmt: skip
    assert refused.value.parameter == "user_id"
    assert snapshot() == before


def test_namespace_at_max_length_and_actor_fields_accepted(make_client, db):
    c = make_client(namespace="n" * 1024)
    c.set_actor(actor_id="a" * 256, request_id="", on_behalf_of="o" * 256, reason="r" * 256)
    assert c.allocate(U, ET, D("2"), UNIT)["balance"] == D("2")
    row = db.execute("SELECT namespace, actor_id FROM meter.ledger").fetchone()
    assert row == {"namespace": "n" * 1024, "actor_id": "a" * 256}


def test_inner_whitespace_and_unicode_accepted(client):
    r = client.allocate("user 1", "gpt tokens", D("3"), "tok\u00e9", resource="model a\u00a0b")
    assert r["balance"] == D("3")
    assert client.get_balance("user 1", "gpt tokens", "tok\u00e9", "model a\u00a0b") == {
        "balance": D("3"),
        "reserved": D("0"),
        "available": D("3"),
    }


# ---------------------------------------------------------------- amounts


@pytest.mark.parametrize(("fn", "param"), AMOUNT_CASES)
def test_bad_amount_refused(seeded, snapshot, fn, param):
    calls = {label: _bind(seeded, fn, param, value) for label, value in BAD_AMOUNTS.items()}
    assert_all_refused(calls, snapshot, param)


@pytest.mark.parametrize(
    ("fn", "param", "value"),
    [
        ("allocate", "amount", D("0")),
        ("allocate", "amount", D("-1")),
        ("consume", "amount", D("0")),
        ("consume", "amount", D("-0.5")),
        ("reserve", "amount", D("0")),
        ("reserve", "amount", D("-1")),
        ("adjust", "amount", D("0")),
        ("adjust", "amount", "-0.000"),
        ("commit", "actual_amount", D("-1")),
        ("set_period_config", "period_allocation", D("-1")),
        ("set_period_config", "carry_over_limit", D("-1")),
        ("open_period", "allocation", D("-1")),
    ],
)
def test_amount_sign_rules(seeded, snapshot, fn, param, value):
    assert_refused(lambda: invoke(seeded, fn, **{param: value}), snapshot, param)


@pytest.mark.parametrize("fn", ["allocate", "consume", "reserve", "adjust"])
def test_missing_amount_refused(seeded, snapshot, fn):
    assert_refused(lambda: invoke(seeded, fn, amount=None), snapshot, "amount")


def test_commit_missing_amount_refused(seeded, snapshot):
    assert_refused(lambda: invoke(seeded, "commit", actual_amount=None), snapshot, "actual_amount")


@pytest.mark.parametrize(
    "text",
    ["5\x1f", "\x1c5", "\x855", "\u30005", "\u00a05", "5\u2028"],
    ids=["US", "FS", "NEL", "ideographic-space", "nbsp", "line-separator"],
)
def test_amount_text_with_other_than_ascii_space_around_refused(db, seeded, snapshot, text):
    # The SDK stripped any Unicode white space (str.strip: U+001C-001F, U+0085, U+3000...)
    # and recorded the number; the database's numeric input refuses the same text.
    with pytest.raises(psycopg.Error):
        db.execute("SELECT %s::text::numeric", (text,))
    assert_refused(lambda: seeded.allocate(U, ET, text, UNIT), snapshot, "amount")


def test_amount_text_with_ascii_space_around_accepted(client):
    # what numeric's input skips (C isspace) is skipped here too
    assert client.allocate(U, ET, " \t5\n\r\v\f", UNIT)["balance"] == D("5")


@pytest.mark.parametrize("text", ["0.5 month", "P0.5M", "0.1 mon"])
def test_fractional_month_interval_refused(seeded, snapshot, text):
    # PostgreSQL reads '0.5 month' as '15 days' before set_period_config can see it: the
    # account got 15-day periods without a word
    assert_refused(
        lambda: seeded.set_period_config(U, ET, UNIT, None, date(2024, 1, 1), D(10), None, text),
        snapshot,
        "period_interval",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (D("1.0000000000000"), D("1")),
        (D("123456789012345678901234"), D("123456789012345678901234")),
        (D("0.000000000001"), D("0.000000000001")),
        (D("123456789012345678901234.123456789012"), D("123456789012345678901234.123456789012")),
        ("1" + "0" * 23 + ".500000000000000", D("1" + "0" * 23 + ".5")),
        (D("1E+3"), D("1000")),
        (D("1E+23"), D("1" + "0" * 23)),
        (D("1E-12"), D("0.000000000001")),
        (0.1, D("0.1")),
        (1.5, D("1.5")),
        (7, D("7")),
        ("2.50", D("2.5")),
    ],
)
def test_amount_accepted_exactly(client, db, value, expected):
    r = client.allocate(U, ET, value, UNIT)
    assert r["balance"] == expected
    row = db.execute("SELECT amount FROM meter.ledger WHERE id = %s", (r["entry_id"],)).fetchone()
    assert row["amount"] == expected


def test_float_is_taken_at_its_shortest_repr(client):
    for _ in range(3):
        client.allocate(U, ET, 0.1, UNIT)
    assert client.get_balance(U, ET, UNIT)["balance"] == D("0.3")
    assert client.consume(U, ET, 0.2, UNIT)["balance"] == D("0.1")


# ---------------------------------------------------------------- metadata


BAD_METADATA = {
    "list": [1, 2],
    "str": "hello",
    "int": 5,
    "too-big": {"x": "a" * 65536},
    "non-serialisable": {"x": object()},
    "set": {"x": {1, 2}},
    "numeric-cannot-hold": {"x": D("1E-16384")},  # (the database refused it, 22003)
}


@pytest.mark.parametrize("fn", TAKES["metadata"])
def test_bad_metadata_refused(seeded, snapshot, fn):
    calls = {label: _bind(seeded, fn, "metadata", value) for label, value in BAD_METADATA.items()}
    assert_all_refused(calls, snapshot, "metadata")


def test_metadata_under_limit_accepted(client, db):
    big = {"x": "a" * 60000, "nested": {"k": [1, 2, None, True]}, "u": "\u00e9"}
    r = client.allocate(U, ET, D("1"), UNIT, metadata=big)
    row = db.execute("SELECT metadata FROM meter.ledger WHERE id = %s", (r["entry_id"],)).fetchone()
    assert row["metadata"] == big


def test_metadata_multibyte_counted_in_bytes(client, snapshot):
    # 40000 two-byte characters: under 64 Ki characters, over 64 KiB of text
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.allocate(U, ET, D("1"), UNIT, metadata={"x": "\u00e9" * 40000})
    assert ei.value.parameter == "metadata" or "metadata" in str(ei.value)
    assert snapshot() == before


def test_metadata_json_cannot_follow_is_read_back(client, db):
    """jsonb takes objects nested past Python's recursion limit and integers past int()'s
    4,300 digits (here written by SQL, as any client may, and by the SDK). The SDK's reads
    of them used to raise RecursionError or ValueError: now every read gives them back."""
    depth = 3000
    deep = '{"a": ' + "[" * depth + "]" * depth + "}"
    row = db.execute(
        "SELECT * FROM meter.allocate(p_user_id => %s, p_event_type => %s, p_amount => 1,"
        " p_unit => %s, p_metadata => %s::jsonb)",
        (U, ET, UNIT, deep),
    ).fetchone()
    big = D("1E+5000")  # 5,001 digits as jsonb writes it, within the 64 KiB
    client.allocate(U, ET, D("1"), UNIT, metadata={"n": big})
    ledger = client.get_ledger(U, ET, UNIT)
    assert ledger[0]["metadata"] == {"n": big}
    assert ledger[1]["id"] == row["entry_id"]
    by_entry = {event["entry_id"]: event["metadata"] for event in client.get_audit_events()}
    assert by_entry[ledger[0]["id"]] == {"n": big}
    for metadata in (ledger[1]["metadata"], by_entry[row["entry_id"]]):
        value = metadata["a"]
        for _ in range(depth - 1):  # (== on it would recurse too deeply)
            (value,) = value
        assert value == []


# ---------------------------------------------------------------- event_time


def _db_now(db):
    return db.execute("SELECT now() AS t").fetchone()["t"]


@pytest.mark.parametrize("fn", TAKES["event_time"])
def test_event_time_far_future_refused(seeded, db, snapshot, fn):
    when = _db_now(db) + timedelta(hours=25)
    assert_refused(lambda: invoke(seeded, fn, event_time=when), snapshot, "event_time")


class _OffsetOfADay(tzinfo):
    """An offset Python's datetime refuses: utcoffset() raises ValueError."""

    def utcoffset(self, dt):
        return timedelta(hours=24)

    def dst(self, dt):
        return None


@pytest.mark.parametrize("fn", TAKES["event_time"])
def test_event_time_whose_tzinfo_gives_a_bad_offset_refused(seeded, snapshot, fn):
    when = datetime(2024, 5, 1, tzinfo=_OffsetOfADay())
    assert_refused(lambda: invoke(seeded, fn, event_time=when), snapshot, "event_time")


@pytest.mark.parametrize("fn", TAKES["event_time"])
def test_event_time_within_24h_accepted(client, db, fn):
    when = _db_now(db) + timedelta(hours=23)
    r = invoke(client, fn, event_time=when)
    row = db.execute(
        "SELECT event_time FROM meter.ledger WHERE id = %s", (r["entry_id"],)
    ).fetchone()
    assert row["event_time"] == when


@pytest.mark.parametrize("fn", TAKES["event_time"])
def test_backdated_event_lands_in_its_own_partition(client, db, fn):
    assert db.execute("SELECT to_regclass('meter.ledger_2019_03') AS r").fetchone()["r"] is None
    when = datetime(2019, 3, 15, 12, 30, tzinfo=UTC)
    r = invoke(client, fn, event_time=when)
    assert r["entry_id"] is not None
    row = db.execute(
        "SELECT c.relname, n.nspname, l.event_time FROM meter.ledger l"
        " JOIN pg_class c ON c.oid = l.tableoid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE l.id = %s",
        (r["entry_id"],),
    ).fetchone()
    assert row == {"relname": "ledger_2019_03", "nspname": "meter", "event_time": when}
    # the month boundary is UTC: the last microsecond of March is still March
    edge = datetime(2019, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)
    r2 = client.allocate(U, ET, D("1"), UNIT, event_time=edge)
    rel = db.execute(
        "SELECT tableoid::regclass::text AS t FROM meter.ledger WHERE id = %s", (r2["entry_id"],)
    ).fetchone()["t"]
    assert rel.endswith("ledger_2019_03")
    assert client.reconcile() == []


# ---------------------------------------------------------------- ttl and limits


@pytest.mark.parametrize(
    "ttl", [0, -5, 86401, 10**9, 10**5000], ids=["0", "-5", "86401", "1e9", "1e5000"]
)
def test_ttl_out_of_range_refused(seeded, snapshot, ttl):
    assert_refused(lambda: invoke(seeded, "reserve", ttl_seconds=ttl), snapshot, "ttl_seconds")


@pytest.mark.parametrize("fn", ["get_ledger", "get_periods"])
@pytest.mark.parametrize("limit", [0, -1, -(10**5000)], ids=["0", "-1", "-1e5000"])
def test_ledger_limit_below_one_refused(seeded, snapshot, fn, limit):
    assert_refused(lambda: invoke(seeded, fn, limit=limit), snapshot, "limit")


@pytest.mark.parametrize(
    ("fn", "param"),
    [("adjust", "reference_id"), ("release_expired_reservations", "batch_size")],
)
def test_an_integer_too_long_to_print_is_refused_by_name(seeded, snapshot, fn, param):
    """The refusal's message says the integer's size: ``str()`` of one past 4,300 digits
    raises ValueError, which used to escape instead of the ValidationError."""
    before = snapshot()
    with pytest.raises(ValidationError, match="an integer of 5001 digits") as refused:
        getattr(seeded, fn)(**{**CALLS.get(fn, {}), param: 10**5000})
    assert refused.value.parameter == param
    assert snapshot() == before


# ---------------------------------------------------------------- the SQL layer itself


def sql_refused(db, snapshot, sql, params, param):
    before = snapshot()
    with pytest.raises(psycopg.Error) as ei:
        db.execute(sql, params)
    err = ei.value
    assert err.sqlstate == "MT001", (err.sqlstate, str(err))
    assert err.diag.column_name == param
    assert err.diag.message_primary.startswith(param), err.diag.message_primary
    assert snapshot() == before


CONSUME = (
    "SELECT * FROM meter.consume(p_user_id => %s, p_event_type => %s, p_amount => %s, p_unit => %s)"
)
ALLOCATE = (
    "SELECT * FROM meter.allocate(p_user_id => %s, p_event_type => %s,"
    " p_amount => %s, p_unit => %s, p_resource => %s, p_idempotency_key => %s,"
    " p_event_time => %s, p_metadata => %s)"
)


@pytest.mark.parametrize(
    "amount",
    [D("NaN"), D("Infinity"), D("-Infinity"), D("1" * 25), D("0.0000000000001"), D("-1"), D("0")],
    ids=["nan", "inf", "-inf", "25-digits", "13-frac", "negative", "zero"],
)
def test_sql_consume_amount(db, seeded, snapshot, amount):
    sql_refused(db, snapshot, CONSUME, (U, ET, amount, UNIT), "amount")


OPEN_PERIOD = (
    "SELECT meter.open_period(p_user_id => %s, p_event_type => %s, p_unit => %s,"
    " p_resource => NULL, p_period_start => %s::date, p_allocation => 5)"
)


@pytest.mark.parametrize(
    ("user", "start"),
    [
        (U, "294277-01-01"),  # past timestamp's range
        (U, "5874897-12-31"),  # date's last day
        (U, "4714-11-24 BC"),  # date's first day
        (U, "1899-12-31"),
        ("nobody", "300000-01-01"),  # an unknown account: the date is named first
    ],
    ids=["past-timestamp-range", "last-date", "first-date", "before-1900", "unknown-account"],
)
def test_sql_open_period_start_out_of_range(db, seeded, snapshot, user, start):
    # open_period did date arithmetic on the start before bounding it: PostgreSQL's 22008
    # "date out of range", naming no parameter (046)
    sql_refused(db, snapshot, OPEN_PERIOD, (user, ET, UNIT, start), "period_start")


def test_sql_allocate_accepts_trailing_zeros(db, seeded):
    row = db.execute(
        ALLOCATE, (U, ET, D("1.0000000000000"), UNIT, None, None, None, None)
    ).fetchone()
    assert row["balance"] == D("101")  # the hold of 5 is not part of the balance


@pytest.mark.parametrize(
    ("idx", "value", "param"),
    [
        (0, "a\x1fb", "user_id"),
        (0, " u", "user_id"),
        (0, "u\u3000", "user_id"),
        (0, "a" * 257, "user_id"),
        (0, "", "user_id"),
        (1, "e\x7f", "event_type"),
        (1, "", "event_type"),
        (3, "t" * 65, "unit"),
        (3, "\u00a0t", "unit"),
        (4, "r" * 257, "resource"),
        (4, "r\x85", "resource"),
        (5, "k" * 257, "idempotency_key"),
        (5, "", "idempotency_key"),
        (5, "k\x9f", "idempotency_key"),
    ],
)
def test_sql_allocate_identifiers(db, seeded, snapshot, idx, value, param):
    args = [U, ET, D("1"), UNIT, None, None, None, None]
    args[idx] = value
    sql_refused(db, snapshot, ALLOCATE, tuple(args), param)


@pytest.mark.parametrize(
    "metadata",
    [Jsonb([1]), Jsonb("s"), Jsonb(3), Jsonb(None), Jsonb(True), Jsonb({"x": "a" * 65536})],
    ids=["array", "string", "number", "null", "bool", "too-big"],
)
def test_sql_allocate_metadata(db, seeded, snapshot, metadata):
    sql_refused(
        db, snapshot, ALLOCATE, (U, ET, D("1"), UNIT, None, None, None, metadata), "metadata"
    )


def test_sql_allocate_future_event_time(db, seeded, snapshot):
    when = _db_now(db) + timedelta(hours=25)
    sql_refused(db, snapshot, ALLOCATE, (U, ET, D("1"), UNIT, None, None, when, None), "event_time")


@pytest.mark.parametrize("ttl", [0, 86401])
def test_sql_reserve_ttl(db, seeded, snapshot, ttl):
    sql_refused(
        db,
        snapshot,
        "SELECT * FROM meter.reserve(p_user_id => %s, p_event_type => %s, p_amount => %s,"
        " p_unit => %s, p_ttl_seconds => %s)",
        (U, ET, D("1"), UNIT, ttl),
        "ttl_seconds",
    )


@pytest.mark.parametrize(
    ("rid", "amount", "param"),
    [
        (RID, D("-1"), "actual_amount"),
        (RID, D("NaN"), "actual_amount"),
        ("x" * 129, D("1"), "reservation_id"),
        ("", D("1"), "reservation_id"),
    ],
)
def test_sql_commit(db, seeded, snapshot, rid, amount, param):
    sql_refused(
        db,
        snapshot,
        "SELECT * FROM meter.commit(p_reservation_id => %s, p_actual_amount => %s)",
        (rid, amount),
        param,
    )


def test_sql_release_bad_id(db, seeded, snapshot):
    sql_refused(
        db, snapshot, "SELECT meter.release(p_reservation_id => %s)", (" r",), "reservation_id"
    )


def test_sql_get_balance_validates_reads(db, seeded, snapshot):
    sql_refused(
        db,
        snapshot,
        "SELECT * FROM meter.get_balance(p_user_id => %s, p_event_type => %s, p_unit => %s)",
        ("u\x01", ET, UNIT),
        "user_id",
    )


@pytest.mark.parametrize("limit", [0, -1])
def test_sql_get_ledger_limit(db, seeded, snapshot, limit):
    sql_refused(
        db,
        snapshot,
        "SELECT * FROM meter.get_ledger(p_user_id => %s, p_event_type => %s,"
        " p_unit => %s, p_limit => %s)",
        (U, ET, UNIT, limit),
        "limit",
    )


@pytest.mark.parametrize("namespace", ["", "n" * 1025, " ns", "n\x1f"])
def test_sql_namespace(db, seeded, snapshot, namespace):
    sql_refused(
        db,
        snapshot,
        "SELECT * FROM meter.allocate(p_user_id => %s, p_event_type => %s,"
        " p_amount => %s, p_unit => %s, p_namespace => %s)",
        (U, ET, D("1"), UNIT, namespace),
        "namespace",
    )


def test_sql_set_period_config_negative_limit(db, seeded, snapshot):
    sql_refused(
        db,
        snapshot,
        "SELECT meter.set_period_config(p_user_id => %s, p_event_type => %s,"
        " p_unit => %s, p_resource => %s, p_period_start => %s,"
        " p_period_allocation => %s, p_carry_over_limit => %s)",
        (U, ET, UNIT, None, date(2024, 1, 1), D("10"), D("-1")),
        "carry_over_limit",
    )


def test_sql_consume_pool_refused(db, seeded, snapshot):
    sql_refused(db, snapshot, CONSUME, (None, ET, D("1"), UNIT), "user_id")


# Every SQL function validates the identifiers it receives, reads included (Appendix C).
SQL_USER_CALLS = {
    "allocate": "SELECT * FROM meter.allocate(p_user_id => %s, p_event_type => 'e',"
    " p_amount => 1, p_unit => 't')",
    "consume": "SELECT * FROM meter.consume(p_user_id => %s, p_event_type => 'e',"
    " p_amount => 1, p_unit => 't')",
    "reserve": "SELECT * FROM meter.reserve(p_user_id => %s, p_event_type => 'e',"
    " p_amount => 1, p_unit => 't')",
    "adjust": "SELECT * FROM meter.adjust(p_user_id => %s, p_event_type => 'e',"
    " p_amount => 1, p_unit => 't')",
    "get_balance": "SELECT * FROM meter.get_balance(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't')",
    "get_account": "SELECT * FROM meter.get_account(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't')",
    "get_user_balances": "SELECT * FROM meter.get_user_balances(p_user_id => %s)",
    "get_ledger": "SELECT * FROM meter.get_ledger(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't')",
    "get_usage": "SELECT * FROM meter.get_usage(p_user_id => %s, p_start_time => NULL,"
    " p_end_time => NULL)",
    "set_period_config": "SELECT meter.set_period_config(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't', p_resource => NULL, p_period_start => '2024-01-01',"
    " p_period_allocation => 1)",
    "open_period": "SELECT meter.open_period(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't', p_resource => NULL, p_period_start => '2024-01-01',"
    " p_allocation => 1)",
    "close_period": "SELECT * FROM meter.close_period(p_user_id => %s, p_event_type => 'e',"
    " p_unit => 't', p_resource => NULL, p_period_end => '2024-01-31')",
}
SQL_BAD_USERS = {
    "us": "a\x1fb",
    "del": "a\x7f",
    "apc": "\x9fa",
    "lead-space": " a",
    "trail-nbsp": "a\u00a0",
    "lead-ideo": "\u3000a",
    "too-long": "a" * 257,
    "empty": "",
}


@pytest.mark.parametrize("fn", list(SQL_USER_CALLS))
def test_sql_functions_validate_user_id(db, seeded, snapshot, fn):
    misses = {}
    for label, value in SQL_BAD_USERS.items():
        before = snapshot()
        try:
            db.execute(SQL_USER_CALLS[fn], (value,))
        except psycopg.Error as err:
            if (err.sqlstate, err.diag.column_name) != ("MT001", "user_id"):
                misses[label] = (err.sqlstate, err.diag.column_name, str(err))
        else:
            misses[label] = "accepted"
        if snapshot() != before:
            misses[label + "/changed"] = True
    assert misses == {}
