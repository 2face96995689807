"""Pipeline fixtures: a real Redis broker and Celery workers running Meter's tasks.

The workers come from ``celery.contrib.pytest`` (its non-Docker fixtures: ``celery_app`` /
``celery_worker``, a worker thread with the ``solo`` pool), configured with Meter's own
settings (:func:`worker.worker_config`) and a short orphan horizon and backoff so tests
stay fast. pytest-celery's Docker-based fixtures are never requested.

Fixtures (names are a contract):

``redis_server``  session   an embedded Redis in a temp dir (``EmbeddedRedis``), or the
                            server of ``METER_TEST_BROKER_URL`` (whose database is flushed
                            before each test: point it at a throwaway Redis).
``broker_url``    function  the broker URL, with an empty database.
``pipeline``      function  a started worker (``celery_worker``) whose tasks apply to the
                            test's database (``db_url``); yields the Celery app.
``make_producer`` function  ``make_producer(**kwargs) -> MeterProducer`` on ``broker_url``,
                            closed afterwards.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest
import redis

from meter.embedded import EmbeddedRedis

if TYPE_CHECKING:
    from celery import Celery

    from meter.producer import MeterProducer

TEST_SETTINGS: Mapping[str, Any] = {
    "meter_orphan_horizon": 3.0,
    "meter_retry_backoff_base": 0.05,
    "meter_retry_backoff_max": 0.5,
    "meter_max_deliveries": 3,
}
"""Worker settings for tests: orphans give up after 3 s, retries come back within 0.5 s."""


class RedisServer(Protocol):
    """What tests may rely on from ``redis_server``."""

    def url(self, db: int = 0) -> str: ...


class ExternalRedis:
    """A server given by ``METER_TEST_BROKER_URL``; its URL is used as it is."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, db: int = 0) -> str:
        del db
        return self._url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A running Redis for the whole session (embedded unless the environment names one)."""
    external = os.environ.get("METER_TEST_BROKER_URL")
    if external:
        yield ExternalRedis(external)
        return
    base = Path(tempfile.mkdtemp(prefix="meter-test-redis-"))
    server = EmbeddedRedis(base / "data")
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def broker_url(redis_server: RedisServer) -> str:
    """The broker URL, its database emptied: no message or result of an earlier test."""
    url = redis_server.url()
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url


# ---------------------------------------------------------- celery.contrib.pytest hooks


@pytest.fixture(scope="session")
def celery_config(redis_server: RedisServer) -> dict[str, Any]:
    """Meter's worker configuration on the test broker (``celery_app`` is built from it)."""
    from worker import worker_config

    config = worker_config(broker_url=redis_server.url(), database_url="")
    config.update(TEST_SETTINGS)
    # BRPOP waits 0.1 s instead of 1 s: a worker thread stops that much sooner.
    config["broker_transport_options"] = {
        **config["broker_transport_options"],
        "polling_interval": 0.1,
    }
    return config


@pytest.fixture(scope="session")
def celery_includes() -> list[str]:
    """Modules registering Meter's tasks on the test app."""
    return ["worker.tasks", "worker.schedule"]


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    """The ping check sends ``celery.ping`` and waits for a result: ours are off by default."""
    return {"perform_ping_check": False, "shutdown_timeout": 10.0}


@pytest.fixture
def _pipeline_db(broker_url: str, db_url: str, celery_app: Celery) -> Iterator[str]:
    """Point the test app's tasks at this test's database; close the pools afterwards.

    Set up before ``celery_worker`` and torn down after it, so the worker never runs with
    another database and its connections are closed before ``db_url`` drops the database.
    """
    del broker_url  # requested for its side effect: an empty broker
    from worker import db

    celery_app.conf.meter_database_url = db_url
    try:
        yield db_url
    finally:
        db.close_all()
        # Collect the test's AsyncResults now: their __del__ unsubscribes from Redis,
        # which must still be running (it is not at the end of the session).
        gc.collect()


@pytest.fixture
def pipeline(_pipeline_db: str, celery_app: Celery, celery_worker: Any) -> Celery:
    """A worker thread applying Meter's tasks to this test's database; returns the app."""
    del _pipeline_db, celery_worker
    return celery_app


@pytest.fixture
def make_producer(broker_url: str) -> Iterator[Callable[..., MeterProducer]]:
    """Factory ``make_producer(namespace="default", **kwargs) -> MeterProducer``."""
    from meter.producer import MeterProducer

    producers: list[MeterProducer] = []

    def factory(namespace: str = "default", **kwargs: Any) -> MeterProducer:
        producer = MeterProducer(broker_url, namespace, **kwargs)
        producers.append(producer)
        return producer

    try:
        yield factory
    finally:
        for producer in reversed(producers):
            producer.close()
