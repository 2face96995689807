"""``meter up``, which the README's ``make run`` runs: from an empty folder, the embedded
servers, a worker, beat and the demo traffic; Ctrl-C stops every process it started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from meter.embedded import EmbeddedPostgres, EmbeddedRedis


def _processes_with(text: str) -> list[int]:
    """Pids of the processes whose environment holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def test_meter_up_serves_the_demo_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env["METER_HOME"] = str(home)
    up = subprocess.Popen(
        [sys.executable, "-m", "meter", "up"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if "serving; press Ctrl-C to stop" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    broker = ""
    try:
        assert serving.wait(timeout=300), "".join(lines)
        output = "".join(lines)
        [broker] = re.findall(r"Redis:\s+(redis://\S+)", output)
        for user in ("alice", "bob", "carol", "(pool)"):
            assert re.search(rf"│ {re.escape(user)} +│", output), output
        assert len(_processes_with(f"METER_BROKER_URL={broker}")) >= 2  # worker and beat
        assert EmbeddedPostgres(home / "pg")._running_port() is not None
        assert EmbeddedRedis(home / "redis")._running() is not None
    finally:
        up.send_signal(signal.SIGINT)
        status = up.wait(timeout=120)
        reader.join(timeout=10)
    assert status == 0, "".join(lines)
    assert "stopping" in "".join(lines)
    # every process it started is gone: the worker (with its pool), beat, both servers
    deadline = time.monotonic() + 10
    while _processes_with(f"METER_BROKER_URL={broker}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(f"METER_BROKER_URL={broker}") == []
    assert EmbeddedPostgres(home / "pg")._running_port() is None
    assert EmbeddedRedis(home / "redis")._running() is None


def _meter_up(tmp_path: Path, home: Path, **extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_")}
    env["METER_HOME"] = str(home)
    env.update(extra)
    return subprocess.Popen(
        [sys.executable, "-m", "meter", "up", "--no-demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_meter_up_leaves_running_the_servers_it_found_running(tmp_path: Path) -> None:
    # `meter up` stopped at Ctrl-C the servers it had only reused: the embedded PostgreSQL
    # that `meter migrate` (or an application, or another `meter up`) had started and
    # was using.
    home = tmp_path / "home"
    pg = EmbeddedPostgres(home / "pg").start()
    redis = EmbeddedRedis(home / "redis").start()
    try:
        up = _meter_up(tmp_path, home)
        lines: list[str] = []
        try:
            assert up.stdout is not None
            for line in up.stdout:
                lines.append(line)
                if "serving; press Ctrl-C to stop" in line:
                    break
            [broker] = re.findall(r"Redis:\s+(redis://\S+)", "".join(lines))
            assert broker == redis.url()
        finally:
            up.send_signal(signal.SIGINT)
            out, _ = up.communicate(timeout=120)
            lines.append(out)
        assert up.returncode == 0, "".join(lines)
        deadline = time.monotonic() + 10
        while _processes_with(f"METER_BROKER_URL={broker}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(f"METER_BROKER_URL={broker}") == []  # its worker and beat
        assert EmbeddedPostgres(home / "pg")._running_port() == pg.port
        assert EmbeddedRedis(home / "redis")._running() is not None
    finally:
        redis.stop()
        pg.stop()


def test_meter_up_that_fails_to_start_stops_what_it_started(tmp_path: Path) -> None:
    # A failure before "serving" (here the migration: the database has a migration this
    # code does not know) left the embedded PostgreSQL and Redis it had started running.
    import psycopg

    home = tmp_path / "home"
    with EmbeddedPostgres(home / "pg") as pg, psycopg.connect(pg.url(), autocommit=True) as c:
        c.execute("CREATE SCHEMA meter")
        c.execute(
            "CREATE TABLE meter.schema_migrations (version text PRIMARY KEY, checksum text"
            " NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        c.execute("INSERT INTO meter.schema_migrations VALUES ('999_from_the_future', 'x')")
    assert EmbeddedPostgres(home / "pg")._running_port() is None
    up = _meter_up(tmp_path, home)
    try:
        out, _ = up.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        leftovers = (EmbeddedRedis(home / "redis"), EmbeddedPostgres(home / "pg"))
    try:
        assert up.returncode == 1, out
        assert "999_from_the_future" in out
        assert EmbeddedPostgres(home / "pg")._running_port() is None, out
        assert EmbeddedRedis(home / "redis")._running() is None, out
    finally:
        for server in leftovers:
            server.stop()


def test_meter_up_does_not_print_the_password_of_the_database_it_is_given(
    tmp_path: Path,
) -> None:
    # It printed METER_DATABASE_URL as given, password included.
    home = tmp_path / "home"
    with EmbeddedPostgres(tmp_path / "own-pg") as pg:  # trust: any password will do
        url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{pg.port}/postgres"
        up = _meter_up(tmp_path, home, METER_DATABASE_URL=url)
        lines: list[str] = []
        try:
            assert up.stdout is not None
            for line in up.stdout:
                lines.append(line)
                if "serving; press Ctrl-C to stop" in line:
                    break
        finally:
            up.send_signal(signal.SIGINT)
            out, _ = up.communicate(timeout=120)
            lines.append(out)
        output = "".join(lines)
        assert up.returncode == 0, output
        assert f"PostgreSQL: postgresql://postgres:***@127.0.0.1:{pg.port}/postgres" in output
        assert "s3cret-pw" not in output


def test_meter_up_whose_terminal_hangs_up_stops_everything(tmp_path: Path) -> None:
    # Closing the terminal sends SIGHUP: meter up died of it without its clean-up, and
    # its worker and beat, in a session of their own (out of reach of the terminal's
    # signals), kept running with both servers, a set more at each `meter up`.
    home = tmp_path / "home"
    up = _meter_up(tmp_path, home)
    lines: list[str] = []
    broker = ""
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if "serving; press Ctrl-C to stop" in line:
                break
        [broker] = re.findall(r"Redis:\s+(redis://\S+)", "".join(lines))
        assert len(_processes_with(f"METER_BROKER_URL={broker}")) >= 2
        up.send_signal(signal.SIGHUP)
        out, _ = up.communicate(timeout=120)
        lines.append(out)
        deadline = time.monotonic() + 10
        while _processes_with(f"METER_BROKER_URL={broker}") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(f"METER_BROKER_URL={broker}") == [], "".join(lines)
        assert EmbeddedPostgres(home / "pg")._running_port() is None
        assert EmbeddedRedis(home / "redis")._running() is None
    finally:
        for pid in _processes_with(f"METER_BROKER_URL={broker}") if broker else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        EmbeddedRedis(home / "redis").stop()
        EmbeddedPostgres(home / "pg").stop()


def test_meter_up_given_a_bad_or_unreachable_database_exits_as_every_command(
    tmp_path: Path,
) -> None:
    # It exited 1 for both, as for any failure: a malformed METER_DATABASE_URL (named
    # "conninfo", after an embedded Redis had been started for nothing) is a usage error
    # (2), a database out of reach 3, as the documented statuses of every command say.
    home = tmp_path / "home"
    bad = _meter_up(tmp_path, home, METER_DATABASE_URL="host=x bogus=1")
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2, out
    assert 'METER_DATABASE_URL: invalid conninfo: invalid connection option "bogus"' in out
    assert not home.exists(), out  # nothing started
    gone = _meter_up(tmp_path, home, METER_DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    out, _ = gone.communicate(timeout=120)
    assert gone.returncode == 3, out
    assert "cannot connect to the database" in out
    assert EmbeddedRedis(home / "redis")._running() is None, out  # stopped again
