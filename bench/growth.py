"""Growth: read latency and the consume rate as the ledger grows.

For each size (``--quick``: 100k and 1M ledger rows; default 1M and 10M), a fresh
database gets 100,000 accounts and that many ledger rows over 12 monthly partitions,
generated set-based by ``bench/growth.sql`` (consistent: reconcile is empty), then
ANALYZE. Measured through ``MeterClient`` on one connection, median (and p95) over
repeated calls on random users: get_balance, get_usage (one user, one month), get_ledger
(first page of 10 entries, and a deep page: 5 entries before a point six months back),
get_namespace_usage (one month), reconcile (one namespace, once: it reads every row), and
the consume rate (keyed consumes, 3 s). Target: per-user reads within 2x from the smaller
size to the larger.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from bench import common
from bench.sql_ops import bench_database

NAMESPACE: Final = "growth"
ACCOUNTS: Final = 100_000
MONTHS: Final = 12
GENERATOR: Final = Path(__file__).resolve().parent / "growth.sql"
PER_USER: Final = ("get_balance", "get_usage", "get_ledger first page", "get_ledger deep page")


def _month(offset: int) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    y, m = now.year, now.month - offset
    while m < 1:
        y, m = y - 1, m + 12
    return datetime(y, m, 1, tzinfo=UTC), datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)


def populate(conninfo: str, rows: int) -> float:
    """Fresh data in the database; the seconds it took."""
    t = time.perf_counter()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(GENERATOR.read_text())
        conn.execute(
            "SELECT pg_temp.bench_populate(%s, %s, %s, %s)", (NAMESPACE, ACCOUNTS, rows, MONTHS)
        )
        conn.execute("VACUUM ANALYZE meter.accounts, meter.ledger")
    return time.perf_counter() - t


def _timed(fn: Callable[[], Any], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def measure(conninfo: str, rows: int, calls: int) -> dict[str, Any]:
    from meter.client import MeterClient

    rng = random.Random(rows)
    result: dict[str, Any] = {"rows": rows, "load": common.loadavg(), "ms": {}}
    client = MeterClient(conninfo, namespace=NAMESPACE)
    try:
        user = lambda: f"g{rng.randrange(ACCOUNTS)}"  # noqa: E731
        m_start, m_end = _month(3)
        deep_end, _ = _month(6)
        # Pages of equal size at every ledger size (each user has >= 10 entries at 1M rows,
        # and >= 5 before six months back), so the figures compare the same work.
        probes: dict[str, Callable[[], Any]] = {
            "get_balance": lambda: client.get_balance(user(), "tokens", "tok"),
            "get_usage": lambda: client.get_usage(user(), m_start, m_end),
            "get_ledger first page": lambda: client.get_ledger(user(), "tokens", "tok", limit=10),
            "get_ledger deep page": lambda: client.get_ledger(
                user(), "tokens", "tok", end_time=deep_end, limit=5
            ),
            "get_namespace_usage": lambda: client.get_namespace_usage(m_start, m_end),
        }
        for name, fn in probes.items():
            n = max(3, calls // 10) if name == "get_namespace_usage" else calls
            fn()  # warm (plan cache, buffers)
            result["ms"][name] = _timed(fn, n)
        result["ms"]["reconcile"] = _timed(lambda: client.reconcile(), 1)
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < 3.0:
            client.consume(user(), "tokens", 1, "tok", idempotency_key=f"grow-{rows}-{done}")
            done += 1
        result["consume_rate"] = done / (time.perf_counter() - t0)
    finally:
        client.close()
    return result


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    sizes = getattr(args, "sizes", None) or (
        [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    )
    report: dict[str, Any] = {"command": command, "hardware": common.hardware(), "results": []}
    for rows in sizes:
        with bench_database(args.database_url) as conninfo:
            from meter import migrate

            migrate(conninfo)
            report["server"] = common.server_info(conninfo)
            seconds = populate(conninfo, rows)
            r = measure(conninfo, rows, calls=50 if args.quick else 200)
            r["populate_s"] = seconds
            report["results"].append(r)
            print(
                f"growth {rows:>11,} rows (generated in {seconds:.0f} s): "
                + ", ".join(f"{k} {common.median(v):.2f} ms" for k, v in r["ms"].items())
                + f", consume {r['consume_rate']:,.0f}/s",
                file=sys.stderr,
                flush=True,
            )
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    res = report["results"]
    header = ["query", *(f"{r['rows']:,} rows: median ms (p95)" for r in res)]
    if len(res) >= 2:
        header.append("growth (median)")
    rows = []
    for name in res[0]["ms"]:
        cells = [name]
        for r in res:
            v = r["ms"][name]
            cells.append(f"{common.median(v):.2f} ({common.percentile(v, 95):.2f})")
        if len(res) >= 2:
            cells.append(
                f"{common.median(res[-1]['ms'][name]) / common.median(res[0]['ms'][name]):.1f}x"
            )
        rows.append(cells)
    cells = ["consume (ops/s, 1 connection)", *(f"{r['consume_rate']:,.0f}" for r in res)]
    if len(res) >= 2:
        cells.append(f"{res[-1]['consume_rate'] / res[0]['consume_rate']:.2f}x")
    rows.append(cells)
    return header, rows


def targets(report: dict[str, Any]) -> list[str]:
    res = report["results"]
    if len(res) < 2:
        return []
    out = []
    for name in PER_USER:
        ratio = common.median(res[-1]["ms"][name]) / common.median(res[0]["ms"][name])
        out.append(
            f"{'MET ' if ratio <= 2 else 'MISS'} {name} within 2x from {res[0]['rows']:,} to "
            f"{res[-1]['rows']:,} rows: {ratio:.1f}x"
        )
    return out


def render_text(report: dict[str, Any]) -> str:
    header, rows = _table(report)
    return "\n".join(["Growth", common.text_table(header, rows), *targets(report)])


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = _table(report)
    gen = ", ".join(f"{r['rows']:,} rows in {r['populate_s']:.0f} s" for r in report["results"])
    return common.section_markdown(
        "Growth (reads and consume as the ledger grows)",
        report,
        [r["load"] for r in report["results"]],
        f"{ACCOUNTS:,} accounts, ledger rows over {MONTHS} monthly partitions, generated "
        f"set-based by `bench/growth.sql` then VACUUM ANALYZE ({gen}). Through "
        "`MeterClient`, one connection, random users; reconcile once. get_ledger pages "
        "hold 10 (first) and 5 (before six months back) entries at every size; get_usage "
        "sums the user's consumption in one month, which grows with rows per user "
        f"(rows / {ACCOUNTS:,}).",
        (header, rows),
        "l" + "r" * (len(header) - 1),
        targets(report),
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    common.write_block(path, "growth", render_markdown(report))


def main(argv: Sequence[str] | None = None) -> int:
    def sizes(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)

    return common.section_main(
        "growth", __doc__, "100k and 1M rows", argv, run, render_text, render_markdown, sizes
    )


if __name__ == "__main__":
    raise SystemExit(main())
