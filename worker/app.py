"""The Celery app of the Meter workers and beat, and its configuration.

``celery -A worker worker`` and ``celery -A worker beat`` find :data:`app` here (through
``worker/__init__.py``). The broker is ``$METER_BROKER_URL`` (default
``redis://127.0.0.1:6379/0``), the database ``$METER_DATABASE_URL``; the other ``METER_*``
variables are listed in :mod:`worker.settings`, except ``METER_METRICS_PORT``
(:mod:`worker.metrics`, Prometheus metrics, hooked in through Celery signals).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Exchange, Queue

from meter import wire
from worker import db, deliveries
from worker import metrics as _metrics  # noqa: F401  (import connects its signal handlers)
from worker.codec import register_exact_json
from worker.schedule import beat_schedule
from worker.settings import Settings
from worker.transport import transport_for

__all__ = ["app", "make_app", "worker_config"]

# Message bodies read with their numbers exact (worker.codec), in this process and in the
# pool processes it forks: kombu's own JSON changed an amount past a float's digits.
register_exact_json()


def worker_config(
    broker_url: str | None = None,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The full Celery configuration of a Meter worker.

    Parameters:
        broker_url: default ``$METER_BROKER_URL``, else ``redis://127.0.0.1:6379/0``.
        database_url: default ``$METER_DATABASE_URL``.
        env: the environment to read ``METER_*`` from (default ``os.environ``).

    On top of :func:`meter.wire.celery_config`, the settings that make delivery
    at-least-once and the effect exactly-once:

    - ``task_acks_late``: acknowledge after the task returned, i.e. after the database
      committed; ``task_reject_on_worker_lost``: a task whose worker process died is put
      back on the queue, not acknowledged;
    - ``task_acks_on_failure``: our tasks complete (retry, or dead-letter) on every error
      they can name; an exception that still escapes is a bug, logged with its message;
      ``task_acks_on_timeout`` off: a task killed by the hard time limit is redelivered
      (and counted: :mod:`worker.deliveries`);
    - ``worker_consumer``: :class:`worker.consumer.Consumer`, which files a message Celery
      cannot run (undecodable, unknown task, invalid or ill-typed headers) as a dead letter
      where Celery's would discard it, or stop the worker;
    - ``worker_prefetch_multiplier=1``: a worker holds one message beyond the one it runs,
      so a dying worker strands little, and a slow batch does not starve the others;
    - the broker visibility timeout (:data:`meter.wire.VISIBILITY_TIMEOUT`) outlasts the
      time limit and the longest retry countdown;
    - ``task_queues``: a worker consumes the events' queue and beat's
      (:data:`meter.wire.MAINTENANCE_QUEUE`) in turn, so maintenance never waits behind a
      backlog of events.
    """
    env = os.environ if env is None else env
    settings = Settings.from_env(env)
    if database_url is not None:
        settings = Settings.from_conf({**settings.as_conf(), "meter_database_url": database_url})
    config = wire.celery_config(
        broker_url or wire.broker_url_from_env(env.get(wire.BROKER_URL_ENV))
    )
    config.update(
        # kombu's Redis transport, minus the pop/record window (docs/reliability.md)
        broker_transport=transport_for(config["broker_url"]),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure=True,
        task_acks_on_timeout=False,
        worker_prefetch_multiplier=1,
        # a message Celery cannot run is a dead letter, never discarded (worker/consumer.py)
        worker_consumer="worker.consumer:Consumer",
        task_time_limit=wire.TASK_TIME_LIMIT,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule=beat_schedule(settings),
        task_queues=[
            Queue(q, Exchange(q), routing_key=q) for q in (wire.QUEUE, wire.MAINTENANCE_QUEUE)
        ],
    )
    config.update(settings.as_conf())
    return config


def make_app(**kwargs: Any) -> Celery:
    """A configured Meter Celery app (``kwargs`` as for :func:`worker_config`)."""
    # task_cls: Celery's built-in tasks take it too, so no task of a Meter worker runs
    # under a message's unsigned ``timelimit`` header
    celery_app = Celery("meter", set_as_current=False, task_cls="worker.tasks:WorkerTask")
    celery_app.conf.update(worker_config(**kwargs))
    # The tasks are shared tasks (registered with every app); importing them here makes
    # sure they exist whatever imported this module first.
    import worker.schedule
    import worker.tasks  # noqa: F401

    return celery_app


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # A prefork child must not use connections opened by its parent.
    db.forget_after_fork()
    deliveries.forget_after_fork()


@worker_process_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    db.close_all()


app = make_app()
"""The app ``celery -A worker`` runs."""
