"""Pure helpers of the operations tooling: the metrics port setting, URL redaction, the
outcome counting of worker/metrics.py (on a private registry), the embedded Redis's
fsync policy argument, and the property tests' METER_PROPERTY_SCALE."""

from __future__ import annotations

import pytest

from meter.embedded import EmbeddedRedis, torn_write
from meter.status import redact
from worker.metrics import metrics_port


@pytest.mark.parametrize(("raw", "port"), [("", 0), ("  ", 0), ("0", 0), ("9808", 9808)])
def test_metrics_port(raw: str, port: int) -> None:
    assert metrics_port({"METER_METRICS_PORT": raw}) == port
    assert metrics_port({}) == 0


@pytest.mark.parametrize("raw", ["x", "-1", "65536", "9808.5"])
def test_metrics_port_refuses_what_is_not_a_port(raw: str) -> None:
    with pytest.raises(ValueError, match="METER_METRICS_PORT"):
        metrics_port({"METER_METRICS_PORT": raw})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://meter:s3cret@db:5432/meter", "postgresql://meter:***@db:5432/meter"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("host=db user=meter password=s3cret dbname=m", "host=db user=meter password=*** dbname=m"),
        ("host=db password='a b' dbname=m", "host=db password=*** dbname=m"),
        ("postgresql://postgres@127.0.0.1:5432/x", "postgresql://postgres@127.0.0.1:5432/x"),
        # redis-py takes the password up to the last '@' of the host part; a backslash
        # escapes a space in libpq's unquoted values: both showed the password's tail
        ("redis://u:p@ss@redis:6379/0", "redis://u:***@redis:6379/0"),
        ("host=db password=sec\\ ret dbname=m", "host=db password=*** dbname=m"),
        ("host=db password='it\\'s' dbname=m", "host=db password=*** dbname=m"),
    ],
)
def test_redact_hides_passwords_only(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_outcomes_are_counted_by_op_and_status_and_errors_are_dead_letters() -> None:
    from prometheus_client import CollectorRegistry

    from worker.metrics import Metrics

    registry = CollectorRegistry()
    m = Metrics(registry)
    consume = {"op": "consume", "namespace": "n", "args": {}}
    commit = {"op": "commit", "namespace": "n", "args": {}}
    m.observe_outcomes("meter.consume", (consume,), {"ok": True, "status": "applied"})
    m.observe_outcomes(
        "meter.apply_batch",
        ([consume, commit, {"op": "bogus"}, consume],),
        [
            {"ok": True, "status": "replayed"},
            {"ok": False, "status": "deferred", "task_id": "t"},
            {"ok": False, "status": "error", "error_sqlstate": "MT001"},
            {"ok": True, "status": "refused"},
        ],
    )
    # a batch that was not even a list is dead-lettered whole: one 'error' outcome
    m.observe_outcomes("meter.apply_batch", ("nonsense",), {"ok": False, "status": "error"})

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("meter_events_total", op="consume", status="applied") == 1
    assert value("meter_events_total", op="consume", status="replayed") == 1
    assert value("meter_events_total", op="consume", status="refused") == 1
    assert value("meter_events_total", op="commit", status="deferred") == 1
    assert value("meter_events_total", op="apply_batch", status="error") == 2
    assert value("meter_dead_letters_total", op="apply_batch") == 2
    assert value("meter_dead_letters_total", op="consume") is None
    assert value("meter_batch_size_count") == 1 and value("meter_batch_size_sum") == 4


@pytest.mark.parametrize("policy", ["no", "EVERYSEC", ""])
def test_embedded_redis_refuses_an_unknown_fsync_policy(tmp_path, policy: str) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync=policy)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing started
    assert EmbeddedRedis(tmp_path, appendfsync="always").appendfsync == "always"


@pytest.mark.parametrize("raw", ["0", "-2", "1.5", "many", "", "\u00b2"])
def test_property_scale_refuses_what_is_not_a_whole_number(monkeypatch, raw: str) -> None:
    from tests.examples import _scale

    monkeypatch.setenv("METER_PROPERTY_SCALE", raw)
    with pytest.raises(ValueError, match="METER_PROPERTY_SCALE"):
        _scale()
    monkeypatch.setenv("METER_PROPERTY_SCALE", "40")
    assert _scale() == 40


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


MULTI, SET = _resp(b"MULTI"), _resp(b"SET", b"k", b"value")


@pytest.mark.parametrize(
    ("tail", "kind"),
    [
        (SET[:-1], "command"),  # cut before the last \n
        (SET[:-2], "command"),
        (SET[:-7], "command"),  # inside the value
        (SET[:3], "command"),  # inside the count line: "*3\r"
        (b"*", "command"),
        (MULTI + SET + SET[:9], "transaction"),
        (MULTI + SET, "transaction"),  # ended between commands, no EXEC
        (MULTI[:-3], "command"),  # the MULTI itself cut short
        (MULTI + _resp(b"multi") + SET[:5], None),  # a MULTI inside: not one write
        (MULTI + SET + _resp(b"EXEC") + SET[:5], None),
        (MULTI + SET + _resp(b"SELECT", b"0") + SET[:5], None),  # a restart's first write
        (SET + SET[:5], None),  # a whole command first: not where a torn write starts
        (b"$3\r\nSET\r\n", None),  # not a command
        (b"*1\r\n$5\r\nMULTI\r\nXX", None),  # damage
        (SET.replace(b"value\r\n", b"valueXX"), None),  # a value not followed by \r\n
        (b"*x\r\n", None),
        (b"*-1\r\n", None),
        (b"", None),
    ],
)
def test_torn_write_tells_one_cut_short_write_from_damage(tail: bytes, kind: str | None) -> None:
    assert torn_write(tail) == kind
