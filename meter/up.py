"""``meter up``: the whole system on one machine, for trying Meter out.

Starts (or reuses) an embedded PostgreSQL and Redis whose data lives in ``./.meter``
(``$METER_HOME``), migrates, starts one Celery worker and beat as child processes, sends a
short demo workload through both the synchronous SDK and the producer, prints the resulting
balances, and keeps serving until Ctrl-C, which stops every process it started. Running it
again reuses the data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meter.embedded import EmbeddedPostgres, EmbeddedRedis, default_data_root

DEMO_NAMESPACE = "demo"
DEMO_USERS = ("alice", "bob", "carol")


@dataclass
class Stack:
    """The servers and child processes of one ``meter up``."""

    database_url: str
    broker_url: str
    home: Path
    started: list[EmbeddedPostgres | EmbeddedRedis] = field(default_factory=list)
    """The embedded servers this run started or reused; ``stop()`` stops the former."""
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment of a worker or beat started for this stack."""
        return {
            **os.environ,
            "METER_DATABASE_URL": self.database_url,
            "METER_BROKER_URL": self.broker_url,
        }

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a child whose output goes to ``<home>/logs/<name>.log``."""
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = (logs / f"{name}.log").open("ab")
        child = subprocess.Popen(
            argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children.append(child)
        return child

    def stop(self) -> None:
        """Stop the children (TERM, then KILL after 10 s) and the servers this run started."""
        for child in self.children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        for server in reversed(self.started):
            if server._started_here:  # one found running is not ours to stop
                server.stop()


def start_stack(home: Path | None = None) -> Stack:
    """Servers (embedded unless ``METER_DATABASE_URL`` / ``METER_BROKER_URL`` are set),
    migrations, one worker and one beat.

    Only the servers this call started are the stack's to stop: one found running
    (started by ``meter migrate``, an application, another ``meter up``) is reused and
    left running. If anything fails (or is interrupted) on the way, what was started is
    stopped before the error is raised.

    Raises:
        ValidationError: ``METER_DATABASE_URL`` is malformed (nothing started).
        MeterConnectionError: a server cannot be reached.
        MeterError, EmbeddedServerError: the migration failed, a server did not start.
    """
    from meter.migrate import migrate
    from meter.types import check_conninfo

    home = home or default_data_root()
    stack = Stack("", "", home)
    if os.environ.get("METER_DATABASE_URL"):
        # named as the operator set it, and refused before any server is started
        check_conninfo(os.environ["METER_DATABASE_URL"], "METER_DATABASE_URL")
    try:
        database_url = os.environ.get("METER_DATABASE_URL")
        if not database_url:
            pg = EmbeddedPostgres(home / "pg")
            stack.started.append(pg)  # stopped only if this start started it
            database_url = pg.start().url()
        broker_url = os.environ.get("METER_BROKER_URL")
        if not broker_url:
            redis = EmbeddedRedis(home / "redis")
            stack.started.append(redis)
            broker_url = redis.start().url()
        stack.database_url, stack.broker_url = database_url, broker_url
        migrate(database_url)
        celery = [sys.executable, "-m", "celery", "-A", "worker"]
        stack.spawn("worker", [*celery, "worker", "--loglevel=INFO", "--concurrency=2"])
        stack.spawn(
            "beat",
            [*celery, "beat", "--loglevel=INFO", "--schedule", str(home / "celerybeat-schedule")],
        )
    except BaseException:
        stack.stop()
        raise
    return stack


def run_demo(database_url: str, broker_url: str, console: Console, timeout: float = 60.0) -> None:
    """A short workload in namespace ``demo``: allocations and a period (SDK), usage through
    the pipeline (producer), a streaming reserve/commit; then the balances as a table.

    ``meter up`` runs it on the stack it started, ``meter demo`` on any running one.

    Raises:
        TimeoutError: no worker applied the events within ``timeout`` seconds.
        MeterError: the database refused a call (or could not be reached).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from meter.client import MeterClient
    from meter.producer import MeterProducer

    run = uuid.uuid4().hex[:8]
    today = datetime.now(UTC).date()
    with MeterClient(database_url, namespace=DEMO_NAMESPACE) as client:
        for user in DEMO_USERS:
            client.allocate(user, "llm", 10_000, "tokens", idempotency_key=f"demo-{run}-{user}")
        client.set_period_config(
            None, "api", "requests", None, today.replace(day=1), 100_000, 10_000
        )
        client.open_period(None, "api", "requests", None, today.replace(day=1))

        before = _ledger_count(client)
        with MeterProducer(broker_url, namespace=DEMO_NAMESPACE) as producer:
            handles = [
                producer.consume(user, "llm", 25 * (i + 1), "tokens")
                for i, user in enumerate(DEMO_USERS * 10)
            ]
        hold = client.reserve("alice", "llm", 2_000, "tokens", ttl_seconds=120)
        client.commit(hold["reservation_id"], 1_234)
        expected = len(handles) + 1  # the consume events and the commit's consumption
        console.print(f"enqueued {len(handles)} consume events; waiting for the worker ...")
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=not console.is_terminal,
        ) as progress:
            bar = progress.add_task("ledger rows", total=expected)

            def applied() -> bool:
                done = min(expected, _ledger_count(client) - before)
                progress.update(bar, completed=done)
                return done >= expected

            _wait_until(applied, timeout=timeout)

        table = Table(title=f"balances in namespace '{DEMO_NAMESPACE}'")
        for column in ("user", "event type", "unit", "balance", "reserved", "available"):
            table.add_column(column, justify="right" if column[0] in "bra" else "left")
        for user in (*DEMO_USERS, None):
            for row in client.get_user_balances(user):
                table.add_row(
                    user or "(pool)",
                    row["event_type"],
                    row["unit"],
                    str(row["balance"]),
                    str(row["reserved"]),
                    str(row["available"]),
                )
        console.print(table)


def _ledger_count(client: object) -> int:
    stats = client.get_stats()  # type: ignore[attr-defined]
    return int(stats["total_ledger_entries"])


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(
                "the demo events were not applied in time: is a worker running on this "
                "broker and database?"
            )
        time.sleep(0.2)


# Ctrl-C, a kill, a closed terminal: the worker and beat run in a session of their own
# (a Ctrl-C reaches only meter up, which stops them in order), so no signal but these
# reaches them; meter up dying of one of these without its clean-up orphaned them.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def serve(console: Console, demo: bool = True) -> None:
    """Run the stack until Ctrl-C (or SIGTERM, SIGHUP); stop everything it started."""

    def _terminate(signum: int, frame: object) -> None:
        # The first Ctrl-C (or SIGTERM) stops; any later one is ignored, so that a second
        # Ctrl-C, or the copy `timeout` and some shells send to the whole process group,
        # cannot cut the clean-up short and leave servers running.
        for stop_signal in _STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        raise KeyboardInterrupt

    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, _terminate)
    try:
        # start_stack stops what it started when it fails; a SIGTERM now is a Ctrl-C too
        stack = start_stack()
    except KeyboardInterrupt:
        console.print("stopped while starting")
        return
    try:
        from meter.status import redact

        # URLs from the environment may hold passwords
        console.print(
            f"PostgreSQL: {redact(stack.database_url)}\nRedis:      {redact(stack.broker_url)}"
        )
        console.print(f"worker and beat logs: {stack.home / 'logs'}")
        if demo:
            run_demo(stack.database_url, stack.broker_url, console)
        console.print("serving; press Ctrl-C to stop")
        while True:
            for child in stack.children:
                if child.poll() is not None:
                    raise RuntimeError(
                        f"{child.args[4:6]} exited with {child.returncode}; "
                        f"see {stack.home / 'logs'}"
                    )
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        # however the loop ended (an error too): no signal interrupts the clean-up
        for stop_signal in _STOP_SIGNALS:
            signal.signal(stop_signal, signal.SIG_IGN)
        stack.stop()
