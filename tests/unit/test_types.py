"""Client-side validation (meter.types): every rule of SPEC Appendix C, no database."""

from __future__ import annotations

import enum
import json
import sys
from collections import OrderedDict
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meter import types as t
from meter.errors import MeterError, ValidationError

D = Decimal


def refused(call, *args, param: str, **kwargs) -> ValidationError:
    with pytest.raises(ValidationError) as ei:
        call(*args, **kwargs)
    err = ei.value
    assert err.parameter == param
    assert err.sqlstate == "MT001"
    assert str(err).startswith(f"{param}: "), str(err)
    return err


# ------------------------------------------------------------------------- amounts


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, "7"),
        (-7, "-7"),
        (0, "0"),
        (10**23, "1" + "0" * 23),
        (D("2.5"), "2.5"),
        (D("2.50"), "2.5"),
        (D("1.0000000000000"), "1"),  # 13 places, but only trailing zeros
        (D("1E+3"), "1000"),  # a positive exponent is spelled out
        (D("100"), "100"),
        (D("0.000000000001"), "0.000000000001"),
        (D("123456789012345678901234.123456789012"), "123456789012345678901234.123456789012"),
        ("1.25", "1.25"),
        ("  1.25\n", "1.25"),  # surrounding white space, as PostgreSQL's numeric input
        ("+3", "3"),
        (".5", "0.5"),
        ("5.", "5"),
        ("1e3", "1000"),
        ("1E-12", "0.000000000001"),
        ("0001.500", "1.5"),
        ("1" + "0" * 23 + ".500000000000000", "1" + "0" * 23 + ".5"),
        (0.1, "0.1"),
        (1.5, "1.5"),
        (1e16, "10000000000000000"),
        (1e23, "1" + "0" * 23),
        (123.456, "123.456"),
    ],
)
def test_amount_accepted_and_canonical(value, expected):
    result = t.to_amount(value, "amount")
    assert type(result) is Decimal
    assert format(result, "f") == expected
    # canonical: the same coefficient and exponent whatever the input's spelling
    assert result.as_tuple() == D(expected).as_tuple()


@pytest.mark.parametrize("value", [D("-0"), D("-0.000"), "-0", "-0.0e5", -0.0, 0.0, D("0E-50")])
def test_negative_zero_becomes_zero(value):
    result = t.to_amount(value, "amount")
    assert str(result) == "0"
    assert not result.is_signed()


def test_float_is_taken_at_its_shortest_repr():
    assert t.to_amount(0.1, "amount") == D("0.1")
    assert D(0.1) != D("0.1")  # what a naive conversion would give
    assert t.to_amount(0.1, "amount") + t.to_amount(0.2, "amount") == D("0.3")
    assert t.to_amount(2.675, "amount") == D("2.675")
    assert t.to_amount(-0.3, "amount") == D("-0.3")


def test_a_float_subclass_is_taken_at_its_float_repr():
    """numpy 2's ``repr(np.float64(0.5))`` is ``'np.float64(0.5)'``: the amount was read
    from that and raised decimal.InvalidOperation, not a ValidationError."""

    class Float64(float):  # as numpy.float64 prints itself
        def __repr__(self) -> str:
            return f"np.float64({float.__repr__(self)})"

    assert t.to_amount(Float64(0.5), "amount") == D("0.5")
    refused(t.to_amount, Float64("nan"), "amount", param="amount")


@pytest.mark.parametrize(
    "value",
    [
        1 / 3,  # 0.3333333333333333: 16 places
        0.1 + 0.2,  # 0.30000000000000004: 17 places
        1e24,  # 25 integer digits
        1e-13,
    ],
)
def test_float_beyond_the_digit_limits_refused(value):
    err = refused(t.to_amount, value, "amount", param="amount")
    assert repr(value) in str(err)


@pytest.mark.parametrize(
    "value",
    [
        D("1" * 25),
        "1" * 25,
        D("1E+24"),
        "1e24",
        D("0.0000000000001"),
        "1.0000000000001",
        D("1" * 24 + ".0000000000001"),
        "1e-13",
        10**24,
        -(10**24),
        "1e999999999",
        "1e-999999999",
    ],
)
def test_digit_limits(value):
    err = refused(t.to_amount, value, "amount", param="amount")
    assert "at most 24 digits before the decimal point and 12 after it" in str(err)


def test_digit_limit_boundaries_accepted():
    assert t.to_amount(10**24 - 1, "amount") == D("9" * 24)
    assert t.to_amount("-" + "9" * 24 + "." + "9" * 12, "amount") == D(
        "-" + "9" * 24 + "." + "9" * 12
    )


@pytest.mark.parametrize(
    "value",
    [
        "NaN",
        "nan",
        "-NaN",
        "sNaN",
        "snan",
        "NaN123",
        "Infinity",
        "infinity",
        "-Infinity",
        "+Infinity",
        "inf",
        "-inf",
        "INF",
        " Infinity ",
        D("NaN"),
        D("-NaN"),
        D("sNaN"),
        D("Infinity"),
        D("-Infinity"),
        float("nan"),
        float("inf"),
        float("-inf"),
    ],
)
def test_non_finite_refused(value):
    err = refused(t.to_amount, value, "amount", param="amount")
    assert "must be a finite number" in str(err)


def test_non_finite_message():
    err = refused(t.to_amount, "NaN", "amount", param="amount")
    assert str(err) == "amount: must be a finite number, got 'NaN'"
    err = refused(t.to_amount, D("NaN"), "actual_amount", param="actual_amount")
    assert str(err) == "actual_amount: must be a finite number, got 'NaN'"


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "abc",
        "1,5",
        "1_000",
        "0x10",
        "1e",
        "e5",
        ".",
        "-",
        "--1",
        "1.2.3",
        "١٢",
        "1 2",
        "½",
    ],
)
def test_unparsable_strings_refused(value):
    err = refused(t.to_amount, value, "amount", param="amount")
    assert "must be a decimal number" in str(err)
    assert repr(value) in str(err)


@pytest.mark.parametrize("value", [True, False, [1], (1,), b"1", 1j, object(), {"a": 1}])
def test_other_types_refused(value):
    err = refused(t.to_amount, value, "amount", param="amount")
    assert type(value).__name__ in str(err)


def test_none_refused_unless_nullable():
    err = refused(t.to_amount, None, "amount", param="amount")
    assert "required" in str(err)
    assert t.to_amount(None, "allocation", nullable=True) is None
    assert t.to_amount("5", "allocation", nullable=True) == D(5)


def test_int_subclass_accepted_bool_not():
    class Quantity(enum.IntEnum):
        TEN = 10

    assert t.to_amount(Quantity.TEN, "amount") == D(10)
    refused(t.to_amount, True, "amount", param="amount")


@pytest.mark.parametrize(
    ("sign", "ok", "bad"),
    [
        ("positive", ["0.000000000001", 1], [0, "-0", "-1", "0.000"]),
        ("nonnegative", [0, "-0", "1"], ["-0.000000000001", -1]),
        ("nonzero", ["-1", "1", "0.5"], [0, "-0.000", 0.0]),
        ("any", ["-1", 0, "1"], []),
    ],
)
def test_sign_rules(sign, ok, bad):
    for value in ok:
        t.to_amount(value, "amount", sign=sign)
    for value in bad:
        refused(t.to_amount, value, "amount", sign=sign, param="amount")


def test_sign_messages():
    assert str(refused(t.to_amount, "-1.50", "amount", sign="positive", param="amount")) == (
        "amount: must be greater than 0, got -1.5"
    )
    assert str(refused(t.to_amount, 0, "amount", sign="nonzero", param="amount")) == (
        "amount: must not be 0"
    )


# ---------------------------------------------------------------------- identifiers


def ident(value, name="user_id", *, min_len=1, max_len=256, nullable=False):
    return t.check_identifier(value, name, min_len=min_len, max_len=max_len, nullable=nullable)


def test_limits_table_matches_appendix_c():
    assert t.LIMITS == {
        "namespace": (1, 1024),
        "user_id": (1, 256),
        "event_type": (1, 256),
        "resource": (0, 256),
        "unit": (1, 64),
        "idempotency_key": (1, 256),
        "reservation_id": (1, 128),
        "actor": (0, 256),
    }


@pytest.mark.parametrize(
    "value", ["u", "user 1", "a\u00a0b", "é" * 256, "x" * 256, "\u200bzw", "日本"]
)
def test_identifier_accepted(value):
    assert ident(value) is value


def test_identifier_length_counts_characters():
    ident("é" * 256)  # 512 bytes in UTF-8
    err = refused(ident, "é" * 257, param="user_id")
    assert "256" in str(err) and "257" in str(err)
    ident("n" * 1024, "namespace", max_len=1024)
    refused(ident, "n" * 1025, "namespace", max_len=1024, param="namespace")


def test_identifier_empty():
    assert str(refused(ident, "", param="user_id")) == "user_id: must not be empty"
    assert ident("", "resource", min_len=0) == ""
    refused(ident, "ab", "unit", min_len=3, max_len=64, param="unit")


def test_identifier_none():
    assert "required" in str(refused(ident, None, param="user_id"))
    assert ident(None, nullable=True) is None


@pytest.mark.parametrize("value", [123, b"abc", ["a"], 1.5, True])
def test_identifier_wrong_type(value):
    err = refused(ident, value, param="user_id")
    assert "must be a string" in str(err)


CONTROLS = [0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1B, 0x1F, 0x7F, 0x80, 0x85, 0x9F]


@pytest.mark.parametrize("code", CONTROLS, ids=[f"U+{c:04X}" for c in CONTROLS])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_control_characters_refused(code, where):
    c = chr(code)
    value = {"start": c + "ab", "middle": "a" + c + "b", "end": "ab" + c}[where]
    err = refused(ident, value, param="user_id")
    assert "control characters" in str(err)
    assert f"U+{code:04X}" in str(err)


def test_every_control_character_refused_and_neighbours_accepted():
    for code in [*range(0x20), *range(0x7F, 0xA0)]:
        refused(ident, f"a{chr(code)}b", param="user_id")
    for code in (0x20, 0x7E, 0xA0, 0xA1):
        ident(f"a{chr(code)}b")


# The SQL layer (sql/002_guards.sql) spells out the white space it refuses at either end:
# with the control characters, that is exactly what str.isspace() accepts.
SQL_WHITESPACE = {
    0x20,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
}


def test_isspace_matches_the_sql_rule():
    controls = {*range(0x20), *range(0x7F, 0xA0)}
    python = {c for c in range(sys.maxunicode + 1) if chr(c).isspace()} - controls
    assert python == SQL_WHITESPACE


@pytest.mark.parametrize("code", sorted(SQL_WHITESPACE), ids=lambda c: f"U+{c:04X}")
def test_leading_and_trailing_white_space_refused(code):
    s = chr(code)
    for value in (s + "a", "a" + s, s, s + "a" + s):
        err = refused(ident, value, param="user_id")
        assert "white space" in str(err)
    assert ident("a" + s + "b") == "a" + s + "b"  # inside is fine


def test_resource_white_space_refused_even_though_empty_is_fine():
    refused(ident, " ", "resource", min_len=0, param="resource")


def test_lone_surrogate_refused():
    err = refused(ident, "a\ud800b", param="user_id")
    assert "surrogate" in str(err)
    ident("a\U0001f600b")  # a real astral character is fine


def test_identifier_list():
    assert t.check_identifier_list(("a", "b"), "kinds", min_len=1, max_len=64, nullable=False) == [
        "a",
        "b",
    ]
    assert t.check_identifier_list([], "kinds", min_len=1, max_len=64, nullable=False) == []
    assert t.check_identifier_list(None, "kinds", min_len=1, max_len=64, nullable=True) is None
    refused(
        t.check_identifier_list, None, "kinds", min_len=1, max_len=64, nullable=False, param="kinds"
    )
    refused(
        t.check_identifier_list, "abc", "kinds", min_len=1, max_len=64, nullable=True, param="kinds"
    )
    refused(
        t.check_identifier_list, ["ok", " bad"], "kinds", min_len=1, max_len=64, nullable=True,
        param="kinds[1]",
    )  # fmt: skip


# --------------------------------------------------------------- scalars and times


def test_check_bool():
    assert t.check_bool(True, "check_balance") is True
    assert t.check_bool(False, "check_balance") is False
    for value in (0, 1, "true", None):
        refused(t.check_bool, value, "check_balance", param="check_balance")


def test_check_int_ttl():
    kw = dict(min_value=1, max_value=86400)
    assert t.check_int(1, "ttl_seconds", **kw) == 1
    assert t.check_int(86400, "ttl_seconds", **kw) == 86400
    for value in (0, -5, 86401, 10**9):
        err = refused(t.check_int, value, "ttl_seconds", **kw, param="ttl_seconds")
        assert str(err) == f"ttl_seconds: must be between 1 and 86400, got {value}"
    for value in (True, 300.0, "300", D(300)):
        refused(t.check_int, value, "ttl_seconds", **kw, param="ttl_seconds")
    refused(t.check_int, None, "ttl_seconds", **kw, param="ttl_seconds")
    assert t.check_int(None, "reference_id", min_value=1, max_value=2, nullable=True) is None


def test_check_limit():
    assert t.check_limit(None) is None
    assert t.check_limit(1) == 1
    assert t.check_limit(10000) == 10000
    assert t.check_limit(10001) == 10000  # capped, as the database does
    assert t.check_limit(10**30) == 10000  # never overflows the int parameter
    for value in (0, -1):
        assert (
            str(refused(t.check_limit, value, param="limit"))
            == f"limit: must be at least 1, got {value}"
        )
    for value in (True, 1.0, "5"):
        refused(t.check_limit, value, param="limit")


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 1, tzinfo=UTC),
        datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-7))),
        datetime(2024, 5, 1, tzinfo=ZoneInfo("Europe/Paris")),
    ],
)
def test_timestamp_aware_accepted(value):
    assert t.check_timestamp(value, "event_time") is value


def test_timestamp_naive_refused():
    err = refused(t.check_timestamp, datetime(2024, 5, 1), "event_time", param="event_time")
    assert "timezone-aware" in str(err) and "naive" in str(err)


@pytest.mark.parametrize("value", [date(2024, 5, 1), "2024-05-01T00:00:00Z", 1714521600, 1.5])
def test_timestamp_wrong_type_refused(value):
    refused(t.check_timestamp, value, "start_time", param="start_time")


class _BadOffset(tzinfo):
    """A tzinfo whose utcoffset Python's datetime refuses (ValueError or TypeError)."""

    def __init__(self, offset: object) -> None:
        self.offset = offset

    def utcoffset(self, dt):
        return self.offset

    def dst(self, dt):
        return None


@pytest.mark.parametrize("offset", [timedelta(hours=25), timedelta(hours=-24), "+01:00"])
def test_timestamp_whose_tzinfo_gives_a_bad_offset_is_refused_by_name(offset):
    # datetime.utcoffset() raised its own ValueError or TypeError, not a MeterError.
    value = datetime(2024, 5, 1, tzinfo=_BadOffset(offset))
    err = refused(t.check_timestamp, value, "event_time", param="event_time")
    assert "offset" in str(err)


def test_timestamp_none():
    assert t.check_timestamp(None, "event_time") is None
    refused(t.check_timestamp, None, "event_time", nullable=False, param="event_time")


def test_check_date():
    assert t.check_date(date(2024, 1, 1), "period_start") == date(2024, 1, 1)
    for value in (datetime(2024, 1, 1, tzinfo=UTC), "2024-01-01", None, 20240101):
        refused(t.check_date, value, "period_start", param="period_start")


def test_check_interval():
    assert t.check_interval("1 month", "period_interval") == "1 month"
    assert t.check_interval(timedelta(days=7), "period_interval") == timedelta(days=7)
    for value in (
        timedelta(hours=1),
        timedelta(days=1, seconds=1),
        timedelta(0),
        timedelta(days=-1),
    ):
        refused(t.check_interval, value, "period_interval", param="period_interval")
    for value in (None, 30, "", " 1 month", "1\x00month", "x" * 65):
        refused(t.check_interval, value, "period_interval", param="period_interval")
    # a fraction of a month or longer unit, which PostgreSQL reads as days ('0.5 month' is
    # '15 days') before the database's whole-days-or-whole-months check sees it
    for value in ("0.5 month", "0.1 mon", "@ 0.5 mons", "1.5 years", "0,5 month", "P0.5M",
                  "p1.5y", "0.5 decade", "0.01 century"):  # fmt: skip
        refused(t.check_interval, value, "period_interval", param="period_interval")
    # fractions of shorter units, whole months and ISO minutes pass to the database's check
    for value in ("3 months", "P1M", "1.5 days", "P1DT0.5M", "2 years", "10 min"):
        assert t.check_interval(value, "period_interval") == value


# ------------------------------------------------------------------------- metadata


def test_metadata_none_and_compact_text():
    assert t.check_metadata(None) is None
    assert t.check_metadata({}) == "{}"
    assert t.check_metadata({"a": 1, "b": [True, None, "x"]}) == '{"a":1,"b":[true,null,"x"]}'
    assert t.check_metadata(OrderedDict(k="é")) == '{"k":"é"}'  # any mapping; not ASCII-escaped


def test_metadata_decimals_are_exact_json_numbers():
    text = t.check_metadata(
        {
            "a": D("0.1"),
            "b": D("12345678901234567890.123456789012345678"),
            "c": D("-1E+5"),
            "d": D("0E-7"),
        }
    )
    assert text == '{"a":0.1,"b":12345678901234567890.123456789012345678,"c":-1E+5,"d":0E-7}'
    back = t.loads(text)
    assert back["b"] == D("12345678901234567890.123456789012345678")
    assert type(back["a"]) is Decimal and back["a"] == D("0.1")
    assert back["c"] == -100000
    # and it is standard JSON
    assert json.loads(text)["a"] == 0.1


def test_metadata_floats_at_shortest_repr():
    assert t.check_metadata({"x": 0.1, "y": 1e100, "z": -0.0}) == '{"x":0.1,"y":1e+100,"z":-0.0}'


def test_dumps_tuples_nested_and_escapes():
    assert (
        t.dumps({"t": (1, (2,)), "s": 'q"\\\n\t\x01'})
        == '{"t":[1,[2]],"s":"q\\"\\\\\\n\\t\\u0001"}'
    )
    assert json.loads(t.dumps({"s": 'q"\\\n\t\x01'})) == {"s": 'q"\\\n\t\x01'}


@pytest.mark.parametrize(
    "value",
    [[1, 2], "hello", 5, (("a", 1),), {"a", "b"}, b"{}"],
    ids=["list", "str", "int", "tuple", "set", "bytes"],
)
def test_metadata_must_be_an_object(value):
    err = refused(t.check_metadata, value, param="metadata")
    assert "JSON object" in str(err)


@pytest.mark.parametrize(
    "value",
    [
        {"x": object()},
        {"x": {1, 2}},
        {"x": b"bytes"},
        {"x": date(2024, 1, 1)},
        {1: "int key"},
        {None: "none key"},
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": [float("-inf")]},
        {"x": D("NaN")},
        {"x": D("Infinity")},
        {"x": "a\x00b"},
        {"a\x00": 1},
    ],
    ids=[
        "object", "set", "bytes", "date", "int-key", "none-key", "nan", "inf", "nested-inf",
        "decimal-nan", "decimal-inf", "nul-value", "nul-key",
    ],
)  # fmt: skip
def test_metadata_not_serialisable_refused(value):
    err = refused(t.check_metadata, value, param="metadata")
    assert "not valid JSON" in str(err)


def test_metadata_lone_surrogate_refused():
    err = refused(t.check_metadata, {"x": "\udc00"}, param="metadata")
    assert "surrogate" in str(err)


def test_metadata_cycles_and_absurd_depth_refused():
    cyclic: dict = {}
    cyclic["self"] = cyclic
    refused(t.check_metadata, cyclic, param="metadata")
    deep: dict = {}
    node = deep
    for _ in range(sys.getrecursionlimit() + 10):
        node["n"] = {}
        node = node["n"]
    refused(t.check_metadata, deep, param="metadata")


def test_metadata_size_limit_in_utf8_bytes():
    # measured as PostgreSQL's jsonb::text, which writes ": " and ", "
    overhead = len('{"x": ""}')
    at_limit = {"x": "a" * (65536 - overhead)}
    assert len(t.check_metadata(at_limit).encode()) == 65536 - 1
    assert t.jsonb_text_size(at_limit) == 65536
    err = refused(t.check_metadata, {"x": "a" * (65536 - overhead + 1)}, param="metadata")
    assert "65536" in str(err) and "65537" in str(err)
    # 40000 two-byte characters: fewer than 65536 characters, more than 65536 bytes
    refused(t.check_metadata, {"x": "é" * 40000}, param="metadata")
    assert t.check_metadata({"x": "é" * 30000}) is not None


def test_loads_accepts_buffers():
    assert t.loads(b'{"a": 1.5}') == {"a": D("1.5")}
    assert t.loads(memoryview(b"[1, 2.0]")) == [1, D("2.0")]
    assert type(t.loads("3")) is int


@pytest.mark.parametrize(
    "data",
    [
        '{"a": 1.50, "b": [1e400, -0.0, 2]}',
        b'{"a": 1.5}',
        bytearray(b"[0.1]"),
        '{"a": 1.5}'.encode("utf-16"),  # json.loads detects UTF-16 and -32 in bytes
        "[2.5]".encode("utf-32-le"),
        b'\xef\xbb\xbf{"a": 1.5}',  # a UTF-8 BOM in bytes is skipped
        '\ufeff{"a": 1}',  # but refused in text
        '{"a":',
        "NaN",
        12,
        None,
    ],
)
def test_loads_is_json_loads_with_exact_fractions(data: object) -> None:
    """``loads`` reuses one decoder instead of ``json.loads(..., parse_float=Decimal)``;
    same values, same errors, whatever it is given."""

    def outcome(parse: object) -> object:
        try:
            value = parse(data)  # type: ignore[operator]
        except Exception as exc:  # the error itself is compared
            return (type(exc), str(exc))
        return repr(value)

    assert outcome(t.loads) == outcome(lambda d: json.loads(d, parse_float=Decimal))


def test_invalid_builds_a_validation_error():
    err = t.invalid("unit", "is odd")
    assert isinstance(err, ValidationError) and isinstance(err, MeterError)
    assert (str(err), err.parameter, err.sqlstate) == ("unit: is odd", "unit", "MT001")


# ---------------------------------------------------------------- reading JSON back

_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(_JSON_VALUES, st.sampled_from([None, 0, 2]))
def test_the_iterative_decoder_reads_what_json_reads(value, indent):
    text = json.dumps(value, default=str, indent=indent)
    expected = json.loads(text, parse_float=Decimal)
    assert repr(t._decode_iteratively(text)) == repr(expected)


@pytest.mark.parametrize(
    "text",
    ["", "[", "[1,]", '{"a" 1}', '{"a":1,}', "[1] x", "{1:2}", "[01]", "[1\u0661]", "[1.\u0661]"],
)
def test_the_iterative_decoder_refuses_what_json_refuses(text):
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        t._decode_iteratively(text)


def test_loads_reads_documents_json_cannot():
    """jsonb stores documents nested past Python's recursion limit and integers past
    int()'s 4,300 digits; reading such metadata back used to raise RecursionError or
    ValueError from inside the SDK's read."""
    depth = sys.getrecursionlimit() * 2
    value = t.loads('{"a": ' + "[" * depth + "]" * depth + "}")["a"]
    for _ in range(depth - 1):
        (value,) = value
    assert value == []
    big = t.loads('{"n": %s, "m": [1, 2.5]}' % ("9" * 5000))
    assert big["n"] == Decimal("9" * 5000) and big["m"] == [1, Decimal("2.5")]
    assert t.loads('{"n": -%s}' % ("9" * 5000))["n"] == Decimal("-" + "9" * 5000)
    with pytest.raises(json.JSONDecodeError):  # digits are ASCII, as json's own
        t.loads("[" + "9" * 5000 + ", 1\u0661]")


@pytest.mark.parametrize("number", ["1E-16384", "1.50E-16382", "0E-20000"])
def test_metadata_numbers_numeric_cannot_hold_are_refused_by_name(number):
    """jsonb stores numbers as numeric, at most 16383 digits after the point as written;
    such a number passed the size check and the database refused it, 22003, naming no
    parameter."""
    err = refused(t.check_metadata, {"x": Decimal(number)}, param="metadata")
    assert "16383 digits after the decimal point" in str(err)
    assert t.check_metadata({"x": Decimal("1.5E-16382")}) is not None
