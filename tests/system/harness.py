"""Real processes for the system tests: a Redis that can be SIGKILLed and restarted, and
``celery -A worker worker`` and ``celery -A worker beat`` processes that can be SIGKILLed
at any instant.

Fixtures built on these live in ``tests/system/conftest.py``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis

from meter.embedded import EmbeddedRedis, free_port

REPO = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what or 'condition'} not met within {timeout}s (last: {value!r})"
            )
        time.sleep(interval)


def _alive(pid: int) -> bool:
    """``pid`` runs and is not a zombie (a daemon re-parented to a PID 1 that never reaps)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class CrashableRedis:
    """A Redis of its own (AOF on, ``appendfsync always``) that tests SIGKILL and restart.

    ``appendfsync always``: every write is on disk before Redis answers it, so even a
    crash of the machine loses nothing acknowledged. (A SIGKILL of Redis alone loses
    nothing acknowledged with ``everysec`` either, as long as the disk keeps up: the write
    reaches the OS before the reply; see docs/reliability.md.)
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.kills = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        # On the command line, not by CONFIG SET once up: clients reconnect within
        # milliseconds of a restart, and none may write under ``everysec`` meanwhile.
        EmbeddedRedis(self.data_dir, port=self.port, appendfsync="always").start()
        client = redis.Redis.from_url(self.url())
        try:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
        finally:
            client.close()

    def pid(self) -> int:
        return int((self.data_dir / "redis.pid").read_text().strip())

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF flush; what it acknowledged must survive."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: not _alive(pid), timeout=30, interval=0.02, what="redis exit")
        self.kills += 1

    def stop(self) -> None:
        EmbeddedRedis(self.data_dir, port=self.port).stop()

    def log_lines(self, *needles: str) -> list[str]:
        """The lines of Redis's log (every start of this server) holding one of ``needles``:
        AOF repairs, truncations, refusals."""
        log = self.data_dir / "redis.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [line for line in text.splitlines() if any(n in line for n in needles)]


def _pythonpath(env: Mapping[str, str]) -> str:
    """The repository first (``-A worker``), then any path the caller gives."""
    extra = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return os.pathsep.join(p for p in (str(REPO), extra) if p)


class CeleryProcess:
    """``celery -A <app> <argv...>`` in its own process group, its output in a log file.

    Its own group, so SIGKILL reaches a worker's pool children too. Subclasses say what to
    run (:attr:`kind`, :meth:`argv`) and which log line means it is up (:attr:`ready_line`).
    """

    kind = ""
    ready_line = b""

    def __init__(self, app: str, name: str, env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        argv = [sys.executable, "-m", "celery", "-A", app, self.kind, *self.argv()]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **env, "PYTHONPATH": _pythonpath(env)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def argv(self) -> list[str]:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for :attr:`ready_line` in the log; fail at once if the process exited."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} {self.name} exited: {self.tail()}")
            return self.ready_line in self.log.read_bytes()

        eventually(ready, timeout, interval=0.05, what=f"{self.kind} {self.name} ready")

    def kill(self) -> None:
        """SIGKILL the process and its children at once, as the OOM killer or a container
        runtime would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM); SIGKILL if it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class WorkerProcess(CeleryProcess):
    """``celery -A <app> worker`` (2 pool processes); ready at Celery's ``ready.`` line."""

    kind = "worker"
    ready_line = b" ready."

    def argv(self) -> list[str]:
        return [
            "--loglevel", "INFO", "--concurrency", "2", "--hostname", f"{self.name}@%h",
            # faster start; these exchange nothing the tests need
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip


class BeatProcess(CeleryProcess):
    """``celery -A <app> beat``; ready at its first ``Scheduler: Sending`` line.

    Its schedule state file (``--schedule``) sits next to the log, never in the repository.
    """

    kind = "beat"
    ready_line = b"Scheduler: Sending"

    def argv(self) -> list[str]:
        return ["--loglevel", "INFO", "--schedule", str(self.log.with_suffix(".schedule"))]


def redis_state(url: str, queue: str) -> dict[str, Any]:
    """What the broker still holds: ready messages and kombu's unacked records."""
    client = redis.Redis.from_url(url)
    try:
        return {
            "ready": int(client.llen(queue)),
            "unacked": int(client.hlen("unacked")),
            "unacked_owner": int(client.hlen("unacked_owner")),
        }
    finally:
        client.close()


# ---------------------------------------------------------------- events and their model

ET = "tokens"
UNIT = "tok"


def amount(rng: random.Random) -> Decimal:
    """A consumption amount with up to 3 decimals (exact arithmetic is part of the check)."""
    return Decimal(rng.randint(1, 10**6)) / 1000


class Sent:
    """What the producer side sent (each idempotency key once) and the balances it implies."""

    def __init__(self) -> None:
        self.amounts: dict[str, tuple[str, Decimal]] = {}  # key -> (user, amount)
        self.lock = threading.Lock()

    def add(self, key: str, user: str, value: Decimal) -> None:
        with self.lock:
            self.amounts[key] = (user, value)

    def __len__(self) -> int:
        with self.lock:
            return len(self.amounts)

    def balances(self) -> dict[str, Decimal]:
        model: dict[str, Decimal] = defaultdict(Decimal)
        with self.lock:
            for user, value in self.amounts.values():
                model[user] -= value
        return dict(model)


class EventStream(threading.Thread):
    """Sends single consume events (direct mode: one message each) at ``rate`` per second
    until stopped. A send that fails (broker down) is sent again with the same key until
    it goes through: the event may then be in the broker twice, which must not matter."""

    def __init__(self, broker_url: str, rate: float, users: int = 20, seed: int = 0) -> None:
        super().__init__(name="event-stream", daemon=True)
        self.broker_url = broker_url
        self.rate = rate
        self.users = users
        self.rng = random.Random(seed)
        self.sent = Sent()
        self.resends = 0
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from meter.errors import MeterConnectionError
        from meter.producer import MeterProducer

        try:
            with MeterProducer(self.broker_url) as producer:
                n = 0
                next_at = time.monotonic()
                while not self.stopped.is_set():
                    user, value = f"u{self.rng.randrange(self.users)}", amount(self.rng)
                    key = f"stream-{n}"
                    while True:
                        try:
                            producer.consume(user, ET, value, UNIT, idempotency_key=key)
                            break
                        except MeterConnectionError:
                            self.resends += 1
                            time.sleep(0.05)
                    self.sent.add(key, user, value)
                    n += 1
                    next_at += 1 / self.rate
                    time.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the test through .error
            self.error = exc

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)
        if self.error is not None:
            raise AssertionError(f"the event stream failed: {self.error!r}") from self.error


def consumption_keys(db: psycopg.Connection[Any]) -> Counter[str]:
    rows = db.execute(
        "SELECT idempotency_key FROM meter.ledger WHERE entry_type = 'consumption'"
    ).fetchall()
    return Counter(row["idempotency_key"] for row in rows)


def check_exactly_once(db: psycopg.Connection[Any], client: Any, sent: Sent) -> dict[str, Any]:
    """Compare the ledger with what was sent; the figures (all must be 0 but ``events``)."""
    applied = consumption_keys(db)
    expected = set(sent.amounts)
    balances = {
        row["user_id"]: row["balance"]
        for row in db.execute(
            "SELECT user_id, balance FROM meter.accounts WHERE event_type = %s AND unit = %s",
            (ET, UNIT),
        ).fetchall()
    }
    model = sent.balances()
    return {
        "events": len(expected),
        "lost": len(expected - set(applied)),
        "doubled": sum(1 for n in applied.values() if n > 1),
        "unexpected": len(set(applied) - expected),
        "wrong_balances": sum(
            1 for u in set(model) | set(balances) if model.get(u) != balances.get(u)
        ),
        "reconcile_issues": len(client.reconcile()),
        "dead_letters": db.execute("SELECT count(*) AS n FROM meter.dead_letters").fetchone()["n"],
    }
