"""Meter benchmarks.

``python -m bench`` (``make bench``) runs every section, each next to a baseline measured
on the same server in the same run, and with ``--markdown`` rewrites its block of
docs/benchmarks.md: :mod:`bench.sql_ops` (SQL operations vs INSERT and ``SELECT 1``),
:mod:`bench.batch` (``meter.apply_events`` batches vs one call per event vs COPY),
:mod:`bench.pipeline` (producer to committed ledger rows through Redis and Celery) and
:mod:`bench.growth` (reads and consume at two ledger sizes). ``python -m bench --help``
lists the options.
"""
