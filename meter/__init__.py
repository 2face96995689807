"""Meter: a usage-metering ledger on PostgreSQL.

>>> from meter import MeterClient
>>> with MeterClient("postgresql://localhost/meter") as client:  # doctest: +SKIP
...     client.allocate("u1", "tokens", 1000, "tok")
...     client.consume("u1", "tokens", 12, "tok", check_balance=True)
"""

from meter.client import MeterClient
from meter.errors import (
    IdempotencyConflictError,
    MeterConnectionError,
    MeterError,
    NotFoundError,
    PublishError,
    TenantError,
    ValidationError,
)
from meter.migrate import migrate

__version__ = "0.1.0"

__all__ = [
    "IdempotencyConflictError",
    "MeterClient",
    "MeterConnectionError",
    "MeterError",
    "NotFoundError",
    "PublishError",
    "TenantError",
    "ValidationError",
    "__version__",
    "migrate",
]
