"""Prometheus metrics of a real ``celery -A worker worker`` (prefork, 2 children).

The worker runs with ``METER_METRICS_PORT``; events go through the producer; the test
scrapes the endpoint and checks the counters against what it sent: outcomes by op and
status, the dead letters, the orphan commit's retries, the batch size and latency
histograms, and the last-success time of a periodic task.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meter import wire
from meter.embedded import free_port
from meter.producer import MeterProducer
from tests.system.harness import CrashableRedis, eventually

pytestmark = [pytest.mark.system]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_worker_serves_event_outcomes_retries_and_periodic_runs(
    start_worker: Any, crash_redis: CrashableRedis
) -> None:
    port = free_port()
    worker = start_worker(
        METER_METRICS_PORT=port,
        METER_ORPHAN_HORIZON_SECONDS="1",  # the orphan commit gives up within a second
    )
    worker.wait_ready()
    assert value(scrape(port), "meter_events_total", op="consume", status="applied") == 0

    started = time.time()
    with MeterProducer(crash_redis.url()) as producer:
        producer.allocate("u1", "tokens", 100, "tok", idempotency_key="a1")
        producer.consume("u1", "tokens", 10, "tok", idempotency_key="c1")
        producer.consume("u1", "tokens", 10, "tok", idempotency_key="c1")  # replayed
        producer.consume("u1", "tokens", 1000, "tok", check_balance=True)  # refused
        producer.allocate("u1", "tokens", 5, "tok", idempotency_key="a1")  # conflict
        producer.commit("r-never-reserved", 1)  # retried as an orphan, then dead-lettered
        producer.send_many(
            [{"op": "consume", "user_id": "u2", "event_type": "tokens", "amount": 1, "unit": "tok"}]
            * 5
        )
        producer.app.send_task(wire.RELEASE_EXPIRED)

    def settled() -> Samples | None:
        # every task has finished: 11 event outcomes, the orphan given up, the sweep done
        samples = scrape(port)
        outcomes = sum(v for (name, _), v in samples.items() if name == "meter_events_total")
        done = (
            outcomes == 11
            and value(samples, "meter_dead_letters_total", op="commit") == 1
            and value(
                samples, "meter_periodic_last_success_timestamp_seconds", task=wire.RELEASE_EXPIRED
            )
            > 0
        )
        return samples if done else None

    # Single events may run in either order across the two children: the replay and the
    # conflict are told apart by key, whichever ran first.
    samples = eventually(settled, timeout=60, what="every task finished")
    events = {
        (dict(labels)["op"], dict(labels)["status"]): v
        for (name, labels), v in samples.items()
        if name == "meter_events_total"
    }
    assert events == {
        ("allocate", "applied"): 1,
        ("allocate", "error"): 1,
        ("consume", "applied"): 6,
        ("consume", "replayed"): 1,
        ("consume", "refused"): 1,
        ("commit", "error"): 1,
    }
    assert value(samples, "meter_dead_letters_total", op="allocate") == 1
    assert value(samples, "meter_task_retries_total", task="meter.commit") >= 1
    assert value(samples, "meter_batch_size_count") == 1
    assert value(samples, "meter_batch_size_sum") == 5
    assert value(samples, "meter_apply_latency_seconds_count", task="meter.consume") == 3
    assert value(samples, "meter_tasks_total", task="meter.apply_batch", state="SUCCESS") == 1
    last = value(
        samples, "meter_periodic_last_success_timestamp_seconds", task=wire.RELEASE_EXPIRED
    )
    assert started <= last <= time.time()
