"""The pipeline end to end: producer call to committed ledger rows.

Embedded Redis (the broker, AOF ``everysec``) and a durable embedded PostgreSQL on this
machine, 1 and 2 ``celery -A worker worker`` subprocesses (``--concurrency 2`` each, the
default prefork pool). For each worker count, two ways of sending the same kind of events
(``consume`` with a generated idempotency key, on 20,000 accounts):

``one per message``  ``MeterProducer()`` (direct mode): each call publishes one message,
                     which a worker applies with one ``apply_events`` call;
``buffered``         ``MeterProducer(batch_size=1000, linger_ms=50)``: calls append to a
                     buffer sent as one ``apply_batch`` message per 1000 events.

events/s = events / (first enqueue -> the last ledger row committed, seen by polling the
accounts' debited total, which commits with the ledger rows; the applied count is then the
ledger's own). Enqueue latency: the producer call's wall time, p50 and p99 (in buffered
mode p99 includes the call that fills and sends a batch). CPU per event: the CPU time
(user + system, ``/proc/<pid>/stat``) each part used during the run, divided by the events:
PostgreSQL (the postmaster and all its children), the Celery worker processes, Redis, and
the producer (this process: also the polling). Targets: >= 20,000 events/s for buffered
batches, and >= 10x the one-per-message rate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import psycopg

from bench import batch, common
from bench.sql_ops import bench_database
from meter.embedded import proc_stat

REPO: Final = Path(__file__).resolve().parent.parent
TARGET_RATE: Final = 20_000
TARGET_SPEEDUP: Final = 10.0
BATCH_SIZE: Final = 1000
AMOUNT: Final = "1.25"


# ------------------------------------------------------------------ CPU accounting

_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _ppid(pid: int) -> int | None:
    fields = proc_stat(pid)
    return None if fields is None else int(fields[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``, all its threads (a worker's heartbeat, the
    producer's linger thread; ``schedstat`` would count the main thread only); 0 once gone."""
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def _with_children(pids: Sequence[int]) -> list[int]:
    """``pids`` and their direct children (PostgreSQL's backends, Celery's pool)."""
    parents = set(pids)
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ppid(int(entry)) in parents:
            children.append(int(entry))
    return [*pids, *children]


def cpu_snapshot(groups: dict[str, Sequence[int]]) -> dict[str, dict[int, float]]:
    """Per group, the CPU seconds of each process of the group and its children."""
    return {
        name: {p: _cpu_seconds(p) for p in _with_children(pids)} for name, pids in groups.items()
    }


def cpu_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds per group between two snapshots (processes started meanwhile count whole)."""
    return {
        name: sum(cpu - before.get(name, {}).get(pid, 0.0) for pid, cpu in procs.items())
        for name, procs in after.items()
    }


def postmaster_pid(db_url: str) -> int:
    """The PostgreSQL server's pid (the parent of a backend)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # read while the backend lives: once the connection closes it may be gone
        ppid = _ppid(int(row[0]))
    assert ppid is not None
    return ppid


# ------------------------------------------------------------------ servers and workers


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A throwaway embedded Redis; its URL and pid."""
    from meter.embedded import EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-redis-"))
    server = EmbeddedRedis(tmp)
    try:
        server.start()
        yield server.url(), int((tmp / "redis.pid").read_text().split()[0])
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def workers(n: int, db_url: str, broker_url: str, logdir: Path) -> Iterator[list[int]]:
    """``n`` Celery worker subprocesses, ready to consume (their pids); stopped (SIGTERM)
    on exit."""
    env = {
        **os.environ,
        "METER_DATABASE_URL": db_url,
        "METER_BROKER_URL": broker_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", os.environ.get("METER_BENCH_WORKER_LOGLEVEL", "WARNING"),
            "--concurrency", "2", "--without-mingle", "--without-gossip",
            "--without-heartbeat"]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            with open(logdir / f"worker{i}.log", "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [*argv, "--hostname", f"bench{i}@%h"],
                        cwd=REPO,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own group: SIGTERM reaches the pool
                    )
                )
        _wait_ready(broker_url, n)
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _wait_ready(broker_url: str, n: int, timeout: float = 90.0) -> None:
    """Until ``n`` workers answer a ping."""
    from celery import Celery

    from meter import wire

    app = Celery("bench-ping", set_as_current=False)
    app.conf.update(wire.celery_config(broker_url))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=1.0) or []
            if len(replies) >= n:
                return
        raise RuntimeError(f"{n} Celery workers not ready within {timeout:g} s")
    finally:
        app.close()


def _ledger_count(conn: psycopg.Connection[Any], after_id: int) -> int:
    """Ledger rows of the benchmark's namespace with an id above ``after_id``: what a run
    applied, counted once at its end (an index range on the primary key)."""
    row = conn.execute(
        "SELECT count(*) FROM meter.ledger WHERE namespace = %s AND id > %s",
        (batch.NAMESPACE, after_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _debited(conn: psycopg.Connection[Any]) -> Decimal:
    """Units consumed in the benchmark's namespace so far.

    The polling's measure of progress: one sum over the namespace's accounts, at a cost
    that does not grow with the run (counting the new ledger rows did, and in a run of
    500,000 events the polling then took a noticeable share of PostgreSQL's CPU).
    """
    row = conn.execute(
        "SELECT coalesce(sum(total_debited), 0) FROM meter.accounts WHERE namespace = %s",
        (batch.NAMESPACE,),
    ).fetchone()
    assert row is not None
    return Decimal(row[0])


def _last_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT coalesce(max(id), 0) FROM meter.ledger WHERE namespace = %s", (batch.NAMESPACE,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def measure(
    db_url: str,
    broker_url: str,
    n_workers: int,
    mode: str,
    events: int,
    timeout: float,
    cpu_groups: dict[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Send ``events`` consumes through the pipeline and time them until committed.

    ``cpu_groups``: processes (with their children) whose CPU time is counted, by name;
    the producer's (this process's) is always counted.
    """
    from meter.producer import MeterProducer

    kwargs: dict[str, Any] = (
        {"batch_size": BATCH_SIZE, "linger_ms": 50} if mode == "buffered" else {}
    )
    latencies: list[float] = []
    load = common.loadavg()
    with psycopg.connect(db_url, autocommit=True) as conn:
        last_id = _last_id(conn)
        debited = _debited(conn)
        producer = MeterProducer(broker_url, batch.NAMESPACE, **kwargs)
        try:
            cpu_before = cpu_snapshot(cpu_groups or {})
            own_before = time.process_time()
            start = time.perf_counter()
            for i in range(events):
                t = time.perf_counter()
                producer.consume(f"d{i % batch.N_ACCOUNTS}", batch.EVENT_TYPE, AMOUNT, batch.UNIT)
                latencies.append(time.perf_counter() - t)
            producer.flush()
            sent = time.perf_counter()
        finally:
            producer.close()
        done = 0
        deadline = time.monotonic() + timeout
        while done < events and time.monotonic() < deadline:
            time.sleep(0.1)
            done = int((_debited(conn) - debited) / Decimal(AMOUNT))
        finished = time.perf_counter()
        cpu = cpu_used(cpu_before, cpu_snapshot(cpu_groups or {}))
        cpu["producer"] = time.process_time() - own_before
        applied = _ledger_count(conn, last_id)
    return {
        "workers": n_workers,
        "mode": mode,
        "events": events,
        "applied": applied,
        "seconds": finished - start,
        "rate": applied / (finished - start),
        "send_seconds": sent - start,
        "enqueue_p50_ms": common.percentile(latencies, 50) * 1000,
        "enqueue_p99_ms": common.percentile(latencies, 99) * 1000,
        "cpu_us_per_event": {k: v / max(applied, 1) * 1e6 for k, v in cpu.items()},
        "load": load,
    }


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    single_events = 500 if args.quick else 2000
    buffered_events = getattr(args, "events", None) or (10_000 if args.quick else 50_000)
    report: dict[str, Any] = {"command": command, "hardware": common.hardware(), "rows": []}
    logdir = Path(tempfile.mkdtemp(prefix="meter-bench-workers-"))
    with bench_database(args.database_url) as db_url, redis_server() as (broker_url, redis_pid):
        batch.prepare(db_url)
        report["server"] = common.server_info(db_url)
        postgres = [postmaster_pid(db_url)]
        for n in (1, 2):
            with workers(n, db_url, broker_url, logdir) as worker_pids:
                groups = {"postgres": postgres, "workers": worker_pids, "redis": [redis_pid]}
                for mode, count in (("single", single_events), ("buffered", buffered_events)):
                    row = measure(
                        db_url, broker_url, n, mode, count, timeout=300, cpu_groups=groups
                    )
                    report["rows"].append(row)
                    print(
                        f"pipeline workers={n} {mode:<8} {row['rate']:>9,.0f} ev/s "
                        f"({row['applied']}/{row['events']} in {row['seconds']:.1f} s), enqueue "
                        f"p50 {row['enqueue_p50_ms']:.3f} ms p99 {row['enqueue_p99_ms']:.3f} ms "
                        f"(load {row['load']:.1f})",
                        file=sys.stderr,
                        flush=True,
                    )
    shutil.rmtree(logdir, ignore_errors=True)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return report


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["workers", "sending", "events", "events/s", "x one per message",
              "enqueue p50 ms", "enqueue p99 ms",
              "CPU µs/event: PostgreSQL / workers / producer / Redis"]  # fmt: skip
    single = {r["workers"]: r["rate"] for r in report["rows"] if r["mode"] == "single"}
    rows = []
    for r in report["rows"]:
        base = single.get(r["workers"])
        rows.append(
            [
                str(r["workers"]),
                "one per message" if r["mode"] == "single" else f"buffered ({BATCH_SIZE}/msg)",
                f"{r['applied']:,}"
                + ("" if r["applied"] == r["events"] else f" of {r['events']:,}"),
                common.fmt_rate(r["rate"]),
                "baseline"
                if r["mode"] == "single"
                else f"{r['rate'] / base:.0f}x"
                if base
                else "-",
                f"{r['enqueue_p50_ms']:.3f}",
                f"{r['enqueue_p99_ms']:.3f}",
                _cpu_cell(r.get("cpu_us_per_event")),
            ]
        )
    return header, rows


def _cpu_cell(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "-"
    parts = [cpu.get(k, float("nan")) for k in ("postgres", "workers", "producer", "redis")]
    return " / ".join(f"{v:.0f}" for v in parts) + f" (total {sum(parts):.0f})"


def targets(report: dict[str, Any]) -> list[str]:
    out = []
    single = {r["workers"]: r["rate"] for r in report["rows"] if r["mode"] == "single"}
    for r in report["rows"]:
        if r["mode"] != "buffered":
            continue
        w = r["workers"]
        out.append(
            f"{'MET ' if r['rate'] >= TARGET_RATE else 'MISS'} buffered, {w} worker(s) >= "
            f"{TARGET_RATE:,} ev/s: {r['rate']:,.0f}"
        )
        ratio = r["rate"] / single[w] if single.get(w) else float("nan")
        out.append(
            f"{'MET ' if ratio >= TARGET_SPEEDUP else 'MISS'} buffered, {w} worker(s) >= "
            f"{TARGET_SPEEDUP:g}x one per message: {ratio:.0f}x"
        )
    return out


def render_text(report: dict[str, Any]) -> str:
    header, rows = _table(report)
    return "\n".join(["Pipeline end to end", common.text_table(header, rows), *targets(report)])


def render_markdown(report: dict[str, Any]) -> str:
    return common.section_markdown(
        "Pipeline end to end (producer -> Redis -> Celery -> PostgreSQL)",
        report,
        [r["load"] for r in report["rows"]],
        "Embedded Redis and PostgreSQL (durable) on the same machine; `celery -A worker "
        "worker --concurrency 2` subprocesses; the producer in the benchmark's process. "
        "events/s: from the first producer call until the last ledger row is committed.",
        _table(report),
        "rlrrrrrr",
        targets(report),
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    common.write_block(path, "pipeline", render_markdown(report))


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--events",
        type=int,
        default=None,
        help="buffered events per worker count (default 50,000; a sustained run: 500,000)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return common.section_main(
        "pipeline", __doc__, "fewer events", argv, run, render_text, render_markdown,
        _add_arguments,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
