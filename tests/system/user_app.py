"""An application's own Celery app whose tasks record usage through a buffered producer.

Used by ``test_producer_in_pool.py``: the producer is made at import, in the worker's
parent process, as task modules make theirs, and used in the prefork pool's children.
``USER_BROKER_URL`` is the application's broker; Meter's is ``METER_BROKER_URL``.
"""

from __future__ import annotations

import os

from celery import Celery

from meter.producer import MeterProducer

app = Celery("user_app", broker=os.environ["USER_BROKER_URL"])
app.conf.task_default_queue = "user"

# A linger far longer than the test: only the child's exit can send what it buffered.
producer = MeterProducer(batch_size=100, linger_ms=600_000)


@app.task(name="user_app.record")
def record(key: str) -> None:
    producer.consume("u1", "tokens", 1, "tok", idempotency_key=key)
