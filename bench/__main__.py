"""``python -m bench``: every benchmark section, each next to its baseline from the same run.

Sections (``--only``, comma-separated; default all, in this order):

``sql_ops``   Meter's SQL operations vs INSERT and SELECT 1 (:mod:`bench.sql_ops`);
``batch``     ``meter.apply_events`` batches vs one call per event and vs COPY
              (:mod:`bench.batch`);
``pipeline``  producer -> Redis -> Celery workers -> PostgreSQL, one event per message vs
              buffered batches (:mod:`bench.pipeline`);
``growth``    reads and consume at two ledger sizes (:mod:`bench.growth`).

``--quick`` runs small sizes (minutes, not tens of minutes). ``--markdown [FILE]`` rewrites
each section's own block of docs/benchmarks.md. Options this command does not know are
passed to the ``sql_ops`` section (``--repeat``, ``--seconds``, ``--conns``, ``--json``...;
see ``python -m bench.sql_ops --help``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import batch, common, growth, pipeline, sql_ops

SECTIONS = ("sql_ops", "batch", "pipeline", "growth")


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Meter benchmarks: every section next to its baseline from the same run.",
        epilog="Other options are passed to the sql_ops section (python -m bench.sql_ops --help).",
    )
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=list(SECTIONS),
        help=f"sections to run, comma-separated ({','.join(SECTIONS)})",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and short runs")
    p.add_argument(
        "--markdown",
        nargs="?",
        const=common.DEFAULT_MARKDOWN,
        type=Path,
        metavar="FILE",
        help=f"rewrite each section's block of FILE (default {common.DEFAULT_MARKDOWN})",
    )
    p.add_argument("--database-url", default=None, help="existing server (default: embedded)")
    args, rest = p.parse_known_args(argv)
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --only {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args, rest


def _sql_ops(args: argparse.Namespace, rest: list[str], command: str) -> list[str]:
    argv = list(rest)
    if args.quick and "--seconds" not in argv:
        argv += ["--seconds", "2", "--warmup", "0.5"]
    if args.database_url:
        argv += ["--database-url", args.database_url]
    sargs = sql_ops.parse_args(argv)
    report = sql_ops.run(sargs, command)
    print(sql_ops.render_text(report), flush=True)
    if args.markdown:
        sql_ops.write_markdown(report, args.markdown)
    return sql_ops.target_lines(report)


def _section(module: ModuleType, args: argparse.Namespace, command: str) -> list[str]:
    report: Any = module.run(args, command)
    print(module.render_text(report), flush=True)
    if args.markdown:
        module.write_markdown(report, args.markdown)
    targets: list[str] = module.targets(report)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parse(raw)
    if rest and "sql_ops" not in args.only:
        print(f"error: {shlex.join(rest)} only apply to the sql_ops section", file=sys.stderr)
        return 2
    redacted = ["$METER_BENCH_DATABASE_URL" if a == args.database_url else a for a in raw]
    command = "python -m bench" + (" " + shlex.join(redacted) if raw else "")
    summary: list[tuple[str, list[str]]] = []
    for name in SECTIONS:
        if name not in args.only:
            continue
        started = time.monotonic()
        print(f"== {name} ==", file=sys.stderr, flush=True)
        if name == "sql_ops":
            lines = _sql_ops(args, rest, command)
        else:
            lines = _section({"batch": batch, "pipeline": pipeline, "growth": growth}[name],
                             args, command)  # fmt: skip
        summary.append((f"{name} ({time.monotonic() - started:.0f} s)", lines))
        print(flush=True)
    print("Targets")
    for name, lines in summary:
        print(f"  {name}")
        for line in lines:
            print(f"    {line}")
    if args.markdown:
        print(f"sections written to {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
