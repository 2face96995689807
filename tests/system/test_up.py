"""``meter up``, which the README's ``make run`` runs: from an empty folder, the embedded
servers, a worker, beat and the demo traffic; Ctrl-C stops every process it started."""

from __future__ import annotations

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
