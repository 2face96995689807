"""sql 068 in SQL alone: what a stamp (an event's ``occurred_at``) dates, and what it never does.

``tests/system/test_dated_at_the_call.py`` holds the producer and a real worker; these hold
the database's side on both paths of ``meter.apply_events`` (a batch's fast path, and the
one-by-one path of single events): a stamp dates exactly where an explicit ``event_time``
would, else nothing; no event or later call inherits one; and a stamped event applied after
the roll closed its period is what an explicit ``event_time`` there is.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

D = Decimal
ET, UNIT = "tokens", "tok"
_keys = itertools.count()

STAMPS = [
    "2026-01-15T12:00:00Z",
    "2026-01-15 12:00:00.123456+05:30",
    "2026-01-15T12:00z",
    "2026-01-15T23:59:60Z",  # PostgreSQL's leap second: the next minute, as event_time
    "2026-01-15T24:00:00+00",
    "1900-01-01T00:00:00Z",
    "1900-01-01T00:00:00+00:01",  # before 1900 in UTC
    "1899-12-31T23:59:59Z",
    "2999-01-01T00:00:00Z",
    "10000-01-01T00:00:00Z",
    "0100-01-01T00:00:00Z BC",
    "infinity",
    "-infinity",
    "epoch",
    "now",
    "today",
    "allballs",
    "2026-01-15",
    "2026-01-15T12:00:00",  # no offset
    "2026-01-15T12:00:00 PST8PDT",
    "2026-01-15T12:00:00 America/New_York",
    "2026-02-30T00:00:00Z",
    "2026-01-15T12:00:00Z\n",
    "x" * 100_000,
    "",
]


def _event(op: str, user: str, stamp: Any = None, **args: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "op": op,
        "namespace": "default",
        "args": {"user_id": user, "event_type": ET, "amount": "1", "unit": UNIT,
                 "idempotency_key": f"k{next(_keys)}", **args},
    }  # fmt: skip
    if stamp is not None:
        event["occurred_at"] = stamp
    return event


def _apply(db: psycopg.Connection[Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT idx, status, error_sqlstate FROM meter.apply_events(%s) ORDER BY idx",
        (Jsonb(events),),
    ).fetchall()


def _time_of(db: psycopg.Connection[Any], event: dict[str, Any]) -> datetime:
    row = db.execute(
        "SELECT event_time FROM meter.ledger WHERE idempotency_key = %s",
        (event["args"]["idempotency_key"],),
    ).fetchone()
    assert row is not None, event
    return row["event_time"]


def _expected(db: psycopg.Connection[Any], stamp: str) -> datetime | None:
    """What an explicit event_time of this text dates, when the database takes it; None when
    it refuses it (then a stamp is ignored: the row is dated by now())."""
    try:
        with db.transaction():
            value = db.execute("SELECT meter._time('event_time', %s) AS t", (stamp,)).fetchone()
            return db.execute(
                "SELECT meter._ledger_time('event_time', %s) AS t", (value["t"],)
            ).fetchone()["t"]
    except psycopg.Error:
        return None


@pytest.mark.parametrize("path", ["single", "batch"])
def test_a_stamp_dates_exactly_where_an_explicit_event_time_would_and_is_ignored_otherwise(
    db: psycopg.Connection[Any], path: str
) -> None:
    for op, stamp in itertools.product(("consume", "allocate"), STAMPS):
        event = _event(op, "u1", stamp)
        filler = [_event("allocate", "filler")] if path == "batch" else []
        with db.transaction():
            assert _apply(db, [event, *filler])[0]["status"] == "applied", (op, stamp[:40])
            now = db.execute("SELECT now() AS t").fetchone()["t"]
            expected = _expected(db, stamp)
            assert _time_of(db, event) == (expected or now), (op, path, stamp[:40])
    for stamp in (17, 1.5, True, None, ["2026-01-15T12:00:00Z"], {"t": "2026-01-15T12:00:00Z"}):
        event = _event("consume", "u1")
        event["occurred_at"] = stamp  # not a JSON string: ignored
        with db.transaction():
            assert _apply(db, [event])[0]["status"] == "applied"
            assert _time_of(db, event) == db.execute("SELECT now() AS t").fetchone()["t"]


def test_no_event_and_no_later_call_of_the_transaction_inherits_a_stamp(
    db: psycopg.Connection[Any],
) -> None:
    stamp = "2026-01-15T12:00:00Z"
    with db.transaction():
        now = db.execute("SELECT now() AS t").fetchone()["t"]
        # One by one: a stamped checked consume that fails after the stamp was set (its
        # amount), one that applies, then events of every op without a stamp of their own.
        batch = [
            _event("consume", "u1", stamp, check_balance=True, amount="lots"),
            _event("allocate", "u1", amount="100"),
            _event("consume", "u1", stamp, check_balance=True),
            _event("consume", "u1", check_balance=True),
            _event("allocate", "u1"),
            _event("reserve", "u1", ttl_seconds="60"),
        ]
        assert [r["status"] for r in _apply(db, batch)] == [
            "error", "applied", "applied", "applied", "applied", "applied",
        ]  # fmt: skip
        assert [_time_of(db, batch[i]) for i in (1, 2, 3, 4)] == [
            now, datetime(2026, 1, 15, 12, tzinfo=UTC), now, now,
        ]  # fmt: skip
        # A single stamped event that fails, then one that applies, then direct calls.
        assert _apply(db, [_event("allocate", "u2", stamp, amount="0")])[0]["status"] == "error"
        assert _apply(db, [_event("allocate", "u2", stamp)])[0]["status"] == "applied"
        assert db.execute("SELECT current_setting('meter.occurred_at', true) AS s").fetchone() == {
            "s": ""
        }
        direct = [
            db.execute(sql).fetchone()["entry_id"]
            for sql in (
                "SELECT entry_id FROM meter.consume('u2', 'tokens', 1, 'tok')",
                "SELECT entry_id FROM meter.allocate('u2', 'tokens', 1, 'tok')",
            )
        ]
        times = db.execute(
            "SELECT event_time FROM meter.ledger WHERE id = ANY(%s)", (direct,)
        ).fetchall()
        assert [r["event_time"] for r in times] == [now, now]
        # A dead letter's retry that fails, then a direct call.
        dead = db.execute(
            "SELECT meter.record_dead_letter('consume', %s, 'MT001', 'x') AS id",
            (Jsonb(_event("consume", "u3", stamp, amount="lots")),),
        ).fetchone()["id"]
        assert db.execute("SELECT ok FROM meter.retry_dead_letter(%s)", (dead,)).fetchone() == {
            "ok": False
        }
        entry = db.execute("SELECT entry_id FROM meter.consume('u3', 'tokens', 1, 'tok')")
        assert _time_of_id(db, entry.fetchone()["entry_id"]) == now


def _time_of_id(db: psycopg.Connection[Any], entry_id: int) -> datetime:
    return db.execute("SELECT event_time FROM meter.ledger WHERE id = %s", (entry_id,)).fetchone()[
        "event_time"
    ]


def test_a_stamped_event_applied_after_the_roll_closed_its_period_is_an_explicit_one_there(
    db: psycopg.Connection[Any],
) -> None:
    # Daily periods, 1000 each, nothing carried; 900 used; the roll closes today at its
    # end; then 50 more arrive dated a second before that end, one stamped, one with an
    # explicit event_time. Both are dated in the closed period (get_usage) and change the
    # balance, not the closed period's record: what 069 documents for a row dated before a
    # start and recorded after its roll.
    today = db.execute("SELECT (now() AT TIME ZONE 'UTC')::date AS d").fetchone()["d"]
    end = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
    late = (end - timedelta(seconds=1)).isoformat()
    for user in ("stamped", "explicit"):
        db.execute(
            "SELECT meter.set_period_config(%s, %s, %s, NULL, %s, 1000, 0, 'default', '1 day')",
            (user, ET, UNIT, today),
        )
        db.execute("SELECT meter.consume(%s, %s, 900, %s)", (user, ET, UNIT))
    db.execute("SELECT * FROM meter.roll_periods('default', %s)", (end,))
    events = [
        _event("consume", "stamped", late, amount="50"),
        _event("consume", "explicit", amount="50", event_time=late),
    ]
    assert [r["status"] for r in _apply(db, events)] == ["applied", "applied"]
    seen = {}
    for user in ("stamped", "explicit"):
        balance = db.execute(
            "SELECT balance FROM meter.accounts WHERE user_id = %s", (user,)
        ).fetchone()["balance"]
        rows = db.execute(
            "SELECT entry_type, amount, event_time FROM meter.ledger WHERE user_id = %s"
            " AND event_time < %s ORDER BY id",
            (user, end),
        ).fetchall()
        seen[user] = (balance, sorted((r["entry_type"], r["amount"]) for r in rows))
        assert rows[-1]["event_time"] == datetime.fromisoformat(late)
    assert seen["stamped"] == seen["explicit"] == (
        D(950),
        [("allocation", D(1000)), ("consumption", D(-900)), ("consumption", D(-50)),
         ("expiration", D(-100))],
    )  # fmt: skip
