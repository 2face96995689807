"""Meter benchmarks.

``python -m bench`` runs :mod:`bench.sql_ops`: throughput of the SQL hot path (consume,
reserve + commit, get_balance) through the real SDK, next to an INSERT and a ``SELECT 1``
baseline measured on the same server in the same run. ``python -m bench --help`` lists the
options.
"""
