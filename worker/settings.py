"""The worker's own settings: read from the environment, carried in the Celery config.

Each ``METER_*`` variable becomes a ``meter_*`` key of ``app.conf`` (so tests and embedding
applications can set them on the app, like any Celery setting), and tasks read them back
through :meth:`Settings.from_conf` on every call.

=================================  ======================  ===================================
environment                         ``app.conf`` key        meaning (default)
=================================  ======================  ===================================
``METER_DATABASE_URL``              meter_database_url      PostgreSQL conninfo; empty: libpq's
                                                            own defaults (``PGHOST``...)
``METER_DB_POOL_SIZE``              meter_db_pool_size      connections per worker process (2)
``METER_ORPHAN_HORIZON_SECONDS``    meter_orphan_horizon    how long a commit/release waits for
                                                            its reserve before it is
                                                            dead-lettered (300); a reserve
                                                            that comes later applies it
``METER_MAX_DELIVERIES``            meter_max_deliveries    deliveries of one message before it
                                                            is given up as poison (10)
``METER_MAX_RETRIES``               meter_max_retries       retries of a task (transient errors
                                                            and orphan waits together) before
                                                            it is dead-lettered (100)
``METER_RETRY_BACKOFF_BASE``        meter_retry_backoff_base   first retry delay, seconds (0.2)
``METER_RETRY_BACKOFF_MAX``         meter_retry_backoff_max    longest retry delay, seconds (15;
                                                            at most 3300: the visibility
                                                            timeout less the task time limit)
``METER_EXPIRY_INTERVAL_SECONDS``   meter_expiry_interval   beat: expiry sweep period (5)
``METER_EXPIRY_BATCH``              meter_expiry_batch      holds expired per sweep statement
                                                            (1000)
``METER_ROLL_INTERVAL_SECONDS``     meter_roll_interval     beat: period roll-over check (60)
``METER_ROLL_BATCH``                meter_roll_batch        period steps per roll statement
                                                            (100)
``METER_PARTITIONS_INTERVAL_SECONDS``  meter_partitions_interval  beat: partition check (86400)
``METER_PARTITIONS_AHEAD_MONTHS``   meter_partitions_ahead  ledger partitions kept ready
                                                            beyond this month (3; at most 120)
``METER_LEDGER_RETENTION_MONTHS``   meter_ledger_retention_months  beat: fold and drop ledger
                                                            months older than this (unset: no
                                                            retention, the default; at most
                                                            1200)
``METER_RETENTION_INTERVAL_SECONDS``  meter_retention_interval  beat: retention check (86400)
``METER_IDEMPOTENCY_KEY_RETENTION_DAYS``  meter_key_retention_days  keys older than this are
                                                            pruned (35; at most 36500)
``METER_PRUNE_INTERVAL_SECONDS``    meter_prune_interval    beat: key pruning period (3600)
``METER_PRUNE_BATCH``               meter_prune_batch       keys deleted per prune statement
                                                            (10000)
``METER_SIGNING_SECRET``            meter_signing_secret    when set, only messages signed
                                                            with the key of the namespace they
                                                            write into are applied
                                                            (:mod:`meter.signing`; empty: off)
=================================  ======================  ===================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from meter import wire

__all__ = ["ETA_HORIZON", "Settings"]


# The environment variable of each setting (the module docstring says what each means).
_ENV: Final = {
    "database_url": "METER_DATABASE_URL",
    "db_pool_size": "METER_DB_POOL_SIZE",
    "orphan_horizon": "METER_ORPHAN_HORIZON_SECONDS",
    "max_deliveries": "METER_MAX_DELIVERIES",
    "max_retries": "METER_MAX_RETRIES",
    "retry_backoff_base": "METER_RETRY_BACKOFF_BASE",
    "retry_backoff_max": "METER_RETRY_BACKOFF_MAX",
    "expiry_interval": "METER_EXPIRY_INTERVAL_SECONDS",
    "expiry_batch": "METER_EXPIRY_BATCH",
    "roll_interval": "METER_ROLL_INTERVAL_SECONDS",
    "roll_batch": "METER_ROLL_BATCH",
    "partitions_interval": "METER_PARTITIONS_INTERVAL_SECONDS",
    "partitions_ahead": "METER_PARTITIONS_AHEAD_MONTHS",
    "ledger_retention_months": "METER_LEDGER_RETENTION_MONTHS",
    "retention_interval": "METER_RETENTION_INTERVAL_SECONDS",
    "key_retention_days": "METER_IDEMPOTENCY_KEY_RETENTION_DAYS",
    "prune_interval": "METER_PRUNE_INTERVAL_SECONDS",
    "prune_batch": "METER_PRUNE_BATCH",
    "signing_secret": "METER_SIGNING_SECRET",
}

ETA_HORIZON: Final = wire.VISIBILITY_TIMEOUT - wire.TASK_TIME_LIMIT
"""Seconds ahead a message's ETA may be: a worker holds the message unacknowledged until
then, and runs it for up to the task time limit, all within the broker's visibility
timeout, past which Redis hands it out again."""

# The bounds the SQL functions these settings feed put on them: a larger value would stop
# its beat task at every run (MT001) instead of the worker at start. And the longest retry
# delay: a retried message waits in its worker, unacknowledged, for its countdown, then
# runs for up to the task time limit; past the broker's visibility timeout Redis would hand
# it out a second time meanwhile.
_MAXIMUM: Final = {
    "METER_PARTITIONS_AHEAD_MONTHS": 120,  # meter.ensure_partitions
    "METER_LEDGER_RETENTION_MONTHS": 1200,  # meter.drop_old_partitions
    "METER_IDEMPOTENCY_KEY_RETENTION_DAYS": 36500,  # meter.prune_idempotency_keys
    "METER_RETRY_BACKOFF_MAX": ETA_HORIZON,
}


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value):  # nan and inf: nan <= 0 is false, and a retry's
        # countdown of either made Celery's retry fail (the message put back at once)
        raise ValueError(f"{name} must be a finite number, got {raw!r}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0, got {raw!r}")
    if name in _MAXIMUM and value > _MAXIMUM[name]:
        raise ValueError(f"{name} must be at most {_MAXIMUM[name]}, got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """The worker settings (see the module docstring for each)."""

    database_url: str = ""
    db_pool_size: int = 2
    orphan_horizon: float = 300.0
    max_deliveries: int = 10
    max_retries: int = 100
    retry_backoff_base: float = 0.2
    retry_backoff_max: float = 15.0
    expiry_interval: float = 5.0
    expiry_batch: int = 1000
    roll_interval: float = 60.0
    roll_batch: int = 100
    partitions_interval: float = 86400.0
    partitions_ahead: int = 3
    ledger_retention_months: int = 0  # 0: retention off (the variable unset)
    retention_interval: float = 86400.0
    key_retention_days: int = 35
    prune_interval: float = 3600.0
    prune_batch: int = 10000
    signing_secret: str = field(default="", repr=False)  # never in logs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``METER_*`` variables; unset or empty ones take the defaults.

        Raises:
            ValueError: a variable is not a finite positive number, or is above its bound
                (``_MAXIMUM``: the SQL function it feeds, or the visibility timeout).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            var = _ENV[name]
            if isinstance(default, str):
                values[name] = env.get(var, default)
            else:  # the default's type says whether a fraction is allowed
                values[name] = _number(env, var, default, integer=isinstance(default, int))
        return cls(**values)

    def as_conf(self) -> dict[str, Any]:
        """The ``meter_*`` Celery config keys holding these settings."""
        return {f"meter_{name}": getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Settings:
        """The settings held in a Celery config (defaults for missing keys)."""
        d = cls()
        return cls(
            **{
                name: conf.get(f"meter_{name}", getattr(d, name))
                for name in cls.__dataclass_fields__
            }
        )
