"""The producers' Redis transport: kombu's, with one redis-py client object per pool, and a
channel closed under a publish raising a connection error (see :class:`Channel`).

kombu builds a new redis-py client object for every command it sends outside its event
loop, and each publish is such a command: ~0.1 ms of CPU per enqueue in direct mode,
for an object that only wraps the channel's connection pool. :class:`Channel` keeps one
per pool. The workers' transport (:mod:`worker.transport`) builds on it.
"""

from __future__ import annotations

from typing import Any, Final

import redis.exceptions
from kombu.transport import redis as kombu_redis

__all__ = ["TRANSPORT", "Channel", "Transport", "scheme", "transport_for"]

TRANSPORT: Final = "meter.broker:Transport"
"""The ``broker_transport`` setting that selects this transport."""


def scheme(broker_url: str) -> str:
    """The URL's scheme, lower case (``''`` when it has none)."""
    return broker_url.partition("://")[0].lower() if "://" in broker_url else ""


def transport_for(broker_url: str) -> str | None:
    """The producers' ``broker_transport`` setting for ``broker_url``.

    This transport for ``redis://``; ``None`` (kombu's choice by scheme) for anything
    else, ``rediss://`` included: kombu infers TLS from that scheme only for its own
    transport.
    """
    return TRANSPORT if scheme(broker_url) == "redis" else None


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, reusing one client object for as long as its pool lasts."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        # The pool is replaced after a fork or a lost connection, and then so is the
        # client. redis-py clients are thread-safe: each command takes a connection from
        # the pool. The event loop's (asynchronous) client is kombu's own, made once.
        if self.connection is None:
            # Closed under a publish that still holds it: kombu's maybe_declare, retrying
            # a declare after a connection error inside the publish, collects the
            # connection (closing this, the producer's channel), reconnects, and the
            # publish goes on with this channel, where kombu raised AttributeError (no
            # retry, no PublishError: a buffered close() lost its buffer). A connection
            # error is what it is: the publish's own retry revives the producer on a new
            # channel and sends the message.
            raise redis.exceptions.ConnectionError(
                "the channel was closed under this publish (its connection was collected)"
            )
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
