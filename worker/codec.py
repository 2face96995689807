"""Celery's JSON in the worker, with no number changed on the way.

kombu's JSON decoder reads every JSON number with a fraction or an exponent as a binary
float. An event sent as an object (by another Celery client: ``meter.wire``) may carry
its amount, or metadata, as a JSON number, which ``meter.apply_events`` takes (032); one
with more significant digits than a float holds came out changed, and was applied so:
``12345678901234567890.5`` as ``12345678901234567000``. The worker registers this codec
in kombu's place for ``application/json``: a number that a float does not give back
exactly (its shortest repr, which is what the worker would send on) is read as a
``Decimal``, which the tasks apply, file and send on exactly (``meter.types.dumps``;
kombu's encoder writes a ``Decimal`` as its exact text, marked). Every other number is
the float it was, so Celery's own fields and messages from Python senders are read as
before, and their signatures (``meter.signing``) cover the same values. A bare ``NaN``,
``Infinity`` or ``-Infinity`` token (JSON has none; Python's decoder reads them) stays the
float it reads as: the event holding one is refused by the task, ``MT001`` naming the
argument (``worker.tasks._not_finite``), as no JSON writer or ``jsonb`` takes it.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

from kombu.serialization import register
from kombu.utils import json as kombu_json

__all__ = ["loads", "register_exact_json"]


def _number(text: str) -> float | Decimal:
    value = float(text)
    if math.isfinite(value) and Decimal(float.__repr__(value)) == Decimal(text):
        return value
    return Decimal(text)  # (an infinite float: the number out of range, named by the SQL)


def _json_loads(s: str, object_hook: Any = None) -> Any:
    return json.loads(s, object_hook=object_hook, parse_float=_number)


def loads(s: str | bytes | bytearray | memoryview) -> Any:
    """kombu's JSON decoder (its ``__type__`` objects included), numbers kept exact."""
    return kombu_json.loads(s, _loads=_json_loads)


def register_exact_json() -> None:
    """Decode ``application/json`` message bodies with :func:`loads` in this process (and
    the pool processes it forks); encoding stays kombu's."""
    register(
        "json", kombu_json.dumps, loads, content_type="application/json", content_encoding="utf-8"
    )
