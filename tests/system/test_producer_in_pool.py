"""A buffered producer used inside an application's Celery prefork pool.

A pool child (billiard) leaves by ``os._exit()`` from its pool's own exit path, which runs
neither atexit hooks nor multiprocessing's finalizers: the producer's exit flush must come
from Celery's ``worker_process_shutdown``, sent in the child just before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.system.harness import (
    CrashableRedis,
    WorkerProcess,
    consumption_keys,
    eventually,
)


class UserWorker(WorkerProcess):
    """The application's worker: one prefork child, recycled after every 2 tasks."""

    def argv(self) -> list[str]:
        return [
            "--loglevel", "INFO", "--pool", "prefork", "--concurrency", "1",
            "--max-tasks-per-child", "2", "--queues", "user", "--hostname", f"{self.name}@%h",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip


@pytest.mark.timeout(180)
def test_a_prefork_child_sends_its_buffer_when_recycled_and_at_shutdown(
    crash_redis: CrashableRedis,
    worker_env: dict[str, str],
    start_worker: Any,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    """Review P3 #1: events a task buffered were lost when its pool child was recycled
    (max_tasks_per_child) or the worker shut down, whatever the linger."""
    from celery import Celery

    meter_worker = start_worker()
    user_env = {**worker_env, "USER_BROKER_URL": crash_redis.url(1)}
    user = UserWorker("tests.system.user_app", "user", user_env, tmp_path / "user.log")
    try:
        user.wait_ready()
        meter_worker.wait_ready()
        sender = Celery("sender", broker=crash_redis.url(1))
        keys = [f"pool-{i}" for i in range(3)]
        for key in keys:
            sender.send_task("user_app.record", args=(key,), queue="user")
        # the first child records 2 and is recycled; the next records the third
        eventually(lambda: user.log.read_bytes().count(b"succeeded") == 3, 60, what="3 tasks run")
        user.stop()  # warm shutdown: the second child exits too
        eventually(
            lambda: set(consumption_keys(db)) == set(keys),
            60,
            what=f"{keys} applied",
        )
        assert consumption_keys(db) == dict.fromkeys(keys, 1)
    finally:
        user.kill()
