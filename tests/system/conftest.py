"""System-test fixtures: real ``celery -A worker worker`` processes, a Redis they can lose.

``crash_redis``   function  a Redis of the test's own (``CrashableRedis``: AOF,
                            ``appendfsync always``) that the test may SIGKILL and restart;
                            its log is kept as ``redis.log`` in the test's ``tmp_path``.
``worker_env``    function  the environment of a worker: ``METER_BROKER_URL`` on
                            ``crash_redis``, ``METER_DATABASE_URL`` the test database as the
                            maintenance role (what workers run as), fast orphan settings.
``start_worker``  function  ``start_worker(**env) -> WorkerProcess`` (not waited for: call
                            ``wait_ready()``); every worker still running at the end is
                            SIGKILLed, and the logs of all are printed if the test failed.

``METER_SYSTEM_CELERY_APP`` names the app the workers run (default ``worker``): for
experiments, such as running the crash tests against kombu's stock transport.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system.harness import CrashableRedis, WorkerProcess


@pytest.fixture
def crash_redis(tmp_path: Path) -> Iterator[CrashableRedis]:
    base = Path(tempfile.mkdtemp(prefix="meter-system-redis-"))
    server = CrashableRedis(base / "data")
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            # its log outlives the data: what each start loaded, cut or refused
            with contextlib.suppress(OSError):
                shutil.copy(base / "data" / "redis.log", tmp_path / "redis.log")
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def worker_env(crash_redis: CrashableRedis, maint_url: str) -> dict[str, str]:
    return {
        "METER_BROKER_URL": crash_redis.url(),
        "METER_DATABASE_URL": maint_url,
        "METER_RETRY_BACKOFF_BASE": "0.05",
        "METER_RETRY_BACKOFF_MAX": "1",
    }


@pytest.fixture
def start_worker(
    request: pytest.FixtureRequest, worker_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    app = os.environ.get("METER_SYSTEM_CELERY_APP", "worker")
    workers: list[WorkerProcess] = []
    counter = itertools.count(1)

    def factory(**env: Any) -> WorkerProcess:
        name = f"w{next(counter)}"
        worker = WorkerProcess(
            app,
            name,
            {**worker_env, **{k: str(v) for k, v in env.items()}},
            tmp_path / f"{name}.log",
        )
        workers.append(worker)
        return worker

    try:
        yield factory
    finally:
        for worker in workers:
            worker.kill()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            for worker in workers[-3:]:
                print(f"--- log of worker {worker.name} ---\n{worker.tail(60)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Let fixtures see whether the test body failed (to print the workers' logs).
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
