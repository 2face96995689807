"""The pipeline's wire protocol: what the producer sends and the worker receives.

Producer (:mod:`meter.producer`) and worker (``worker/``) share this module, so that task
names, the queue, the Celery settings and the event format are defined once.

An *event* is one element of the JSON array taken by ``meter.apply_events`` (SQL, file
``sql/008_pipeline.sql``) and stored as the payload of a dead letter::

    {"op": "consume", "namespace": "default",
     "args": {"user_id": "u1", "event_type": "tokens", "amount": "12.5", "unit": "tok",
              "idempotency_key": "..."}}

``args`` uses the SQL parameter names without ``p_``; arguments left at their default are
omitted. Amounts travel as strings holding the exact decimal text (never JSON numbers, so
no JSON library on the way can turn them into floats); ``event_time`` is ISO 8601 with its
offset (the producer sends it in UTC, ``+00:00``). ``meter.apply_events`` takes these forms only (``sql/032``): a JSON number for an
amount, but no ``'now'``, no time without its offset, no ``0x10`` or ``1_000``, and no
identifier that is not a JSON string; it refuses the rest, naming the argument.

A consume or allocate sent without an ``event_time`` also carries ``"occurred_at"`` beside
``op`` (not in ``args``: no argument of the call): the time the producer's call was made,
ISO 8601 in UTC. The database dates the ledger row by it instead of by when a worker
applies the event (``sql/068``), and it counts in no idempotency fingerprint, so a resend
with the same key at another call time is a replay. A stamp that is not a valid time from
1900 to 24 hours after the database's ``now()`` is ignored (the row is dated by
``now()``); other ops ignore the field. Databases from before 068 ignore it; workers of
any release pass it on untouched.

Tasks (all JSON, one queue :data:`QUEUE`):

``meter.<op>(event, orphan_since=None, verdict=None, auth=None)``
    one event (``op`` is consume, reserve, commit, release, allocate or adjust). ``event``
    is the JSON text of its object (:func:`dumps`), as producers and the worker's own
    single-event tasks send it, so that Celery's JSON (kombu's) never decodes event
    content: its decoder turns any object whose keys are ``__type__`` and ``__value__``
    (metadata may hold one) into a Python value, or refuses the whole message. An object
    in its place (as sent before, or by another Celery client) is applied the same way,
    as kombu decoded it, but for its numbers: the worker reads a JSON number that a float
    does not give back exactly as a ``Decimal`` (``worker/codec.py``), never rounded to
    a float's 17 digits (workers from before the text form take only objects: upgrade
    workers first). ``orphan_since`` is set by the worker itself when it retries a
    commit or release whose reservation does not exist yet, ``verdict`` when it retries
    recording a dead letter.
``meter.apply_batch(events, verdict=None, auth=None)``
    many events applied in one database transaction. ``events`` is the JSON text of their
    array (:func:`dumps`), exactly what ``meter.apply_events`` takes: the worker checks
    it and, unless it must change an event, passes the text on as it came, and Celery
    decodes one string per message instead of every event's objects (twice: once in the
    worker's consumer, once in its pool process). A JSON array in its place (as sent
    before) is applied the same way.

``auth`` is ``{"namespace": ns, "signed_at": seconds, "mac": hex}``: the one namespace every
event of the message must name, when it was signed, and its HMAC-SHA256 with that
namespace's key (:mod:`meter.signing`; ``signed_at`` and ``mac`` absent when the producer
has no key). Workers with ``METER_SIGNING_SECRET`` refuse a message whose ``auth`` is
missing or does not verify, or that was signed too long ago or ahead of their clock.

A task returns an *outcome* (stored only when the sender asked for a result):
``{"ok", "status", "result", "error_sqlstate", "error_message", "digest"}`` per event, as
the rows of ``meter.apply_events``; ``apply_batch`` returns the list of them. ``digest`` is
:func:`digest` of the payload text the task received (a single-event task the worker sent
for an event of a batch echoes its batch's, which it carries as ``auth["digest"]``; an
event sent as an object, not text, has ``None``); the producer's ``wait()`` refuses an
outcome whose digest is not its message's. ``meter.unreadable`` echoes the digest of the
payload text the body of the message it files holds, when it holds one. Workers before it
stored no ``digest``, nor does a dead letter of a message whose body holds no payload text:
such outcomes are taken as they are. A batch event whose
reservation was not found yet is handed to a task of its own: its outcome is
``{"ok": false, "status": "deferred", "task_id": ...}`` and that task's outcome is the
event's.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from meter import broker
from meter import types as t

__all__ = [
    "APPLY_BATCH",
    "BROKER_URL_ENV",
    "DEFAULT_BROKER_URL",
    "MAINTENANCE_QUEUE",
    "OPS",
    "QUEUE",
    "broker_url_from_env",
    "celery_config",
    "child_task_id",
    "decode_outcome",
    "digest",
    "task_name",
]

QUEUE: Final = "meter"
"""The queue every pipeline task travels on."""

MAINTENANCE_QUEUE: Final = "meter.maintenance"
"""The queue of beat's periodic tasks. Workers consume it next to :data:`QUEUE`, taking the
two in turn, so an event backlog does not hold the expiry sweep back for minutes (while it
waits, expired holds keep counting in ``reserved``)."""

OPS: Final = ("consume", "reserve", "commit", "release", "allocate", "adjust")
"""The recording operations a single event can carry."""

APPLY_BATCH: Final = "meter.apply_batch"
RELEASE_EXPIRED: Final = "meter.release_expired"

BROKER_URL_ENV: Final = "METER_BROKER_URL"
DEFAULT_BROKER_URL: Final = "redis://127.0.0.1:6379/0"

VISIBILITY_TIMEOUT: Final = 3600
"""Seconds a delivered, unacknowledged message stays invisible before Redis hands it out
again. It must outlast the longest task (``TASK_TIME_LIMIT``) and the longest retry
countdown (a retried task waits in the worker, unacknowledged, until its ETA): otherwise a
message still being worked on is delivered a second time."""

TASK_TIME_LIMIT: Final = 300
"""Hard limit (seconds) on one task; a batch of 1000 events takes well under a second."""

RESULT_EXPIRES: Final = 3600
"""Seconds a stored result (only for callers that asked for one) is kept."""

_AMOUNT_FIELDS: Final = frozenset(
    {"balance", "available", "reserved", "consumed", "released", "reserved_amount"}
)


def task_name(op: str) -> str:
    """The Celery task name of a single-event operation: ``meter.<op>``."""
    return f"meter.{op}"


def broker_url_from_env(url: str | None = None) -> str:
    """``url``, else ``$METER_BROKER_URL``, else a Redis on localhost (``redis://127.0.0.1:6379/0``)."""
    return url or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL


def celery_config(broker_url: str) -> dict[str, Any]:
    """The Celery settings producer and worker share (the worker adds its own on top).

    The choices that turn at-least-once delivery into exactly-once effect:

    - JSON only, both ways: a message is data, never code (no pickle), and amounts in it are
      strings.
    - Results are off unless a sender asks (``ignore_result=False`` on the message): the
      Redis result backend at the broker URL is there for those callers only.
    - The queue is :data:`QUEUE`, so Meter's tasks do not mix with an application's.
    """
    return {
        "broker_url": broker_url,
        # kombu's Redis transport without a client object per publish (the worker's own
        # builds on it)
        "broker_transport": broker.transport_for(broker_url),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "result_backend": broker_url,
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "result_expires": RESULT_EXPIRES,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_default_exchange": QUEUE,
        "task_default_routing_key": QUEUE,
    }


def digest(payload: str) -> str:
    """The digest of a message's payload (its event's or batch's JSON text, as sent) that
    the worker echoes in every outcome it stores (``"digest"``), so that ``wait()`` takes
    only the outcome of the message it sent, not that of another message which reused its
    task id. 128 bits of SHA-256 (about 0.4 µs for a 200-byte event)."""
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def child_task_id(parent_id: str, idx: int) -> str:
    """The task id of event ``idx`` of batch ``parent_id`` when the worker sends it alone.

    Deterministic, so a batch delivered twice hands each event to the same task id (and a
    waiting producer can follow it).
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meter:{parent_id}/{idx}"))


def decode_outcome(op: str, result: Any) -> Any:
    """Turn the ``result`` of a successful outcome into what ``MeterClient`` would return.

    Quantities become ``Decimal`` (JSON gives ``int`` for whole numbers), ``expires_at`` an
    aware ``datetime``; ``release`` gives a ``bool``.
    """
    if op == "release":
        return bool(result.get("released")) if isinstance(result, dict) else bool(result)
    if not isinstance(result, dict):
        return result
    out = dict(result)
    for key, value in out.items():
        if key in _AMOUNT_FIELDS and value is not None and not isinstance(value, Decimal):
            out[key] = Decimal(str(value))
        elif key == "expires_at" and isinstance(value, str):
            out[key] = datetime.fromisoformat(value)
    return out


def dumps(value: Any) -> str:
    """JSON text of ``value``, as :func:`meter.types.dumps` writes it, faster.

    Events are plain JSON values (object keys str, amounts strings), for which the C
    encoder gives the same text several times faster than the exact pure-Python one
    (about 20 ms less per 1000 events). What it cannot write the same way (a ``Decimal``,
    another Mapping type) makes it raise TypeError, and a NUL escape would be refused by
    ``jsonb``: those go to :func:`meter.types.dumps`, which is exact for Decimal and names
    what it refuses (ValueError, TypeError). A value nested deeper than either can write on
    this stack (both recurse) is written the same by a walk with a stack of its own.
    """
    try:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError):
            return t.dumps(value)
        return t.dumps(value) if "\\u0000" in text else text
    except RecursionError:
        # Both encoders recurse, one level a frame: a worker's stack ran out near 900
        # levels, and an event nested deeper (which apply_events takes) could not be handed
        # to a task of its own, applied alone or filed but as its ascii() text.
        return _dumps_iteratively(value)


_TEXT: Final = 0
_CLOSE: Final = 1
_VALUE: Final = 2
_KEY: Final = 3


def _dumps_iteratively(value: Any) -> str:
    """The text :func:`meter.types.dumps` writes, with a stack of its own instead of
    recursion; its errors, and ValueError for a circular reference."""
    parts: list[str] = []
    path: set[int] = set()  # the containers being written, to refuse a cycle
    opened: list[Any] = []
    stack: list[tuple[int, Any]] = [(_VALUE, value)]
    while stack:
        kind, item = stack.pop()
        if kind == _TEXT:
            parts.append(item)
            continue
        if kind == _CLOSE:  # (the closing bracket, the container's id)
            parts.append(item[0])
            path.discard(item[1])
            continue
        if kind == _KEY:  # (the separator before it, the key)
            # Checked in its turn, not when its object is opened, so that of two faults (a
            # NUL in a value, then a key not str) the first is named, as meter.types.dumps
            # names it: a caller may take ValueError and not TypeError (send_child does).
            separator, key = item
            if not isinstance(key, str):
                raise TypeError(f"object keys must be str, got {type(key).__name__}")
            parts.append(separator + t.dumps(key) + ":")
            continue
        is_object = isinstance(item, Mapping)
        if not is_object and not isinstance(item, list | tuple):
            parts.append(t.dumps(item))  # a scalar: no recursion
            continue
        if id(item) in path:
            raise ValueError("circular reference")
        path.add(id(item))
        # Kept to the end: one a Mapping makes as it is read would be freed while written,
        # and its id, still in the path, taken by the next one made (a false cycle).
        opened.append(item)
        entries = list(item.items()) if is_object else list(enumerate(item))
        parts.append("{" if is_object else "[")
        stack.append((_CLOSE, ("}" if is_object else "]", id(item))))
        for i in range(len(entries) - 1, -1, -1):
            key, member = entries[i]
            stack.append((_VALUE, member))
            separator = "," if i else ""
            if is_object:
                stack.append((_KEY, (separator, key)))
            elif separator:
                stack.append((_TEXT, separator))
    return "".join(parts)


OBJECT_DEPTH: Final = 64
"""The deepest nesting of an event a worker hands on as an object (``send_child``); one
nested deeper goes as its JSON text, which no pickling or JSON codec on the way recurses
into."""


def nested_deeper_than(value: Any, depth: int) -> bool:
    """Whether ``value`` holds objects or arrays more than ``depth`` levels below itself;
    without recursion."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list | tuple):
            if level > depth:
                return True
            stack.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return False


def walk(value: Any) -> Iterator[Any]:
    """``value`` and every value it holds, at any depth (objects' values, arrays' items).
    Without recursion: metadata may be nested as deep as the producer takes
    (``MAX_METADATA_DEPTH``), which a recursive walk, two frames a level, could not go
    through on a worker's stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def holds_type_marker(value: Any) -> bool:
    """True when ``value`` holds an object whose keys are exactly ``__type__`` and
    ``__value__``, which kombu's JSON decoder turns into a Python value (or refuses with
    the whole message) instead of passing on."""
    return any(
        isinstance(item, dict) and item.keys() == {"__type__", "__value__"} for item in walk(value)
    )
