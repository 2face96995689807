"""sql 067 in SQL alone: a release's key is matched against its own hold, nothing else.

A release event's ``idempotency_key`` is recorded by the hold it releases
(``reservations.release_key``) and never claimed in ``meter.idempotency_keys``: it neither
conflicts with nor replays another op's use of the same key, and the same key given to the
releases of two holds releases each (one release of each hold: nothing to conflict with).
A release reports true for a hold no longer active only when that hold was released under
that very key: not for one committed, expired, or released under another key, whatever
another hold recorded.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

D = Decimal
ET, UNIT = "tokens", "tok"


def _ev(op: str, **args: Any) -> dict[str, Any]:
    return {"op": op, "namespace": "default", "args": args}


def _reserve(rid: str, amount: int = 10, **more: Any) -> dict[str, Any]:
    return _ev("reserve", user_id="u1", event_type=ET, amount=str(amount), unit=UNIT,
               reservation_id=rid, **more)  # fmt: skip


def _apply(db: psycopg.Connection[Any], events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    rows = db.execute(
        "SELECT idx, status, result, error_sqlstate FROM meter.apply_events(%s) ORDER BY idx",
        (Jsonb(events),),
    ).fetchall()
    return [(r["status"], r["result"], r["error_sqlstate"]) for r in rows]


def _hold(db: psycopg.Connection[Any], rid: str) -> tuple[str, str | None]:
    row = db.execute(
        "SELECT status, release_key FROM meter.reservations WHERE reservation_id = %s", (rid,)
    ).fetchone()
    assert row is not None
    return row["status"], row["release_key"]


def _keys(db: psycopg.Connection[Any]) -> list[str]:
    rows = db.execute("SELECT key FROM meter.idempotency_keys ORDER BY key").fetchall()
    return [r["key"] for r in rows]


def test_a_release_key_is_scoped_to_its_hold_and_claims_no_idempotency_key(client, db):
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    _apply(db, [_reserve("r1"), _reserve("r2")])
    released = {"released": True}
    # the same key for two holds: each is released once, by it
    assert _apply(db, [_ev("release", reservation_id="r1", idempotency_key="K")]) == [
        ("applied", released, None)
    ]
    assert _apply(db, [_ev("release", reservation_id="r2", idempotency_key="K")]) == [
        ("applied", released, None)
    ]
    assert _hold(db, "r1") == _hold(db, "r2") == ("released", "K")
    # a consume under the release's key is a request of its own, claimed once, replayed
    consume = _ev("consume", user_id="u1", event_type=ET, amount="3", unit=UNIT,
                  idempotency_key="K")  # fmt: skip
    (first,) = _apply(db, [consume])
    assert first[0] == "applied" and first[1]["success"] is True
    (again,) = _apply(db, [consume])
    assert again[0] == "replayed" and again[1]["entry_id"] == first[1]["entry_id"]
    assert _keys(db) == ["K", "grant"]
    # and the key a consume claimed releases a hold, reported true again only for it
    _apply(db, [_reserve("r3")])
    assert _apply(db, [_ev("release", reservation_id="r3", idempotency_key="K")]) == [
        ("applied", released, None)
    ]
    for rid in ("r1", "r2", "r3"):
        assert _apply(db, [_ev("release", reservation_id=rid, idempotency_key="K")]) == [
            ("replayed", released, None)
        ]
        assert _apply(db, [_ev("release", reservation_id=rid, idempotency_key="L")])[0][1] == {
            "released": False
        }
    assert client.get_balance("u1", ET, UNIT)["reserved"] == D(0)
    assert client.get_balance("u1", ET, UNIT)["balance"] == D(97)


def test_a_key_that_released_one_hold_says_false_for_another_hold_expired_or_committed(client, db):
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    _apply(db, [_reserve("gone"), _reserve("old", ttl_seconds="1")])
    _apply(db, [_ev("release", reservation_id="gone", idempotency_key="K")])
    db.execute(
        "UPDATE meter.reservations SET expires_at = now() - interval '1 minute'"
        " WHERE reservation_id = 'old'"
    )
    db.execute("SELECT meter.release_expired_reservations()")
    assert _hold(db, "old") == ("expired", None)
    (row,) = _apply(db, [_ev("release", reservation_id="old", idempotency_key="K")])
    assert row[1] == {"released": False}
    assert _hold(db, "old") == ("expired", None)
    # in one batch with its reserve and a commit before it: the commit took the hold
    rows = _apply(db, [
        _reserve("both", idempotency_key="rk"),
        _ev("commit", reservation_id="both", actual_amount="4"),
        _ev("release", reservation_id="both", idempotency_key="K"),
    ])  # fmt: skip
    assert [r[0] for r in rows[:2]] == ["applied", "applied"]
    assert rows[2][1] == {"released": False}
    assert _hold(db, "both") == ("committed", None)
    # the same batch again (redelivered): the same answers, nothing applied twice
    again = _apply(db, [
        _reserve("both", idempotency_key="rk"),
        _ev("commit", reservation_id="both", actual_amount="4"),
        _ev("release", reservation_id="both", idempotency_key="K"),
    ])  # fmt: skip
    assert [r[0] for r in again[:2]] == ["replayed", "replayed"]
    assert again[2][1] == {"released": False}
    # released in the batch that reserved it, before a commit: true, also when redelivered
    batch = [
        _reserve("mine", idempotency_key="mk"),
        _ev("release", reservation_id="mine", idempotency_key="K2"),
        _ev("commit", reservation_id="mine", actual_amount="4"),
    ]
    for status in ("applied", "replayed"):
        rows = _apply(db, batch)
        assert rows[1] == (status, {"released": True}, None)
        assert rows[2][0] == "refused"
    assert _hold(db, "mine") == ("released", "K2")
    assert client.get_balance("u1", ET, UNIT)["balance"] == D(96)
    assert client.get_balance("u1", ET, UNIT)["reserved"] == D(0)


def test_a_release_key_the_rules_refuse_is_refused_by_name_and_changes_nothing(
    client, db, snapshot
):
    """067 lets a release carry a key and checks it as any key (1..256 characters, no
    control characters, no white space at its ends): refused MT001 naming idempotency_key,
    filed as a dead letter, the hold still active and nothing else written."""
    client.allocate("u1", ET, 100, UNIT, idempotency_key="grant")
    assert _apply(db, [_reserve("h1")])[0][0] == "applied"
    before = snapshot()
    for bad in ("k" * 257, "a\x01b", " k", ""):
        event = _ev("release", reservation_id="h1", idempotency_key=bad)
        row = db.execute(
            "SELECT status, error_sqlstate, error_message FROM meter.apply_events(%s)",
            (Jsonb([event]),),
        ).fetchone()
        assert row is not None and (row["status"], row["error_sqlstate"]) == ("error", "MT001")
        assert row["error_message"].startswith("idempotency_key"), row
        after = snapshot()
        # filed as a dead letter, as the pipeline files every refusal; nothing else written
        assert [d[3]["args"]["idempotency_key"] for d in after.pop("dead_letters")][-1] == bad
        assert after == {k: v for k, v in before.items() if k != "dead_letters"}, bad
    assert _hold(db, "h1") == ("active", None)
