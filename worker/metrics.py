"""Prometheus metrics of a Meter worker, served over HTTP on ``$METER_METRICS_PORT``.

Off unless ``METER_METRICS_PORT`` is set to a port (``0`` or unset: off). Everything is
measured from Celery signals, so the tasks themselves know nothing of it:

- ``task_prerun`` / ``task_postrun``: apply latency, and the outcome of every event a task
  returns (``meter.<op>`` returns one outcome, ``meter.apply_batch`` a list of them, see
  :mod:`meter.wire`);
- ``task_retry``: retries; ``task_success``: the last successful run of each periodic task
  (those named in the app's ``beat_schedule``);
- ``worker_init`` (the worker's main process, before the pool forks): switch
  ``prometheus_client`` to multiprocess mode and start the HTTP server.

Why multiprocess mode: with the prefork pool tasks run in child processes, each with its
own memory, while one port can only be served by one process. Each child writes its
figures to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless that
variable is set; a given folder is emptied of ``*.db`` files at startup, as
``prometheus_client`` requires), and the main process adds them up on each scrape.
Counters of a child that was replaced keep counting in the sum.

Metric names and labels are documented in ``docs/operations.md``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from celery.signals import task_postrun, task_prerun, task_retry, task_success, worker_init

from meter.wire import OPS

__all__ = ["METRICS_PORT_ENV", "Metrics", "metrics", "metrics_port"]

logger = logging.getLogger(__name__)

METRICS_PORT_ENV: Final = "METER_METRICS_PORT"
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Events per apply_batch message: the producer sends up to 500 by default (chunk_size).
BATCH_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# Seconds per task: a single event takes milliseconds, a batch of 1000 well under a second.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def metrics_port(env: Mapping[str, str] | None = None) -> int:
    """The port of ``METER_METRICS_PORT`` (``0``: metrics off).

    Raises:
        ValueError: not an integer in 0..65535.
    """
    env = os.environ if env is None else env
    raw = env.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return 0
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{METRICS_PORT_ENV} must be a TCP port (0..65535; 0 = off), got {raw!r}")
    return port


class Metrics:
    """The worker's metrics. Built once multiprocess mode is on (see :func:`_enable`)."""

    def __init__(self, registry: Any = None) -> None:
        """``registry``: where the metrics register (default: prometheus_client's own)."""
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry

        self.events = Counter(
            "meter_events",
            "Events that reached an outcome, by operation and outcome status.",
            ["op", "status"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "meter_dead_letters",
            "Events recorded as dead letters by the worker.",
            ["op"],
            registry=registry,
        )
        self.retries = Counter(
            "meter_task_retries",
            "Task retries (transient failures, waiting orphans).",
            ["task"],
            registry=registry,
        )
        self.tasks = Counter(
            "meter_tasks",
            "Task runs, by task name and final Celery state.",
            ["task", "state"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "meter_batch_size",
            "Events per apply_batch task run.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "meter_apply_latency_seconds",
            "Seconds from the start to the end of a task run (one event, or a batch).",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.periodic_last_success = Gauge(
            "meter_periodic_last_success_timestamp_seconds",
            "Unix time of the last successful run of a periodic (beat) task.",
            ["task"],
            multiprocess_mode="max",
            registry=registry,
        )

    def observe_outcomes(self, task_name: str, args: Any, retval: Any) -> None:
        """Count the events of a successful task run by op and outcome status."""
        if task_name == "meter.apply_batch":
            events = args[0] if args and isinstance(args[0], list) else []
            if isinstance(events, list) and events:
                self.batch_size.observe(len(events))
            outcomes = retval if isinstance(retval, list) else [retval]
            for i, outcome in enumerate(outcomes):
                event = events[i] if i < len(events) else None
                self._count(_op_of(event, "apply_batch"), outcome)
        else:
            event = args[0] if args else None
            self._count(_op_of(event, task_name.rpartition(".")[2]), retval)

    def _count(self, op: str, outcome: Any) -> None:
        if not isinstance(outcome, dict):
            return
        status = str(outcome.get("status") or "unknown")
        self.events.labels(op, status).inc()
        # Every 'error' outcome is a dead letter: meter.apply_events records one for each
        # in the same transaction, and the task records the ones it gives up on itself.
        if status == "error":
            self.dead_letters.labels(op).inc()


def _op_of(event: Any, default: str) -> str:
    op = event.get("op") if isinstance(event, dict) else None
    # Bound the label's values: an op outside the six is a bad event (a dead letter).
    return op if op in OPS else default


metrics: Metrics | None = None
"""The worker's metrics once enabled; ``None`` while metrics are off (the default)."""

_started: dict[str, float] = {}


def _periodic_tasks(app: Any) -> frozenset[str]:
    schedule = getattr(app.conf, "beat_schedule", None) or {}
    return frozenset(entry.get("task") for entry in schedule.values() if isinstance(entry, dict))


def _prepare_multiproc_dir() -> Path:
    """The multiprocess folder, emptied of an earlier run's files; created if not given."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink(missing_ok=True)
        return folder
    folder = Path(tempfile.mkdtemp(prefix="meter-metrics-"))
    os.environ[MULTIPROC_ENV] = str(folder)  # inherited by the pool children
    owner = os.getpid()

    def _remove() -> None:
        if os.getpid() == owner:  # not in a forked child that runs atexit handlers too
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(_remove)
    return folder


def _enable(port: int) -> None:
    """Multiprocess mode, the metrics, and the HTTP server on ``port`` (main process)."""
    global metrics
    folder = _prepare_multiproc_dir()
    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    # prometheus_client picks its value class when first imported: if something imported
    # it before the variable was set, pick again so the metrics below are file-backed.
    values.ValueClass = values.get_value_class()
    metrics = Metrics()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    try:
        start_http_server(port, registry=registry)
    except OSError as exc:
        # The worker still applies events; only the scrape endpoint is missing.
        logger.error("cannot serve metrics on port %d: %s", port, exc)
        return
    logger.info("serving Prometheus metrics on port %d (files in %s)", port, folder)


# ------------------------------------------------------------------ signal handlers


@worker_init.connect
def _on_worker_init(**_: Any) -> None:
    try:
        port = metrics_port()
    except ValueError as exc:
        # Celery would log and swallow it anyway; say plainly that metrics are off.
        logger.error("metrics off: %s", exc)
        return
    if port:
        _enable(port)


@task_prerun.connect
def _on_prerun(task_id: str | None = None, **_: Any) -> None:
    if metrics is not None and task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _on_postrun(
    task_id: str | None = None,
    task: Any = None,
    args: Any = None,
    retval: Any = None,
    state: str | None = None,
    **_: Any,
) -> None:
    m = metrics
    started = _started.pop(task_id, None) if task_id else None
    if m is None or task is None:
        return
    name = str(task.name)
    if started is not None:
        m.latency.labels(name).observe(time.perf_counter() - started)
    m.tasks.labels(name, state or "UNKNOWN").inc()
    if state == "SUCCESS" and name.startswith("meter.") and name not in _periodic_tasks(task.app):
        # apply_batch leaves its events parsed on the request (its message carries them as
        # JSON text): counted by op without parsing them again
        parsed = getattr(task.request, "meter_events", None)
        m.observe_outcomes(name, args if parsed is None else (parsed,), retval)


@task_retry.connect
def _on_retry(sender: Any = None, **_: Any) -> None:
    if metrics is not None and sender is not None:
        metrics.retries.labels(str(sender.name)).inc()


@task_success.connect
def _on_success(sender: Any = None, **_: Any) -> None:
    if metrics is not None and sender is not None and sender.name in _periodic_tasks(sender.app):
        metrics.periodic_last_success.labels(str(sender.name)).set(time.time())
