"""Client-side validation and conversion of Meter arguments.

The SQL functions enforce the same rules authoritatively (``SPEC.md``, Appendix C); the SDK
checks first so bad input never crosses the wire (NUL bytes cannot even be sent to
PostgreSQL) and the error names the offending parameter. Every refusal raises
:class:`meter.errors.ValidationError` with ``sqlstate='MT001'``, like the database would.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from json.decoder import scanstring
from json.encoder import encode_basestring
from typing import Any, Final, Literal, overload

from meter.errors import ValidationError

__all__ = [
    "LIMITS",
    "MAX_AMOUNT_FRACTION_DIGITS",
    "MAX_AMOUNT_INTEGER_DIGITS",
    "MAX_LIMIT",
    "MAX_METADATA_BYTES",
    "MAX_TTL_SECONDS",
    "check_bool",
    "check_conninfo",
    "check_date",
    "check_identifier",
    "check_identifier_list",
    "check_int",
    "check_interval",
    "check_limit",
    "check_metadata",
    "check_timestamp",
    "connect",
    "connect_timeout",
    "dumps",
    "invalid",
    "loads",
    "new_id",
    "refused_conninfo",
    "to_amount",
]

MAX_AMOUNT_INTEGER_DIGITS = 24
MAX_AMOUNT_FRACTION_DIGITS = 12
MAX_METADATA_BYTES = 65536
MAX_TTL_SECONDS = 86400
MAX_LIMIT = 10000
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1

LIMITS: dict[str, tuple[int, int]] = {
    "namespace": (1, 1024),
    "user_id": (1, 256),
    "event_type": (1, 256),
    "resource": (0, 256),
    "unit": (1, 64),
    "idempotency_key": (1, 256),
    "reservation_id": (1, 128),
    "actor": (0, 256),
}
"""Identifier length bounds (characters), Appendix C. ``actor`` covers actor_id,
request_id, on_behalf_of and reason."""


def invalid(name: str, problem: str) -> ValidationError:
    """Build the ValidationError for parameter ``name`` (message ``"name: problem"``)."""
    return ValidationError(f"{name}: {problem}", sqlstate="MT001", parameter=name)


def shown(value: object) -> str:
    """``value`` for an error message, short: ``repr()`` up to 80 characters, and the size
    of an integer too long to print (``str()`` of one past 4,300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**80:
        return f"an integer of {Decimal(value).adjusted() + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _digits(value: object) -> object:
    """``str(value)``, or the int itself when too long to print (:func:`shown` says so)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**80:
        return value
    return str(value)


def _type_name(value: object) -> str:
    return type(value).__name__


# ---------------------------------------------------------------------------- amounts

_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# What PostgreSQL's numeric input skips around a number (C isspace), and nothing else:
# str.strip() would also drop Unicode spaces and the separators U+001C-001F and U+0085,
# which the database refuses in the same text.
_NUMERIC_SPACE = " \t\n\r\v\f"


Sign = Literal["any", "positive", "nonnegative", "nonzero"]


@overload
def to_amount(
    value: object, name: str, *, nullable: Literal[False] = False, sign: Sign = "any"
) -> Decimal: ...
@overload
def to_amount(
    value: object, name: str, *, nullable: bool, sign: Sign = "any"
) -> Decimal | None: ...
def to_amount(
    value: object, name: str, *, nullable: bool = False, sign: Sign = "any"
) -> Decimal | None:
    """Convert an amount argument to an exact, canonical ``Decimal``.

    Parameters:
        value: an ``int``, ``Decimal``, ``str`` (plain decimal notation, exponent allowed)
            or ``float`` (taken at its shortest repr: ``0.1`` is ``Decimal('0.1')``).
        name: the parameter name used in the error message.
        nullable: whether ``None`` is accepted (and returned).
        sign: ``"positive"`` (> 0), ``"nonnegative"`` (>= 0), ``"nonzero"`` or ``"any"``:
            the sign the operation needs, as the SQL function checks it.

    Returns:
        The value in canonical form: trailing fractional zeros removed, a positive exponent
        spelled out (``1E+3`` is ``1000``), ``-0`` as ``0``.

    Raises:
        ValidationError: for ``bool``, ``None`` when not nullable, other types, unparsable
            strings, NaN or infinities, more than 24 digits before the point or more than
            12 after it (counted after stripping trailing zeros), or the wrong sign.
    """
    if type(value) is int and -_INT_AMOUNT_LIMIT < value < _INT_AMOUNT_LIMIT:
        d = Decimal(value)  # the common case: already canonical
    else:
        d = _to_decimal(value, name, nullable)
        if d is None:
            return None
    if sign == "positive" and d <= 0:
        raise invalid(name, f"must be greater than 0, got {d}")
    if sign == "nonnegative" and d < 0:
        raise invalid(name, f"must not be negative, got {d}")
    if sign == "nonzero" and d == 0:
        raise invalid(name, "must not be 0")
    return d


_INT_AMOUNT_LIMIT = 10**MAX_AMOUNT_INTEGER_DIGITS


def _to_decimal(value: object, name: str, nullable: bool) -> Decimal | None:
    """``to_amount`` without the sign rule: the canonical Decimal, or None when allowed."""
    if value is None:
        if nullable:
            return None
        raise invalid(name, "is required (got None)")
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str, float)):
        raise invalid(
            name, f"must be a number (int, Decimal, str or float), got {_type_name(value)}"
        )
    if isinstance(value, float):
        if not math.isfinite(value):
            raise invalid(name, f"must be a finite number, got {shown(value)}")
        d = Decimal(float.__repr__(value))  # (a subclass's repr may not be a number: numpy's)
    elif isinstance(value, str):
        text = value.strip(_NUMERIC_SPACE)
        if _NUMBER_RE.fullmatch(text) is None:
            try:
                finite = Decimal(text).is_finite()
            except (InvalidOperation, ValueError):
                finite = True
            if not finite:
                raise invalid(name, f"must be a finite number, got {shown(value)}")
            raise invalid(name, f"must be a decimal number, got {shown(value)}")
        try:
            d = Decimal(text)
        except (InvalidOperation, ValueError):  # exponent out of Decimal's range
            raise invalid(name, f"is out of range, got {shown(value)}") from None
    else:
        d = Decimal(value)
    if not d.is_finite():
        raise invalid(name, f"must be a finite number, got {str(value)!r}")
    return _canonical(d, name, value)


def _canonical(d: Decimal, name: str, original: object) -> Decimal:
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    if not any(digits):
        return Decimal(0)
    coefficient = list(digits)
    while exponent < 0 and coefficient[-1] == 0:
        coefficient.pop()
        exponent += 1
    integer_digits = max(len(coefficient) + exponent, 0)
    fraction_digits = max(-exponent, 0)
    if integer_digits > MAX_AMOUNT_INTEGER_DIGITS or fraction_digits > MAX_AMOUNT_FRACTION_DIGITS:
        text = shown(original if isinstance(original, str) else _digits(original))
        raise invalid(
            name,
            f"must have at most {MAX_AMOUNT_INTEGER_DIGITS} digits before the decimal point "
            f"and {MAX_AMOUNT_FRACTION_DIGITS} after it, got {text}",
        )
    if exponent > 0:
        coefficient.extend([0] * exponent)
        exponent = 0
    return Decimal((sign, tuple(coefficient), exponent))


# ------------------------------------------------------------------------ identifiers

_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
# Printable ASCII with no space at either end: passes every identifier rule but the length.
_plain_ascii = re.compile("[!-~](?:[ -~]*[!-~])?").fullmatch
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _check_text(value: str, name: str) -> None:
    if (m := _CONTROL_RE.search(value)) is not None:
        raise invalid(
            name,
            f"must not contain control characters (U+{ord(m.group()):04X} at position {m.start()})",
        )
    if (m := _SURROGATE_RE.search(value)) is not None:
        raise invalid(
            name,
            f"must be valid Unicode (lone surrogate U+{ord(m.group()):04X} at "
            f"position {m.start()})",
        )


@overload
def check_identifier(
    value: object, name: str, *, min_len: int, max_len: int, nullable: Literal[False]
) -> str: ...
@overload
def check_identifier(
    value: object, name: str, *, min_len: int, max_len: int, nullable: bool
) -> str | None: ...
def check_identifier(
    value: object, name: str, *, min_len: int, max_len: int, nullable: bool
) -> str | None:
    """Check an identifier (namespace, user_id, unit, key, actor field...).

    Parameters:
        value: the argument.
        name: the parameter name used in the error message.
        min_len, max_len: bounds on the length in characters (see :data:`LIMITS`).
        nullable: whether ``None`` is accepted (and returned).

    Returns:
        The value, unchanged.

    Raises:
        ValidationError: when it is not a ``str``, is too short or too long, contains a
            control character (U+0000-001F, U+007F-009F) or a lone surrogate, or starts or
            ends with white space (``str.isspace``).
    """
    if type(value) is str and min_len <= len(value) <= max_len and _plain_ascii(value):
        return value  # the common case, decided by one C-level match
    if value is None:
        if nullable:
            return None
        raise invalid(name, "is required (got None)")
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {_type_name(value)}")
    n = len(value)
    if n < min_len:
        if n == 0:
            raise invalid(name, "must not be empty")
        raise invalid(name, f"must be at least {min_len} characters long, got {n}")
    if n > max_len:
        raise invalid(name, f"must be at most {max_len} characters long, got {n}")
    _check_text(value, name)
    if n and (value[0].isspace() or value[-1].isspace()):
        raise invalid(name, "must not start or end with white space")
    return value


def check_identifier_list(
    value: object, name: str, *, min_len: int, max_len: int, nullable: bool
) -> list[str] | None:
    """Check a list (or tuple) of identifiers, each with :func:`check_identifier`'s rules.

    Parameters:
        value: a ``list`` or ``tuple`` of ``str``, or ``None`` when nullable.
        name: the parameter name used in the error message.
        min_len, max_len: bounds on each element's length.
        nullable: whether ``None`` is accepted (and returned).

    Returns:
        A new list with the elements, or ``None``.

    Raises:
        ValidationError: when it is not a list or tuple or an element is invalid.
    """
    if value is None:
        if nullable:
            return None
        raise invalid(name, "is required (got None)")
    if not isinstance(value, (list, tuple)):
        raise invalid(name, f"must be a list of strings, got {_type_name(value)}")
    return [
        check_identifier(item, f"{name}[{i}]", min_len=min_len, max_len=max_len, nullable=False)
        for i, item in enumerate(value)
    ]


# ---------------------------------------------------------------- scalars and times


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a ``bool``; raise ValidationError otherwise."""
    if not isinstance(value, bool):
        raise invalid(name, f"must be a bool, got {_type_name(value)}")
    return value


@overload
def check_int(
    value: object, name: str, *, min_value: int, max_value: int, nullable: Literal[False] = False
) -> int: ...
@overload
def check_int(
    value: object, name: str, *, min_value: int, max_value: int, nullable: bool
) -> int | None: ...
def check_int(
    value: object, name: str, *, min_value: int, max_value: int, nullable: bool = False
) -> int | None:
    """Check an integer argument.

    Parameters:
        value: the argument, an ``int`` (not ``bool``).
        name: the parameter name used in the error message.
        min_value, max_value: inclusive bounds.
        nullable: whether ``None`` is accepted (and returned).

    Returns:
        The value as a plain ``int``.

    Raises:
        ValidationError: for another type or a value out of bounds.
    """
    if value is None:
        if nullable:
            return None
        raise invalid(name, "is required (got None)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {_type_name(value)}")
    if not min_value <= value <= max_value:
        raise invalid(name, f"must be between {min_value} and {max_value}, got {shown(value)}")
    return int(value)


def check_limit(value: object, name: str = "limit", *, maximum: int = MAX_LIMIT) -> int | None:
    """Check a row limit: ``None`` (the default of 100) or an ``int`` >= 1.

    Returns:
        ``None`` or the limit, capped at ``maximum`` as the database would.

    Raises:
        ValidationError: for another type or a value below 1.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {_type_name(value)}")
    if value < 1:
        raise invalid(name, f"must be at least 1, got {shown(value)}")
    return min(int(value), maximum)


@overload
def check_timestamp(
    value: object, name: str, *, nullable: Literal[True] = True
) -> datetime | None: ...
@overload
def check_timestamp(value: object, name: str, *, nullable: Literal[False]) -> datetime: ...
def check_timestamp(value: object, name: str, *, nullable: bool = True) -> datetime | None:
    """Check a timestamp argument: a timezone-aware ``datetime`` (or ``None``).

    Raises:
        ValidationError: for a naive datetime, one whose ``tzinfo`` gives an offset
            ``datetime`` refuses, a ``date`` or another type.
    """
    if value is None:
        if nullable:
            return None
        raise invalid(name, "is required (got None)")
    if not isinstance(value, datetime):
        raise invalid(name, f"must be a timezone-aware datetime, got {_type_name(value)}")
    try:
        offset = value.utcoffset()
    except (TypeError, ValueError) as exc:  # a tzinfo whose offset datetime refuses
        raise invalid(name, f"has an invalid UTC offset: {exc}") from None
    if value.tzinfo is None or offset is None:
        raise invalid(
            name,
            "must be timezone-aware, got a naive datetime (use e.g. datetime.now(timezone.utc))",
        )
    return value


def check_conninfo(value: str, name: str) -> None:
    """Check a conninfo string (a URL or ``key=value`` pairs) as libpq would parse it: a
    malformed one is the caller's mistake, which psycopg raises as ProgrammingError.

    Also the values libpq and psycopg read as numbers only when they connect: ``port``
    (an integer from 1 to 65535, or empty for the default; of a list, at least one) and
    ``connect_timeout`` (a number). A bad port failed as a host that could not be
    resolved or reached, and a bad timeout as psycopg's ProgrammingError at connect.
    Values libpq refuses when it connects (``sslmode``, a ``service`` not defined, ...)
    are told apart by :func:`refused_conninfo` once a connection failed.

    Raises:
        ValidationError: naming ``name``, with the parser's message.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    if "\x00" in value:  # libpq would read up to it and connect elsewhere
        raise invalid(name, "invalid conninfo: contains a NUL character")
    try:
        params = conninfo_to_dict(value)
    except psycopg.ProgrammingError as exc:
        raise invalid(name, f"invalid conninfo: {str(exc).strip()}") from None
    port = params.get("port")
    if port is not None:
        # Refused only when no host has a port it could be reached at: with a list, a
        # bad port fails its own host's attempt and the next host's is made (psycopg
        # connects with host=a,b port=abc,5432).
        if not any(_usable_port(one) for one in str(port).split(",")):
            raise invalid(name, f"invalid conninfo: invalid port number: {shown(str(port))}")
    timeout = params.get("connect_timeout")
    if timeout is not None:
        try:
            int(float(timeout))  # as psycopg reads it ('nan' and 'inf' fail there too)
        except (ValueError, OverflowError):
            raise invalid(
                name, f"invalid conninfo: connect_timeout is not a number: {shown(timeout)}"
            ) from None


_PORT_RE = re.compile(r"\s*\+?[0-9]+\s*")


def _usable_port(one: str) -> bool:
    """Whether ``one``, an entry of a ``port`` list, is one libpq connects at: empty (the
    default), or as its pqParseIntParam reads it, an integer (white space around it
    allowed) from 1 to 65535."""
    return not one.strip() or bool(_PORT_RE.fullmatch(one) and 1 <= int(one.strip()) <= 65535)


DEFAULT_CONNECT_TIMEOUT: Final = 10
"""Seconds the command line and the migration runner wait to connect (an address) when
the conninfo sets no ``connect_timeout`` and ``PGCONNECT_TIMEOUT`` is not set."""


def connect_timeout(value: str, seconds: int = DEFAULT_CONNECT_TIMEOUT) -> dict[str, int]:
    """The ``connect_timeout`` keyword argument to connect to conninfo ``value`` with:
    ``seconds``, unless ``value`` sets its own or ``PGCONNECT_TIMEOUT`` does (which then
    wins, as libpq's and psycopg's convention has it), so that a server out of reach fails
    within a bound rather than after the system's TCP timeout (psycopg's default: 130 s).
    ``value`` is one :func:`check_conninfo` passed."""
    from psycopg.conninfo import conninfo_to_dict

    if "connect_timeout" in conninfo_to_dict(value):
        return {}
    env = os.environ.get("PGCONNECT_TIMEOUT")
    if env is not None:
        try:
            int(float(env))  # as psycopg reads it; one it cannot read is not the operator's
            return {}
        except (ValueError, OverflowError):
            pass
    return {"connect_timeout": seconds}


def refused_conninfo(value: str, name: str, error: BaseException) -> ValidationError | None:
    """After a connection to conninfo ``value`` failed with ``error``: the ValidationError
    naming ``name`` when libpq refused the parameters themselves, before trying any server
    (an ``sslmode`` or ``target_session_attrs`` it does not know, a ``service`` its service
    file does not define, an option unknown in that file, as many ports as hosts not
    given); ``None`` when it tried to reach one.

    Told by libpq itself, not by its (translated) messages: ``PQping`` answers
    ``PQPING_NO_ATTEMPT`` exactly when the options did not pass its checks. It is asked
    only when ``PQconnectStart`` failed at once (options refused, or every address refused
    or not resolved without waiting): a start under way passed the checks, and waiting
    for it, as the ping would, held an outage's error 2 s more an address of a server
    that does not answer (the ping's ``connect_timeout``). Not seen from here: a value
    libpq reads only when it tries a server (``sslrootcert`` a missing file, ``keepalives=abc``, a ``PGPORT`` that
    is no number); and a bad value libpq reads from the environment (``PGSSLMODE``) is
    refused under ``name`` too.
    """
    import psycopg
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    try:
        probe = make_conninfo(value, connect_timeout=2)
    except psycopg.ProgrammingError as exc:
        return invalid(name, f"invalid conninfo: {str(exc).strip()}")
    started = pq.PGconn.connect_start(probe.encode())
    try:
        if started.status != pq.ConnStatus.BAD:  # the options passed: an attempt began
            return None
    finally:
        started.finish()
    if pq.PGconn.ping(probe.encode()) != pq.Ping.NO_ATTEMPT:
        return None
    return invalid(name, f"invalid conninfo: {' '.join(str(error).split())}")


def connect(value: str, name: str, seconds: int = DEFAULT_CONNECT_TIMEOUT, **kwargs: Any) -> Any:
    """``psycopg.connect(value, **kwargs)`` within :func:`connect_timeout`'s bound, for the
    command line, the migration runner and ``meter status``.

    Raises:
        ValidationError: naming ``name``, for a value libpq refuses (:func:`refused_conninfo`).
        psycopg.OperationalError: the server could not be reached (each caller says so in
            its own way).
    """
    import psycopg

    try:
        return psycopg.connect(value, **connect_timeout(value, seconds), **kwargs)
    except psycopg.OperationalError as exc:
        refused = refused_conninfo(value, name, exc)
        if refused is not None:
            raise refused from None
        raise


def check_date(value: object, name: str) -> date:
    """Check a date argument: a ``datetime.date`` that is not a ``datetime``.

    Raises:
        ValidationError: for ``None``, a ``datetime`` or another type.
    """
    if value is None:
        raise invalid(name, "is required (got None)")
    if isinstance(value, datetime) or not isinstance(value, date):
        raise invalid(name, f"must be a date (datetime.date), got {_type_name(value)}")
    return value


# A fraction of a month or longer unit: PostgreSQL's interval input turns it into days
# ('0.5 month' is '15 days', '0.1 year' '1 mon 6 days') before the database's whole-days-or-
# whole-months check can see it. Unit spellings as PostgreSQL's (datetime.c), by prefix.
_FRACTIONAL_MONTHS = re.compile(
    r"(?:[0-9]*[.,][0-9]+|[0-9]+[.,])\s*(?:mons?|months?|y|yrs?|years?|decs?|decades?|c|cent"
    r"|century|centuries|mils?|millennium|millennia)\b",
    re.IGNORECASE,
)
# The same in ISO 8601 form: a fractional Y or M before the time part ('P0.5M').
_ISO_FRACTIONAL_MONTHS = re.compile(r"^\s*P[^T]*?[0-9]*[.,][0-9]+\s*[YM]", re.IGNORECASE)


def check_interval(value: object, name: str) -> str | timedelta:
    """Check a period interval: a ``timedelta`` of whole days or PostgreSQL interval text.

    The text (``'1 month'``, ``'7 days'``) is parsed and checked (whole days or whole
    months, positive) by the database; here it must be a clean string of 1..64 characters
    with no fraction of a month or longer unit (``'0.5 month'``, ``'P1.5Y'``), which
    PostgreSQL would read as days before the database's check could see it.

    Raises:
        ValidationError: for another type, a timedelta that is not a positive number of whole
            days, a fraction of a month or longer unit, or a malformed string.
    """
    if isinstance(value, timedelta):
        if value <= timedelta(0) or value.seconds or value.microseconds:
            raise invalid(name, f"must be a positive number of whole days, got {value}")
        return value
    if not isinstance(value, str):
        raise invalid(
            name,
            f"must be an interval (str such as '1 month', or timedelta), got {_type_name(value)}",
        )
    text = check_identifier(value, name, min_len=1, max_len=64, nullable=False)
    assert text is not None
    if _FRACTIONAL_MONTHS.search(text) or _ISO_FRACTIONAL_MONTHS.search(text):
        raise invalid(
            name,
            "must be whole days or whole months, and a fraction of a month or a longer unit"
            f" is read as days: use whole months (or days), got {shown(value)}",
        )
    return text


# -------------------------------------------------------------------------- metadata


def dumps(obj: Any) -> str:
    """Serialise ``obj`` as compact JSON, exactly.

    ``Decimal`` values become JSON numbers with their exact digits (never via float);
    ``dict`` keys must be ``str``; tuples are arrays. The text is not ASCII-escaped.

    Raises:
        TypeError: for a value JSON cannot represent.
        ValueError: for NaN or infinities, or a NUL character (PostgreSQL's ``jsonb``
            cannot store ``\\u0000``).
        RecursionError: for a circular or absurdly deep structure.
    """
    parts: list[str] = []
    _encode(obj, parts.append)
    return "".join(parts)


def _encode_str(s: str, emit: Any) -> None:
    if "\x00" in s:
        raise ValueError("strings must not contain NUL characters (\\u0000)")
    emit(encode_basestring(s))


def _encode(obj: Any, emit: Any) -> None:
    if obj is None:
        emit("null")
    elif obj is True:
        emit("true")
    elif obj is False:
        emit("false")
    elif isinstance(obj, str):
        _encode_str(obj, emit)
    elif isinstance(obj, int):
        emit(int.__repr__(obj))
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite number {obj!r} is not valid JSON")
        emit(float.__repr__(obj))
    elif isinstance(obj, Decimal):
        if not obj.is_finite():
            raise ValueError(f"non-finite number {str(obj)!r} is not valid JSON")
        emit(str(obj))
    elif isinstance(obj, Mapping):
        emit("{")
        first = True
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"object keys must be str, got {_type_name(key)}")
            if not first:
                emit(",")
            first = False
            _encode_str(key, emit)
            emit(":")
            _encode(item, emit)
        emit("}")
    elif isinstance(obj, (list, tuple)):
        emit("[")
        for i, item in enumerate(obj):
            if i:
                emit(",")
            _encode(item, emit)
        emit("]")
    else:
        raise TypeError(f"{_type_name(obj)} is not JSON serialisable")


# One decoder for every call: ``json.loads(text, parse_float=Decimal)`` builds a new
# decoder, with its C scanner, at each call: about 7 of the 10 µs it took to parse a small
# result document (the workers parse one per event).
_DECODER = json.JSONDecoder(parse_float=Decimal)


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """Parse JSON text, keeping non-integer numbers exact as ``Decimal``.

    Accepts what :func:`json.loads` accepts (bytes in UTF-8, -16 or -32), with its errors.
    Also what it cannot take, as PostgreSQL stores it: a document nested deeper than
    Python's recursion allows, and integers longer than Python converts from text (4,300
    digits; such an integer comes back as a ``Decimal``), both by
    :func:`_decode_iteratively`.
    """
    if isinstance(data, memoryview):
        data = bytes(data)
    if isinstance(data, (bytes, bytearray)):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    elif not isinstance(data, str) or data.startswith("\ufeff"):
        return json.loads(data, parse_float=Decimal)  # json's own TypeError or BOM error
    try:
        return _DECODER.decode(data)
    except RecursionError:
        return _decode_iteratively(data)
    except ValueError as exc:  # a JSONDecodeError, or int()'s limit on digits
        if isinstance(exc, json.JSONDecodeError):
            raise
        return _decode_iteratively(data)


_WHITESPACE: Final = re.compile(r"[ \t\n\r]*").match
_NUMBER: Final = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?").match
_CONSTANTS: Final[dict[str, Any]] = {
    "null": None,
    "true": True,
    "false": False,
    "NaN": float("nan"),  # as json.loads takes them (PostgreSQL never writes them)
    "Infinity": float("inf"),
    "-Infinity": float("-inf"),
}


def _decode_iteratively(s: str) -> Any:
    """Parse JSON text as :func:`loads` does, with a stack of its own instead of
    recursion: jsonb accepts documents nested beyond what json's scanner can follow in
    Python's recursion limit, and integers longer than ``int()`` converts
    (``sys.get_int_max_str_digits()``; kept here as ``Decimal``). Slower than json's C
    scanner: only for what that scanner cannot take."""
    containers: list[dict[str, Any] | list[Any]] = []
    keys: list[str] = []  # the pending key of each open object, innermost last
    pos = 0

    def key_at(pos: int) -> int:
        pos = _WHITESPACE(s, pos).end()
        if not s.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, pos)
        key, pos = scanstring(s, pos + 1)
        keys.append(key)
        pos = _WHITESPACE(s, pos).end()
        if not s.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", s, pos)
        return pos + 1

    while True:
        pos = _WHITESPACE(s, pos).end()
        char = s[pos : pos + 1]
        value: Any
        if char == "{":
            if s.startswith("}", after := _WHITESPACE(s, pos + 1).end()):
                value, pos = {}, after + 1
            else:
                containers.append({})
                pos = key_at(pos + 1)
                continue
        elif char == "[":
            if s.startswith("]", after := _WHITESPACE(s, pos + 1).end()):
                value, pos = [], after + 1
            else:
                containers.append([])
                pos += 1
                continue
        elif char == '"':
            value, pos = scanstring(s, pos + 1)
        elif number := _NUMBER(s, pos):
            integer, fraction, exponent = number.groups()
            if fraction or exponent:
                value = Decimal(number.group())
            else:
                limit = sys.get_int_max_str_digits()  # 0: no limit
                digits = len(integer) - integer.startswith("-")
                value = int(integer) if not limit or digits <= limit else Decimal(integer)
            pos = number.end()
        else:
            for text, constant in _CONSTANTS.items():
                if s.startswith(text, pos):
                    value, pos = constant, pos + len(text)
                    break
            else:
                raise json.JSONDecodeError("Expecting value", s, pos)
        # Put the value in its container; close every container that ends after it.
        while True:
            if not containers:
                end = _WHITESPACE(s, pos).end()
                if end != len(s):
                    raise json.JSONDecodeError("Extra data", s, end)
                return value
            top = containers[-1]
            if isinstance(top, dict):
                top[keys.pop()] = value
            else:
                top.append(value)
            pos = _WHITESPACE(s, pos).end()
            char = s[pos : pos + 1]
            if char == ",":
                pos = key_at(pos + 1) if isinstance(top, dict) else pos + 1
                break
            if char == ("}" if isinstance(top, dict) else "]"):
                value = containers.pop()
                pos += 1
                continue
            raise json.JSONDecodeError("Expecting ',' delimiter", s, pos)


_NUMERIC_MAX_SCALE: Final = 16383
"""The most digits after the decimal point a ``numeric`` (so a jsonb number) holds, as
written: ``1.50E-16382`` counts its trailing zero."""

_NUMERIC_EXPONENT_LIMIT = 70000
"""Beyond this decimal exponent a number's plain text alone exceeds the metadata limit."""


def jsonb_text_size(obj: Any) -> int:
    """UTF-8 bytes of PostgreSQL's ``jsonb::text`` of ``obj`` (a value :func:`dumps` took).

    jsonb prints ``", "`` and ``": "`` between items, and numbers in ``numeric``'s plain
    notation (``1E+3`` -> ``1000``, ``1e-07`` -> ``0.0000001``, no negative zero). It also
    reorders keys, which does not change the size. Iterative: any depth :func:`dumps`
    accepted is measured without recursion.

    Raises:
        ValueError: for a number jsonb cannot store (more than 16383 digits after the
            decimal point), which no size would let through.
    """
    size = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            size += 2 + 2 * max(len(item) - 1, 0) + 2 * len(item)  # braces, ", ", ": "
            for key, value in item.items():
                stack.append(key)
                stack.append(value)
        elif isinstance(item, (list, tuple)):
            size += 2 + 2 * max(len(item) - 1, 0)
            stack.extend(item)
        elif isinstance(item, str):
            size += len(encode_basestring(item).encode("utf-8"))
        elif isinstance(item, (float, Decimal)):
            d = Decimal(float.__repr__(item)) if isinstance(item, float) else item
            exponent = d.as_tuple().exponent
            if isinstance(exponent, int) and exponent < -_NUMERIC_MAX_SCALE:
                raise ValueError(
                    f"the number {shown(str(d))} has more than {_NUMERIC_MAX_SCALE} digits "
                    "after the decimal point, more than PostgreSQL's numeric holds"
                )
            if abs(d.adjusted()) > _NUMERIC_EXPONENT_LIMIT:
                return MAX_METADATA_BYTES + 1  # too long (or out of numeric's range) anyway
            text = format(d, "f")
            size += len(text.lstrip("-") if d.is_zero() else text)
        else:
            size += len(dumps(item))  # null, true, false, integers: the same text
    return size


def check_metadata(value: object, name: str = "metadata") -> str | None:
    """Check a metadata argument and return its compact JSON text.

    Parameters:
        value: a ``dict`` (JSON object) or ``None``.
        name: the parameter name used in the error message.

    Returns:
        The compact JSON text (see :func:`dumps`), or ``None``.

    Raises:
        ValidationError: when it is not a mapping, cannot be serialised exactly, contains a
            lone surrogate or a NUL, or its text as PostgreSQL writes it (``jsonb::text``,
            :func:`jsonb_text_size`) exceeds 65536 bytes.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise invalid(name, f"must be a JSON object (dict), got {_type_name(value)}")
    try:
        text = dumps(value)
    except RecursionError:
        raise invalid(name, "is nested too deeply (or contains a cycle)") from None
    except (TypeError, ValueError) as exc:
        raise invalid(name, f"is not valid JSON: {exc}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(name, "must be valid Unicode (contains a lone surrogate)") from None
    # Measured as the SQL measures it (octet_length(metadata::text)), so that what passes
    # here is never refused by the database for its size.
    try:
        size = jsonb_text_size(value)
    except ValueError as exc:
        raise invalid(name, str(exc)) from None
    if size > MAX_METADATA_BYTES:
        raise invalid(name, f"must be at most {MAX_METADATA_BYTES} bytes as JSON text, got {size}")
    return text


# uuid4 text without building a UUID object (half the cost of str(uuid.uuid4()), once
# per event): 122 random bits, the version nibble 4 and the RFC 4122 variant 10xx.
_VARIANT_NIBBLE: Final = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


_RESERVATION_ID_SPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "meter:producer/reservation-id")


def keyed_reservation_id(namespace: str, idempotency_key: str) -> str:
    """The reservation id of a reserve that has an idempotency key but no id of the
    caller's, in ``MeterClient.reserve`` and ``MeterProducer.reserve`` alike.

    Derived (uuid5) from the namespace and the key, so that a retry with the key is the
    same request and replays, whichever of the two sent either (the database's request
    fingerprint covers the reservation id); the producer must know it before the event is
    applied, for the handle (commit and release can be enqueued at once). Another request
    under the same key has the same id and is refused as a conflict
    (``IdempotencyConflictError``).
    """
    return str(uuid.uuid5(_RESERVATION_ID_SPACE, json.dumps([namespace, idempotency_key])))


def new_id() -> str:
    """A random (version 4) UUID as text: a generated idempotency key, reservation or task id."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_NIBBLE[h[16]]}{h[17:20]}-{h[20:]}"
