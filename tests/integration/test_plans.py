"""Query plans of the per-user reads stay index-driven and month-pruned as the ledger grows.

A moderate ledger (24,000 rows over 12 monthly partitions, 2,000 accounts, generated
set-based by ``bench/growth.sql`` and ANALYZEd) is enough for the planner to choose as it
would at scale. The plans checked are the real ones: the statements *inside* the
``meter.*`` functions, captured with ``auto_explain`` (``log_nested_statements``, JSON
format) while each function is called as the SDK calls it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fix_db import _suffix, cloned_database

NS = "growth"
ACCOUNTS = 2000
ROWS = 24000
MONTHS = 12
GENERATOR = Path(__file__).resolve().parents[2] / "bench" / "growth.sql"


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _month(offset: int) -> tuple[datetime, datetime]:
    """[start, end) of the month ``offset`` months before the current one (UTC)."""
    now = datetime.now(UTC)
    y, m = now.year, now.month - offset
    while m < 1:
        y, m = y - 1, m + 12
    start = datetime(y, m, 1, tzinfo=UTC)
    end = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)
    return start, end


@pytest.fixture(scope="module")
def ledger_db(
    pg_server: Any, _admin: psycopg.Connection[Any], meter_template: str
) -> Iterator[str]:
    """A database cloned from the template with the generated ledger, shared by this
    module's tests (they only read); dropped afterwards."""
    name = "meter_plans" + _suffix()
    with cloned_database(_admin, meter_template, name):
        with psycopg.connect(pg_server.url(name), autocommit=True) as conn:
            conn.execute(GENERATOR.read_text())
            conn.execute(
                "SELECT pg_temp.bench_populate(%s, %s, %s, %s)", (NS, ACCOUNTS, ROWS, MONTHS)
            )
            conn.execute("ANALYZE meter.accounts, meter.ledger")
            # the data is consistent, as the generator promises
            assert conn.execute("SELECT count(*) FROM meter.reconcile(%s)", (NS,)).fetchone() == (
                0,
            )
        yield pg_server.url(name)


@pytest.fixture
def plans(ledger_db: str) -> Iterator[Any]:
    """``plans(sql, params) -> [plan of each statement run inside the call that reads
    meter.ledger or meter.accounts]``, on the generated ledger."""
    with psycopg.connect(ledger_db, autocommit=True) as db:
        db.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
            ("client_min_messages", "notice"),
        ):
            db.execute(f"SET {setting} = {value}")
        captured: list[str] = []
        db.add_notice_handler(lambda diag: captured.append(diag.message_primary or ""))

        def run(query: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
            captured.clear()
            db.execute(query, params).fetchall()
            out = []
            for message in captured:
                start = message.find("{")
                if start < 0:
                    continue
                doc = json.loads(message[start:])
                text = doc.get("Query Text", "")
                if "meter.ledger" in text or "meter.accounts" in text:
                    out.append(doc["Plan"])
            assert out, f"no inner statement captured for {query}"
            return out

        yield run


def _ledger_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in _nodes(plan) if str(n.get("Relation Name", "")).startswith("ledger_")]


def _check_indexed(plans: list[dict[str, Any]], max_partitions: int) -> None:
    for plan in plans:
        scans = _ledger_scans(plan)
        seq = [n["Relation Name"] for n in scans if n["Node Type"] == "Seq Scan"]
        assert not seq, f"sequential scan of ledger partitions {seq}: {json.dumps(plan)}"
        partitions = {n["Relation Name"] for n in scans}
        assert len(partitions) <= max_partitions, f"not pruned: {sorted(partitions)}"
        accounts = [n for n in _nodes(plan) if n.get("Relation Name") == "accounts"]
        assert all(n["Node Type"] != "Seq Scan" for n in accounts), json.dumps(plan)


def test_get_balance_probes_the_account_key(plans: Any) -> None:
    found = plans("SELECT * FROM meter.get_balance('g7', 'tokens', 'tok', NULL, %s)", (NS,))
    _check_indexed(found, 0)
    assert any(n.get("Index Name") == "accounts_key" for p in found for n in _nodes(p)), json.dumps(
        found
    )


def test_get_usage_of_one_month_reads_one_partition_by_index(plans: Any) -> None:
    start, end = _month(3)
    found = plans("SELECT * FROM meter.get_usage('g7', %s, %s, %s)", (start, end, NS))
    _check_indexed(found, 1)
    assert any(_ledger_scans(p) for p in found)


def test_get_ledger_pages_use_the_account_time_index(plans: Any) -> None:
    first = plans(
        "SELECT * FROM meter.get_ledger('g7', 'tokens', 'tok', NULL, NULL, NULL, 5, %s)", (NS,)
    )
    # newest first with no time bound: a merge of every partition's index, each read only
    # as far as the LIMIT needs
    _check_indexed(first, 100)
    # a deep page: entries before a point ten months back (keyset paging by end time)
    _, before = _month(10)
    deep = plans(
        "SELECT * FROM meter.get_ledger('g7', 'tokens', 'tok', NULL, NULL, %s, 5, %s)",
        (before, NS),
    )
    _check_indexed(deep, 2)
    # the same page continued after an entry of that time (062's cursor)
    cursor = plans(
        "SELECT * FROM meter.get_ledger('g7', 'tokens', 'tok', NULL, NULL, %s, 5, %s, %s)",
        (before, NS, 2**62),
    )
    # plus the month that the cursor's instant, a month's first, begins
    _check_indexed(cursor, 3)
    for plan in first + deep + cursor:
        names = {n.get("Index Name") for n in _ledger_scans(plan)}
        assert names <= {None} | {n for n in names if n and "account_id" in n}, names


def test_get_namespace_usage_of_one_month_prunes_to_that_month(plans: Any) -> None:
    start, end = _month(2)
    found = plans("SELECT * FROM meter.get_namespace_usage(%s, %s, %s)", (start, end, NS))
    # the whole month is read (every row counts), but only that month's partition
    for plan in found:
        partitions = {n["Relation Name"] for n in _ledger_scans(plan)}
        assert len(partitions) == 1, sorted(partitions)


def test_reconcile_reads_each_partition_once(plans: Any) -> None:
    found = plans("SELECT * FROM meter.reconcile(%s)", (NS,))
    # reconcile sums every ledger row of the namespace: one pass, never per account
    for plan in found:
        scans = _ledger_scans(plan)
        names = [n["Relation Name"] for n in scans]
        assert len(names) == len(set(names)), names
        assert all(n.get("Actual Loops", 1) <= 1 for n in scans), names


def test_the_request_fingerprint_is_inlined(db: psycopg.Connection[Any]) -> None:
    """meter._hash runs once per keyed event: as a SQL function it must stay inlinable
    (no more volatile than its body), or every event pays a function call."""
    plan = "\n".join(
        row["QUERY PLAN"]
        for row in db.execute("EXPLAIN (VERBOSE, COSTS OFF) SELECT meter._hash('a', NULL, 'b')")
    )
    assert "md5(array_to_string(" in plan, plan
    assert "_hash" not in plan, plan
