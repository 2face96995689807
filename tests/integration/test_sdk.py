"""The Python SDK: connection kinds, transactions, lifecycle, types, errors, threads (SPEC 4)."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

import meter
from meter import client as client_module
from meter.errors import (
    IdempotencyConflictError,
    MeterConnectionError,
    MeterError,
    NotFoundError,
    ValidationError,
)

D = Decimal
U = "u1"
ET = "tokens"
UNIT = "tok"


def other_backends(db):
    return db.execute(
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    ).fetchone()["n"]


def n_accounts(db):
    return db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"]


# ---------------------------------------------------------------- connection kinds


def test_client_from_conninfo(db_url, db):
    c = meter.MeterClient(db_url)
    try:
        assert c.allocate(U, ET, D("5"), UNIT)["balance"] == D("5")
        assert c.get_balance(U, ET, UNIT)["balance"] == D("5")
    finally:
        c.close()
    row = db.execute("SELECT namespace, balance FROM meter.accounts").fetchone()
    assert row == {"namespace": "default", "balance": D("5")}


def test_client_namespace_argument(db_url, db):
    with meter.MeterClient(db_url, namespace="acme") as c:
        c.allocate(U, ET, D("5"), UNIT)
    assert db.execute("SELECT namespace FROM meter.accounts").fetchone()["namespace"] == "acme"


def test_client_from_pool(db_url, db):
    with ConnectionPool(db_url, min_size=1, max_size=3, open=True) as pool:
        c = meter.MeterClient(pool)
        assert c.allocate(U, ET, D("5"), UNIT)["balance"] == D("5")
        assert c.consume(U, ET, D("2"), UNIT)["balance"] == D("3")
        with pytest.raises(ValidationError):
            c.allocate(U, ET, D("NaN"), UNIT)
        # the failed call left no broken connection behind
        assert c.get_balance(U, ET, UNIT)["balance"] == D("3")
        with pool.connection() as conn:
            assert conn.info.transaction_status == TransactionStatus.IDLE
    assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("3")


def test_client_from_connection_outside_transaction_commits(db_url, db):
    with psycopg.connect(db_url) as conn:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("5"), UNIT)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        # visible to others at once: the call ran in its own transaction
        assert n_accounts(db) == 1


def test_client_from_autocommit_connection(db_url, db):
    with psycopg.connect(db_url, autocommit=True) as conn:
        c = meter.MeterClient(conn)
        assert c.allocate(U, ET, D("5"), UNIT)["balance"] == D("5")
        assert n_accounts(db) == 1


def test_connection_client_failure_rolls_back_only_its_savepoint(db_url, db):
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TEMP TABLE caller_work (x int)")
        conn.execute("INSERT INTO caller_work VALUES (1)")
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("5"), UNIT, idempotency_key="k-1")
        with pytest.raises(IdempotencyConflictError):
            c.allocate(U, ET, D("6"), UNIT, idempotency_key="k-1")  # raised by the database
        with pytest.raises(NotFoundError):
            c.adjust(U, ET, D("1"), UNIT, reference_id=987654321)
        # the caller's transaction is still open and healthy, its work and the call intact
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert conn.execute("SELECT x FROM caller_work").fetchall() == [(1,)]
        assert c.get_balance(U, ET, UNIT)["balance"] == D("5")
        assert n_accounts(db) == 0  # nothing committed yet
        conn.commit()
    assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("5")
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 1


def test_connection_client_caller_rollback_undoes_call(db_url, db, snapshot):
    before = snapshot()
    with psycopg.connect(db_url) as conn:
        conn.execute("SELECT 1")
        c = meter.MeterClient(conn)
        assert c.allocate(U, ET, D("5"), UNIT)["balance"] == D("5")
        rid = c.reserve(U, ET, D("2"), UNIT)["reservation_id"]
        assert c.commit(rid, D("1"))["balance"] == D("4")
        conn.rollback()
        assert c.get_balance(U, ET, UNIT)["balance"] == D("0")
    assert snapshot() == before


def test_connection_client_inside_explicit_transaction_block(db_url, db):
    with psycopg.connect(db_url) as conn:
        c = meter.MeterClient(conn)
        with pytest.raises(RuntimeError):
            with conn.transaction():
                c.allocate(U, ET, D("5"), UNIT)
                raise RuntimeError("caller aborts")
        assert n_accounts(db) == 0
        with conn.transaction():
            c.allocate(U, ET, D("7"), UNIT)
        assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("7")


def _context(conn) -> tuple[str, ...]:
    names = ("tenant", "actor_id", "request_id", "on_behalf_of", "reason")
    return conn.execute(
        "SELECT " + ", ".join(f"current_setting('meter.{n}', true)" for n in names)
    ).fetchone()


def test_a_call_inside_the_callers_transaction_leaves_the_callers_context(app_url, db):
    # A call sets the tenant and the actor transaction-locally; inside the caller's open
    # transaction (a savepoint, released) they stayed until the caller's COMMIT: the
    # caller's own meter.* calls after it, in its own tenant, were refused (MT004), and
    # an actor set by the client was recorded on the caller's own writes.
    with psycopg.connect(app_url) as conn:
        conn.execute("SELECT meter.set_tenant('mine'), meter.set_actor('svc', 'req-1')")
        conn.commit()
        mine = _context(conn)
        assert mine == ("mine", "svc", "req-1", "", "")
        conn.execute("SELECT 1")  # the caller's transaction, open
        actor = meter.MeterClient(conn, namespace="other")
        actor.set_actor("alice", reason="refund")
        assert actor.allocate(U, ET, 5, UNIT)["balance"] == D(5)
        assert _context(conn) == mine
        plain = meter.MeterClient(conn, namespace="other")  # no actor: clears it for the call
        assert plain.get_balance(U, ET, UNIT)["balance"] == D(5)
        assert _context(conn) == mine
        with pytest.raises(IdempotencyConflictError):  # a failed call too
            actor.allocate(U, ET, 1, UNIT, idempotency_key="k")
            actor.allocate(U, ET, 2, UNIT, idempotency_key="k")
        assert _context(conn) == mine
        conn.execute("SELECT meter.allocate('u2', 'tokens', 3, 'tok', p_namespace => 'mine')")
        conn.commit()
        assert _context(conn) == mine
    rows = db.execute(
        "SELECT namespace, user_id, amount, actor_id, request_id, reason FROM meter.ledger"
        " ORDER BY id"
    ).fetchall()
    assert [tuple(r.values()) for r in rows] == [
        ("other", U, D(5), "alice", None, "refund"),
        ("other", U, D(1), "alice", None, "refund"),
        ("mine", "u2", D(3), "svc", "req-1", None),
    ]


@pytest.mark.parametrize("autocommit", [False, True])
def test_clients_sharing_a_connection_across_threads_count_every_call_once(db_url, db, autocommit):
    # Two clients on one connection (one per namespace, say), called from two threads:
    # one's BEGIN or SAVEPOINT ... COMMIT interleaved with the other's, and psycopg ended
    # some calls with "transaction commit at the wrong nesting level", a plain MeterError,
    # after their allocation had committed: a caller retrying them counted them twice.
    with psycopg.connect(db_url, autocommit=autocommit) as conn:
        clients = [meter.MeterClient(conn, namespace=ns) for ns in ("a", "b")]
        barrier = threading.Barrier(2)

        def calls(c: meter.MeterClient) -> int:
            barrier.wait()
            for _ in range(100):
                c.allocate(U, ET, D(1), UNIT)
            return 100

        with ThreadPoolExecutor(2) as pool:
            assert sum(pool.map(calls, clients)) == 200
        assert conn.info.transaction_status == TransactionStatus.IDLE
    counts = db.execute(
        "SELECT namespace, count(*) AS n FROM meter.ledger GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [(r["namespace"], r["n"]) for r in counts] == [("a", 100), ("b", 100)]


@pytest.mark.parametrize("same_client", [True, False])
@pytest.mark.parametrize("autocommit", [True, False])
def test_a_call_from_a_loader_run_inside_a_call_on_its_connection_is_refused(
    db_url, db, autocommit, same_client
):
    # A caller's loader calling the client again on the same connection, while a call was
    # loading its rows: on the same client it ran on the call's cursor, whose rows it
    # replaced (the outer call, committed, raised a ValueError out of the SDK's errors),
    # and on another it ran inside the call's transaction, its result undone if that
    # rolled back. It is refused, before anything is sent.
    with psycopg.connect(db_url, autocommit=autocommit) as conn:
        c = meter.MeterClient(conn)
        other = c if same_client else meter.MeterClient(conn)
        inner: list[Any] = []

        class CallingLoader(psycopg.adapt.Loader):
            def load(self, data: Any) -> int:
                if not inner:
                    inner.append(None)  # once
                    try:
                        inner[0] = other.allocate("inner", ET, D(1), UNIT)
                    except Exception as exc:
                        inner[0] = exc
                return int(bytes(data))

        conn.adapters.register_loader("int8", CallingLoader)
        got = c.allocate(U, ET, D("100"), UNIT)
        conn.commit()
        [refused] = inner
        assert isinstance(refused, ValidationError) and refused.parameter == "conn"
        assert got == {"balance": D("100"), "entry_id": got["entry_id"]}
        assert c.get_balance(U, ET, UNIT)["balance"] == D("100")  # the connection serves on
    assert [(r["entry_id"], r["amount"]) for r in ledger_rows(db)] == [(got["entry_id"], D(100))]


def test_a_call_from_a_notice_handler_inside_a_call_on_its_connection_is_refused(db_url, db):
    # psycopg runs a notice handler under its own lock of the connection: a call made from
    # it, on that connection, waited for that lock for good, and so did every later call.
    conn = psycopg.connect(db_url, autocommit=True, options="-c client_min_messages=debug5")
    c = meter.MeterClient(conn)
    inner: list[Any] = []

    def handler(diag: Any) -> None:
        if not inner:
            inner.append(None)  # once
            try:
                inner[0] = c.allocate("inner", ET, D(1), UNIT)
            except Exception as exc:
                inner[0] = exc

    conn.add_notice_handler(handler)
    outer: list[Any] = []
    call = threading.Thread(target=lambda: outer.append(c.allocate(U, ET, D(5), UNIT)))
    call.daemon = True
    call.start()
    call.join(10)
    assert not call.is_alive(), "the call hung"
    conn.close()
    [refused] = inner
    assert isinstance(refused, ValidationError) and refused.parameter == "conn"
    assert outer[0]["balance"] == D(5)
    assert [r["amount"] for r in ledger_rows(db)] == [D(5)]


def test_a_caller_s_connection_or_pool_of_raw_cursors_serves_every_call(db_url, db):
    # A psycopg.RawCursor takes $1 placeholders: built with cursor_factory=RawCursor, a
    # caller's connection or pool failed every call with a syntax error (42601, a plain
    # MeterError). The client's statements now use a cursor of its own kind, also for the
    # settings a session in another DateStyle gets, in and out of the caller's transaction.
    raw = make_conninfo(db_url, options="-c DateStyle=German")
    with psycopg.connect(raw, cursor_factory=psycopg.RawCursor) as conn:
        c = meter.MeterClient(conn)
        c.set_actor("alice")
        assert c.allocate(U, ET, D("1.5"), UNIT, metadata={"a": D("0.1")})["balance"] == D("1.5")
        conn.execute("SELECT $1::int", [1])  # the caller's transaction, open
        assert c.consume(U, ET, 1, UNIT)["balance"] == D("0.5")
        assert [r["amount"] for r in c.get_ledger(U, ET, UNIT)] == [D(-1), D("1.5")]
        conn.commit()
    with ConnectionPool(
        raw, min_size=1, max_size=1, kwargs={"cursor_factory": psycopg.RawCursor}, open=True
    ) as pool:
        c = meter.MeterClient(pool)
        assert c.allocate(U, ET, 2, UNIT)["balance"] == D("2.5")
        assert c.get_balance(U, ET, UNIT)["balance"] == D("2.5")
    rows = db.execute("SELECT amount, actor_id FROM meter.ledger ORDER BY id").fetchall()
    assert [tuple(r.values()) for r in rows] == [
        (D("1.5"), "alice"),
        (D(-1), "alice"),
        (D(2), None),
    ]


# ---------------------------------------------------------------- lifecycle


def _wait_backends(db, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while other_backends(db) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return other_backends(db)


def test_context_manager_returns_client_and_closes(db_url, db):
    base = other_backends(db)
    with meter.MeterClient(db_url) as c:
        assert isinstance(c, meter.MeterClient)
        assert c.allocate(U, ET, D("1"), UNIT)["balance"] == D("1")
    assert _wait_backends(db, base) == base


def test_close_releases_connections(db_url, db):
    base = other_backends(db)
    c = meter.MeterClient(db_url)
    for _ in range(3):
        c.get_balance(U, ET, UNIT)
    c.close()
    assert _wait_backends(db, base) == base


def test_a_client_called_from_one_thread_holds_one_connection(db_url, db):
    # Called at once after construction, as applications do: the first call must not
    # leave the pool with a second connection that it would then alternate with.
    base = other_backends(db)
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        for _ in range(50):
            assert c.get_balance(U, ET, UNIT)["balance"] == D("5")
        assert other_backends(db) == base + 1


def test_a_client_keeps_its_connection_between_calls(db_url, monkeypatch):
    with meter.MeterClient(db_url) as c:
        for _ in range(20):
            c.get_balance(U, ET, UNIT)
        # the first call's connection was kept, and served the other nineteen
        assert c._pool.get_stats()["requests_num"] == 1
    monkeypatch.setattr("meter.client._KEEP_FOR", 0.0)  # due back at once, every time
    with meter.MeterClient(db_url) as c:
        for _ in range(20):
            c.get_balance(U, ET, UNIT)
        assert c._pool.get_stats()["requests_num"] == 20


@pytest.mark.timeout(120)  # on the inherited pool it hung until killed
def test_a_forked_child_uses_connections_of_its_own(db_url, db):
    # As under gunicorn --preload: the client is built, and used, before the fork.
    base = other_backends(db)
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)  # the parent now holds a connection
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            try:
                c.consume(U, ET, D("1"), UNIT)
                with psycopg.connect(db_url, autocommit=True) as probe:
                    n = probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname ="
                        " current_database() AND pid <> pg_backend_pid()"
                        " AND backend_type = 'client backend'"
                    ).fetchone()[0]
                c.close()  # must leave the parent's connections alone
                os.write(w, f"backends {n}".encode())
            except BaseException as exc:
                os.write(w, repr(exc).encode()[:1000])
            finally:
                os._exit(0)
        os.close(w)
        for _ in range(50):  # the parent goes on with its own connection meanwhile
            assert c.get_balance(U, ET, UNIT)["available"] in (D("5"), D("4"))
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as pipe:
            # the test's own connection (db), the parent's, the child's
            assert pipe.read().decode() == f"backends {base + 3}"
        assert c.get_balance(U, ET, UNIT)["balance"] == D("4")
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


@pytest.mark.timeout(120)
def test_a_child_forked_while_a_client_was_being_built_can_build_its_own(db_url, db):
    # The registry of connection locks is guarded by a lock, held while a client is built
    # on a caller's connection; forked at that moment (another thread building one), the
    # child held it for good: the first client it built on a connection hung forever.
    r, w = os.pipe()
    held, done = threading.Event(), threading.Event()

    def building() -> None:  # another thread, building a client on a connection
        with client_module._connection_locks_guard:
            held.set()
            done.wait(10)

    builder = threading.Thread(target=building)
    builder.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:
        try:

            def hung(*_: object) -> None:
                raise TimeoutError("building a client hung")

            signal.signal(signal.SIGALRM, hung)
            signal.alarm(10)
            with psycopg.connect(db_url, autocommit=True) as conn:
                balance = meter.MeterClient(conn).allocate(U, ET, D("5"), UNIT)["balance"]
            os.write(w, f"balance {balance}".encode())
        except BaseException as exc:
            os.write(w, repr(exc).encode()[:1000])
        finally:
            os._exit(0)
    done.set()
    builder.join()
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as pipe:
        assert pipe.read().decode() == "balance 5"
    with psycopg.connect(db_url, autocommit=True) as conn:  # and the parent's still works
        assert meter.MeterClient(conn).get_balance(U, ET, UNIT)["balance"] == D("5")


@pytest.mark.timeout(120)
def test_a_forked_child_that_cannot_build_its_pool_gets_a_meter_error(db_url, db, monkeypatch):
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:

                def no_thread(*args, **kwargs):
                    raise RuntimeError("can't start new thread")

                monkeypatch.setattr(client_module, "ConnectionPool", no_thread)
                try:
                    c.consume(U, ET, D("1"), UNIT)
                    outcome = "no error"
                except MeterConnectionError as exc:
                    outcome = f"MeterConnectionError: {exc}"
                monkeypatch.undo()
                after = c.consume(U, ET, D("1"), UNIT)["balance"]  # the next call tries again
                c.close()
                os.write(w, f"{outcome} | {after}".encode())
            except BaseException as exc:
                os.write(w, repr(exc).encode()[:1000])
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as pipe:
            assert pipe.read().decode() == (
                "MeterConnectionError: could not open a connection pool in this process:"
                " can't start new thread | 4"
            )
        assert c.get_balance(U, ET, UNIT)["balance"] == D("4")  # the parent's pool still works
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


def test_more_threads_than_connections_all_get_served(db_url):
    # A kept connection must not bypass a call waiting for one from the pool.
    threads, calls = 3, 300
    with meter.MeterClient(db_url, max_size=1, timeout=10) as c:
        c.allocate(U, ET, D("5"), UNIT)
        barrier = threading.Barrier(threads)

        def work(_):
            barrier.wait()
            slowest = 0.0
            for _ in range(calls):
                started = time.monotonic()
                assert c.get_balance(U, ET, UNIT)["balance"] == D("5")
                slowest = max(slowest, time.monotonic() - started)
            return slowest

        with ThreadPoolExecutor(threads) as ex:
            slowest = list(ex.map(work, range(threads)))
    assert max(slowest) < 5.0, slowest  # the pool's timeout (10 s) is far off


def test_close_while_threads_call_leaves_no_connection_open(db_url, db):
    base = other_backends(db)
    c = meter.MeterClient(db_url, max_size=4)
    c.allocate(U, ET, D("5"), UNIT)
    outcomes: list[str] = []

    def work():
        try:
            while True:
                c.get_balance(U, ET, UNIT)
        except Exception as exc:  # the client closed, or its pool closed under the call
            outcomes.append(type(exc).__name__)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    c.close()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)
    assert outcomes == ["MeterConnectionError"] * 4
    assert _wait_backends(db, base) == base


def test_a_kept_connection_that_died_fails_one_call_and_is_replaced(db_url, db, monkeypatch):
    # Used again at once, a connection is not checked first: the call that finds it dead
    # fails (it cannot know whether the server ran it), the next one reconnects.
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 3600.0)
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        c.get_balance(U, ET, UNIT)  # this call's connection is the one kept
        killed = db.execute(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchall()
        assert [r["ok"] for r in killed] == [True]
        with pytest.raises(MeterConnectionError):
            c.consume(U, ET, D("2"), UNIT)
        assert c.consume(U, ET, D("2"), UNIT)["balance"] == D("3")
    assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("3")
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


def _kill_other_backends(db) -> int:
    return len(
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchall()
    )


def test_a_kept_connection_that_died_while_idle_is_replaced_before_the_call(
    db_url, db, monkeypatch
):
    # As after a server restart or an idle-session timeout: the check finds it dead before
    # anything is sent, so the call goes through on a new connection.
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 0.0)
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        assert _kill_other_backends(db) == 1
        assert c.consume(U, ET, D("2"), UNIT)["balance"] == D("3")
    assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("3")
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


def test_a_pooled_connection_that_died_while_idle_is_replaced_before_the_call(
    db_url, db, monkeypatch
):
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 0.0)
    monkeypatch.setattr(client_module, "_KEEP_FOR", 0.0)  # every call gives it back
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        assert c._kept is None
        assert _kill_other_backends(db) == 1
        assert c.consume(U, ET, D("2"), UNIT)["balance"] == D("3")
    assert db.execute("SELECT balance FROM meter.accounts").fetchone()["balance"] == D("3")
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


def test_a_pool_full_of_dead_connections_is_replaced_without_waiting(db_url, db, monkeypatch):
    # After a server restart every idle connection of the pool is dead: each is discarded
    # at once (psycopg_pool's own check waits 1, 2, 4... s between them).
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 0.0)
    with meter.MeterClient(db_url, max_size=6, timeout=30) as c:
        c.allocate(U, ET, D("5"), UNIT)  # its connection is kept
        taken = [c._pool.getconn() for _ in range(5)]  # five more, idle in the pool
        for conn in taken:
            c._pool.putconn(conn)
        assert _kill_other_backends(db) == 6
        started = time.monotonic()
        assert c.consume(U, ET, D("2"), UNIT)["balance"] == D("3")
        assert time.monotonic() - started < 3.0
    assert db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 2


def test_only_a_connection_idle_past_the_window_is_checked(db_url, monkeypatch):
    checks = []
    check = ConnectionPool.check_connection

    def counted(conn):
        checks.append(conn)
        check(conn)

    monkeypatch.setattr(ConnectionPool, "check_connection", staticmethod(counted))
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 0.3)
    with meter.MeterClient(db_url) as c:
        for _ in range(20):
            c.get_balance(U, ET, UNIT)
        assert checks == []  # busy: no round trip added
        time.sleep(0.4)
        c.get_balance(U, ET, UNIT)
        assert len(checks) == 1
        c.get_balance(U, ET, UNIT)
        assert len(checks) == 1


def test_close_does_not_close_callers_connection(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        with meter.MeterClient(conn) as c:
            c.get_balance(U, ET, UNIT)
        assert not conn.closed
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- types


def _no_floats(value, path="result"):
    if isinstance(value, float):
        raise AssertionError(f"{path} is a float: {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_floats(v, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _no_floats(v, f"{path}[{i}]")


def _decimals(d, *cols):
    for col in cols:
        assert type(d[col]) is Decimal, (col, d[col])


def test_results_are_decimal_never_float(client, db):
    t = datetime(2024, 5, 1, tzinfo=UTC)
    results = []
    r = client.allocate(U, ET, 10, UNIT)
    _decimals(r, "balance")
    results.append(r)
    r = client.consume(U, ET, 1, UNIT, event_time=t)
    _decimals(r, "balance", "available")
    results.append(r)
    r = client.reserve(U, ET, 2, UNIT)
    _decimals(r, "balance", "available")
    results.append(r)
    r = client.commit(r["reservation_id"], 1)
    _decimals(r, "consumed", "released", "reserved_amount", "balance")
    results.append(r)
    r = client.adjust(U, ET, 1, UNIT)
    _decimals(r, "balance")
    results.append(r)
    r = client.get_balance(U, ET, UNIT)
    _decimals(r, "balance", "reserved", "available")
    results.append(r)
    r = client.get_account(U, ET, UNIT)
    _decimals(r, "balance", "reserved", "total_credited", "total_debited")
    results.append(r)
    for row in client.get_ledger(U, ET, UNIT):
        _decimals(row, "amount", "balance_after")
        results.append(row)
    for row in client.get_user_balances(U):
        _decimals(row, "balance", "reserved", "available")
    for row in client.get_usage(U, None, None):
        _decimals(row, "total_consumed")
        assert type(row["event_count"]) is int
    for row in client.get_namespace_usage(None, None):
        _decimals(row, "total_consumed")
    s = client.get_stats()
    _decimals(s, "total_balance", "total_reserved")
    results.append(s)
    client.set_period_config(U, ET, UNIT, None, date(2024, 1, 1), 5, 1)
    opened = client.open_period(U, ET, UNIT, None, date(2024, 1, 1))
    assert type(opened) is Decimal
    r = client.close_period(U, ET, UNIT, None, date(2024, 1, 31))
    _decimals(r, "expired", "carried_over", "new_balance")
    results.append(r)
    results.extend(client.get_audit_events(limit=1000))
    for e in client.get_audit_events(kinds=["ledger.allocation"]):
        assert type(e["amount"]) is Decimal
    _no_floats(results)


def test_amounts_accept_int_decimal_str_float(client):
    assert client.allocate(U, ET, 5, UNIT)["balance"] == D("5")
    assert client.allocate(U, ET, D("2.5"), UNIT)["balance"] == D("7.5")
    assert client.allocate(U, ET, "1.25", UNIT)["balance"] == D("8.75")
    r = client.allocate(U, ET, 0.1, UNIT)
    assert r["balance"] == D("8.85")
    assert str(r["balance"].normalize()) == "8.85"
    assert client.consume(U, ET, 0.05, UNIT)["balance"] == D("8.8")
    assert client.adjust(U, ET, -0.3, UNIT)["balance"] == D("8.5")


def test_returned_values_can_be_passed_back(client):
    a = client.allocate(U, ET, D("10"), UNIT)
    avail = client.get_balance(U, ET, UNIT)["available"]
    g = client.reserve(U, ET, avail, UNIT)
    assert g["granted"] is True
    c = client.commit(g["reservation_id"], g["available"] + D("3"))  # available is 0 here
    assert c["consumed"] == D("3")
    back = client.allocate(U, ET, c["released"] + c["reserved_amount"], UNIT)
    assert back["balance"] == D("24")
    row = client.get_ledger(U, ET, UNIT)[0]
    j = client.adjust(U, ET, -row["amount"], UNIT, reference_id=a["entry_id"])
    assert j["balance"] == D("7")
    ledger = client.get_ledger(U, ET, UNIT, start_time=row["event_time"])
    assert ledger[0]["reference_id"] == a["entry_id"]
    bal = client.get_account(U, ET, UNIT)
    r = client.consume(U, ET, bal["balance"], UNIT, check_balance=True)
    assert (r["success"], r["balance"]) == (True, D("0"))
    start = bal["created_at"].date()
    client.set_period_config(U, ET, UNIT, bal["resource"], start, j["balance"], j["balance"])
    opened = client.open_period(U, ET, UNIT, bal["resource"], start)
    assert opened == D("7")
    assert client.allocate(U, ET, opened, UNIT)["balance"] == D("14")


# ---------------------------------------------------------------- errors


def test_error_hierarchy():
    for cls in (ValidationError, IdempotencyConflictError, NotFoundError, MeterConnectionError):
        assert issubclass(cls, MeterError)
    assert issubclass(meter.MeterError, Exception)


def test_validation_error_names_parameter(client, snapshot):
    before = snapshot()
    with pytest.raises(ValidationError) as ei:
        client.consume(U, ET, D("NaN"), UNIT)
    assert ei.value.parameter == "amount"
    assert snapshot() == before


def test_unreachable_database_raises_connection_error():
    url = "host=127.0.0.1 port=1 dbname=meter user=meter connect_timeout=2"
    started = time.monotonic()
    with pytest.raises(MeterConnectionError) as ei:
        with meter.MeterClient(url) as c:
            c.get_balance(U, ET, UNIT)
    assert isinstance(ei.value, MeterError)
    assert time.monotonic() - started < 60


def test_an_unreachable_database_behind_a_pool_whose_kwargs_fix_its_conninfo_is_an_outage():
    # The probe asked libpq about the pool's conninfo alone, while it connected with the
    # pool's kwargs over it: a value the kwargs replace (sslmode) made a database out of
    # reach a ValidationError naming conn, a caller's mistake not to retry.
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        "host=127.0.0.1 port=1 dbname=meter user=meter sslmode=bogus connect_timeout=2",
        kwargs={"sslmode": "disable", "autocommit": True},
        min_size=0, max_size=2, open=True, timeout=3,
    )  # fmt: skip
    try:
        with pytest.raises(MeterConnectionError):
            meter.MeterClient(pool).get_balance(U, ET, UNIT)
    finally:
        pool.close()


# ---------------------------------------------------------------- threads


def test_conninfo_client_is_thread_safe(db_url, db):
    threads, per_thread = 8, 25
    with meter.MeterClient(db_url) as c:
        c.allocate("shared", ET, D("1000"), UNIT)
        barrier = threading.Barrier(threads)

        def work(i):
            barrier.wait()
            for j in range(per_thread):
                c.consume("shared", ET, D("1"), UNIT, idempotency_key=f"t{i}-{j}")
                c.allocate(f"user-{i}", ET, D("0.5"), UNIT)
                assert c.get_balance(f"user-{i}", ET, UNIT)["balance"] == D("0.5") * (j + 1)
            return i

        with ThreadPoolExecutor(threads) as ex:
            assert sorted(ex.map(work, range(threads))) == list(range(threads))

        assert c.get_balance("shared", ET, UNIT)["balance"] == D("800")
        for i in range(threads):
            assert c.get_balance(f"user-{i}", ET, UNIT)["balance"] == D("12.5")
        assert len(c.get_ledger("shared", ET, UNIT, limit=1000)) == 1 + threads * per_thread
        assert c.reconcile() == []
    balances = [
        r["balance_after"]
        for r in db.execute(
            "SELECT balance_after FROM meter.ledger WHERE user_id = 'shared' ORDER BY id"
        ).fetchall()
    ]
    assert balances == [D("1000") - k for k in range(threads * per_thread + 1)]


# ---------------------------------------------------------------- a reply lost after the commit


class ReplyCutter:
    """A TCP proxy in front of PostgreSQL that, once told a statement, lets it through and
    cuts the connection instead of handing back its reply: a network failing after the
    commit. The cut waits for ReadyForQuery, which the server sends after it committed."""

    READY = b"Z\x00\x00\x00\x05"

    def __init__(self, upstream: str) -> None:
        info = conninfo_to_dict(upstream)
        self.upstream = (info.get("host") or "127.0.0.1", int(info.get("port") or 5432))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = make_conninfo(upstream, host="127.0.0.1", port=self.listener.getsockname()[1])
        self.needle = b"\xff matches no statement"
        self.armed = False
        self.chance = 0.0  # cut_at_random
        self.rng = random.Random(0)
        self.seen = 0  # statements holding the needle since it was set
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_reply_to(self, needle: bytes) -> None:
        """Cut the reply to the next statement holding ``needle``; count them all."""
        self.needle, self.seen, self.armed = needle, 0, True

    def cut_at_random(self, chance: float, rng: random.Random) -> None:
        """Cut the reply to each statement with this chance. A statement is a message of
        the extended protocol (Parse or Bind first), which the SDK's calls use, not the
        pool's checks (a simple Query)."""
        self.chance, self.rng = chance, rng

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, server, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, cut), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if self.needle in data:
                    self.seen += 1
                    if self.armed:
                        self.armed = False
                        cut.set()
                if self.chance and data[:1] in (b"P", b"B") and self.rng.random() < self.chance:
                    cut.set()
                server.sendall(data)

    def _down(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        held = b""
        with suppress(OSError):
            while data := server.recv(65536):
                if not cut.is_set():
                    client.sendall(data)
                    continue
                held += data
                if self.READY in held:  # committed; the client never hears of it
                    self.cuts += 1
                    break
        for s in (client, server):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cutter(db_url):
    proxy = ReplyCutter(db_url)
    try:
        yield proxy
    finally:
        proxy.close()


def ledger_rows(db, key=None):
    return db.execute(
        "SELECT id AS entry_id, amount FROM meter.ledger"
        + (" WHERE idempotency_key = %s" if key else " ORDER BY id"),
        (key,) if key else (),
    ).fetchall()


def test_keyed_writes_whose_reply_was_lost_run_again_and_count_once(cutter, db):
    # A write that carries its key replays on another connection: the caller gets the
    # first result, the ledger one row.
    with meter.MeterClient(cutter.url) as c:
        c.allocate(U, ET, D("100"), UNIT, idempotency_key="grant")
        cutter.cut_reply_to(b"meter.consume(")
        got = c.consume(U, ET, D("7"), UNIT, idempotency_key="k1")
        assert (cutter.seen, cutter.cuts) == (2, 1)  # run twice, the first reply lost
        [row] = ledger_rows(db, "k1")
        assert got["entry_id"] == row["entry_id"] and got["balance"] == D("93")

        cutter.cut_reply_to(b"meter.reserve(")
        held = c.reserve(U, ET, D("10"), UNIT, reservation_id="r1")
        assert held["granted"] and held["reservation_id"] == "r1" and cutter.seen == 2
        assert db.execute("SELECT count(*) AS n FROM meter.reservations").fetchone()["n"] == 1

        cutter.cut_reply_to(b"meter.commit(")
        done = c.commit("r1", D("4"))
        assert done["success"] and done["consumed"] == D("4") and done["status"] == "replayed"
        assert cutter.seen == 2

        cutter.cut_reply_to(b"meter.get_balance(")
        assert c.get_balance(U, ET, UNIT)["balance"] == D("89")
        assert (cutter.seen, cutter.cuts) == (2, 4)
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7"), D("-4")]


def test_a_keyless_write_whose_reply_was_lost_is_reported_in_doubt(cutter, db):
    # Without a key a second run would be a second event: the call raises, and says so.
    with meter.MeterClient(cutter.url) as c:
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(b"meter.consume(")
        with pytest.raises(MeterConnectionError, match="may have committed") as lost:
            c.consume(U, ET, D("7"), UNIT)
        assert "idempotency key" in str(lost.value)
        assert (cutter.seen, cutter.cuts) == (1, 1)
        # it had committed: once, and only once
        assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7")]
        cutter.cut_reply_to(b"meter.release(")
        with pytest.raises(MeterConnectionError, match="may have committed"):
            c.release("no-such-hold")  # its answer would differ the second time
        assert (cutter.seen, cutter.cuts) == (1, 2)


def test_a_reserve_without_key_or_id_whose_reply_was_lost_runs_again_and_holds_once(cutter, db):
    # The client gives such a hold its id, so the second run replays the first.
    with meter.MeterClient(cutter.url) as c:
        c.allocate(U, ET, D("100"), UNIT, idempotency_key="grant")
        cutter.cut_reply_to(b"meter.reserve(")
        held = c.reserve(U, ET, D("10"), UNIT)
        assert (cutter.seen, cutter.cuts) == (2, 1)
        assert held["granted"] and held["available"] == D("90")
    [hold] = db.execute("SELECT reservation_id, amount FROM meter.reservations").fetchall()
    assert hold == {"reservation_id": held["reservation_id"], "amount": D("10")}
    account = db.execute("SELECT reserved FROM meter.accounts").fetchone()
    assert account["reserved"] == D("10")


def test_generated_keys_make_keyless_writes_run_again_and_count_once(cutter, db):
    with meter.MeterClient(cutter.url, generate_keys=True) as c:
        cutter.cut_reply_to(b"meter.allocate(")
        assert c.allocate(U, ET, D("100"), UNIT)["balance"] == D("100")
        cutter.cut_reply_to(b"meter.consume(")
        assert c.consume(U, ET, D("7"), UNIT)["balance"] == D("93")
        cutter.cut_reply_to(b"meter.adjust(")
        assert c.adjust(U, ET, D("2"), UNIT)["balance"] == D("95")
        assert (cutter.seen, cutter.cuts) == (2, 3)
        # two equal calls are two events: each call has a key of its own
        c.consume(U, ET, D("1"), UNIT)
        c.consume(U, ET, D("1"), UNIT)
        # a caller's key is used as it is
        c.consume(U, ET, D("1"), UNIT, idempotency_key="mine")
        c.consume(U, ET, D("1"), UNIT, idempotency_key="mine")
    rows = db.execute("SELECT amount, idempotency_key FROM meter.ledger ORDER BY id").fetchall()
    assert [r["amount"] for r in rows] == [D("100"), D("-7"), D("2"), D("-1"), D("-1"), D("-1")]
    keys = [r["idempotency_key"] for r in rows]
    assert keys[-1] == "mine" and len(set(keys)) == len(keys)
    assert all(uuid.UUID(k).version == 4 for k in keys[:-1])


def test_a_write_that_cannot_be_run_again_names_the_key_that_replays_it(cutter, db_url, db):
    # On a caller's connection nothing is run again; the error says how to replay the call,
    # with the key the client generated, and that replays it: it counts once.
    conn = psycopg.connect(cutter.url, autocommit=True)
    try:
        c = meter.MeterClient(conn, generate_keys=True)
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(b"meter.consume(")
        with pytest.raises(MeterConnectionError, match="may have committed") as lost:
            c.consume(U, ET, D("7"), UNIT)
    finally:
        conn.close()
    [key] = re.findall(
        r"calling again with the same idempotency_key='([^']+)' replays it", str(lost.value)
    )
    with meter.MeterClient(db_url) as again:
        assert again.consume(U, ET, D("7"), UNIT, idempotency_key=key)["balance"] == D("93")
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7")]


def test_a_statement_lost_before_the_sdks_commit_is_not_reported_in_doubt(cutter, db):
    # On a caller's connection that is not autocommit the SDK sends BEGIN, the statement,
    # then COMMIT: a connection lost under the statement lost an uncommitted transaction.
    conn = psycopg.connect(cutter.url)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(b"meter.consume(")
        with pytest.raises(MeterConnectionError) as lost:
            c.consume(U, ET, D("7"), UNIT)
        assert "may have committed" not in str(lost.value)
    finally:
        conn.close()
    assert [r["amount"] for r in ledger_rows(db)] == [D("100")]


@pytest.mark.parametrize(
    ("options", "autocommit", "needle", "committed"),
    [
        ("", False, b"BEGIN", False),
        ("", False, b"COMMIT", True),
        ("-c DateStyle=German", True, b"BEGIN", False),
        ("-c DateStyle=German", True, b"set_config('DateStyle'", False),
        ("-c DateStyle=German", True, b"meter.consume(", False),
        ("-c DateStyle=German", True, b"COMMIT", True),
    ],
)
def test_only_a_reply_lost_to_the_sdks_own_commit_is_reported_in_doubt(
    cutter, db, options, autocommit, needle, committed
):
    # A lost BEGIN (nothing of the call sent), and on an autocommit connection in another
    # DateStyle, whose call the SDK wraps in BEGIN ... COMMIT, a lost statement, were
    # reported "may have committed": a keyless write the caller then left alone was lost.
    conn = psycopg.connect(make_conninfo(cutter.url, options=options), autocommit=autocommit)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        if not autocommit:
            conn.commit()
        cutter.cut_reply_to(needle)
        with pytest.raises(MeterConnectionError) as lost:
            c.consume(U, ET, D("7"), UNIT)
        assert (cutter.seen, cutter.cuts) == (1, 1)
        assert ("may have committed" in str(lost.value)) is committed
    finally:
        conn.close()
    expected = [D("100"), D("-7")] if committed else [D("100")]
    assert [r["amount"] for r in ledger_rows(db)] == expected


@pytest.mark.parametrize("options", ["", "-c DateStyle=German"])
@pytest.mark.parametrize("autocommit", [True, False])
def test_a_call_in_pipeline_mode_has_committed_when_it_returns(db_url, db, autocommit, options):
    # On an autocommit connection in pipeline mode a statement's implicit transaction lasts
    # until the caller's next Sync: a call returned its entry before it had committed, and
    # a statement of the caller's failing in the same pipeline rolled it back.
    with psycopg.connect(make_conninfo(db_url, options=options), autocommit=autocommit) as conn:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        conn.commit()
        with pytest.raises(psycopg.errors.DivisionByZero), conn.pipeline():
            got = c.consume(U, ET, D("7"), UNIT)
            assert [r["entry_id"] for r in ledger_rows(db)][-1] == got["entry_id"]
            conn.execute("SELECT 1/0")
        conn.rollback()
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7")]


@pytest.mark.parametrize("in_callers_transaction", [False, True])
def test_a_call_whose_connection_was_closed_before_its_commit_is_not_reported_done(
    db_url, db, monkeypatch, in_callers_transaction
):
    # Another thread closing the caller's connection after the call's statement, before its
    # COMMIT (or RELEASE): psycopg's transaction block then ends without sending it, raising
    # nothing, and the call returned its entry though nothing had committed.
    conn = psycopg.connect(db_url)
    c = meter.MeterClient(conn)
    c.allocate(U, ET, D("100"), UNIT)
    conn.commit()
    if in_callers_transaction:
        conn.execute("SELECT 1")
    fetch = c._fetch

    def closed_by_another_thread(*args: Any) -> Any:
        rows = fetch(*args)
        conn.close()
        return rows

    monkeypatch.setattr(c, "_fetch", closed_by_another_thread)
    with pytest.raises(MeterConnectionError) as lost:
        c.consume(U, ET, D("7"), UNIT)
    assert "may have committed" not in str(lost.value)
    assert [r["amount"] for r in ledger_rows(db)] == [D("100")]


def test_a_keyless_write_after_statements_queued_in_a_pipeline_is_in_doubt_at_its_commit(
    cutter, db
):
    # With statements the caller queued in pipeline mode still pending, an autocommit
    # connection reads ACTIVE: the call took it for the caller's open transaction, though
    # psycopg synced them and ran the call in a BEGIN ... COMMIT of its own, so a reply lost
    # to that COMMIT, which had committed, was reported "cannot have committed" (a caller
    # retrying counted it twice).
    conn = psycopg.connect(cutter.url, autocommit=True)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(b"COMMIT")
        with pytest.raises(MeterConnectionError, match="may have committed"), conn.pipeline():
            conn.cursor().execute("SELECT 1")
            c.consume(U, ET, D("7"), UNIT)
        assert (cutter.seen, cutter.cuts) == (1, 1)
    finally:
        conn.close()
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7")]


@pytest.mark.parametrize("options", ["", "-c DateStyle=German"])
def test_a_write_in_pipeline_mode_lost_before_its_commit_was_sent_is_not_in_doubt(
    cutter, db, monkeypatch, options
):
    # In pipeline mode psycopg syncs the call's statement (a Sync of its own) before it
    # sends COMMIT: a connection lost at that Sync lost a transaction never committed, but
    # the call, whose BEGIN had gone through, reported it "may have committed" (a keyless
    # write the caller then left alone was lost).
    conn = psycopg.connect(make_conninfo(cutter.url, options=options), autocommit=True)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        fetch = c._fetch

        def then_cut_the_sync(*args: Any) -> Any:
            rows = fetch(*args)
            cutter.cut_reply_to(b"S\x00\x00\x00\x04")  # the next Sync, before COMMIT
            return rows

        monkeypatch.setattr(c, "_fetch", then_cut_the_sync)
        with pytest.raises(MeterConnectionError) as lost, conn.pipeline():
            c.consume(U, ET, D("7"), UNIT)
        assert cutter.cuts == 1
        assert "may have committed" not in str(lost.value)
    finally:
        conn.close()
    assert [r["amount"] for r in ledger_rows(db)] == [D("100")]


def test_a_keyless_write_made_while_another_thread_s_statement_ran_is_in_doubt_at_its_commit(
    cutter, db
):
    # On an autocommit connection where another thread's own statement was under way
    # (ACTIVE, no transaction open), the call took it for the caller's transaction; psycopg,
    # finding it IDLE once that statement ended, ran the call in a BEGIN ... COMMIT of its
    # own, and a reply lost to that COMMIT, which had committed, was reported "cannot have
    # committed" (a caller retrying counted it twice).
    conn = psycopg.connect(cutter.url, autocommit=True)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        with ThreadPoolExecutor(1) as pool:
            sleeping = pool.submit(conn.execute, "SELECT pg_sleep(0.5)")
            while conn.info.transaction_status != TransactionStatus.ACTIVE:
                time.sleep(0.001)
            cutter.cut_reply_to(b"COMMIT")
            with pytest.raises(MeterConnectionError, match="may have committed"):
                c.consume(U, ET, D("7"), UNIT)
            sleeping.result(10)
        assert (cutter.seen, cutter.cuts) == (1, 1)
    finally:
        conn.close()
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-7")]


@pytest.mark.parametrize(("needle", "committed"), [(b"meter.consume(", False), (b"COMMIT", True)])
def test_on_a_callers_pool_in_another_style_only_a_lost_commit_is_in_doubt(
    cutter, db, needle, committed
):
    # A pooled connection in another DateStyle runs the call in BEGIN ... COMMIT with
    # Meter's settings: a statement lost before that COMMIT was reported "may have committed".
    with ConnectionPool(
        make_conninfo(cutter.url, options="-c DateStyle=German"),
        min_size=1, max_size=1, kwargs={"autocommit": True}, open=True,
    ) as pool:  # fmt: skip
        c = meter.MeterClient(pool)
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(needle)
        with pytest.raises(MeterConnectionError) as lost:
            c.consume(U, ET, D("7"), UNIT)
        assert (cutter.seen, cutter.cuts) == (1, 1)  # a keyless write: not run again
        assert ("may have committed" in str(lost.value)) is committed
    expected = [D("100"), D("-7")] if committed else [D("100")]
    assert [r["amount"] for r in ledger_rows(db)] == expected


class _SaysWhenWaited:
    """A client's connection lock that tells when a call has come to wait for it."""

    def __init__(self, lock: Any) -> None:
        self.lock, self.waiting = lock, threading.Event()

    def __enter__(self) -> Any:
        self.waiting.set()
        return self.lock.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self.lock.__exit__(*exc)


def test_a_keyless_write_that_waited_for_another_clients_call_is_reported_in_doubt(
    cutter, db_url, db
):
    # Whether a call is its own transaction was read before it took the connection's lock:
    # while another client's call was under way there (status ACTIVE), a keyless write
    # that then ran in an implicit transaction of its own, committed, and lost the reply
    # was reported "cannot have committed" -- a caller retrying it counted it twice.
    conn = psycopg.connect(cutter.url, autocommit=True)
    blocker = psycopg.connect(db_url)
    try:
        a, b = meter.MeterClient(conn, namespace="a"), meter.MeterClient(conn, namespace="b")
        a.allocate(U, ET, D("100"), UNIT)
        b.allocate(U, ET, D("100"), UNIT)
        blocker.execute("SELECT 1 FROM meter.accounts WHERE namespace = 'b' FOR UPDATE")
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(b.consume, U, ET, D("1"), UNIT)  # waits for the row lock
            while not db.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).fetchone()["n"]:
                time.sleep(0.01)
            assert conn.info.transaction_status == TransactionStatus.ACTIVE
            cutter.cut_reply_to(b"meter.consume(")
            a._conn_lock = _SaysWhenWaited(a._conn_lock)
            second = pool.submit(a.consume, U, ET, D("7"), UNIT)
            assert a._conn_lock.waiting.wait(10)
            blocker.rollback()
            assert first.result(10)["balance"] == D("99")
            with pytest.raises(MeterConnectionError, match="may have committed") as lost:
                second.result(10)
        assert "idempotency key" in str(lost.value)
        assert (cutter.seen, cutter.cuts) == (1, 1)
    finally:
        blocker.close()
        conn.close()
    amounts = db.execute(
        "SELECT namespace, amount FROM meter.ledger ORDER BY id"
    ).fetchall()  # it had committed, once
    assert [tuple(r.values()) for r in amounts] == [
        ("a", D("100")),
        ("b", D("100")),
        ("b", D("-1")),
        ("a", D("-7")),
    ]


def test_a_reserve_with_a_key_and_an_id_is_named_by_both(cutter, db_url, db):
    # Its fingerprint covers both: the id alone would be refused as another reservation.
    conn = psycopg.connect(cutter.url, autocommit=True)
    try:
        c = meter.MeterClient(conn)
        c.allocate(U, ET, D("100"), UNIT)
        cutter.cut_reply_to(b"meter.reserve(")
        with pytest.raises(MeterConnectionError) as lost:
            c.reserve(U, ET, D("10"), UNIT, idempotency_key="k", reservation_id="r")
    finally:
        conn.close()
    assert "calling again with the same idempotency_key='k', reservation_id='r' replays it" in (
        str(lost.value)
    )
    with meter.MeterClient(db_url) as again:
        held = again.reserve(U, ET, D("10"), UNIT, idempotency_key="k", reservation_id="r")
        assert held["granted"] and held["available"] == D("90")
    assert db.execute("SELECT count(*) AS n FROM meter.reservations").fetchone()["n"] == 1


def test_period_calls_whose_reply_was_lost_run_again_and_count_once(cutter, db):
    # open_period and close_period replay by account and date.
    with meter.MeterClient(cutter.url) as c:
        c.set_period_config(U, ET, UNIT, None, date(2026, 1, 1), D("100"), D("0"))
        cutter.cut_reply_to(b"meter.open_period(")
        assert c.open_period(U, ET, UNIT, None, date(2026, 1, 1)) == D("100")
        c.consume(U, ET, D("30"), UNIT)
        cutter.cut_reply_to(b"meter.close_period(")
        closed = c.close_period(U, ET, UNIT, None, date(2026, 1, 31))
        assert (closed["expired"], closed["new_balance"]) == (D("70"), D("0"))
        assert (cutter.seen, cutter.cuts) == (2, 2)
    assert [r["amount"] for r in ledger_rows(db)] == [D("100"), D("-30"), D("-70")]
    [period] = db.execute("SELECT allocation, expired FROM meter.periods").fetchall()
    assert period == {"allocation": D("100"), "expired": D("70")}


def test_a_period_opened_again_after_its_configuration_changed_replays_the_first_opening(
    cutter, db_url, db
):
    # Between the lost reply and the second run the configured allocation changes: the
    # second run must replay the opening (100), not open with the new figure.
    with meter.MeterClient(cutter.url) as c, meter.MeterClient(db_url) as admin:
        c.set_period_config(U, ET, UNIT, None, date(2026, 1, 1), D("100"), D("0"))
        run_own_pool = c._run_own_pool

        def change_between(query: str, args: list, *, check: bool) -> list:
            if check:  # the second run, on a checked connection
                admin.set_period_config(U, ET, UNIT, None, date(2026, 1, 1), D("200"), D("0"))
            return run_own_pool(query, args, check=check)

        c._run_own_pool = change_between  # type: ignore[method-assign]
        cutter.cut_reply_to(b"meter.open_period(")
        assert c.open_period(U, ET, UNIT, None, date(2026, 1, 1)) == D("100")
        assert (cutter.seen, cutter.cuts) == (2, 1)
    assert [r["amount"] for r in ledger_rows(db)] == [D("100")]
    [period] = db.execute("SELECT allocation FROM meter.periods").fetchall()
    assert period["allocation"] == D("100")


def test_client_arguments_are_checked_by_name(db_url):
    for kwargs, parameter in [
        ({"namespace": ""}, "namespace"),
        ({"max_size": 0}, "max_size"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"generate_keys": "yes"}, "generate_keys"),
        ({"generate_keys": 1}, "generate_keys"),
        ({"max_size": 0, "generate_keys": 1}, "max_size"),  # in the signature's order
        ({"max_size": 10**5000}, "max_size"),  # too long to print: named by its size
        ({"timeout": 10**5000}, "timeout"),
        ({"timeout": -(10**5000)}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ]:
        with pytest.raises(ValidationError) as refused:
            meter.MeterClient(db_url, **kwargs)
        assert refused.value.parameter == parameter, kwargs
    # (a NUL: libpq would read the URL up to it, and connect to another server)
    for conn in ("dbname='unterminated", 42, db_url.replace("@", "@127.0.0.1\x00", 1)):
        with pytest.raises(ValidationError) as refused:
            meter.MeterClient(conn, namespace="", max_size=0)  # conn comes first
        assert refused.value.parameter == "conn"


def _replaying(call: Callable[..., Any], *args: Any, read: bool = False, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``; when it raises in doubt, call it again with the arguments
    its error names (a generated key, a reservation id), as a caller would, until it
    answers."""
    replay: dict[str, str] = {}
    for _ in range(20):
        try:
            return call(*args, **{**kwargs, **replay})
        except MeterConnectionError as exc:
            if read:
                continue  # a read is never in doubt: read again
            named = re.search(r"calling again with the same (.*) replays it", str(exc))
            assert named, f"a write in doubt that names nothing to replay it: {exc}"
            replay = dict(re.findall(r"(\w+)='([^']*)'", named.group(1)))
    raise AssertionError("still failing after 20 tries")


def test_replies_lost_at_random_never_lose_or_double_a_call(db_url, db):
    # Every write replayable (generate_keys; reserve and commit by their id); replies cut
    # at random after the commit, up to every try of a call. A model says what the ledger,
    # the balances and each answer must be.
    rng = random.Random(int(os.environ.get("METER_SDK_CUT_SEED", "11")))
    cutter = ReplyCutter(db_url)
    cutter.cut_at_random(0.3, random.Random(rng.random()))
    accounts = ["a", "b", "c"]
    balance = dict.fromkeys(accounts, D(0))
    reserved = dict.fromkeys(accounts, D(0))
    holds: dict[str, tuple[str, D]] = {}
    rows = 0
    try:
        with meter.MeterClient(cutter.url, generate_keys=True, max_size=3) as c:
            for _ in range(150):
                user = rng.choice(accounts)
                amount = D(rng.randint(1, 40))
                op = rng.choice(["allocate", "consume", "adjust", "reserve", "commit", "read"])
                available = balance[user] - reserved[user]
                if op == "allocate":
                    got = _replaying(c.allocate, user, ET, amount, UNIT)
                    balance[user] += amount
                    rows += 1
                elif op == "consume":
                    got = _replaying(c.consume, user, ET, amount, UNIT, check_balance=True)
                    assert got["success"] == (available >= amount)
                    if got["success"]:
                        balance[user] -= amount
                        rows += 1
                elif op == "adjust":
                    amount = -amount if rng.random() < 0.5 else amount
                    got = _replaying(c.adjust, user, ET, amount, UNIT)
                    balance[user] += amount
                    rows += 1
                elif op == "reserve":
                    got = _replaying(c.reserve, user, ET, amount, UNIT)
                    assert got["granted"] == (available >= amount)
                    if got["granted"]:
                        reserved[user] += amount
                        holds[got["reservation_id"]] = (user, amount)
                elif op == "commit" and holds:
                    rid = rng.choice(sorted(holds))
                    user, held = holds.pop(rid)
                    got = _replaying(c.commit, reservation_id=rid, actual_amount=amount)
                    assert got["status"] in ("committed", "replayed") and got["consumed"] == amount
                    reserved[user] -= held
                    balance[user] -= amount
                    rows += 1
                else:
                    got = _replaying(c.get_balance, user, ET, UNIT, read=True)
                    assert (got["balance"], got["reserved"]) == (balance[user], reserved[user])
                if "balance" in got and op != "read":
                    assert got["balance"] == balance[user], (op, got)
            assert _replaying(c.reconcile, read=True) == []
            for user in accounts:
                got = _replaying(c.get_balance, user, ET, UNIT, read=True)
                assert (got["balance"], got["reserved"]) == (balance[user], reserved[user])
    finally:
        cutter.close()
    assert len(ledger_rows(db)) == rows
    assert cutter.cuts > 20, cutter.cuts
    print(f"{cutter.cuts} replies cut in 150 calls; {rows} ledger rows")


def test_a_deadlock_in_the_calls_own_transaction_is_retried_and_counts_once(db_url, db):
    # The deadlock detector ends one side with 40P01, its transaction rolled back whole:
    # the SDK runs it again, whether that transaction was its own on a pool, a caller's
    # autocommit connection, or BEGIN/COMMIT it sent on a caller's connection -- but not a
    # savepoint in the caller's open transaction, which is the caller's to retry.
    conn = psycopg.connect(db_url)
    clients = {
        "pool": meter.MeterClient(db_url),
        "autocommit": meter.MeterClient(psycopg.connect(db_url, autocommit=True)),
        "not autocommit": meter.MeterClient(conn),
    }
    for name, c in clients.items():
        execute, failed = c._execute, []

        def deadlocked_once(*args: Any, execute: Any = execute, failed: list = failed) -> Any:
            if not failed:
                failed.append(1)
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            return execute(*args)

        c._execute = deadlocked_once  # type: ignore[method-assign]
        assert c.allocate(U, ET, D("1"), UNIT, idempotency_key=name)["entry_id"], name
    tries: list[int] = []

    def always_deadlocked(*args: Any) -> Any:
        tries.append(1)
        raise psycopg.errors.DeadlockDetected("deadlock detected")

    clients["not autocommit"]._execute = always_deadlocked  # type: ignore[method-assign]
    with conn.transaction(), pytest.raises(MeterError, match="deadlock"):
        clients["not autocommit"].allocate(U, ET, D("1"), UNIT, idempotency_key="inside")
    assert tries == [1]  # inside the caller's transaction: not run again
    assert [r["amount"] for r in ledger_rows(db)] == [D("1")] * 3
    for c in clients.values():
        c.close()
    conn.close()


def test_a_session_ended_by_a_transaction_timeout_is_a_connection_error_not_in_doubt(
    db_url, db, snapshot
):
    # idle_in_transaction_session_timeout (25P03) and transaction_timeout (25P04) end the
    # session, its transaction rolled back: they came out as a plain MeterError, so an
    # application reconnecting on MeterConnectionError kept its dead connection. Nothing
    # committed, so a keyless write is not reported as one that may have.
    with psycopg.connect(
        make_conninfo(db_url, options="-c idle_in_transaction_session_timeout=100")
    ) as conn:
        c = meter.MeterClient(conn)
        conn.execute("SELECT 1")  # the caller's transaction, left idle
        time.sleep(0.5)
        with pytest.raises(MeterConnectionError) as idle:
            c.get_balance(U, ET, UNIT)
        assert idle.value.sqlstate == "25P03" and conn.broken
    with meter.MeterClient(db_url) as setup:
        setup.allocate(U, ET, D(5), UNIT)
    before = snapshot()
    with (
        meter.MeterClient(make_conninfo(db_url, options="-c transaction_timeout=300")) as c,
        psycopg.connect(db_url) as locker,
    ):
        locker.execute("SELECT 1 FROM meter.accounts FOR UPDATE")  # the consume waits
        with pytest.raises(MeterConnectionError) as timed_out:
            c.consume(U, ET, D(1), UNIT)
        locker.rollback()
        assert timed_out.value.sqlstate == "25P04"
        assert "may have committed" not in str(timed_out.value)
        assert snapshot() == before
        assert c.consume(U, ET, D(1), UNIT)["balance"] == D(4)  # on a new connection


def test_a_pool_that_sends_nothing_is_not_reported_in_doubt(db_url, db):
    # A closed pool raises before anything reaches the server: no doubt to report.
    pool = ConnectionPool(db_url, min_size=1, max_size=1, open=True)
    c = meter.MeterClient(pool)
    c.allocate(U, ET, D("5"), UNIT)
    pool.close()
    with pytest.raises(MeterConnectionError) as refused:
        c.consume(U, ET, D("1"), UNIT)
    assert "may have committed" not in str(refused.value)
    assert [r["amount"] for r in ledger_rows(db)] == [D("5")]


def test_a_session_the_server_ended_while_idle_is_replaced_for_reads_and_keyed_writes(
    db_url, db, monkeypatch
):
    # idle_session_timeout (57P05) is a lost connection like any other: it usually means
    # the call never ran, but psycopg can make a round trip of its own after a statement's
    # result, so it may also come after the commit. Reads and keyed writes run again; a
    # keyless write says it may have committed (here it had not).
    monkeypatch.setattr(client_module, "_CHECK_IDLE_AFTER", 3600.0)
    name = db.execute("SELECT current_database() AS d").fetchone()["d"]
    db.execute(f'ALTER DATABASE "{name}" SET idle_session_timeout = 200')
    with meter.MeterClient(db_url) as c:
        c.allocate(U, ET, D("5"), UNIT)
        time.sleep(0.6)  # the kept connection's session ends meanwhile
        assert c.consume(U, ET, D("2"), UNIT, idempotency_key="k")["balance"] == D("3")
        time.sleep(0.6)
        assert c.get_balance(U, ET, UNIT)["balance"] == D("3")
        time.sleep(0.6)
        with pytest.raises(MeterConnectionError, match=r"idle-session timeout.*may have committed"):
            c.consume(U, ET, D("1"), UNIT)
    assert [r["amount"] for r in ledger_rows(db)] == [D("5"), D("-2")]


def test_a_read_after_a_restart_skips_every_dead_connection_of_a_callers_pool(db_url, db):
    with ConnectionPool(db_url, min_size=4, max_size=4, open=True) as pool:
        pool.wait()
        c = meter.MeterClient(pool)
        c.allocate(U, ET, D("5"), UNIT)
        assert _kill_other_backends(db) == 4  # as a database restart would
        assert c.get_balance(U, ET, UNIT)["balance"] == D("5")
        c.close()


# ------------------------------------------------------- sessions in other output styles

OTHER_STYLES = [
    ("datestyle", "SQL,DMY"),
    ("datestyle", "German"),
    ("datestyle", "Postgres,MDY"),
    ("intervalstyle", "iso_8601"),
    ("intervalstyle", "sql_standard"),
    ("intervalstyle", "postgres_verbose"),
]


def _with_option(db_url: str, name: str, value: str) -> str:
    return make_conninfo(db_url, options=f"-c {name}={value}")


def _reads(c: meter.MeterClient) -> list[Any]:
    return [
        c.get_account(U, ET, UNIT),
        c.get_ledger(U, ET, UNIT),
        c.get_audit_events(),
        c.get_balance(U, ET, UNIT),
    ]


@pytest.mark.parametrize(("setting", "value"), OTHER_STYLES)
def test_a_database_in_another_date_or_interval_style_reads_and_writes_as_any(
    db_url, client, db, setting, value
):
    # psycopg reads times only in DateStyle ISO, the SDK intervals only in IntervalStyle
    # postgres. A session in another style (a database or role default, or options in the
    # conninfo) raised NotImplementedError, not a MeterError, after the statement ran: a
    # reserve had committed its hold by then. The client's own connections now get ISO.
    client.set_period_config(U, ET, UNIT, None, date(2025, 1, 1), 100, None, "7 days")
    client.allocate(U, ET, 5, UNIT)
    expected = _reads(client)
    with meter.MeterClient(_with_option(db_url, setting, value)) as styled:
        assert _reads(styled) == expected
        hold = styled.reserve(U, ET, 2, UNIT, reservation_id="h1")
        assert hold["granted"] and isinstance(hold["expires_at"], datetime)
    assert client.get_balance(U, ET, UNIT)["reserved"] == D(2)


# Text outside Latin-1 both ways: an identifier, metadata, and what is read back.
NOT_LATIN1 = {"user_id": "\u20ac-user", "metadata": {"x": "\u00e9\u20ac\U0001f600"}}


def _writes_and_reads_exactly(c: meter.MeterClient, db) -> None:
    row = c.allocate(NOT_LATIN1["user_id"], ET, 3, UNIT, metadata=NOT_LATIN1["metadata"])
    stored = db.execute(
        "SELECT user_id, metadata FROM meter.ledger WHERE id = %s", (row["entry_id"],)
    ).fetchone()
    assert (stored["user_id"], stored["metadata"]) == (
        NOT_LATIN1["user_id"],
        NOT_LATIN1["metadata"],
    )
    ledger = c.get_ledger(NOT_LATIN1["user_id"], ET, UNIT)
    assert [r["metadata"] for r in ledger] == [NOT_LATIN1["metadata"]]


def test_a_connection_in_another_client_encoding_stores_text_exactly(db_url, db):
    # jsonb went as UTF-8 bytes that a LATIN1 session decoded as Latin-1 ('é' stored as
    # 'Ã©'), and an identifier or result Latin-1 cannot hold raised psycopg's own
    # UnicodeEncodeError or UnicodeDecodeError. The client's connections now get UTF8.
    latin1 = make_conninfo(db_url, client_encoding="LATIN1")
    with meter.MeterClient(latin1) as c:
        _writes_and_reads_exactly(c, db)


def test_a_caller_s_connection_in_another_client_encoding_keeps_it(db_url, db):
    # A caller's connection: each call runs in UTF8 and the caller's session keeps LATIN1,
    # also within the caller's open transaction.
    with psycopg.connect(make_conninfo(db_url, client_encoding="LATIN1")) as conn:
        c = meter.MeterClient(conn)
        _writes_and_reads_exactly(c, db)
        assert conn.info.parameter_status("client_encoding") == "LATIN1"
        conn.execute("SELECT 1")  # the caller's transaction, open
        assert c.consume(NOT_LATIN1["user_id"], ET, 1, UNIT, metadata={"y": "\u20ac"})["success"]
        assert conn.info.parameter_status("client_encoding") == "LATIN1"
        conn.commit()
        assert conn.info.encoding == "iso8859-1"
    balance = db.execute(
        "SELECT balance FROM meter.accounts WHERE user_id = %s", (NOT_LATIN1["user_id"],)
    ).fetchone()["balance"]
    assert balance == D(2)


@pytest.mark.parametrize(("setting", "value"), OTHER_STYLES)
def test_a_caller_s_session_in_another_style_keeps_it(db_url, client, setting, value):
    # A caller's connection or pool: the call gets ISO for its own transaction (a
    # savepoint in the caller's), and the caller's session keeps its style.
    client.set_period_config(U, ET, UNIT, None, date(2025, 1, 1), 100, None, "7 days")
    client.allocate(U, ET, 5, UNIT)
    expected = _reads(client)
    name = {"datestyle": "DateStyle", "intervalstyle": "IntervalStyle"}[setting]
    with psycopg.connect(db_url) as conn:
        conn.execute(f"SET {setting} = '{value}'")
        conn.commit()
        styled = conn.info.parameter_status(name)
        c = meter.MeterClient(conn)
        assert _reads(c) == expected  # each call its own transaction
        conn.execute("SELECT 1")  # the caller's transaction, open
        assert c.reserve(U, ET, 1, UNIT, reservation_id="h1")["granted"]
        assert conn.info.parameter_status(name) == styled  # back within the transaction
        conn.commit()
        assert conn.info.parameter_status(name) == styled
    with ConnectionPool(
        _with_option(db_url, setting, value), min_size=1, max_size=1, open=True
    ) as pool:
        assert _reads(meter.MeterClient(pool)) == _reads(client)
        with pool.connection() as conn:
            assert conn.info.parameter_status(name) == styled
