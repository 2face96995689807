"""Celery beat: the periodic maintenance tasks and their schedule (UTC).

- ``meter.release_expired``, every ``METER_EXPIRY_INTERVAL_SECONDS`` (5): return the holds
  whose TTL has passed to ``available``, in batches of ``METER_EXPIRY_BATCH``.
- ``meter.roll_periods``, every ``METER_ROLL_INTERVAL_SECONDS`` (60): close every ended
  billing period (expiration, carry-over) and open the next with its allocation, catching
  up missed periods in order, ledger rows dated at the period boundaries.
- ``meter.ensure_partitions``, every ``METER_PARTITIONS_INTERVAL_SECONDS`` (86400): this
  month's ledger partition and the next ``METER_PARTITIONS_AHEAD_MONTHS`` (3).
- ``meter.retention``, every ``METER_RETENTION_INTERVAL_SECONDS`` (86400), scheduled only
  when ``METER_LEDGER_RETENTION_MONTHS`` is set: fold the older months into the retention
  checkpoints and drop them, so ``reconcile()`` stays empty.
- ``meter.prune_idempotency_keys``, every ``METER_PRUNE_INTERVAL_SECONDS`` (3600): delete
  keys older than ``METER_IDEMPOTENCY_KEY_RETENTION_DAYS`` (35) that nothing still needs.

Each entry is also due once when beat starts (:class:`EveryFromStart`), so a daily task
does not wait a day after every restart of a beat without a persistent schedule file.

Every periodic task is idempotent and safe when two beat processes run by mistake or a
message is delivered twice: the sweep and the key pruning claim their rows ``FOR UPDATE
SKIP LOCKED`` (two runs split the work); the roll-over takes an advisory lock, then each
account's row lock, on top of open/close being idempotent per period; partition creation
locks per month and skips what exists; retention takes its advisory lock and folds each
month in the transaction that drops it. Each message expires after one interval, so ticks
missed while no worker was up do not pile up into a burst of stale runs.

Every run is recorded in ``meter.maintenance_runs`` (``meter.get_maintenance_runs()``): when
it started and finished, its result or its error. A failure is logged, recorded, raised
and left to the next tick: a transient one (the database down or restarting, a timeout,
a lost race) as :class:`MaintenanceDeferred`, one warning line; any other with its
traceback.

Driving time in tests: ``roll_periods`` and ``prune_idempotency_keys`` take ``now`` (an ISO
8601 timestamp with a zone, default: the database clock), passed to the SQL functions'
``p_now``. Beat never passes it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from celery import Task, shared_task
from celery.schedules import schedstate, schedule
from celery.utils.log import get_task_logger

from meter import wire
from worker import db
from worker.retry import is_transient
from worker.settings import Settings

__all__ = [
    "ENSURE_PARTITIONS",
    "PRUNE_KEYS",
    "RETENTION",
    "ROLL_PERIODS",
    "EveryFromStart",
    "MaintenanceDeferred",
    "beat_schedule",
    "ensure_partitions",
    "prune_idempotency_keys",
    "release_expired",
    "retention",
    "roll_periods",
]

logger = get_task_logger(__name__)

ROLL_PERIODS: Final = "meter.roll_periods"
ENSURE_PARTITIONS: Final = "meter.ensure_partitions"
RETENTION: Final = "meter.retention"
PRUNE_KEYS: Final = "meter.prune_idempotency_keys"

MAX_SWEEP_ROUNDS: Final = 100
"""Statements per sweep, roll or prune run at most: a huge backlog is worked off over several
ticks rather than by one run that never ends."""

R = TypeVar("R")


class EveryFromStart(schedule):
    """An interval schedule that is also due as soon as beat starts.

    Beat checks an entry before it first runs it (to order its heap) and again when it is
    time: the entry stays due until its ``last_run_at`` changes from the first one this
    schedule saw, that is, until beat has sent it once in this process.
    """

    def __init__(self, run_every: float | timedelta, *args: Any, **kwargs: Any) -> None:
        super().__init__(run_every, *args, **kwargs)
        self._first_seen: datetime | None = None

    def is_due(self, last_run_at: datetime) -> schedstate:
        if self._first_seen is None:
            self._first_seen = last_run_at
        if last_run_at == self._first_seen:
            return schedstate(is_due=True, next=self.seconds)
        return super().is_due(last_run_at)


class MaintenanceDeferred(Exception):
    """A maintenance run met a transient failure (the database down or restarting, a lock
    or statement timeout, a lost race); the next tick runs it again.

    Declared in each task's ``throws``, so the worker logs it as expected, one line at INFO,
    instead of a traceback at ERROR every tick for as long as the database is away.
    """


def _recorded(task: str, s: Settings, work: Callable[[], R], summary: Callable[[R], Any]) -> R:
    """Run ``work`` and record the run (its summary, or its error) in maintenance_runs.

    A failure to record is logged, never allowed to hide the work's own outcome. A
    transient failure is logged as a warning without traceback and raised as
    :class:`MaintenanceDeferred`; any other is logged with its traceback and raised as is.
    """
    started = datetime.now(UTC)
    try:
        result = work()
    except Exception as exc:
        transient = is_transient(exc)
        if transient:
            logger.warning("%s deferred to the next tick: %s", task, _one_line(exc))
        else:
            logger.exception("%s failed", task)
        try:
            db.record_maintenance_run(
                s.database_url, s.db_pool_size, task=task, ok=False,
                error=f"{type(exc).__name__}: {exc}", started_at=started,
            )  # fmt: skip
        except Exception as not_recorded:
            if transient and is_transient(not_recorded):
                logger.warning("%s: could not record the deferred run either", task)
            else:
                logger.exception("%s: could not record the failed run", task)
        if transient:
            raise MaintenanceDeferred(f"{task}: {_one_line(exc)}") from exc
        raise
    try:
        db.record_maintenance_run(
            s.database_url, s.db_pool_size, task=task, ok=True,
            result=summary(result), started_at=started,
        )  # fmt: skip
    except Exception:
        logger.exception("%s: could not record the run", task)
    return result


def _one_line(exc: BaseException) -> str:
    """``Type: message``, first line only (psycopg adds context lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _as_time(now: str | None) -> datetime | None:
    """The ``now`` argument of a task: an ISO 8601 timestamp with a zone, or None."""
    if now is None:
        return None
    value = datetime.fromisoformat(now)
    if value.tzinfo is None:
        raise ValueError(f"now: {now!r} has no time zone")
    return value


class MaintenanceTask(Task):
    """Base of beat's tasks: run under the worker's time limits, not a message's header
    (:class:`worker.tasks.WorkerLimitsRequest`)."""

    Request = "worker.tasks:WorkerLimitsRequest"


@shared_task(
    bind=True,
    base=MaintenanceTask,
    name=wire.RELEASE_EXPIRED,
    ignore_result=True,
    throws=(MaintenanceDeferred,),
)
def release_expired(self: Task) -> int:
    """Expire every active hold whose TTL has passed, in every namespace; how many.

    Calls ``meter.release_expired_reservations(NULL, batch)`` in short transactions until
    one expires fewer than a batch.
    """
    s = Settings.from_conf(self.app.conf)

    def work() -> int:
        total = 0
        for _ in range(MAX_SWEEP_ROUNDS):
            expired = db.release_expired_reservations(
                s.database_url, s.db_pool_size, s.expiry_batch
            )
            total += expired
            if expired < s.expiry_batch:
                break
        if total:
            logger.info("expired %d reservations", total)
        return total

    return _recorded(wire.RELEASE_EXPIRED, s, work, lambda n: {"expired": n})


@shared_task(
    bind=True,
    base=MaintenanceTask,
    name=ROLL_PERIODS,
    ignore_result=True,
    throws=(MaintenanceDeferred,),
)
def roll_periods(self: Task, now: str | None = None) -> dict[str, int]:
    """Roll every configured account's ended periods as of ``now`` (default: the database
    clock); counts of steps by status (``opened``, ``rolled``, ``error``).

    Calls ``meter.roll_periods`` in bounded transactions until a round does less than a
    batch, or only failing accounts are left (each reported once per round, and logged).
    """
    s = Settings.from_conf(self.app.conf)
    at = _as_time(now)

    def work() -> dict[str, int]:
        counts = {"opened": 0, "rolled": 0, "error": 0}
        for _ in range(MAX_SWEEP_ROUNDS):
            steps = db.roll_periods(s.database_url, s.db_pool_size, s.roll_batch, at)
            for step in steps:
                counts[step["status"]] = counts.get(step["status"], 0) + 1
                if step["status"] == "error":
                    logger.error(
                        "roll_periods: account (%s, %s, %s, %s, %s) failed: %s",
                        step["namespace"], step["user_id"], step["event_type"],
                        step["resource"], step["unit"], step["error"],
                    )  # fmt: skip
            # Failed steps do not count toward the batch (they come back at every call).
            done = sum(step["status"] != "error" for step in steps)
            if done < s.roll_batch:
                break
        if counts["opened"] or counts["rolled"]:
            logger.info("rolled periods: %s", counts)
        return counts

    return _recorded(ROLL_PERIODS, s, work, lambda counts: counts)


@shared_task(
    bind=True,
    base=MaintenanceTask,
    name=ENSURE_PARTITIONS,
    ignore_result=True,
    throws=(MaintenanceDeferred,),
)
def ensure_partitions(self: Task) -> list[str]:
    """Create this month's ledger partition and the next ``meter_partitions_ahead``; the
    names created."""
    s = Settings.from_conf(self.app.conf)

    def work() -> list[str]:
        created = db.ensure_partitions(s.database_url, s.db_pool_size, s.partitions_ahead)
        if created:
            logger.info("created partitions %s", ", ".join(created))
        return created

    return _recorded(ENSURE_PARTITIONS, s, work, lambda names: {"created": names})


@shared_task(
    bind=True,
    base=MaintenanceTask,
    name=RETENTION,
    ignore_result=True,
    throws=(MaintenanceDeferred,),
)
def retention(self: Task) -> list[str]:
    """Fold the ledger months older than ``meter_ledger_retention_months`` into the
    retention checkpoints and drop them (``meter.drop_old_partitions``); the names dropped.
    Does nothing when retention is off (0)."""
    s = Settings.from_conf(self.app.conf)

    def work() -> list[str]:
        if s.ledger_retention_months <= 0:
            return []
        dropped = db.drop_old_partitions(s.database_url, s.db_pool_size, s.ledger_retention_months)
        if dropped:
            logger.info("retention dropped partitions %s", ", ".join(dropped))
        return dropped

    return _recorded(RETENTION, s, work, lambda names: {"dropped": names})


@shared_task(
    bind=True,
    base=MaintenanceTask,
    name=PRUNE_KEYS,
    ignore_result=True,
    throws=(MaintenanceDeferred,),
)
def prune_idempotency_keys(self: Task, now: str | None = None) -> int:
    """Delete idempotency keys older than ``meter_key_retention_days`` as of ``now``
    (default: the database clock), except those still needed (see
    ``meter.prune_idempotency_keys``); how many."""
    s = Settings.from_conf(self.app.conf)
    at = _as_time(now)

    def work() -> int:
        total = 0
        for _ in range(MAX_SWEEP_ROUNDS):
            pruned = db.prune_idempotency_keys(
                s.database_url, s.db_pool_size, s.key_retention_days, s.prune_batch, at
            )
            total += pruned
            if pruned < s.prune_batch:
                break
        if total:
            logger.info("pruned %d idempotency keys", total)
        return total

    return _recorded(PRUNE_KEYS, s, work, lambda n: {"pruned": n})


def _entry(task: str, interval: float) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": EveryFromStart(timedelta(seconds=interval)),
        # a message not started within one interval is dropped: the next tick does its work;
        # its own queue, so a backlog of events does not delay it
        "options": {"expires": interval, "queue": wire.MAINTENANCE_QUEUE},
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` Celery setting for these settings."""
    entries = {
        "meter.release-expired": _entry(wire.RELEASE_EXPIRED, settings.expiry_interval),
        "meter.roll-periods": _entry(ROLL_PERIODS, settings.roll_interval),
        "meter.ensure-partitions": _entry(ENSURE_PARTITIONS, settings.partitions_interval),
        "meter.prune-idempotency-keys": _entry(PRUNE_KEYS, settings.prune_interval),
    }
    if settings.ledger_retention_months > 0:
        entries["meter.retention"] = _entry(RETENTION, settings.retention_interval)
    return entries
