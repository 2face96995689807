"""A bare kombu consumer for the crash tests: ``python -m tests.system.kombu_consumer``.

Arguments: broker URL, queue name, transport (``worker.transport:Transport``, or ``redis``
for kombu's own), transport options as JSON. Each message body ``{"n": <int>}`` is
"processed" by adding ``n`` to the Redis set ``<queue>.done`` (idempotent, like Meter's
idempotency keys), then acknowledged. Prints ``ready`` once it consumes; runs until killed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import redis
from kombu import Connection, Exchange, Queue


def main(argv: list[str]) -> None:
    url, name, transport, options = argv[0], argv[1], argv[2], json.loads(argv[3])
    done = redis.Redis.from_url(url)
    queue = Queue(name, Exchange(name), name)

    def on_message(body: dict[str, Any], message: Any) -> None:
        done.sadd(f"{name}.done", body["n"])
        message.ack()

    with (
        Connection(url, transport=transport, transport_options=options) as conn,
        conn.Consumer(queue, callbacks=[on_message], prefetch_count=4),
    ):
        print("ready", flush=True)
        while True:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass


if __name__ == "__main__":
    main(sys.argv[1:])
