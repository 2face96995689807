"""Property test with refusals: invalid operations mixed into random valid sequences.

The state machine of ``test_properties.py`` (the Python model as oracle: balances,
``reconcile()``, the ledger folding to the balance, money conserved, replays changing
nothing) gets extra rules that make calls which must be refused: invalid amounts,
identifiers, metadata, TTLs and event times through the SDK; the same through the SQL
functions directly (bypassing the SDK's checks); idempotency keys reused for another
request; a hold committed or released that is not one. After each refusal:

- the call raised a ``MeterError`` (the SQL call: an ``MT0xx`` SQLSTATE);
- the whole database is exactly as before (``snapshot``: every ``meter`` table);
- the model is unchanged, so every invariant of the base machine still holds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test
from psycopg.types.json import Jsonb

from meter.errors import IdempotencyConflictError, MeterError, ValidationError
from tests.examples import examples
from tests.integration.test_properties import ET, UNIT, USER_ACCOUNTS, LedgerMachine

D = Decimal

# (parameter, bad value) for the SDK's recording calls
BAD_ARGS: list[tuple[str, Any]] = [
    ("amount", D("NaN")),
    ("amount", float("inf")),
    ("amount", D("1e-13")),  # 13 places
    ("amount", D("1e24")),  # 25 digits
    ("amount", D("0")),
    ("amount", D("-1")),
    ("amount", "ten"),
    ("user_id", ""),
    ("user_id", " u1"),
    ("user_id", "u\x00"),
    ("user_id", "u" * 257),
    ("event_type", "e\n"),
    ("unit", "x" * 65),
    ("resource", "r\x85"),
    ("idempotency_key", "k" * 257),
    ("metadata", [1, 2]),
    ("metadata", {"x": "a" * 70000}),
    ("metadata", {"x": float("nan")}),
    ("event_time", "yesterday"),
    ("ttl_seconds", 0),
    ("ttl_seconds", 86401),
]
TAKES = {
    "allocate": {"amount", "user_id", "event_type", "unit", "resource", "idempotency_key",
                 "metadata", "event_time"},
    "consume": {"amount", "user_id", "event_type", "unit", "resource", "idempotency_key",
                "metadata", "event_time"},
    "reserve": {"amount", "user_id", "event_type", "unit", "resource", "idempotency_key",
                "metadata", "ttl_seconds"},
    "adjust": {"user_id", "event_type", "unit", "resource", "idempotency_key", "metadata"},
}  # fmt: skip
BAD_CALLS = [(fn, p, v) for fn, params in TAKES.items() for p, v in BAD_ARGS if p in params]

# The SQL functions themselves, with values the SDK would never send.
BAD_SQL = [
    "SELECT * FROM meter.allocate('u1', 'tokens', 'NaN'::numeric, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.allocate('u1', 'tokens', 1e30, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.allocate('u1', 'tokens', 0.0000000000001, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.consume('u1', 'tokens', -5, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.consume(NULL, 'tokens', 5, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.adjust('u1', 'tokens', 0, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.allocate(E'u\\n1', 'tokens', 1, 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.allocate('u1', 'tokens', 1, 'tok', p_metadata => '[1]'::jsonb,"
    " p_namespace => %(ns)s)",
    "SELECT * FROM meter.allocate('u1', 'tokens', 1, 'tok',"
    " p_event_time => now() + interval '2 days', p_namespace => %(ns)s)",
    "SELECT * FROM meter.reserve('u1', 'tokens', 1, 'tok', p_ttl_seconds => 0,"
    " p_namespace => %(ns)s)",
    "SELECT * FROM meter.commit('r', -1, p_namespace => %(ns)s)",
    "SELECT * FROM meter.get_balance(' u1', 'tokens', 'tok', p_namespace => %(ns)s)",
    "SELECT * FROM meter.apply_events(%(events)s, NULL)",
]


class RefusalMachine(LedgerMachine):
    SNAPSHOT: Any = None

    def refused(self, call: Any, expected: type[MeterError] = MeterError) -> MeterError:
        before = self.SNAPSHOT()
        with pytest.raises(expected) as exc:
            call()
        assert self.SNAPSHOT() == before
        return exc.value

    @rule(bad=st.sampled_from(BAD_CALLS), acct=st.sampled_from(USER_ACCOUNTS))
    def invalid_sdk_call(self, bad, acct):
        fn, param, value = bad
        kwargs: dict[str, Any] = dict(
            user_id=acct[0], event_type=ET, amount=D("1"), unit=UNIT, resource=acct[1]
        )
        kwargs[param] = value
        err = self.refused(lambda: getattr(self.c, fn)(**kwargs), ValidationError)
        assert err.parameter == param or param in str(err), (err, param)

    @rule(statement=st.sampled_from(BAD_SQL))
    def invalid_sql_call(self, statement):
        # one event the fast path refuses (no account may appear) and one the slow path does
        events = Jsonb(
            [
                {"op": "allocate", "namespace": self.ns,
                 "args": {"user_id": "u1", "event_type": ET, "amount": "NaN", "unit": UNIT}},
                {"op": "commit", "namespace": self.ns,
                 "args": {"reservation_id": "r", "actual_amount": "-1"}},
            ]
        )  # fmt: skip
        before = self.SNAPSHOT()
        try:
            with self.DB.transaction():
                rows = self.DB.execute(statement, {"ns": self.ns, "events": events}).fetchall()
        except psycopg.Error as exc:
            assert (exc.sqlstate or "").startswith("MT"), exc
            assert self.SNAPSHOT() == before
            return
        # apply_events reports per event instead of raising; it files dead letters, else
        # nothing
        assert [r["status"] for r in rows] == ["error", "error"]
        after = self.SNAPSHOT()
        assert {k: v for k, v in after.items() if k != "dead_letters"} == {
            k: v for k, v in before.items() if k != "dead_letters"
        }
        self.DB.execute("DELETE FROM meter.dead_letters WHERE namespace = %s", (self.ns,))

    def _claimed_keys(self) -> list[str]:
        """Idempotency keys that hold a result. Not the client-chosen reservation ids that
        ``keyed`` also tracks: those are another name space, which a consume's
        idempotency key may repeat without conflict."""
        return [
            k
            for k, c in self.keyed.items()
            if c.result is not None and c.kwargs.get("idempotency_key") == k
        ]

    @precondition(lambda self: self._claimed_keys())
    @rule(data=st.data())
    def key_reused_for_another_request(self, data):
        key = data.draw(st.sampled_from(self._claimed_keys()))
        call = self.keyed[key]
        op = "consume" if call.op != "consume" else "allocate"
        user = call.kwargs.get("user_id") or "u1"
        self.refused(
            lambda: getattr(self.c, op)(user, ET, D("3.5"), UNIT, idempotency_key=key),
            IdempotencyConflictError,
        )

    @rule(days=st.integers(2, 3650))
    def event_time_too_far_ahead(self, days):
        when = datetime.now(UTC) + timedelta(days=days)
        self.refused(lambda: self.c.allocate("u1", ET, D("1"), UNIT, event_time=when))

    @rule()
    def consume_from_the_pool(self):
        # pool accounts take allocate and adjust, never consumption (SPEC 2)
        self.refused(lambda: self.c.consume(None, ET, D("1"), UNIT), ValidationError)


@pytest.mark.slow
def test_random_operations_with_refusals_agree_with_model(db_url, db, snapshot):
    class Machine(RefusalMachine):
        URL = db_url
        DB = db
        SNAPSHOT = staticmethod(snapshot)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=examples(15),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
