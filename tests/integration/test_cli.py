"""The read, check and by-hand commands of ``meter`` against a real database (and Redis,
worker).

Every command is run through click's ``CliRunner`` with ``METER_DATABASE_URL`` set, once
for people (a table) and once with ``--json`` (exact figures), and its exit status is
checked against the documented meaning: 0 ok, 1 problems found, 2 usage, 3 cannot connect.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from meter import types as t
from meter.cli import EXIT_PROBLEMS, EXIT_UNREACHABLE, EXIT_USAGE, main
from tests.integration.test_sdk import ReplyCutter

UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/nothing"
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def as_json(result: Result) -> Any:
    assert result.exit_code in (0, 1), result.output
    return t.loads(result.stdout)  # Decimals stay exact


@pytest.fixture
def env(db_url: str) -> dict[str, str]:
    return {"METER_DATABASE_URL": db_url}


@pytest.fixture
def alice(client: Any) -> None:
    client.allocate("alice", "llm", "1000.5", "tokens")
    client.consume("alice", "llm", "0.1", "tokens", event_time=datetime(2026, 1, 10, tzinfo=UTC))
    client.consume("alice", "llm", 2, "tokens", event_time=datetime(2026, 2, 10, tzinfo=UTC))
    client.allocate("alice", "api", 10, "requests", resource="search")


def test_balance_table_and_json(env: dict[str, str], alice: None) -> None:
    table = run(env, "balance", "alice")
    assert table.exit_code == 0, table.output
    assert "998.4" in table.output and "search" in table.output

    rows = as_json(run(env, "balance", "alice", "--json"))
    by_type = {r["event_type"]: r for r in rows}
    assert by_type["llm"]["balance"] == D("998.4") and by_type["llm"]["available"] == D("998.4")
    assert by_type["api"] == {
        "event_type": "api", "resource": "search", "unit": "requests",
        "balance": D(10), "reserved": D(0), "available": D(10),
    }  # fmt: skip

    assert as_json(run(env, "balance", "nobody", "--json")) == []
    other = run(env, "balance", "alice", "--namespace", "other")
    assert other.exit_code == 0 and "no accounts" in other.output


def test_usage_window(env: dict[str, str], alice: None) -> None:
    feb = as_json(
        run(env, "usage", "alice", "--from", "2026-02-01", "--to", "2026-03-01", "--json")
    )
    assert [(r["event_type"], r["total_consumed"], r["event_count"]) for r in feb] == [
        ("llm", D(2), 1)
    ]
    everything = as_json(run(env, "usage", "alice", "--json"))
    assert [(r["total_consumed"], r["event_count"]) for r in everything] == [(D("2.1"), 2)]
    table = run(env, "usage", "alice", "--to", "2026-02-01T00:00:00+00:00")
    assert table.exit_code == 0 and "0.1" in table.output and "2.1" not in table.output


def test_ledger_newest_first_filtered_and_limited(env: dict[str, str], alice: None) -> None:
    rows = as_json(run(env, "ledger", "alice", "--json"))
    assert len(rows) == 4
    times = [datetime.fromisoformat(r["event_time"]) for r in rows]
    assert times == sorted(times, reverse=True)
    llm = as_json(run(env, "ledger", "alice", "--event-type", "llm", "--json"))
    # by event time: the allocation is dated now, the consumptions January and February
    # 2026; balance_after follows the order they were recorded in
    assert [(r["entry_type"], r["amount"], r["balance_after"]) for r in llm] == [
        ("allocation", D("1000.5"), D("1000.5")),
        ("consumption", D(-2), D("998.4")),
        ("consumption", D("-0.1"), D("1000.4")),
    ]
    assert len(as_json(run(env, "ledger", "alice", "--limit", "1", "--json"))) == 1
    table = run(env, "ledger", "alice", "--unit", "requests")
    assert (
        table.exit_code == 0 and "allocation" in table.output and "consumption" not in table.output
    )


@pytest.mark.parametrize(
    "command",
    [("usage", "alice"), ("ledger", "alice"), ("ledger", "nobody"), ("ledger", "--pool")],
)
def test_from_after_to_is_a_usage_error_naming_the_option(
    env: dict[str, str], alice: None, snapshot: Any, command: tuple[str, ...]
) -> None:
    # It printed nothing found, as if nothing had happened in the window (`ledger` of a
    # user without accounts asks the database nothing, which refuses the window too).
    before = snapshot()
    for window in (("2026-03-01", "2026-02-01"), ("2026-02-10T00:00:00.000001", "2026-02-10")):
        swapped = run(env, *command, "--from", window[0], "--to", window[1])
        assert swapped.exit_code == EXIT_USAGE, swapped.output
        assert "'--from'" in swapped.stderr and "is after --to" in swapped.stderr
    assert snapshot() == before
    # --from = --to is the empty window [t, t), even of what happened at t
    empty = run(env, *command, "--from", "2026-02-10", "--to", "2026-02-10", "--json")
    assert as_json(empty) == []


def test_reconcile_exit_status_follows_the_findings(
    env: dict[str, str], alice: None, db: Any
) -> None:
    ok = run(env, "reconcile")
    assert ok.exit_code == 0 and "every account reconciles" in ok.output
    assert as_json(run(env, "reconcile", "--json")) == []

    db.execute("UPDATE meter.accounts SET balance = balance + 1 WHERE event_type = 'api'")
    bad = run(env, "reconcile")
    assert bad.exit_code == EXIT_PROBLEMS and "balance_mismatch" in bad.output
    issues = as_json(run(env, "reconcile", "--json"))
    assert [(i["issue_type"], i["discrepancy"]) for i in issues] == [("balance_mismatch", D(1))]
    # another namespace is not affected
    assert run(env, "reconcile", "--namespace", "other").exit_code == 0


def test_usage_errors_and_unreachable_database(env: dict[str, str]) -> None:
    assert run(env, "usage", "alice", "--from", "last tuesday").exit_code == EXIT_USAGE
    assert run(env, "ledger", "alice", "--limit", "0").exit_code == EXIT_USAGE
    bad_user = run(env, "balance", " alice")  # leading white space: a ValidationError
    assert bad_user.exit_code == EXIT_USAGE and "user_id" in bad_user.output
    gone = {"METER_DATABASE_URL": UNREACHABLE_DB}
    for command in (["balance", "alice"], ["reconcile"], ["ledger", "alice"], ["migrate"]):
        assert run(gone, *command).exit_code == EXIT_UNREACHABLE, command


WHO = ("--actor", "ops:ana", "--reason", "ticket 7")
LLM = ("--event-type", "llm", "--unit", "tokens")


def test_grant_and_adjust_by_hand_record_who_and_why(
    env: dict[str, str], alice: None, client: Any
) -> None:
    granted = run(env, "grant", "--user", "alice", *LLM, "--amount", "100", *WHO)
    assert granted.exit_code == 0, granted.output
    assert "balance 1098.4" in granted.output
    [(entry, key)] = re.findall(
        r"ledger entry (\d+), idempotency key (\S+)$", granted.stdout.strip()
    )
    assert f"idempotency key {key} " in granted.stderr  # printed before the write
    assert "nothing written" not in granted.output
    # run again with the printed key: a replay, nothing new, and it says so
    replayed = run(env, "grant", "--user", "alice", *LLM, "--amount", "100", *WHO,
                   "--idempotency-key", key)  # fmt: skip
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout.startswith(f"nothing written: idempotency key {key} was used before")
    assert f"as ledger entry {entry} (balance then 1098.4)" in replayed.stdout
    again = as_json(
        run(env, "grant", "--user", "alice", *LLM, "--amount", "100", *WHO,
            "--idempotency-key", key, "--json")
    )  # fmt: skip
    assert again["balance"] == D("1098.4") and again["idempotency_key"] == key
    assert again["replayed"] is True and again["entry_id"] == int(entry)
    assert client.get_balance("alice", "llm", "tokens")["balance"] == D("1098.4")
    fix = as_json(
        run(env, "adjust", "--user", "alice", *LLM, "--amount=-0.4", *WHO, "--reference-id",
            str(again["entry_id"]), "--on-behalf-of", "alice", "--json")
    )  # fmt: skip
    assert fix["balance"] == D("1098") and fix["idempotency_key"] != key
    assert fix["replayed"] is False
    pool = as_json(run(env, "grant", "--pool", *LLM, "--amount", "5", *WHO, "--json"))
    assert pool["balance"] == D(5)

    assert client.get_balance("alice", "llm", "tokens")["balance"] == D("1098")
    events = client.get_audit_events(actor_id="ops:ana")
    assert sorted((e["kind"], e["amount"], e["user_id"]) for e in events) == [
        ("ledger.adjustment", D("-0.4"), "alice"),
        ("ledger.allocation", D(5), None),
        ("ledger.allocation", D(100), "alice"),
    ]
    assert {(e["reason"], e["on_behalf_of"]) for e in events} == {
        ("ticket 7", None), ("ticket 7", "alice")
    }  # fmt: skip


def test_grant_and_adjust_refusals_change_nothing(
    env: dict[str, str], alice: None, snapshot: Any
) -> None:
    before = snapshot()
    grant = ("grant", "--user", "alice", *LLM)
    for args, status, says in [
        ((*grant, "--amount", "1"), EXIT_USAGE, "--actor"),  # who and why are required
        ((*grant, "--amount", "1", "--actor", "ops:ana"), EXIT_USAGE, "--reason"),
        (("grant", "--user", "alice", "--pool", *LLM, "--amount", "1", *WHO), EXIT_USAGE,
         "either --user or --pool"),
        ((*grant, "--amount", "0", *WHO), EXIT_USAGE, "amount"),
        ((*grant, "--amount", "NaN", *WHO), EXIT_USAGE, "amount"),
        ((*grant, "--amount", "1", "--actor", " ana", "--reason", "x"), EXIT_USAGE, "actor_id"),
        ((*grant, "--amount", "1", "--actor", "", "--reason", "x"), EXIT_USAGE, "--actor"),
        ((*grant, "--amount", "1", "--actor", "ana", "--reason", " "), EXIT_USAGE, "--reason"),
        (("adjust", "--user", "alice", *LLM, "--amount", "1", *WHO, "--reference-id", "0"),
         EXIT_USAGE, "--reference-id"),
        (("adjust", "--user", "alice", *LLM, "--amount", "0", *WHO), EXIT_USAGE, "amount"),
        (("adjust", "--user", "alice", *LLM, "--amount", "1", *WHO, "--reference-id",
          "999999"), EXIT_PROBLEMS, "reference_id"),
    ]:  # fmt: skip
        result = run(env, *args)
        assert result.exit_code == status and says in result.output, (args, result.output)
    assert snapshot() == before
    first = run(env, *grant, "--amount", "1", *WHO, "--idempotency-key", "g1")
    assert first.exit_code == 0
    after = snapshot()
    other = run(env, *grant, "--amount", "2", *WHO, "--idempotency-key", "g1")
    assert other.exit_code == EXIT_PROBLEMS and "idempotency_key" in other.output
    assert snapshot() == after
    gone = run({"METER_DATABASE_URL": UNREACHABLE_DB}, *grant, "--amount", "1", *WHO)
    assert gone.exit_code == EXIT_UNREACHABLE and "idempotency key" in gone.stderr
    assert "if unsure whether it was written" not in gone.stderr  # it cannot have been
    malformed = run({"METER_DATABASE_URL": "host=x port"}, *grant, "--amount", "1", *WHO)
    assert malformed.exit_code == EXIT_USAGE and "database_url" in malformed.stderr
    # a replay of a key another command used is a conflict, not a replay
    adjusted = run(env, "adjust", "--user", "alice", *LLM, "--amount", "1", *WHO,
                   "--idempotency-key", "g1")  # fmt: skip
    assert adjusted.exit_code == EXIT_PROBLEMS and "idempotency_key" in adjusted.output
    assert snapshot() == after


def test_a_grant_whose_commit_was_not_heard_names_the_key_that_counts_it_once(
    db_url: str, client: Any
) -> None:
    # The connection is cut after the server committed, before the CLI heard it: the
    # operator is told how to find out safely, and doing so writes nothing more.
    cutter = ReplyCutter(db_url)
    try:
        cutter.cut_reply_to(b"COMMIT")
        lost = run({"METER_DATABASE_URL": cutter.url}, "grant", "--user", "bob", *LLM,
                   "--amount", "7", *WHO)  # fmt: skip
    finally:
        cutter.close()
    assert cutter.cuts == 1 and lost.exit_code == EXIT_UNREACHABLE, lost.output
    [key] = re.findall(r"run the command again with --idempotency-key (\S+): it counts once",
                       lost.stderr)  # fmt: skip
    assert client.get_balance("bob", "llm", "tokens")["balance"] == D(7)  # it was written
    again = as_json(run({"METER_DATABASE_URL": db_url}, "grant", "--user", "bob", *LLM,
                        "--amount", "7", *WHO, "--idempotency-key", key, "--json"))  # fmt: skip
    assert again["replayed"] is True and again["balance"] == D(7)
    assert client.get_balance("bob", "llm", "tokens")["balance"] == D(7)


def test_a_dead_letter_retry_whose_reply_was_lost_exits_3_and_runs_again_safely(
    db_url: str, db: Any, client: Any
) -> None:
    # The connection was lost under the retry, after the server had applied it: the CLI
    # exited 1, which the documented statuses and `retry`'s help keep for "a retry
    # failed", with the dead letter waiting; here it was applied. Exit 3, as every command
    # that loses its database; run again, it finds nothing to retry and applies nothing.
    client.allocate("bob", "llm", 10, "tokens")
    payload = {"op": "consume", "namespace": "default",
               "args": {"user_id": "bob", "event_type": "llm", "amount": "3", "unit": "tokens",
                        "idempotency_key": "lost-reply"}}  # fmt: skip
    letter = db.execute(
        "SELECT meter.record_dead_letter('consume', %s::jsonb, 'MT001', 'x', NULL, 'default')"
        " AS id",
        (json.dumps(payload),),
    ).fetchone()["id"]
    cutter = ReplyCutter(db_url)
    try:
        cutter.cut_reply_to(b"retry_dead_letter")
        lost = run({"METER_DATABASE_URL": cutter.url}, "dead-letters", "retry", str(letter))
    finally:
        cutter.close()
    assert cutter.cuts == 1 and lost.exit_code == EXIT_UNREACHABLE, lost.output
    assert "still failing" not in lost.output
    assert client.get_balance("bob", "llm", "tokens")["balance"] == D(7)  # it was applied
    again = run({"METER_DATABASE_URL": db_url}, "dead-letters", "retry", str(letter))
    assert again.exit_code == EXIT_PROBLEMS and "no dead letter" in again.stderr
    assert client.get_balance("bob", "llm", "tokens")["balance"] == D(7)


def test_a_grant_that_meets_its_key_claimed_concurrently_runs_again_and_replays(
    db_url: str, client: Any
) -> None:
    # A batch's fast path claims keys without the key's lock: a grant with the same key
    # waits on the key row, then fails with 40001 and is rolled back whole. Run again by
    # the command, it replays the batch's event.
    import threading

    from psycopg.types.json import Jsonb

    def event(user: str, key: str) -> dict[str, Any]:
        return {"op": "allocate", "namespace": "default",
                "args": {"user_id": user, "event_type": "llm", "amount": "2",
                         "unit": "tokens", "idempotency_key": key}}  # fmt: skip

    holder = psycopg.connect(db_url)
    try:
        holder.execute(
            "SELECT * FROM meter.apply_events(%s, NULL, true)",
            (Jsonb([event("carol", "kb"), event("dave", "other")]),),
        ).fetchall()
        threading.Timer(1.0, holder.commit).start()
        granted = run({"METER_DATABASE_URL": db_url}, "grant", "--user", "carol", *LLM,
                      "--amount", "2", *WHO, "--idempotency-key", "kb", "--json")  # fmt: skip
    finally:
        holder.close()
    assert as_json(granted)["replayed"] is True, granted.output
    assert client.get_balance("carol", "llm", "tokens")["balance"] == D(2)


def test_a_grant_on_a_schema_behind_the_command_or_a_bad_url_writes_nothing(
    db_url: str, db: Any, snapshot: Any
) -> None:
    # Before sql/027 a replay cannot be told from a write: the command refuses to guess.
    newest = db.execute(
        "DELETE FROM meter.schema_migrations WHERE version = (SELECT max(version) "
        "FROM meter.schema_migrations WHERE version ~ '^[0-9]') RETURNING version"
    ).fetchone()["version"]
    before = snapshot()
    behind = run({"METER_DATABASE_URL": db_url}, "grant", "--user", "erin", *LLM,
                 "--amount", "1", *WHO)  # fmt: skip
    assert behind.exit_code == EXIT_PROBLEMS, behind.output
    assert f"not applied, from {newest}): run `meter migrate` first" in behind.stderr
    bad = run({"METER_DATABASE_URL": db_url + "?connect_timeout=abc"}, "grant", "--user",
              "erin", *LLM, "--amount", "1", *WHO)  # fmt: skip
    assert bad.exit_code == EXIT_USAGE and "database_url" in bad.stderr, bad.output
    assert snapshot() == before


def test_a_replay_setting_left_on_by_default_does_not_pass_a_write_for_a_replay(
    db_url: str, db: Any, client: Any
) -> None:
    name = db.execute("SELECT current_database() AS d").fetchone()["d"]
    db.execute(f'ALTER DATABASE "{name}" SET meter.replayed = on')
    fresh = as_json(run({"METER_DATABASE_URL": db_url}, "grant", "--user", "frank", *LLM,
                        "--amount", "3", *WHO, "--json"))  # fmt: skip
    assert fresh["replayed"] is False and fresh["balance"] == D(3)


def test_grant_prints_names_as_they_are(env: dict[str, str], client: Any) -> None:
    # Names are the caller's: rich markup in them ([/], [bold]) is printed, not run.
    odd = ("--user", "[bold]al", "--event-type", "gpu[/]", "--unit", "{x}")
    result = run(env, "grant", *odd, "--amount", "+5.50", *WHO, "--namespace", "a[b]")
    assert result.exit_code == 0, result.output
    assert "granted 5.5 {x} (gpu[/]) for '[bold]al' in namespace 'a[b]'" in result.stdout
    taken = run(env, "adjust", *odd, "--amount", "-5", *WHO, "--namespace", "a[b]", "--json")
    assert as_json(taken)["balance"] == D("0.50")


def test_status_unreachable_is_exit_3(env: dict[str, str]) -> None:
    both = run(
        {"METER_DATABASE_URL": UNREACHABLE_DB, "METER_BROKER_URL": UNREACHABLE_BROKER},
        "status", "--json",
    )  # fmt: skip
    assert both.exit_code == EXIT_UNREACHABLE
    report = json.loads(both.stdout)
    assert report["healthy"] is False
    assert not report["database"]["reachable"] and not report["broker"]["reachable"]

    # The database answers, the broker does not: its figures are still there.
    half = run({**env, "METER_BROKER_URL": UNREACHABLE_BROKER}, "status", "--json")
    assert half.exit_code == EXIT_UNREACHABLE
    db = json.loads(half.stdout)["database"]
    assert db["reachable"] and db["pending_migrations"] == [] and db["dead_letters"] == 0


def test_status_json_has_every_figure_whatever_it_could_reach(
    env: dict[str, str], tmp_path: Any
) -> None:
    # A database out of reach reported "pending_migrations": [] (nothing pending), and
    # with none at all the document lacked every figure but url, reachable and error.
    seen = json.loads(run({**env, "METER_BROKER_URL": UNREACHABLE_BROKER}, "status", "--json")
                      .stdout)["database"]  # fmt: skip
    gone = run({"METER_DATABASE_URL": UNREACHABLE_DB, "METER_BROKER_URL": UNREACHABLE_BROKER},
               "status", "--json")  # fmt: skip
    nowhere = run({"METER_HOME": str(tmp_path / "none"), "METER_DATABASE_URL": None,  # type: ignore[dict-item]
                   "METER_BROKER_URL": UNREACHABLE_BROKER}, "status", "--json")  # fmt: skip
    for result in (gone, nowhere):
        assert result.exit_code == EXIT_UNREACHABLE, result.output
        db = json.loads(result.stdout)["database"]
        assert db.keys() == seen.keys()
        assert db["reachable"] is False and db["error"]
        assert db["pending_migrations"] is None and db["schema_version"] is None


def test_status_json_says_workers_unknown_when_the_broker_is_out_of_reach(
    env: dict[str, str],
) -> None:
    # Review C2: workers not asked (the broker out of reach) were reported as "alive": [],
    # "no worker answers", where the database's figures it could not read are null.
    result = run({**env, "METER_BROKER_URL": UNREACHABLE_BROKER}, "status", "--json")
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    workers = json.loads(result.stdout)["workers"]
    assert workers["alive"] is None and workers["error"] == "broker unreachable"


def test_status_json_says_why_the_embedded_server_gave_no_database(tmp_path: Any) -> None:
    # Review C2: an embedded server that would not start was reported as "no database: set
    # METER_DATABASE_URL or --database-url", as if there were none to look at.
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "PG_VERSION").write_text("9\n")  # a data folder it cannot start
    env = {"METER_HOME": str(tmp_path), "METER_DATABASE_URL": None,
           "METER_BROKER_URL": UNREACHABLE_BROKER}  # fmt: skip
    result = run(env, "status", "--json")  # type: ignore[arg-type]
    assert result.exit_code == EXIT_UNREACHABLE, result.output
    db = json.loads(result.stdout)["database"]
    assert db["reachable"] is False and db["url"] is None
    assert db["error"].startswith("the embedded server did not start: "), db["error"]


def test_status_without_worker_is_unhealthy(env: dict[str, str], broker_url: str) -> None:
    result = run({**env, "METER_BROKER_URL": broker_url}, "status", "--timeout", "0.3")
    assert result.exit_code == EXIT_PROBLEMS, result.output
    assert "no worker answered" in result.output


def test_status_healthy_then_failed_beat_run_then_dead_letter(
    env: dict[str, str], broker_url: str, pipeline: Any, make_producer: Any, db: Any
) -> None:
    env = {**env, "METER_BROKER_URL": broker_url}
    healthy = run(env, "status")
    assert healthy.exit_code == 0, healthy.output
    assert "healthy" in healthy.output
    report = json.loads(run(env, "status", "--json").stdout)
    assert report["healthy"] and report["problems"] == []
    assert report["broker"]["queue_depth"] == 0 and report["broker"]["unacked"] == 0
    assert len(report["workers"]["alive"]) == 1
    assert report["database"]["maintenance"] == []  # beat has not run here

    # A periodic task whose last run failed is a problem until a later run succeeds.
    db.execute("SELECT meter.record_maintenance_run('meter.roll_periods', false, NULL, 'boom')")
    failed = run(env, "status")
    assert failed.exit_code == EXIT_PROBLEMS
    assert "periodic task meter.roll_periods failed: boom" in failed.output
    assert "meter.roll_periods" in failed.output  # the beat runs table
    db.execute(
        """SELECT meter.record_maintenance_run('meter.roll_periods', true, '{"rolled": 0}')"""
    )
    assert run(env, "status").exit_code == 0

    # A conflicting event: dead-lettered, and status says so (exit 1).
    p = make_producer(results=True)
    p.allocate("u1", "llm", 1, "tok", idempotency_key="k").wait()
    with pytest.raises(Exception, match="idempotency"):
        p.allocate("u1", "llm", 2, "tok", idempotency_key="k").wait()
    after = run(env, "status", "--json")
    assert after.exit_code == EXIT_PROBLEMS
    report = json.loads(after.stdout)
    assert report["database"]["dead_letters"] == 1
    assert any("dead letter" in p for p in report["problems"])


def test_json_output_of_metadata_nested_as_deep_as_postgresql_takes(env, db) -> None:
    """Metadata written through SQL nests as deep as PostgreSQL parses (the 64 KiB bound
    leaves some 9,000 levels of objects, 14,000 of arrays), and an event refused into the
    dead letters carries what it was sent with. ``--json`` used to walk it past Python's
    recursion limit: a RecursionError traceback instead of the output."""
    objects = '{"a":' * 9000 + "1" + "}" * 9000
    arrays = '{"a":' + "[" * 14000 + "]" * 14000 + "}"
    for metadata in (objects, arrays):
        db.execute(
            "SELECT meter.allocate(p_user_id => 'deep', p_event_type => 'e', p_amount => 1,"
            " p_unit => 'u', p_metadata => %s::jsonb)",
            (metadata,),
        )
    db.execute(
        "SELECT meter.record_dead_letter('consume', %s::jsonb, 'MT001', 'too deep', NULL,"
        " 'default')",
        ('{"op": "consume", "namespace": "default", "args": ' + objects + "}",),
    )

    def depth(value: Any) -> int:
        levels = 0
        while isinstance(value, dict | list) and value:
            value = value["a"] if isinstance(value, dict) else value[0]
            levels += 1
        return levels

    rows = as_json(run(env, "ledger", "deep", "--json"))
    assert sorted(depth(r["metadata"]) for r in rows) == [9000, 14000]
    (letter,) = as_json(run(env, "dead-letters", "list", "--json"))
    assert depth(letter["payload"]["args"]) == 9000
    table = run(env, "dead-letters", "list")
    assert table.exit_code == 0, table.output
    assert sys.getrecursionlimit() < 100_000  # raised for the output only


@pytest.mark.parametrize(
    "args",
    [("balance", "bob"), ("periods", "show", "bob"), ("dead-letters", "list"), ("migrate",)],
)
def test_every_command_takes_a_malformed_url_for_a_usage_error(args: tuple[str, ...]) -> None:
    # periods show exited 1 and the dead-letter commands 3 ("cannot connect") for what
    # `balance` and the documented statuses call a usage error; migrate, 1 with a traceback.
    malformed = run({"METER_DATABASE_URL": "host=x bogus=1"}, *args)
    assert malformed.exit_code == EXIT_USAGE and "invalid conninfo" in malformed.stderr
    gone = run({"METER_DATABASE_URL": UNREACHABLE_DB}, *args)
    assert gone.exit_code == EXIT_UNREACHABLE


GRANT_ARGS = ("grant", "--user", "u", "--event-type", "e", "--unit", "n", "--amount", "1",
              "--actor", "ops", "--reason", "r", "--idempotency-key", "k")  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ("status", "--timeout", "0.1"),
        ("usage", "bob"),
        ("ledger", "bob"),
        ("reconcile",),
        ("migrate",),
        ("demo", "--timeout", "1"),
        ("dead-letters", "retry", "1"),
        ("dead-letters", "discard", "1"),
        GRANT_ARGS,
    ],
)
def test_a_malformed_url_is_a_usage_error_naming_the_option(
    args: tuple[str, ...], broker_url: str
) -> None:
    # `status` took a malformed URL for an unreachable database (exit 3, "database
    # unreachable"), and the others named the SDK's or the runner's parameter ("conn:",
    # "conninfo:") rather than the option the operator typed.
    env = {"METER_DATABASE_URL": "host=x bogus=1", "METER_BROKER_URL": broker_url}
    result = run(env, *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "database_url: invalid conninfo" in result.stderr, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""  # nothing looked at: no status table, no demo


def test_up_says_in_its_help_that_it_uses_the_servers_of_the_environment() -> None:
    # Its help spoke of ./.meter only: with METER_DATABASE_URL exported (as the README has
    # an operator do in another shell), `meter up` migrates that database and writes its
    # demo traffic there.
    shown = run({}, "up", "--help")
    assert shown.exit_code == 0
    text = " ".join(shown.output.split())
    assert "$METER_DATABASE_URL or $METER_BROKER_URL set" in text
    assert "namespace 'demo'" in text


def test_the_help_of_database_url_says_where_the_default_server_is() -> None:
    # Every --help said "else an embedded server in ./.meter/pg": not that $METER_HOME
    # moves it, nor that it is started, nor, for status, that it is used only if it exists.
    for args in (("balance",), ("migrate",), ("dead-letters", "list"), ("status",)):
        text = " ".join(run({}, *args, "--help").output.split())
        assert "$METER_HOME/pg (./.meter/pg)" in text, (args, text)
        assert "started if it is not running" in text, (args, text)
        assert ("if that folder exists" in text) == (args == ("status",)), (args, text)


def test_demo_against_an_unreachable_database_says_so_once(broker_url: str) -> None:
    # The pool's own log lines came first ("error connecting in 'meter:demo': ..."), twice;
    # run as an operator would, since pytest's log capture hides them from CliRunner.
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo),
           "METER_DATABASE_URL": UNREACHABLE_DB, "METER_BROKER_URL": broker_url}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "meter", "demo", "--timeout", "1"],
        capture_output=True, text=True, cwd=repo, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert "error connecting in" not in proc.stderr
    assert proc.stderr.count("cannot connect to the database") == 1, proc.stderr


@pytest.mark.parametrize(
    "args",
    [("balance", "bob"), ("usage", "bob"), ("reconcile",), ("periods", "show", "bob"),
     ("dead-letters", "list"), ("dead-letters", "retry", "1"), ("dead-letters", "discard", "1")],
)  # fmt: skip
def test_a_database_not_migrated_is_named_as_such(args: tuple[str, ...], pg_server: Any) -> None:
    # They said only 'schema "meter" does not exist' (or 'function meter.... does not
    # exist' for a schema migrated by an older meter), and left the operator to guess.
    from psycopg import sql

    dbname = "meter_cli_bare_" + "_".join(args).replace("-", "_")
    name = sql.Identifier(dbname)
    with psycopg.connect(pg_server.url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(name))
        try:
            url = str(pg_server.url(dbname))
            result = run({"METER_DATABASE_URL": url}, *args)
            assert result.exit_code == EXIT_PROBLEMS, result.output
            assert "is the database migrated?" in result.stderr, result.output
            assert "meter migrate" in result.stderr
            with psycopg.connect(url) as conn:  # and nothing was made
                assert conn.execute("SELECT to_regnamespace('meter')").fetchone() == (None,)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))


def test_commands_read_a_database_whose_default_date_style_is_another(
    db_url: str, db: Any, client: Any
) -> None:
    # Times and intervals came back in the database's style, which psycopg cannot read.
    from datetime import date

    from psycopg.conninfo import make_conninfo

    client.set_period_config("bob", "llm", "tokens", None, date(2025, 1, 1), 100)
    client.open_period("bob", "llm", "tokens", None, date(2025, 1, 1))
    styled = {"METER_DATABASE_URL": make_conninfo(db_url, options="-c datestyle=German")}
    shown = run(styled, "periods", "show", "bob", "--json")
    assert shown.exit_code == 0, shown.output
    assert "2025-01-01" in shown.output
    db.execute(
        "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad', NULL, 'default')"
    )
    listed = run(styled, "dead-letters", "list")  # prints when each last failed
    assert listed.exit_code == 0, listed.output
    assert "MT001 bad" in listed.output


def test_invalid_input_to_dead_letters_and_keys_is_a_usage_error(
    env: dict[str, str], db: Any, snapshot: Any
) -> None:
    # These exited 1 ("a retry failed, an id unknown") for what every other command and
    # the documented statuses call a usage error (2): a ValidationError, nothing done.
    db.execute(
        "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad', NULL, 'default')"
    )
    before = snapshot()
    too_big = str(2**63)
    for args in (
        ("dead-letters", "retry", too_big),
        ("dead-letters", "discard", too_big),
        ("dead-letters", "list", "--namespace", " x"),
        ("dead-letters", "list", "--namespace", ""),
        ("keys", "derive", " x", "--secret", "s"),
        ("keys", "derive", "x", "--secret", ""),
    ):
        result = run(env, *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "error:" in result.stderr or "Error:" in result.stderr, (args, result.output)
    assert snapshot() == before


def test_status_that_cannot_check_is_not_healthy(
    env: dict[str, str], db: Any, app_url: str
) -> None:
    # As a role that may not count the dead letters (a meter_app member, no tenant) or
    # read beat's runs, status said "dead letters ok" and left both out of its problems:
    # a probe answered "healthy" for what it could not see. A role that may not read the
    # schema at all got a traceback.
    db.execute(
        "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001', 'bad', NULL, 'default')"
    )
    as_app = {"METER_DATABASE_URL": app_url, "METER_BROKER_URL": UNREACHABLE_BROKER}
    result = run(as_app, "status", "--json")
    assert result.exit_code == EXIT_UNREACHABLE, result.output  # the broker
    report = json.loads(result.stdout)
    assert report["database"]["reachable"] and report["database"]["dead_letters"] is None
    problems = [p for p in report["problems"] if not p.startswith("broker unreachable")]
    assert any(p.startswith("cannot check dead letters: namespace:") for p in problems), problems
    assert any("get_maintenance_runs" in p for p in problems), problems
    table = run(as_app, "status")
    assert re.search(r"dead letters\s+FAIL", table.stdout), table.output

    db.execute("REVOKE USAGE ON SCHEMA meter FROM meter_app")
    shut_out = run(as_app, "status", "--json")
    assert shut_out.exit_code == EXIT_UNREACHABLE, shut_out.output
    report = json.loads(shut_out.stdout)
    assert report["database"]["pending_migrations"] is None
    assert any("permission denied for schema meter" in p for p in report["problems"])
    assert re.search(r"schema\s+FAIL", run(as_app, "status").stdout)


def test_read_commands_print_names_in_titles_as_they_are(
    env: dict[str, str], make_client: Any, db: Any
) -> None:
    # The tables' titles ran the caller's names as rich markup: '[/x]' crashed the command
    # (MarkupError, a traceback) and '[bold]al' was shown as 'al', another user's name.
    from datetime import date

    ns = "n[bold]s"
    c = make_client(ns)
    for user in ("[/x]", "[bold]al"):
        c.allocate(user, "llm", 10, "tokens")
        c.consume(user, "llm", 1, "tokens")
        c.set_period_config(user, "llm", "tokens", None, date(2025, 1, 1), 100)
        c.open_period(user, "llm", "tokens", None, date(2025, 1, 1))
        for args, title in (
            (("balance", user), f"{user} ({ns})"),
            (("usage", user), f"usage of {user} ({ns})"),
            (("ledger", user), f"ledger of {user} ({ns}), newest first"),
            (("periods", "show", user), f"periods of {user!r} ({ns})"),
        ):
            result = run(env, *args, "--namespace", ns)
            assert result.exit_code == 0, (args, result.output)
            assert title in result.stdout, (args, result.stdout)
    db.execute("UPDATE meter.accounts SET balance = balance + 1 WHERE namespace = %s", (ns,))
    result = run(env, "reconcile", "--namespace", ns)
    assert result.exit_code == EXIT_PROBLEMS, result.output
    assert f"2 issue(s) in namespace {ns!r}" in result.stdout


def test_the_reads_show_the_namespace_pool(env: dict[str, str], client: Any) -> None:
    """grant and adjust write to the pool (--pool); balance and ledger read it (usage is
    consumption, which a pool never records: consume and reserve name a user)."""
    client.allocate(None, "llm", 50, "tokens")
    client.adjust(None, "llm", "-1.5", "tokens")
    client.allocate("alice", "llm", 7, "tokens")
    (row,) = as_json(run(env, "balance", "--pool", "--json"))
    assert (row["balance"], row["available"]) == (D("48.5"), D("48.5"))
    assert "48.5" in run(env, "balance", "--pool").output
    entries = as_json(run(env, "ledger", "--pool", "--json"))
    assert sorted(e["amount"] for e in entries) == [D("-1.5"), D(50)]
    table = run(env, "ledger", "--pool")
    assert table.exit_code == 0 and "ledger of the pool" in table.output
    assert "no accounts for the pool" in run(env, "balance", "--pool", "--namespace", "x").output
    for command in ("balance", "ledger"):  # one of USER and --pool, not both
        for args in ((), ("alice", "--pool")):
            assert run(env, command, *args).exit_code == EXIT_USAGE


def test_small_amounts_and_zeros_of_many_places_are_printed_in_plain_digits(
    env: dict[str, str], client: Any
) -> None:
    # str(Decimal) writes exponents below 1e-6: a balance of 0.0000005 was printed as
    # 5E-7 and one spent to nothing (0.0000000) as 0E-7.
    client.allocate("bob", "llm", "0.0000005", "tokens")
    client.allocate("bob", "llm", "0.0000001", "tokens", resource="r")
    client.consume("bob", "llm", "0.0000001", "tokens", resource="r")
    granted = run(env, "grant", "--user", "bob", *LLM, "--amount", "1e-7", *WHO)
    assert granted.exit_code == 0, granted.output
    assert "granted 0.0000001 tokens" in granted.stdout
    assert "balance 0.0000006," in granted.stdout
    table = run(env, "balance", "bob")
    assert table.exit_code == 0, table.output
    assert "0.0000006" in table.output and "0.0000000" in table.output
    ledger = run(env, "ledger", "bob", "--event-type", "llm", "--unit", "tokens")
    assert ledger.exit_code == 0, ledger.output
    assert "0.0000005" in ledger.output
    for output in (granted.stdout, table.output, ledger.output):
        assert "E-" not in output


def _with_port(url: str, port: str) -> str:
    return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{port}/", url, count=1)


@pytest.fixture
def service_file(tmp_path: Any) -> dict[str, str]:
    """A libpq service file of our own: one service, with an option libpq does not know."""
    path = tmp_path / "pg_service.conf"
    path.write_text("[meter_odd]\nno_such_option=1\n")
    return {"PGSERVICEFILE": str(path)}


REFUSED_VALUES = {
    "a port that is no number": lambda url: _with_port(url, "abc"),
    "a port out of range": lambda url: _with_port(url, "99999"),
    "an sslmode libpq does not know": lambda url: url + "?sslmode=bogus",
    "a target_session_attrs libpq does not know": lambda url: url + "?target_session_attrs=x",
    "a service not defined": lambda url: url + "?service=meter_no_such_service",
    "a service with an unknown option": lambda url: url + "?service=meter_odd",
}


@pytest.mark.parametrize("bad", list(REFUSED_VALUES))
def test_a_url_with_a_value_libpq_refuses_is_a_usage_error_naming_the_option(
    bad: str, db_url: str, service_file: dict[str, str], snapshot: Any
) -> None:
    # Syntax was checked, values were not: each of these failed only at connect, and was
    # taken for a database out of reach (exit 3, "cannot connect"), the port's as a host
    # that could not be resolved. Each URL names the test database, which stays as it was.
    env = {**service_file, "METER_DATABASE_URL": REFUSED_VALUES[bad](db_url),
           "METER_BROKER_URL": UNREACHABLE_BROKER}  # fmt: skip
    before = snapshot()
    for args in (("balance", "bob"), ("migrate",), ("status", "--timeout", "0.1"),
                 ("dead-letters", "list"), GRANT_ARGS):  # fmt: skip
        result = run(env, *args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "database_url: invalid conninfo" in result.stderr, (args, result.output)
        assert "Traceback" not in result.output
    assert snapshot() == before


def test_status_keeps_the_connect_timeout_of_the_url(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # status connected with connect_timeout=5 whatever the URL said.
    used: list[str | None] = []
    connect = psycopg.connect

    def recording(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        used.append(conn.info.get_parameters().get("connect_timeout"))
        return conn

    monkeypatch.setattr(psycopg, "connect", recording)
    for url, expected in ((db_url + "?connect_timeout=17", "17"), (db_url, "5")):
        env = {"METER_DATABASE_URL": url, "METER_BROKER_URL": UNREACHABLE_BROKER}
        result = run(env, "status", "--json")
        assert result.exit_code == EXIT_UNREACHABLE, result.output  # the broker
        assert json.loads(result.stdout)["database"]["reachable"] is True
        assert used.pop() == expected


@pytest.mark.parametrize("url", ["host=x bogus=1", "sslmode"])
def test_status_json_reports_a_malformed_url_as_a_document_too(url: str, db_url: str) -> None:
    # --json printed nothing on stdout for a malformed URL: a probe's script read no
    # document, where every other outcome gives one.
    url = db_url + "?sslmode=bogus" if url == "sslmode" else url
    seen = json.loads(run({"METER_DATABASE_URL": db_url, "METER_BROKER_URL": UNREACHABLE_BROKER},
                          "status", "--json").stdout)  # fmt: skip
    result = run({"METER_DATABASE_URL": url, "METER_BROKER_URL": UNREACHABLE_BROKER},
                 "status", "--json")  # fmt: skip
    assert result.exit_code == EXIT_USAGE, result.output
    assert "database_url: invalid conninfo" in result.stderr
    report = json.loads(result.stdout)
    assert report.keys() == seen.keys()
    assert report["database"].keys() == seen["database"].keys()
    assert report["healthy"] is False and report["database"]["reachable"] is False
    assert report["database"]["url"] is None  # not shown: its password might not be hidden
    assert report["database"]["error"].startswith("database_url: invalid conninfo")
    assert report["problems"][0].startswith("database not looked at: database_url: invalid")


def test_status_json_of_a_malformed_url_does_not_carry_its_password() -> None:
    # The document's error quoted libpq's message whole, and libpq quotes the piece of the
    # URL it could not read: a password with a stray '%' went into status.json.
    url = "postgresql://meter:s3cr%zzet@127.0.0.1/meter"
    result = run({"METER_DATABASE_URL": url, "METER_BROKER_URL": UNREACHABLE_BROKER},
                 "status", "--json")  # fmt: skip
    assert result.exit_code == EXIT_USAGE, result.output
    report = json.loads(result.stdout)
    assert report["database"]["error"].startswith("database_url: invalid conninfo")
    assert "s3cr" not in result.stdout


@pytest.fixture
def silent_server() -> Any:
    """A TCP port that takes connections and never answers, as a host behind a firewall
    that drops its replies would: libpq waits for the server's first message."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener.getsockname()[1]
    listener.close()


def test_migrate_gives_up_on_a_server_that_does_not_answer(silent_server: int) -> None:
    # migrate set no connect_timeout: it waited psycopg's default of 130 s (libpq alone:
    # the system's TCP timeout, minutes) for a server that never answered.
    import os
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    url = f"postgresql://postgres@127.0.0.1:{silent_server}/meter"
    for given, within in ((url, 40.0), (url + "?connect_timeout=2", 9.0)):
        env = {**os.environ, "PYTHONPATH": str(repo), "METER_DATABASE_URL": given}
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "meter", "migrate"],
            capture_output=True, text=True, cwd=repo, env=env, timeout=60, check=False,
        )  # fmt: skip
        took = time.monotonic() - started
        assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
        assert "cannot connect to the database to migrate" in proc.stderr, proc.stderr
        assert took < within, (given, took)  # the URL's own timeout kept, not the default


def test_telling_a_refused_value_from_an_outage_adds_no_wait_for_a_silent_server(
    silent_server: int,
) -> None:
    # The ping that tells a value libpq refuses from a server out of reach tried the
    # server once more, 2 s an address: an outage's error (the SDK's pool probe, the CLI,
    # migrate) came 2 s an address later than the connect_timeout it was given.
    import time

    from meter import types as t

    for hosts in (1, 3):
        url = (f"host={','.join(['127.0.0.1'] * hosts)} port={silent_server} "
               "dbname=meter user=postgres connect_timeout=2")  # fmt: skip
        started = time.monotonic()
        assert t.refused_conninfo(url, "conn", psycopg.OperationalError("timeout")) is None
        assert time.monotonic() - started < 1.0, hosts


@pytest.mark.parametrize("bad_port", ["abc", "0", "99999"])
def test_a_port_list_with_one_bad_port_is_not_refused(
    bad_port: str, db_url: str, snapshot: Any
) -> None:
    # Each port of a list was checked alone: host=a,b port=abc,5432 was refused (exit 2),
    # where psycopg and libpq fail the first host's attempt and connect to the second.
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from meter import MeterClient

    params = conninfo_to_dict(db_url)
    host = params.get("host") or "127.0.0.1"
    url = make_conninfo(db_url, host=f"{host},{host}", port=f"{bad_port},{params['port']}")
    psycopg.connect(url).close()  # libpq's and psycopg's word
    with MeterClient(url) as client:
        assert client.get_periods("nobody") == []
    before = snapshot()
    for args in (("migrate",), ("dead-letters", "list")):
        result = run({"METER_DATABASE_URL": url}, *args)
        assert result.exit_code == 0, (args, result.output)
    assert snapshot() == before


def test_migrate_keeps_pgconnect_timeout(silent_server: int) -> None:
    # migrate's default of 10 s was passed as connect_timeout, which overrode the
    # PGCONNECT_TIMEOUT libpq and psycopg read when the URL sets none: a migrate that
    # waited the operator's 2 s before a67c249 waited 10.
    import os
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "PGCONNECT_TIMEOUT": "2",
           "METER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{silent_server}/meter"}  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meter", "migrate"],
        capture_output=True, text=True, cwd=repo, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert time.monotonic() - started < 8.0
