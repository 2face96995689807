"""Retrying dead letters (SPEC 5: dead letters are listed and replayable from the CLI, never
dropped; an event applies exactly once in effect), as found by a review of their lifecycle
(migration 048 and `meter dead-letters retry --all`)."""

from __future__ import annotations

import json
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from meter import dead_letters as dl
from meter.cli import main


def _cli(db_url: str, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env={"METER_DATABASE_URL": db_url})


def _file(db: Any, op: str, payload: dict[str, Any], sqlstate: str, source: str) -> int:
    row = db.execute(
        "SELECT meter.record_dead_letter(%s, %s::jsonb, %s, 'retries exhausted', %s, %s) AS id",
        (op, json.dumps(payload), sqlstate, source, payload["namespace"]),
    ).fetchone()
    return int(row["id"])


def _status(db: Any, id_: int) -> dict[str, Any]:
    return db.execute(
        "SELECT status, attempts FROM meter.dead_letters WHERE dead_letter_id = %s", (id_,)
    ).fetchone()


def test_retry_all_goes_on_past_a_letter_an_earlier_retry_settled(db, db_url, client):
    """A reserve dead-lettered after transient failures and the commit orphaned for it:
    retrying the reserve settles the commit (trigger); --all then raised "no dead letter
    waiting" on the commit and stopped, leaving older letters untried."""
    client.allocate("bob", "llm", 100, "tok")
    # oldest: an unrelated, fixable event
    other = _file(
        db,
        "allocate",
        {
            "op": "allocate",
            "namespace": "default",
            "args": {
                "user_id": "carol",
                "event_type": "llm",
                "amount": "7",
                "unit": "tok",
                "idempotency_key": "k-carol",
            },
        },
        "08006",
        "task-a",
    )
    orphan = db.execute(
        "SELECT * FROM meter.record_orphan(%s::jsonb, 'no reservation', 'task-c')",
        (
            json.dumps(
                {
                    "op": "commit",
                    "namespace": "default",
                    "args": {"reservation_id": "r1", "actual_amount": "3"},
                }
            ),
        ),
    ).fetchone()
    assert orphan["applied"] is False
    commit_id = orphan["dead_letter_id"]
    # newest: the reserve itself, which failed transiently until retries ran out
    reserve_id = _file(
        db,
        "reserve",
        {
            "op": "reserve",
            "namespace": "default",
            "args": {
                "user_id": "bob",
                "event_type": "llm",
                "amount": "5",
                "unit": "tok",
                "reservation_id": "r1",
            },
        },
        "08006",
        "task-r",
    )

    result = _cli(db_url, "dead-letters", "retry", "--all")

    assert _status(db, reserve_id)["status"] == "retried"
    assert _status(db, commit_id)["status"] == "retried"  # settled by the reserve's trigger
    # every waiting dead letter was retried, and the run says so
    assert _status(db, other)["status"] == "retried", result.output
    assert result.exit_code == 0, result.output


def test_a_waiting_dead_letter_keeps_its_key_from_pruning(db, client):
    """MTW01: the first delivery committed, the worker died before the ack, the message was
    dead-lettered though applied. While the letter waits, beat's pruning keeps its key, so
    a retry 40 days later replays: it applied the consume a second time."""
    client.allocate("dave", "llm", 100, "tok")
    event = {
        "op": "consume",
        "namespace": "default",
        "args": {
            "user_id": "dave",
            "event_type": "llm",
            "amount": "10",
            "unit": "tok",
            "idempotency_key": "task:t-1",
        },
    }
    first = db.execute(
        "SELECT * FROM meter.apply_events(%s::jsonb, 't-1')", (json.dumps([event]),)
    ).fetchone()
    assert first["status"] == "applied"
    letter = _file(db, "consume", event, "MTW01", "t-1")
    # 40 days later: beat's prune (default 35 days) removes the key, the letter still waits
    db.execute("UPDATE meter.idempotency_keys SET created_at = created_at - interval '40 days'")
    db.execute("SELECT meter.prune_idempotency_keys()")

    out = dl.retry(db, letter)

    assert out["status"] == "replayed", out
    assert client.get_balance("dave", "llm", "tok")["balance"] == D(90)


def test_retry_all_retries_reserves_before_the_commits_waiting_for_them(db, db_url, client):
    """Reserves first: newest first, the orphaned commit was tried before its reserve and
    reported still failing, then the reserve settled it; the run exited 1 though nothing
    was left waiting."""
    client.allocate("erin", "llm", 100, "tok")
    reserve_id = _file(
        db,
        "reserve",
        {
            "op": "reserve",
            "namespace": "default",
            "args": {
                "user_id": "erin",
                "event_type": "llm",
                "amount": "5",
                "unit": "tok",
                "reservation_id": "r2",
            },
        },
        "08006",
        "task-r2",
    )
    commit_id = db.execute(
        "SELECT * FROM meter.record_orphan(%s::jsonb, 'no reservation', 'task-c2')",
        (
            json.dumps(
                {
                    "op": "commit",
                    "namespace": "default",
                    "args": {"reservation_id": "r2", "actual_amount": "3"},
                }
            ),
        ),
    ).fetchone()["dead_letter_id"]

    result = _cli(db_url, "dead-letters", "retry", "--all", "--json")

    assert _status(db, reserve_id)["status"] == "retried"
    assert _status(db, commit_id)["status"] == "retried"
    outcomes = {o["dead_letter_id"]: o for o in json.loads(result.stdout)}
    assert outcomes[commit_id]["ok"], outcomes  # reported still failing, yet settled
    assert result.exit_code == 0, result.output


def test_retry_all_reaches_letters_beyond_the_first_10000(db, db_url):
    """--all retries every waiting dead letter: it read one page of 10000."""
    db.execute(
        "INSERT INTO meter.dead_letters (namespace, op, payload, error_sqlstate, error_message)"
        " SELECT '', 'consume', '{\"unstorable\": \"x\"}'::jsonb, 'MT001', 'bad'"
        " FROM generate_series(1, 10001)"
    )
    _cli(db_url, "dead-letters", "retry", "--all")
    untried = db.execute(
        "SELECT count(*) AS n FROM meter.dead_letters WHERE status = 'dead' AND attempts = 1"
    ).fetchone()["n"]
    assert untried == 0


def test_list_dead_letters_refuses_a_status_that_names_none(db, app_url, snapshot):
    """A misspelt status filter (`'Dead'`, `'failed'`) answered with no letters, as if none
    waited: an operator (or an application role calling the SQL API) read "nothing to
    retry" while letters waited. Refused now by name, as the Python wrapper refuses it
    (and as get_audit_events refuses an unknown kind, 039); the known filters still list."""
    waiting = _file(db, "consume", {"namespace": "default", "args": {}}, "MT001", "src-1")
    listed = "SELECT dead_letter_id FROM meter.list_dead_letters(%s, 10, 'default')"
    for status in ("dead", "all", None):
        assert [r["dead_letter_id"] for r in db.execute(listed, (status,))] == [waiting]
    assert db.execute(listed, ("retried",)).fetchall() == []
    before = snapshot()
    with psycopg.connect(app_url, autocommit=True) as app:
        app.execute("SELECT meter.set_tenant('default')")
        for status in ("Dead", "failed", "", " dead"):
            with pytest.raises(psycopg.Error) as refused:
                app.execute(listed, (status,))
            assert refused.value.sqlstate == "MT001", status
            assert refused.value.diag.column_name == "status"
            assert "dead, retried, discarded, all" in str(refused.value)
    with pytest.raises(psycopg.Error) as refused:
        db.execute("SELECT * FROM meter.list_dead_letters('waiting', 10, NULL)")
    assert refused.value.sqlstate == "MT001"
    assert snapshot() == before


def test_retry_all_counts_only_the_letters_this_run_retried(db, db_url, client, monkeypatch):
    """Letters another operator retried or discarded while the run went on were counted
    as retried by it ("retried 3 of 3"): retry_dead_letter found them no longer waiting,
    and the run took that for its own success."""

    def letter(user: str) -> int:
        args = {"user_id": user, "event_type": "llm", "amount": "7", "unit": "tok",
                "idempotency_key": f"k-{user}"}  # fmt: skip
        event = {"op": "allocate", "namespace": "default", "args": args}
        return _file(db, "allocate", event, "08006", f"task-{user}")

    mine, discarded, retried_elsewhere = letter("ann"), letter("ben"), letter("cy")
    listed = dl.to_retry

    def listed_then_settled_elsewhere(conn: Any) -> list[int]:
        ids = listed(conn)
        # another operator, in a session of their own, after this run listed the letters
        assert db.execute("SELECT meter.discard_dead_letter(%s) AS d", (discarded,)).fetchone()["d"]
        assert dl.retry(db, retried_elsewhere)["ok"]
        return ids

    monkeypatch.setattr(dl, "to_retry", listed_then_settled_elsewhere)
    result = _cli(db_url, "dead-letters", "retry", "--all")

    assert result.exit_code == 0, result.output
    assert "retried 1 of 3; 2 no longer waiting when reached" in result.output, result.output
    assert _status(db, mine)["status"] == "retried"
    assert _status(db, discarded)["status"] == "discarded"
    assert client.get_balance("cy", "llm", "tok")["balance"] == D(7)  # once, elsewhere


def test_a_dead_letter_retried_later_is_dated_at_its_producer_s_call(db):
    """A consume filed after its retries were exhausted (MTW01) and retried weeks later is
    dated at the producer's call (`occurred_at`, sql 068), not at the retry: before 068 it
    counted in the month and billing period of the retry. Its stamp counts in no
    fingerprint: a second retry of the applied event replays it."""
    called = "2026-01-31T23:59:00+00:00"
    event = {"op": "consume", "namespace": "default", "occurred_at": called,
             "args": {"user_id": "u1", "event_type": "tokens", "amount": "2", "unit": "tok",
                      "idempotency_key": "late-1"}}  # fmt: skip
    id_ = _file(db, "consume", event, "MTW01", "task-late")
    again = _file(db, "consume", {**event, "occurred_at": "2026-02-01T00:05:00+00:00"},
                  "MTW01", "task-late-2")  # fmt: skip
    assert db.execute("SELECT * FROM meter.retry_dead_letter(%s)", (id_,)).fetchone()["ok"]
    row = db.execute("SELECT * FROM meter.retry_dead_letter(%s)", (again,)).fetchone()
    assert (row["ok"], row["status"]) == (True, "replayed")
    rows = db.execute("SELECT event_time FROM meter.ledger").fetchall()
    assert [r["event_time"].isoformat() for r in rows] == [called]
