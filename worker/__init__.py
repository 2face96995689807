"""Meter's Celery workers and beat: ``celery -A worker worker`` / ``celery -A worker beat``.

- :mod:`worker.app`: the Celery app and its configuration (``METER_*`` environment);
- :mod:`worker.tasks`: the event tasks (``meter.<op>``, ``meter.apply_batch``);
- :mod:`worker.schedule`: the beat schedule and the periodic tasks;
- :mod:`worker.db`, :mod:`worker.retry`, :mod:`worker.deliveries`, :mod:`worker.settings`,
  :mod:`worker.codec` (message bodies read with their numbers exact): what the tasks lean
  on.
"""

from worker.app import app, make_app, worker_config

celery = app  # the other name `celery -A` looks for

__all__ = ["app", "celery", "make_app", "worker_config"]
