"""Property test: random operation sequences agree with a pure-Python model (pgledger style).

A hypothesis rule-based state machine drives allocate, consume (with and without
check_balance), reserve (with and without a client-chosen id), commit, release, adjust,
replays and conflicting reuses of earlier keys, and period configuration, opening and
closing, over a handful of accounts (a namespace pool among them). After every step:

- every balance, reserved and available equals the model (exact Decimals);
- ``reconcile()`` is empty;
- the ledger folds to the balance, and each row's ``balance_after`` is the running sum;
- money is conserved: ``total_credited - total_debited == balance``, both >= 0;
- accounts exist exactly when the model says a call created them.

Each example runs in its own namespace (a fresh uuid) of one database, so examples cannot
see each other and nothing needs truncating between them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from meter import MeterClient
from meter.errors import IdempotencyConflictError, NotFoundError, ValidationError
from tests.examples import examples

D = Decimal
ZERO = D("0")
ET = "tokens"
UNIT = "tok"

# (user_id, resource): two users, one with two resources, and the namespace pool.
ACCOUNTS: list[tuple[str | None, str | None]] = [
    ("u1", None),
    ("u1", "gpt"),
    ("u2", None),
    (None, None),
]
USER_ACCOUNTS = [a for a in ACCOUNTS if a[0] is not None]
PERIOD_STARTS = [date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)]
PERIOD_ENDS = [date(2025, 1, 31), date(2025, 2, 28), date(2025, 3, 31)]

# Mostly cents, sometimes the full 12 decimal places the SPEC allows.
amounts = st.one_of(
    st.integers(1, 100_000).map(lambda n: D(n) / 100),
    st.decimals(min_value=D("0.000000000001"), max_value=D("50"), places=12),
)
signed_amounts = st.tuples(amounts, st.booleans()).map(lambda t: t[0] if t[1] else -t[0])


@dataclass
class Account:
    exists: bool = False
    balance: Decimal = ZERO
    reserved: Decimal = ZERO
    config_allocation: Decimal | None = None
    config_limit: Decimal | None = None

    @property
    def available(self) -> Decimal:
        return self.balance - self.reserved


@dataclass
class Hold:
    account: tuple[str | None, str | None]
    amount: Decimal
    status: str = "active"
    commit_actual: Decimal | None = None
    commit_result: dict | None = None


@dataclass
class KeyedCall:
    """A write made with an idempotency key (or a client-chosen reservation id)."""

    op: str
    kwargs: dict[str, Any]
    result: dict | None = None  # None: the call had no effect, so it claimed nothing


class LedgerMachine(RuleBasedStateMachine):
    URL: str = ""
    DB: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.ns = f"prop-{uuid.uuid4().hex[:16]}"
        self.c = MeterClient(self.URL, namespace=self.ns)
        self.accounts = {a: Account() for a in ACCOUNTS}
        # Drawn from in insertion order, never sorted: keys and reservation ids are random
        # (uuids), so a sorted order would differ between runs of the same example and
        # hypothesis could not replay it (FlakyStrategyDefinition, seen in long runs).
        self.holds: dict[str, Hold] = {}
        self.keyed: dict[str, KeyedCall] = {}
        self.entry_ids: list[int] = []
        self.opens: dict[tuple, tuple[Decimal, Decimal]] = {}
        self.closes: dict[tuple, dict] = {}
        self.empty_closes: set[tuple] = set()

    def teardown(self) -> None:
        self.c.close()

    # ------------------------------------------------------------ operations (model + SDK)

    def _allocate(self, kw: dict) -> dict:
        acct = self.accounts[(kw["user_id"], kw["resource"])]
        r = self.c.allocate(**kw)
        acct.exists = True
        acct.balance += kw["amount"]
        assert r["balance"] == acct.balance, (r, acct)
        assert isinstance(r["entry_id"], int)
        self.entry_ids.append(r["entry_id"])
        return r

    def _consume(self, kw: dict) -> dict | None:
        acct = self.accounts[(kw["user_id"], kw["resource"])]
        r = self.c.consume(**kw)
        if kw["check_balance"] and acct.available < kw["amount"]:
            assert r == {
                "success": False,
                "balance": acct.balance,
                "available": acct.available,
                "entry_id": None,
            }, (r, acct)
            event("consume: refused")
            return None
        acct.exists = True
        acct.balance -= kw["amount"]
        assert (r["success"], r["balance"], r["available"]) == (
            True,
            acct.balance,
            acct.available,
        ), (r, acct)
        assert isinstance(r["entry_id"], int)
        self.entry_ids.append(r["entry_id"])
        return r

    def _reserve(self, kw: dict) -> dict | None:
        acct = self.accounts[(kw["user_id"], kw["resource"])]
        r = self.c.reserve(**kw)
        if acct.available < kw["amount"]:
            assert r == {
                "granted": False,
                "reservation_id": None,
                "balance": acct.balance,
                "available": acct.available,
                "expires_at": None,
            }, (r, acct)
            event("reserve: refused")
            return None
        acct.reserved += kw["amount"]
        assert (r["granted"], r["balance"], r["available"]) == (
            True,
            acct.balance,
            acct.available,
        ), (r, acct)
        assert r["expires_at"] is not None
        if kw.get("reservation_id") is not None:
            assert r["reservation_id"] == kw["reservation_id"]
        assert r["reservation_id"] not in self.holds
        self.holds[r["reservation_id"]] = Hold((kw["user_id"], kw["resource"]), kw["amount"])
        return r

    def _adjust(self, kw: dict) -> dict:
        acct = self.accounts[(kw["user_id"], kw["resource"])]
        r = self.c.adjust(**kw)
        acct.exists = True
        acct.balance += kw["amount"]
        assert r["balance"] == acct.balance, (r, acct)
        self.entry_ids.append(r["entry_id"])
        return r

    OPS = {"allocate": _allocate, "consume": _consume, "reserve": _reserve, "adjust": _adjust}

    def _keyed(self, op: str, kw: dict, key: str) -> None:
        """Make a keyed call for the first time, or evaluate an unclaimed one afresh."""
        result = self.OPS[op](self, kw)
        self.keyed[key] = KeyedCall(op, kw, result)

    # ------------------------------------------------------------ rules

    @rule(acct=st.sampled_from(ACCOUNTS), amount=amounts, keyed=st.booleans())
    def allocate(self, acct, amount, keyed):
        key = f"k-{uuid.uuid4().hex}" if keyed else None
        kw = dict(
            user_id=acct[0],
            event_type=ET,
            amount=amount,
            unit=UNIT,
            resource=acct[1],
            idempotency_key=key,
        )
        if key:
            self._keyed("allocate", kw, key)
        else:
            self._allocate(kw)

    @rule(
        acct=st.sampled_from(USER_ACCOUNTS),
        amount=amounts,
        check=st.booleans(),
        keyed=st.booleans(),
    )
    def consume(self, acct, amount, check, keyed):
        key = f"k-{uuid.uuid4().hex}" if keyed else None
        kw = dict(
            user_id=acct[0],
            event_type=ET,
            amount=amount,
            unit=UNIT,
            resource=acct[1],
            check_balance=check,
            idempotency_key=key,
        )
        if key:
            self._keyed("consume", kw, key)
        else:
            self._consume(kw)

    @rule(
        acct=st.sampled_from(USER_ACCOUNTS),
        amount=amounts,
        how=st.sampled_from(["plain", "key", "client-id"]),
    )
    def reserve(self, acct, amount, how):
        kw = dict(
            user_id=acct[0],
            event_type=ET,
            amount=amount,
            unit=UNIT,
            resource=acct[1],
            ttl_seconds=3600,
        )
        if how == "plain":
            self._reserve(kw)
            return
        if how == "key":
            kw["idempotency_key"] = key = f"k-{uuid.uuid4().hex}"
        else:
            kw["reservation_id"] = key = f"r-{uuid.uuid4().hex}"
        self._keyed("reserve", kw, key)

    @rule(
        acct=st.sampled_from(ACCOUNTS), amount=signed_amounts, keyed=st.booleans(), data=st.data()
    )
    def adjust(self, acct, amount, keyed, data):
        key = f"k-{uuid.uuid4().hex}" if keyed else None
        ref = None
        if self.entry_ids and data.draw(st.booleans(), label="with reference"):
            ref = data.draw(st.sampled_from(self.entry_ids), label="reference_id")
        kw = dict(
            user_id=acct[0],
            event_type=ET,
            amount=amount,
            unit=UNIT,
            resource=acct[1],
            reference_id=ref,
            idempotency_key=key,
        )
        if key:
            self._keyed("adjust", kw, key)
        else:
            self._adjust(kw)

    @rule(ref=st.integers(10**12, 10**13))
    def adjust_unknown_reference(self, ref):
        with pytest.raises(NotFoundError):
            self.c.adjust("u1", ET, D("1"), UNIT, reference_id=ref)

    @precondition(lambda self: self.holds)
    @rule(data=st.data(), actual=st.one_of(st.just(ZERO), amounts), replay=st.booleans())
    def commit(self, data, actual, replay):
        rid = data.draw(st.sampled_from(list(self.holds)), label="reservation_id")
        hold = self.holds[rid]
        acct = self.accounts[hold.account]
        if hold.status == "active":
            r = self.c.commit(rid, actual)
            acct.reserved -= hold.amount
            acct.balance -= actual
            assert {k: v for k, v in r.items() if k != "entry_id"} == {
                "success": True,
                "consumed": actual,
                "released": max(hold.amount - actual, ZERO),
                "reserved_amount": hold.amount,
                "balance": acct.balance,
                "status": "committed",
            }, (r, hold, acct)
            if actual == 0:
                assert r["entry_id"] is None
            else:
                assert isinstance(r["entry_id"], int)
                self.entry_ids.append(r["entry_id"])
            hold.status, hold.commit_actual, hold.commit_result = "committed", actual, r
        elif hold.status == "committed":
            if replay:
                r = self.c.commit(rid, hold.commit_actual)
                assert r == {**hold.commit_result, "status": "replayed"}, (r, hold)
                event("commit: replayed")
            else:
                other = hold.commit_actual + D("1")
                with pytest.raises(IdempotencyConflictError):
                    self.c.commit(rid, other)
                event("commit: conflict")
        else:  # released
            r = self.c.commit(rid, actual)
            assert r == {
                "success": False,
                "consumed": None,
                "released": None,
                "reserved_amount": hold.amount,
                "balance": None,
                "entry_id": None,
                "status": "released",
            }, (r, hold)
            event("commit: of released hold")

    @rule()
    def commit_unknown(self):
        r = self.c.commit(f"nope-{uuid.uuid4().hex}", D("1"))
        assert r == {
            "success": False,
            "consumed": None,
            "released": None,
            "reserved_amount": None,
            "balance": None,
            "entry_id": None,
            "status": "not_found",
        }

    @precondition(lambda self: any(h.status == "committed" for h in self.holds.values()))
    @rule(data=st.data(), same=st.booleans())
    def recommit(self, data, same):
        committed = [rid for rid, h in self.holds.items() if h.status == "committed"]
        rid = data.draw(st.sampled_from(committed), label="reservation_id")
        hold = self.holds[rid]
        if same:
            # The same amount, written differently (trailing zeros): still the same request.
            r = self.c.commit(rid, hold.commit_actual.quantize(D("1.000000000000")))
            assert r == {**hold.commit_result, "status": "replayed"}, (r, hold)
            event("commit: replayed")
        else:
            with pytest.raises(IdempotencyConflictError):
                self.c.commit(rid, hold.commit_actual + D("0.5"))
            event("commit: conflict")

    @precondition(lambda self: self.holds)
    @rule(data=st.data())
    def release(self, data):
        rid = data.draw(st.sampled_from(list(self.holds)), label="reservation_id")
        hold = self.holds[rid]
        ok = self.c.release(rid)
        if hold.status == "active":
            assert ok is True
            hold.status = "released"
            self.accounts[hold.account].reserved -= hold.amount
        else:
            assert ok is False

    @precondition(lambda self: self.keyed)
    @rule(data=st.data())
    def replay(self, data):
        key = data.draw(st.sampled_from(list(self.keyed)), label="key")
        call = self.keyed[key]
        if call.result is None:
            # The first attempt was refused and claimed nothing: evaluated afresh.
            self._keyed(call.op, call.kwargs, key)
            event(f"replay: {call.op} evaluated afresh")
            return
        r = getattr(self.c, call.op)(**call.kwargs)
        assert r == call.result, (r, call)
        event(f"replay: {call.op}")

    @precondition(lambda self: any(k.result is not None for k in self.keyed.values()))
    @rule(data=st.data())
    def conflicting_reuse(self, data):
        claimed = [k for k, v in self.keyed.items() if v.result is not None]
        key = data.draw(st.sampled_from(claimed), label="key")
        call = self.keyed[key]
        kw = {**call.kwargs, "amount": call.kwargs["amount"] * 2}
        if call.op == "consume":
            kw["check_balance"] = False  # so only the key can refuse it
        if call.op == "reserve":
            acct = self.accounts[(kw["user_id"], kw["resource"])]
            if acct.available < kw["amount"]:
                return  # a refusal for want of funds would also be right: not this check
        with pytest.raises(IdempotencyConflictError):
            getattr(self.c, call.op)(**kw)
        event(f"conflict: {call.op}")

    @rule(
        acct=st.sampled_from(ACCOUNTS),
        allocation=amounts,
        limit=st.one_of(st.none(), st.just(ZERO), amounts),
    )
    def set_period_config(self, acct, allocation, limit):
        r = self.c.set_period_config(
            acct[0], ET, UNIT, acct[1], PERIOD_STARTS[0], allocation, carry_over_limit=limit
        )
        assert r is None
        a = self.accounts[acct]
        a.exists = True
        a.config_allocation, a.config_limit = allocation, limit

    @rule(
        acct=st.sampled_from(ACCOUNTS),
        start=st.sampled_from(PERIOD_STARTS),
        allocation=st.one_of(st.none(), amounts),
    )
    def open_period(self, acct, start, allocation):
        a = self.accounts[acct]
        args = (acct[0], ET, UNIT, acct[1], start)
        if not a.exists:
            if allocation is None:
                return  # NotFoundError and ValidationError would both be right
            with pytest.raises(NotFoundError):
                self.c.open_period(*args, allocation=allocation)
            return
        if (acct, start) in self.opens:
            # a repeat: without an allocation it replays, whatever the configuration says
            # now; an explicit one must be the allocation the period was opened with
            first_effective, first_result = self.opens[(acct, start)]
            if allocation is None or allocation == first_effective:
                assert self.c.open_period(*args, allocation=allocation) == first_result
                event("open: replayed")
            else:
                with pytest.raises(IdempotencyConflictError):
                    self.c.open_period(*args, allocation=allocation)
            return
        effective = allocation if allocation is not None else a.config_allocation
        if effective is None:
            with pytest.raises(ValidationError):
                self.c.open_period(*args, allocation=None)
            return
        r = self.c.open_period(*args, allocation=allocation)
        self._period_closed_by_open(acct, start - timedelta(days=1))
        a.balance += effective
        assert r == a.balance, (r, a)
        self.opens[(acct, start)] = (effective, r)

    def _periods_around(self, acct: tuple, end: date) -> tuple[bool, bool]:
        """(a recorded period began by ``end`` and was closed after it, a recorded period
        begins after ``end``), from the periods table."""
        row = self.DB.execute(
            "SELECT bool_or(period_start <= %s AND period_end > %s) AS inside,"
            " bool_or(period_start > %s) AS later FROM meter.periods"
            " WHERE namespace = %s AND user_id IS NOT DISTINCT FROM %s AND event_type = %s"
            " AND unit = %s AND resource = coalesce(%s, '')",
            (end, end, end, self.ns, acct[0], ET, UNIT, acct[1]),
        ).fetchone()
        return bool(row["inside"]), bool(row["later"])

    def _period_closed_by_open(self, acct: tuple, end: date) -> None:
        """On a configured account, open_period closes the period still open before it at
        the day before, as the roll closes it (sql 031): what was unused at that end, by the
        ledger's event times, which this model does not keep. The close's figures are taken
        from the periods table; the invariants still check the ledger and the balance."""
        if (acct, end) in self.closes or (acct, end) in self.empty_closes:
            return
        row = self.DB.execute(
            "SELECT expired, carried_over, close_balance FROM meter.periods"
            " WHERE namespace = %s AND user_id IS NOT DISTINCT FROM %s AND event_type = %s"
            " AND unit = %s AND resource = coalesce(%s, '') AND period_end = %s",
            (self.ns, acct[0], ET, UNIT, acct[1], end),
        ).fetchone()
        if row is None:
            return
        event("open: closed the period before (031)")
        self.accounts[acct].balance -= row["expired"]
        result = {
            "expired": row["expired"],
            "carried_over": row["carried_over"],
            "new_balance": row["close_balance"],
        }
        if row["expired"] == row["carried_over"] == 0:
            self.empty_closes.add((acct, end))
        else:
            self.closes[(acct, end)] = result

    @rule(acct=st.sampled_from(ACCOUNTS), end=st.sampled_from(PERIOD_ENDS))
    def close_period(self, acct, end):
        a = self.accounts[acct]
        if not a.exists or (acct, end) in self.empty_closes:
            return  # unknown account / repeat of a no-op close: left to the periods tests
        args = (acct[0], ET, UNIT, acct[1], end)
        if (acct, end) in self.closes:
            assert self.c.close_period(*args) == self.closes[(acct, end)]
            event("close: replayed")
            return
        inside, later = self._periods_around(acct, end)
        if inside:
            # 041: a day inside a period closed on a later day ends no period
            with pytest.raises(ValidationError) as ei:
                self.c.close_period(*args)
            assert ei.value.parameter == "period_end"
            event("close: refused inside a closed period")
            return
        r = self.c.close_period(*args)
        if later:
            # 041: a period begins after the day, so the close counts what stood at its
            # end, by the ledger's event times, which this model does not keep: the figures
            # are the call's; the invariants still check the ledger and the balance
            a.balance -= r["expired"]
            if r["expired"] or r["carried_over"]:
                self.closes[(acct, end)] = r
            else:
                self.empty_closes.add((acct, end))
            event("close: as it stood at its end")
            return
        available = a.available
        if available <= 0:
            assert r == {"expired": ZERO, "carried_over": ZERO, "new_balance": a.balance}, (r, a)
            self.empty_closes.add((acct, end))
            return
        carry = available if a.config_limit is None else min(available, a.config_limit)
        a.balance = a.balance - available + carry
        expected = {"expired": available - carry, "carried_over": carry, "new_balance": a.balance}
        assert r == expected, (r, a)
        self.closes[(acct, end)] = r
        event("close: expired some" if expected["expired"] else "close: carried all")

    # ------------------------------------------------------------ invariants

    @invariant()
    def balances_match_model(self):
        for key, a in self.accounts.items():
            got = self.c.get_balance(key[0], ET, UNIT, key[1])
            assert got == {
                "balance": a.balance,
                "reserved": a.reserved,
                "available": a.available,
            }, (key, got, a)
            if not a.exists:
                assert self.c.get_account(key[0], ET, UNIT, key[1]) is None, key

    @invariant()
    def reconcile_is_empty(self):
        assert self.c.reconcile() == []

    @invariant()
    def ledger_folds_and_money_is_conserved(self):
        db = self.DB
        accounts = db.execute(
            "SELECT account_id, user_id, resource, balance, reserved, total_credited,"
            " total_debited FROM meter.accounts WHERE namespace = %s",
            (self.ns,),
        ).fetchall()
        existing = {(r["user_id"], r["resource"] or None) for r in accounts}
        assert existing == {k for k, a in self.accounts.items() if a.exists}
        rows = db.execute(
            "SELECT account_id, user_id, resource, amount, balance_after FROM meter.ledger"
            " WHERE namespace = %s ORDER BY id",
            (self.ns,),
        ).fetchall()
        running: dict[int, Decimal] = {}
        for row in rows:
            aid = row["account_id"]
            running[aid] = running.get(aid, ZERO) + row["amount"]
            assert row["balance_after"] == running[aid], row
        for acc in accounts:
            assert running.get(acc["account_id"], ZERO) == acc["balance"], acc
            assert acc["total_credited"] >= 0 and acc["total_debited"] >= 0, acc
            assert acc["total_credited"] - acc["total_debited"] == acc["balance"], acc
        active = db.execute(
            "SELECT count(*) AS n FROM meter.reservations WHERE namespace = %s"
            " AND status = 'active'",
            (self.ns,),
        ).fetchone()["n"]
        assert active == sum(h.status == "active" for h in self.holds.values())


@pytest.mark.slow
def test_random_operations_agree_with_model(db_url, db):
    class Machine(LedgerMachine):
        URL = db_url
        DB = db

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=examples(25),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
