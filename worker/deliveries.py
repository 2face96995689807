"""Counting the deliveries of a message, to stop a task that keeps killing its worker.

With ``acks_late`` and ``reject_on_worker_lost``, a message whose task dies with its worker
(SIGKILL, OOM, segfault, hard time limit) is put back and delivered again: what makes the
pipeline lose nothing would also loop forever on an event that crashes every worker that
touches it. So a message marked *redelivered* (kombu's Redis transport sets the flag in the
message headers and ``delivery_info`` whenever it puts a message back: unacked restore or
reject with requeue) increments a counter in Redis before the task does any work; at
``max_deliveries`` the task gives up on it (a single event is dead-lettered, a batch split
into single-event tasks) instead of running it once more.

Keys: ``meter:deliveries:<task id>:<retries>`` (a Celery retry is a new message with the
same task id and ``retries + 1``, so each attempt counts on its own), an integer, expiring
after :data:`KEY_TTL` seconds, deleted when the task completes. A first delivery costs
nothing: only redelivered messages touch Redis.

So the n-th redelivery counts n, and a message is given up when it has already been
delivered ``max_deliveries`` times (the original delivery and ``max_deliveries - 1``
redeliveries) without its task completing.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

import redis

__all__ = ["KEY_TTL", "clear", "count", "forget_after_fork", "is_redelivered"]

KEY_TTL: Final = 7 * 24 * 3600
"""Seconds a counter outlives its last redelivery: far longer than any message waits."""

logger = logging.getLogger(__name__)

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def _client(url: str) -> redis.Redis:
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
                _clients[url] = client
    return client


def forget_after_fork() -> None:
    """In a freshly forked child: drop the parent's Redis clients (their sockets are shared)."""
    with _lock:
        _clients.clear()


def _key(task_id: str, retries: int) -> str:
    return f"meter:deliveries:{task_id}:{retries}"


def is_redelivered(request: Any) -> bool:
    """True if the broker has delivered this message before (flag set when it was put back)."""
    info = getattr(request, "delivery_info", None) or {}
    if info.get("redelivered"):
        return True
    headers = getattr(request, "headers", None) or {}
    return bool(headers.get("redelivered"))


def count(url: str, task_id: str, retries: int) -> int | None:
    """Count one more redelivery of this message; the total redeliveries so far.

    Returns ``None`` when Redis cannot be reached, or redis-py cannot open ``url`` (a
    ``sentinel://`` broker, which keeps kombu's own transport: its ValueError failed the
    task, which was acked and lost): the task then runs (counting is a safety net, never
    a reason to hold up work).
    """
    key = _key(task_id, retries)
    try:
        pipe = _client(url).pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, KEY_TTL)
        value, _ = pipe.execute()
        return int(value)
    except (redis.exceptions.RedisError, ValueError) as exc:
        logger.warning("cannot count deliveries of %s: %s", task_id, exc)
        return None


def clear(url: str, task_id: str, retries: int) -> None:
    """Forget the counter of a message whose task completed (best effort)."""
    try:
        _client(url).delete(_key(task_id, retries))
    except (redis.exceptions.RedisError, ValueError) as exc:
        logger.warning("cannot clear the delivery counter of %s: %s", task_id, exc)
