"""``meter status``: is the pipeline healthy? One look at the database, the broker, the
workers and beat's maintenance runs.

Everything is read, nothing changed. Each part is collected on its own, so an unreachable
broker still leaves the database figures, and the other way round.

Broker figures come straight from Redis, with the key names of Meter's transport
(``worker/transport.py``, kombu's defaults): the queue lists (``meter`` and kombu's
priority lists ``meter\\x06\\x16<3|6|9>``), the ``unacked`` hash (delivered, not yet
acknowledged) and the ``unacked_consumers`` heartbeat set.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg.rows import dict_row

from meter import session

__all__ = ["collect", "redact"]

QUEUE_KEYS: Final = tuple(
    key
    for q in ("meter", "meter.maintenance")
    for key in (q, *(f"{q}\x06\x16{p}" for p in (3, 6, 9)))
)
"""The Redis lists of the events' and beat's queues: kombu adds a list per priority step."""
UNACKED_KEY: Final = "unacked"
CONSUMERS_KEY: Final = "unacked_consumers"
CONSUMER_TIMEOUT: Final = 10.0
"""Seconds without heartbeat after which the transport counts a consumer dead."""

DEAD_LETTER_CAP: Final = 10000


def _one_line(exc: BaseException) -> str:
    """An error message on one line (libpq's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def redact(url: str) -> str:
    """``url`` with its password hidden (URL or ``key=value`` conninfo form)."""
    # to the last '@' of the authority, as redis-py (urllib) reads it; libpq stops at the
    # first, so this may hide a little more than the password, never less
    url = re.sub(r"(://[^:/@\s]*:)[^/?#\s]*@", r"\1***@", url)
    # libpq's values: quoted, or unquoted with backslash escapes ('sec\ ret' is one value)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])+)", r"\1***", url)


def _without_fragments(message: str | None) -> str | None:
    """``message``, why a URL was refused, with the pieces of it libpq quoted (in double
    quotes) hidden: of a URL not parsed, they may be its password (``invalid
    percent-encoded token: "s3cr%zzet"``), which the document must not carry."""
    return None if message is None else re.sub(r'"[^"]*"', '"***"', message)


def _unknown_database(url: str | None, error: str) -> dict[str, Any]:
    """The figures of a database not looked at: every key, each ``None`` (unknown), so that
    a script reads the same document whatever happened, and never ``[]`` ("nothing
    pending") for migrations it could not count."""
    return {
        "url": None if url is None else redact(url),
        "reachable": False,
        "error": error,
        "schema_version": None,
        "pending_migrations": None,
        "dead_letters": None,
        "maintenance": None,
        "maintenance_error": None,
    }


CONNECT_TIMEOUT: Final = 5
"""Seconds to wait to connect to the database (an address) when neither its URL nor
``PGCONNECT_TIMEOUT`` sets a ``connect_timeout``."""


def _database(url: str) -> dict[str, Any]:
    from meter import types as t
    from meter.migrate import newest, pending, recorded_versions

    t.check_conninfo(url, "database_url")
    try:
        # the URL's own connect_timeout wins: it was overridden by 5 s; a value libpq
        # refuses raises (the URL's, not an outage: nothing else is looked at)
        conn = t.connect(
            url, "database_url", CONNECT_TIMEOUT, autocommit=True, row_factory=dict_row
        )
    except psycopg.OperationalError as exc:
        return _unknown_database(url, _one_line(exc))
    except psycopg.Error as exc:
        return _unknown_database(url, _one_line(exc))
    out = {**_unknown_database(url, ""), "reachable": True, "error": None}
    with conn:
        session.use_settings(conn)  # the times it reads, in the style psycopg reads
        try:
            recorded = recorded_versions(conn)
        except psycopg.Error as exc:  # a role that may not read the schema
            out["error"] = f"schema: {_one_line(exc)}"
            out["pending_migrations"] = None  # unknown
            return out
        out["schema_version"] = newest(recorded)
        out["pending_migrations"] = pending(recorded)
        if not recorded:
            return out
        try:
            out["dead_letters"] = conn.execute(
                "SELECT count(*) AS n FROM meter.list_dead_letters('dead', %s, NULL)",
                (DEAD_LETTER_CAP,),
            ).fetchone()["n"]  # type: ignore[index]
        except psycopg.Error as exc:
            out["error"] = f"dead letters: {_one_line(exc)}"
        try:
            out["maintenance"] = conn.execute(
                "SELECT * FROM meter.get_maintenance_runs() ORDER BY task"
            ).fetchall()
        except psycopg.errors.UndefinedFunction:
            # an older schema without beat's run records: "unknown", not an error
            out["maintenance"] = None
        except psycopg.Error as exc:
            out["maintenance_error"] = _one_line(exc)
    return out


def _broker(url: str, timeout: float) -> dict[str, Any]:
    import redis

    out: dict[str, Any] = {
        "url": redact(url),
        "reachable": False,
        "error": None,
        "queue_depth": None,
        "unacked": None,
        "consumers_alive": None,
    }
    if not url.startswith(("redis://", "rediss://", "unix://")):
        out["error"] = "not a Redis URL: only Redis brokers are inspected"
        return out
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        pipe = client.pipeline(transaction=False)
        for key in QUEUE_KEYS:
            pipe.llen(key)
        pipe.hlen(UNACKED_KEY)
        pipe.time()
        *depths, unacked, (seconds, micros) = pipe.execute()
        now = seconds + micros / 1e6
        out["queue_depth"] = sum(depths)
        out["unacked"] = unacked
        # consumers that beat within the timeout (the transport's heartbeats, Redis clock)
        out["consumers_alive"] = client.zcount(CONSUMERS_KEY, now - CONSUMER_TIMEOUT, "+inf")
        out["reachable"] = True
    except redis.RedisError as exc:
        out["error"] = _one_line(exc)
    finally:
        client.close()
    return out


def _workers(broker_url: str, timeout: float) -> dict[str, Any]:
    """Celery workers answering a ``ping`` broadcast within ``timeout`` seconds (``alive``
    ``None`` when the broadcast could not be made: unknown, not "none answered")."""
    from celery import Celery

    from meter import wire

    app = Celery("meter-status", set_as_current=False)
    app.conf.update(wire.celery_config(broker_url))
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_max_retries = 0
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception as exc:  # kombu/redis errors vary by version: report, don't crash
        return {"alive": None, "error": _one_line(exc)}
    finally:
        app.close()
    return {"alive": sorted(host for reply in replies for host in reply), "error": None}


def _problems(status: dict[str, Any], *, invalid: bool = False) -> list[str]:
    db, broker, workers = status["database"], status["broker"], status["workers"]
    problems: list[str] = []
    if invalid:
        problems.append(f"database not looked at: {db['error']}")
    elif not db["reachable"]:
        problems.append(f"database unreachable: {db['error']}")
    else:
        # what could not be checked is not healthy (a role without the rights, say)
        if db.get("error"):
            problems.append(f"cannot check {db['error']}")
        if db.get("maintenance_error"):
            problems.append(f"cannot check beat runs: {db['maintenance_error']}")
        if db["pending_migrations"]:
            problems.append(
                f"{len(db['pending_migrations'])} migration(s) not applied: run `meter migrate`"
            )
        if db["dead_letters"]:
            problems.append(f"{db['dead_letters']} dead letter(s) waiting: `meter dead-letters`")
        for run in db["maintenance"] or []:
            if run.get("last_error") and not _ok_since_error(run):
                problems.append(f"periodic task {run['task']} failed: {run['last_error']}")
    if not broker["reachable"]:
        problems.append(f"broker unreachable: {broker['error']}")
    elif workers["alive"] is None:
        problems.append(f"cannot check workers: {workers['error']}")
    elif not workers["alive"]:
        problems.append("no worker answered the ping")
    return problems


def _ok_since_error(run: dict[str, Any]) -> bool:
    """Whether the last run of a periodic task succeeded (an older error is history)."""
    ok, finished = run.get("last_ok_at"), run.get("last_finished_at")
    return isinstance(ok, datetime) and isinstance(finished, datetime) and ok >= finished


def collect(
    database_url: str | None,
    broker_url: str,
    timeout: float = 1.0,
    *,
    database_error: str | None = None,
    database_invalid: str | None = None,
) -> dict[str, Any]:
    """The status of a Meter installation.

    Parameters:
        database_url: PostgreSQL conninfo (a superuser or ``meter_maintenance`` member sees
            every namespace's dead letters); ``None`` when it could not even be resolved.
        broker_url: the Redis broker.
        timeout: seconds to wait for Redis and for the workers' ping replies.
        database_error: why there is no ``database_url`` (the embedded server did not
            start), reported as the database's error.
        database_invalid: why there is no ``database_url``: the one given was refused,
            malformed or holding a value libpq refuses (a ValidationError of this function,
            or of the caller's own check), reported as the database's error (what libpq
            quoted of the URL hidden: it may be the password) and as the problem
            "database not looked at".

    Returns:
        ``{"healthy", "problems", "database", "broker", "workers"}``: ``database`` has
        ``reachable``, ``schema_version``, ``pending_migrations``, ``dead_letters``
        (waiting, counted up to 10000) and ``maintenance`` (rows of
        ``meter.get_maintenance_runs()``, ``None`` if the schema has no such function),
        always every key, ``None`` for what could not be looked at (``reachable`` false
        when the database was not looked at);
        ``broker`` has ``reachable``, ``queue_depth``, ``unacked``, ``consumers_alive``;
        ``workers`` has ``alive`` (hostnames; ``None`` when they could not be asked, the
        broker out of reach) and ``error``.

    Raises:
        ValidationError: naming ``database_url``, malformed or with a value libpq refuses
            (``sslmode=bogus``, a ``service`` not defined), before the broker is looked at.
    """
    if database_url is None:
        database = _unknown_database(
            None,
            _without_fragments(database_invalid)
            or database_error
            or "no database: set METER_DATABASE_URL or --database-url",
        )
    else:
        database = _database(database_url)
    broker = _broker(broker_url, timeout)
    workers = (
        _workers(broker_url, timeout)
        if broker["reachable"]
        else {"alive": None, "error": "broker unreachable"}  # not asked: unknown
    )
    status: dict[str, Any] = {"database": database, "broker": broker, "workers": workers}
    status["problems"] = _problems(status, invalid=database_url is None and bool(database_invalid))
    status["healthy"] = not status["problems"]
    return {"healthy": status["healthy"], "problems": status["problems"], **status}
