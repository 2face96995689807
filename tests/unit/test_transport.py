"""``worker.transport`` without a Redis: how it is selected and configured."""

from __future__ import annotations

import hashlib

import pytest
from kombu import Connection

from meter import broker, wire
from worker import worker_config
from worker.transport import BEAT, ORPHANS, RECORD, RELEASE, TAKE, TRANSPORT, transport_for


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", TRANSPORT),
        ("REDIS://host/1", TRANSPORT),
        ("rediss://host:6380/0", TRANSPORT),
        ("sentinel://host:26379", None),
        ("amqp://guest@host//", None),
        ("memory://", None),
        ("", None),
    ],
)
def test_transport_for(url: str, expected: str | None) -> None:
    assert transport_for(url) == expected


def test_the_worker_uses_it_for_a_plain_redis_url() -> None:
    assert worker_config(broker_url="redis://127.0.0.1:1/0")["broker_transport"] == TRANSPORT
    assert worker_config(broker_url="memory://")["broker_transport"] is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", broker.TRANSPORT),
        ("REDIS://host/1", broker.TRANSPORT),
        ("rediss://host:6380/0", None),  # kombu's own: it infers TLS from the scheme
        ("sentinel://host:26379", None),
        ("amqp://guest@host//", None),
        ("", None),
    ],
)
def test_the_producers_transport(url: str, expected: str | None) -> None:
    assert broker.transport_for(url) == expected
    assert wire.celery_config(url)["broker_transport"] == expected


def test_the_workers_transport_builds_on_the_producers() -> None:
    from worker import transport

    assert issubclass(transport.Channel, broker.Channel)
    assert issubclass(transport.Transport, broker.Transport)
    conn = Connection("redis://127.0.0.1:1/0", transport=broker.TRANSPORT)
    try:
        assert type(conn.transport) is broker.Transport
    finally:
        conn.release()


def test_connection_resolves_it_and_defaults_the_sweep_period() -> None:
    # Nothing connects until a channel is opened.
    conn = Connection("redis://127.0.0.1:1/0", transport=TRANSPORT)
    try:
        assert type(conn.transport).__module__ == "worker.transport"
        assert conn.transport.client.transport_options["unacked_restore_interval"] == 1
    finally:
        conn.release()
    conn = Connection(
        "redis://127.0.0.1:1/0",
        transport=TRANSPORT,
        transport_options={"unacked_restore_interval": 5, "visibility_timeout": 7},
    )
    try:
        options = conn.transport.client.transport_options
        assert options["unacked_restore_interval"] == 5
        assert options["visibility_timeout"] == 7
    finally:
        conn.release()


def test_scripts_are_addressed_by_their_sha1() -> None:
    for script in (TAKE, RECORD, RELEASE, BEAT, ORPHANS):
        assert script.sha == hashlib.sha1(script.text.encode()).hexdigest()
