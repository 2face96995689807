"""Celery beat: the periodic maintenance tasks and their schedule.

For now one entry: the expiry sweep, every ``meter_expiry_interval`` seconds (5), which
returns the holds whose TTL has passed to ``available``. Other maintenance (rolling
periods, partitions, retention, idempotency-key pruning) joins :func:`beat_schedule`.

Every periodic task is idempotent and safe when two beat processes run by mistake: the
sweep locks what it expires (``FOR UPDATE SKIP LOCKED``), so two sweeps split the work.
Each message expires after one interval, so ticks missed while no worker was up do not
pile up into a burst of sweeps.
"""

from __future__ import annotations

from typing import Any, Final

from celery import Task, shared_task
from celery.utils.log import get_task_logger

from meter import wire
from worker import db
from worker.settings import Settings

__all__ = ["beat_schedule", "release_expired"]

logger = get_task_logger(__name__)

MAX_SWEEP_ROUNDS: Final = 100
"""Statements per sweep run at most: a huge backlog is worked off over several ticks rather
than by one run that never ends."""


@shared_task(bind=True, name=wire.RELEASE_EXPIRED, ignore_result=True)
def release_expired(self: Task) -> int:
    """Expire every active hold whose TTL has passed, in every namespace; how many.

    Calls ``meter.release_expired_reservations(NULL, batch)`` in short transactions until
    one expires fewer than a batch. A failure is logged and left to the next tick.
    """
    s = Settings.from_conf(self.app.conf)
    total = 0
    for _ in range(MAX_SWEEP_ROUNDS):
        expired = db.release_expired_reservations(s.database_url, s.db_pool_size, s.expiry_batch)
        total += expired
        if expired < s.expiry_batch:
            break
    if total:
        logger.info("expired %d reservations", total)
    return total


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` Celery setting for these settings."""
    return {
        "meter.release-expired": {
            "task": wire.RELEASE_EXPIRED,
            "schedule": settings.expiry_interval,
            "options": {"expires": settings.expiry_interval},
        },
    }
