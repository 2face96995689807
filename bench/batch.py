"""Set-based batch apply: ``meter.apply_events`` events/s next to its two baselines.

For batches of 100, 1000 and 10000 mixed events (70% consume, 20% allocate, 10% adjust,
each with its own idempotency key) on distinct accounts or on 10 hot accounts:

``batch``       one ``SELECT ... FROM meter.apply_events(<the batch>)``, one transaction;
``one by one``  the same kind of events, one ``apply_events`` call (and transaction) each:
                what the pipeline does with one event per message;
``COPY``        ``COPY`` of the same number of rows into an unindexed table, one
                transaction: the ceiling for getting that many rows into PostgreSQL.

Times are wall-clock from the client, commit included; the JSON (or COPY text) is built
before the clock starts. ``events/s`` is the batch size over the median time of the
rounds. Targets: >= 50,000 events/s at batch 1000 and within 4x of the COPY ceiling.

``python -m bench --only batch`` (or ``python -m bench.batch``) runs it on a fresh durable
embedded PostgreSQL (or ``--database-url``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from bench import common
from bench.sql_ops import bench_database, checkpoint

NAMESPACE: Final = "bench"
EVENT_TYPE: Final = "tokens"
UNIT: Final = "tok"
N_ACCOUNTS: Final = 20000
HOT_ACCOUNTS: Final = 10
SCHEMA: Final = "bench_baseline"
SIZES: Final = (100, 1000, 10000)
MODES: Final = ("distinct", "hot")
TARGET_RATE: Final = 50_000
TARGET_COPY_RATIO: Final = 4.0

_keys = itertools.count(1)


@dataclass
class Row:
    """One batch size x account mode."""

    size: int
    mode: str
    batch_s: list[float] = field(default_factory=list)
    batch_cpu_s: list[float] = field(default_factory=list)  # the backend's CPU time
    single_s: list[float] = field(default_factory=list)  # per event
    copy_s: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    @property
    def batch_rate(self) -> float:
        return self.size / common.median(self.batch_s)

    @property
    def cpu_rate(self) -> float:
        return self.size / common.median(self.batch_cpu_s) if self.batch_cpu_s else float("nan")

    @property
    def single_rate(self) -> float:
        return 1.0 / common.median(self.single_s) if self.single_s else float("nan")

    @property
    def copy_rate(self) -> float:
        return self.size / common.median(self.copy_s)


def events(size: int, mode: str, run_id: str) -> list[dict[str, Any]]:
    """``size`` mixed events with fresh keys; accounts spread (distinct) or 10 hot ones."""
    out = []
    for i in range(size):
        user = f"h{i % HOT_ACCOUNTS}" if mode == "hot" else f"d{i % N_ACCOUNTS}"
        r = i % 10
        op, amount = ("allocate", "5") if r < 2 else ("adjust", "-0.5") if r == 2 else (
            "consume", "1.25")  # fmt: skip
        out.append(
            {
                "op": op,
                "namespace": NAMESPACE,
                "args": {
                    "user_id": user,
                    "event_type": EVENT_TYPE,
                    "amount": amount,
                    "unit": UNIT,
                    "idempotency_key": f"{run_id}-{next(_keys)}",
                },
            }
        )
    return out


def prepare(conninfo: str) -> None:
    """Migrate, create the COPY target and the accounts (set-based, consistent)."""
    from meter import migrate

    migrate(conninfo)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.copy_rows (account text, op text,"
            " amount numeric, idempotency_key text)"
        )
        with conn.transaction():
            conn.execute("SELECT meter.set_tenant(%s)", (NAMESPACE,))
            # Through the API, so balances and ledger agree (reconcile stays empty).
            conn.execute(
                "SELECT count(*) FROM meter.apply_events(("
                " SELECT jsonb_agg(jsonb_build_object('op', 'allocate', 'namespace', %s::text,"
                "   'args', jsonb_build_object('user_id', u, 'event_type', %s::text, 'amount', '1000000',"
                "   'unit', %s::text)))"
                " FROM (SELECT 'd' || g AS u FROM generate_series(0, %s - 1) g"
                "       UNION ALL SELECT 'h' || g FROM generate_series(0, %s - 1) g) s))",
                (NAMESPACE, EVENT_TYPE, UNIT, N_ACCOUNTS, HOT_ACCOUNTS),
            )
            conn.execute("SELECT meter.clear_tenant()")
        conn.execute("ANALYZE")


def _copy_text(evs: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    for e in evs:
        a = e["args"]
        buf.write(f"{a['user_id']}\t{e['op']}\t{a['amount']}\t{a['idempotency_key']}\n")
    return buf.getvalue().encode()


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds the server backend has used (Linux, server on this machine), else None.

    Less sensitive than wall time to the other jobs of a shared box (the backend may wait
    for a CPU, but its CPU time is its own work).
    """
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def measure(conninfo: str, size: int, mode: str, rounds: int, single_cap: int) -> Row:
    row = Row(size, mode)
    sql = "SELECT count(*) FROM meter.apply_events(%s::jsonb, NULL)"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        pid = conn.info.backend_pid
        for r in range(rounds):
            row.load.append(common.loadavg())
            payload = json.dumps(events(size, mode, f"b{size}{mode}{r}{time.time_ns()}"))
            cpu = _backend_cpu(pid)
            t = time.perf_counter()
            n = conn.execute(sql, (payload,)).fetchone()
            row.batch_s.append(time.perf_counter() - t)
            after = _backend_cpu(pid)
            if cpu is not None and after is not None:
                row.batch_cpu_s.append(after - cpu)
            assert n is not None and n[0] == size
            text = _copy_text(events(size, mode, "copy"))
            t = time.perf_counter()
            with conn.cursor().copy(
                f"COPY {SCHEMA}.copy_rows (account, op, amount, idempotency_key) FROM STDIN"
            ) as cp:
                cp.write(text)
            row.copy_s.append(time.perf_counter() - t)
        # One call per event (prepared after a few calls, like any steady client).
        singles = [
            json.dumps([e]) for e in events(min(size, single_cap), mode, f"s{time.time_ns()}")
        ]
        for payload in singles:
            t = time.perf_counter()
            conn.execute(sql, (payload,), prepare=True).fetchone()
            row.single_s.append(time.perf_counter() - t)
        conn.execute(f"TRUNCATE {SCHEMA}.copy_rows")
    return row


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    sizes = [s for s in SIZES if not args.quick or s <= 1000]
    rounds = 3 if args.quick else 5
    single_cap = 200 if args.quick else 1000
    report: dict[str, Any] = {"command": command, "hardware": common.hardware(), "rows": []}
    with bench_database(args.database_url) as conninfo:
        prepare(conninfo)
        report["server"] = common.server_info(conninfo)
        report["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        for size in sizes:
            for mode in MODES:
                checkpoint(conninfo)
                r = measure(conninfo, size, mode, rounds, single_cap)
                report["rows"].append(r)
                print(
                    f"batch {size:>6} {mode:<8} {r.batch_rate:>9,.0f} ev/s  one-by-one "
                    f"{r.single_rate:>7,.0f}  COPY {r.copy_rate:>9,.0f}  "
                    f"(load {max(r.load):.1f})",
                    file=sys.stderr,
                    flush=True,
                )
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["batch", "accounts", "apply_events ev/s", "ms/batch", "server CPU ms/batch",
              "ev/s per server CPU s", "one by one ev/s", "x one by one",
              "COPY ev/s (ceiling)", "COPY / batch"]  # fmt: skip
    rows = []
    for r in report["rows"]:
        rows.append(
            [
                f"{r.size:,}",
                "distinct" if r.mode == "distinct" else f"{HOT_ACCOUNTS} hot",
                common.fmt_rate(r.batch_rate),
                f"{common.median(r.batch_s) * 1000:.1f}",
                f"{common.median(r.batch_cpu_s) * 1000:.1f}" if r.batch_cpu_s else "-",
                common.fmt_rate(r.cpu_rate),
                common.fmt_rate(r.single_rate),
                f"{r.batch_rate / r.single_rate:.0f}x",
                common.fmt_rate(r.copy_rate),
                f"{r.copy_rate / r.batch_rate:.1f}x",
            ]
        )
    return header, rows


def targets(report: dict[str, Any]) -> list[str]:
    out = []
    for r in report["rows"]:
        if r.size != 1000:
            continue
        ok_rate = r.batch_rate >= TARGET_RATE
        ok_copy = r.copy_rate / r.batch_rate <= TARGET_COPY_RATIO
        out.append(
            f"{'MET ' if ok_rate else 'MISS'} batch 1000 ({r.mode}) >= {TARGET_RATE:,} ev/s: "
            f"{r.batch_rate:,.0f}"
        )
        out.append(
            f"{'MET ' if ok_copy else 'MISS'} batch 1000 ({r.mode}) within "
            f"{TARGET_COPY_RATIO:g}x of COPY: {r.copy_rate / r.batch_rate:.1f}x"
        )
    return out


def render_text(report: dict[str, Any]) -> str:
    header, rows = _table(report)
    return "\n".join(
        ["Batch apply (meter.apply_events)", common.text_table(header, rows), *targets(report)]
    )


def render_markdown(report: dict[str, Any]) -> str:
    return common.section_markdown(
        "Batch apply (`meter.apply_events`)",
        report,
        [x for r in report["rows"] for x in r.load],
        "Mixed events (70% consume, 20% allocate, 10% adjust), each with its own "
        "idempotency key; accounts exist beforehand. Wall time from the client, commit "
        "included; medians over the rounds. One by one: one `apply_events` call and "
        "transaction per event. COPY: the same number of rows into an unindexed table in "
        "one transaction. Server CPU: the backend's CPU time for the batch "
        "(`/proc/<pid>/schedstat`), less sensitive to the other jobs on the box than wall "
        "time.",
        _table(report),
        "lrrrrrrrrr",
        targets(report),
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    common.write_block(path, "batch", render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    return common.section_main(
        "batch", __doc__, "batches of 100 and 1000 only", argv, run, render_text, render_markdown
    )


if __name__ == "__main__":
    raise SystemExit(main())
