"""Fire-and-forget recording through the Celery pipeline: :class:`MeterProducer`.

The producer validates each call exactly as :class:`meter.MeterClient` does (bad input
raises :class:`~meter.errors.ValidationError` at once and nothing is enqueued; so does an
``event_time`` the database would refuse on arrival, before 1900 or more than 24 hours
ahead of this machine's clock, see ``_put_time``; and one thing the client takes is
refused: ``metadata`` nested more than :data:`MAX_METADATA_DEPTH` levels, which the message
could not carry), gives every
event an idempotency key, turns it into a message (:mod:`meter.wire`) and hands it to the
broker. A worker applies it to PostgreSQL exactly once in effect (``worker/``).

Two ways to send:

- **Direct** (default): each call publishes one message before it returns; once the call
  has returned, the event is in Redis (durable as Redis is: AOF, ``everysec``).
- **Buffered** (``batch_size`` and/or ``linger_ms``): calls append to an in-memory buffer
  that is sent as one ``apply_batch`` message when it holds ``batch_size`` events, when
  its oldest event is ``linger_ms`` old (also when the caller has dropped the producer
  without closing it: the linger thread holds it while it holds events), on
  :meth:`MeterProducer.flush`, :meth:`MeterProducer.close` and at interpreter exit,
  including the exit of a process started by :mod:`multiprocessing` (which skips atexit
  hooks: a finalizer of its own sends the buffer; after a fork, the child's buffer is
  its own, empty at first) and of a Celery prefork pool child (which skips both: Celery's
  ``worker_process_shutdown`` signal sends it when the worker recycles or shuts its
  children down; a child sent SIGTERM itself, as systemd's default
  ``KillMode=control-group`` does, dies with its buffer). Much cheaper per event, at a price:
  **events still in the buffer are lost if the process dies before they are sent**
  (SIGKILL, OOM, power loss: at most ``batch_size`` events or ``linger_ms`` of traffic
  while the broker takes the messages; while it refuses them, at most ``max_buffered``
  events, 10 x ``batch_size`` by default, plus the batch each call then under way was
  sending). The buffer never holds more than ``max_buffered``: a call that finds it full
  first sends its oldest batch itself (back-pressure) and, if the broker refuses that
  too, raises ``PublishError`` with its own event, which was not buffered. (The one
  exception: an interrupt, ``KeyboardInterrupt`` or ``SystemExit``, inside the call
  sending the batch it filled, which cannot carry that batch's other events: they go
  back to the buffer whatever the room, fewer than ``batch_size`` over; a ``close()``
  made by a signal handler inside that call, before the interrupt, has sent the buffer
  without them, and they are lost.)
  Use direct mode, or call ``flush()`` at the points where you need the guarantee, for
  usage you cannot afford to lose.

Results: by default nothing is stored (``task_ignore_result``), so the handle only carries
identifiers. A producer created with ``results=True``, or a call passing
``want_result=True``, has the worker store the outcome in the Redis result backend and
:meth:`EventHandle.wait` returns it.
"""

from __future__ import annotations

import atexit
import copy
import logging
import multiprocessing.util
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import TracebackType
from typing import Any, Final, Self

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.signals import worker_process_shutdown
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meter import signing, wire
from meter import types as t
from meter.errors import (
    MeterConnectionError,
    MeterError,
    PublishError,
    ValidationError,
    from_sqlstate,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "EventHandle", "MeterProducer"]

_log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE: Final = 500
"""Events per ``apply_batch`` message for :meth:`MeterProducer.send_many`."""

MAX_CHUNK_SIZE: Final = 1000
"""The most events per ``apply_batch`` message (``batch_size``, ``chunk_size``). A worker
applies a message of more than 100 events of which any goes one by one (a checked
consume, reserve, commit, release, an adjust naming an entry, a key's second use) in
transactions of at most 100, in order, since each such event takes locks in the server's
shared lock table (sql 050, 054)."""

DEFAULT_BATCH_SIZE: Final = 500
BUFFERED_BATCHES: Final = 10
"""Default ``max_buffered``: this many times ``batch_size`` events."""

MAX_BUFFERED: Final = 10_000_000
DEFAULT_LINGER_MS: Final = 50
DEFAULT_TTL_SECONDS: Final = 300
BROKER_TIMEOUT_SECONDS: Final = 30
"""Default ``broker_timeout``: how long one publish (sending the message included) may wait
for the broker. Without a limit, a broker that stops answering without closing the
connection (paused, failed over, cut off by a firewall) blocks the call for good; with
one, the call ends in a :class:`~meter.errors.PublishError` after Celery's publish
retries, some five times the limit (measured: 5.1-5.6 s with a limit of 1 s, a paused
Redis).
It bounds the size of a message too: raise it to send large batches over a slow link."""

BROKER_CONNECT_TIMEOUT_SECONDS: Final = 5
"""How long connecting to the broker may take."""

# How the producer's result backend (the broker's Redis) reconnects: Celery's default, 20
# retries a second apart, would make a paused Redis hold a publish with results, or a
# wait(), for 20 x broker_timeout. These 3 retries (4 tries) still ride out a restart of
# some 6 s.
_RESULT_RETRY_POLICY: Final = {
    "max_retries": 3,
    "interval_start": 0,
    "interval_step": 2,
    "interval_max": 4,
}

# A wait hears its outcome on a subscription, and also reads the stored outcome each time it
# starts. It starts again this often (seconds): an outcome published while the subscription
# could not hear it (its connection broken, or silently dead) is still found, and so is a
# Redis that stopped answering, by that read's socket timeout.
_WAIT_SLICE: Final = 5.0

Amount = int | Decimal | str | float


class _Batch:
    """Events buffered for one ``apply_batch`` message (buffered mode)."""

    __slots__ = (
        "created", "digests", "events", "filler", "handed", "outcome", "pid", "refused",
        "sent", "task_id", "want_result",
    )  # fmt: skip

    def __init__(self, task_id: str | None = None) -> None:
        self.task_id = task_id or t.new_id()
        self.events: list[dict[str, Any]] = []
        self.created = time.monotonic()
        self.want_result = False
        self.sent = False
        self.outcome: list[Any] | None = None
        # wire.digest of each message it was published as (when results are wanted), a
        # failed publish's too: the outcome's echo. Its filler's failed send may have got
        # through, and the batch then goes again without that call's event (the last),
        # under the same task id: either message's outcome may be the one stored.
        self.digests: tuple[str, ...] = ()
        # The thread of the call that filled it and is about to send it (out of the buffer
        # meanwhile), else None: a wait() for one of its events waits for that call.
        self.filler: int | None = None
        # Set once it is out of the buffer for good, unsent: its events handed back in the
        # error of the call that filled it (no room to keep them) or of a close().
        self.handed = False
        # The process whose buffer it belongs to: in a child forked later, only the
        # parent sends it.
        self.pid = os.getpid()
        # A send of it failed: the linger thread, retrying it, takes the open batch along
        # (not behind a batch merely being sent by another thread's flush).
        self.refused = False


class EventHandle:
    """What an enqueue returns: the event's identifiers, and :meth:`wait` for its result.

    Attributes:
        op: the operation (``consume``, ``reserve``...).
        idempotency_key: the key guarding the event (generated when not given; for
            ``reserve`` without a key, and for ``commit``, the reservation id; a
            ``release`` gets one of its own, which the hold records when this event
            releases it: sql 067).
        reservation_id: the reservation (reserve, commit, release), else ``None``.
        task_id: the Celery task carrying the event (for batched events, the batch's).
    """

    __slots__ = (
        "_batch",
        "_digest",
        "_index",
        "_outcome",
        "_producer",
        "_want_result",
        "idempotency_key",
        "op",
        "reservation_id",
        "task_id",
    )

    def __init__(
        self,
        producer: MeterProducer,
        op: str,
        idempotency_key: str,
        reservation_id: str | None,
        task_id: str,
        want_result: bool,
        batch: _Batch | None = None,
        index: int | None = None,
        digest: str | None = None,
    ) -> None:
        self._producer = producer
        self._digest = digest  # of its message (a batch's: in the batch, once sent)
        self.op = op
        self.idempotency_key = idempotency_key
        self.reservation_id = reservation_id
        self.task_id = task_id
        self._want_result = want_result
        self._batch = batch
        self._index = index
        self._outcome: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<EventHandle {self.op} key={self.idempotency_key!r} "
            f"reservation_id={self.reservation_id!r} task_id={self.task_id!r}>"
        )

    def wait(self, timeout: float | None = 30.0) -> Any:
        """Wait until a worker has applied the event; return what ``MeterClient`` would.

        Only for events sent with results on (``MeterProducer(results=True)`` or
        ``want_result=True``). A buffered event still in the buffer is flushed first
        (within ``timeout``; a batch another thread is sending is waited for). In a
        process forked from the one that buffered it, it waits for the outcome only (that
        process sends it). A commit or release whose reserve has not arrived yet is
        retried by the worker, so this may wait for the reserve.

        Parameters:
            timeout: seconds to wait in all (``None``: forever). A wait that starts while
                the broker's Redis does not answer raises ``MeterConnectionError`` after
                some 4 x the producer's ``broker_timeout``, possibly past ``timeout``. A
                wait longer than 5 s + ``broker_timeout`` (``None`` included) reads the
                stored outcome every 5 s: it finds an outcome whose notification was
                lost, and when Redis stops answering it raises ``MeterConnectionError``
                within about 5 s + ``broker_timeout``, never past ``timeout``; a shorter
                wait then ends at ``timeout``.

        Returns:
            The SQL result as ``MeterClient`` returns it: a dict with ``Decimal``
            quantities (a refusal too: ``success``/``granted`` false), or a ``bool`` for
            ``release`` (true also when the event, its message delivered again after its
            reply was lost or the event sent again in a new message after a
            ``PublishError``, finds the hold released by its own earlier delivery, by the
            key it carries: sql 067; false for a hold another caller or another
            ``release()`` call released, committed or that expired).

        Raises:
            RuntimeError: the event was sent without results.
            TimeoutError: no outcome within ``timeout`` (or the event not sent by then).
            MeterConnectionError: the outcome could not be read: the broker's Redis did not
                answer (the event was sent; wait again later).
            PublishError: the event was still buffered and the flush that sends it failed
                (as :meth:`MeterProducer.flush`); or it was never sent, handed back by a
                ``close()`` that failed, or by the call that filled its batch, failed to send
                it and found no room for it in a full buffer (``max_buffered``) (in that
                error's ``events``; this one's ``events`` holds it again): raised at once,
                whatever ``timeout``.
            ValidationError, IdempotencyConflictError, NotFoundError, TenantError,
            MeterError: the event can never be applied; it is in the dead letters.
            MeterError: the outcome stored under the event's task id is another message's
                (a message that reused the task id, crafted or another producer's, ran
                first): every outcome echoes the digest of the message it came from
                (:func:`meter.wire.digest`), and one that is not this event's message's is
                refused, at once, since the result backend keeps the first outcome stored
                and this event's own would never be read. The event itself is applied or
                dead-lettered as usual. An outcome without a digest (a worker from before
                the echo, a message whose body holds no payload text) is taken as it is.
        """
        if not self._want_result:
            raise RuntimeError(
                "this event was sent without results: create the producer with "
                "results=True or pass want_result=True to wait for it"
            )
        outcome = self._outcome
        if outcome is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            outcome = self._producer._outcome_of(self, deadline)
            self._outcome = outcome
        if outcome.get("ok") or outcome.get("status") == "refused":
            return wire.decode_outcome(self.op, outcome.get("result"))
        raise from_sqlstate(
            outcome.get("error_sqlstate"),
            outcome.get("error_message") or f"{self.op} failed: {outcome.get('status')}",
        )


def _ident(value: object, name: str, *, nullable: bool = False) -> Any:
    lo, hi = t.LIMITS[name]
    return t.check_identifier(value, name, min_len=lo, max_len=hi, nullable=nullable)


# Text that is already what _amount_text returns for it: positive, fixed-point, canonical
# (no sign, no leading zero, no trailing fractional zero) and within the digit limits. The
# common amount (a producer is called once per event) skips the Decimal round trip.
_canonical_positive_amount = re.compile(
    rf"(?:0|[1-9][0-9]{{0,{t.MAX_AMOUNT_INTEGER_DIGITS - 1}}})"
    rf"(?:\.[0-9]{{0,{t.MAX_AMOUNT_FRACTION_DIGITS - 1}}}[1-9])?"
).fullmatch


def _amount_text(value: object, name: str, sign: t.Sign) -> str:
    if type(value) is str and value != "0" and _canonical_positive_amount(value):
        return value  # > 0, so it meets every sign rule
    # Fixed-point text: str(Decimal) would write 1E-7 for 0.0000001.
    return format(t.to_amount(value, name, sign=sign), "f")


def _account_args(
    user_id: object, event_type: object, amount: object, unit: object, resource: object,
    sign: t.Sign, *, pool: bool,
) -> dict[str, Any]:  # fmt: skip
    """The account key and amount of a recording event, validated in this order;
    ``pool`` allows ``user_id=None`` (the namespace-wide account)."""
    args: dict[str, Any] = {
        "user_id": _ident(user_id, "user_id", nullable=pool),
        "event_type": _ident(event_type, "event_type"),
        "amount": _amount_text(amount, "amount", sign),
        "unit": _ident(unit, "unit"),
    }
    if resource is not None:
        args["resource"] = _ident(resource, "resource")
    return args


MAX_METADATA_DEPTH: Final = 800
"""The deepest nesting of ``metadata`` the producer takes (objects and arrays inside it):
what a worker, whose stack is deeper than a caller's, still decodes."""


def _depth(value: Any) -> int:
    """How many levels of objects and arrays ``value`` (decoded JSON) holds below itself;
    without recursion."""
    deepest = 0
    stack = [(value, 0)]  # the metadata object itself: level 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def _put_metadata(args: dict[str, Any], metadata: object) -> None:
    text = t.check_metadata(metadata, "metadata")
    if text is not None:
        # Re-read from the exact text: plain JSON types with Decimal for fractions (the
        # serializer carries those exactly), whatever Mapping types the caller used.
        # The send cannot run out of stack writing what passes (wire.dumps falls back to a
        # walk of its own); the cap is what a worker still decodes.
        try:
            value = t.loads(text)
            deep = _depth(value) > MAX_METADATA_DEPTH
        except RecursionError:
            deep = True
        if deep:
            raise t.invalid(
                "metadata",
                f"is nested too deeply to be sent (at most {MAX_METADATA_DEPTH} levels, and "
                "as the caller's stack allows)",
            )
        args["metadata"] = value


EARLIEST_EVENT_TIME: Final = datetime(1900, 1, 1, tzinfo=UTC)
"""No ledger row is dated before this instant (the database refuses it)."""

MAX_EVENT_TIME_AHEAD: Final = timedelta(hours=24)
"""How far ahead of now an ``event_time`` may be (the database's rule, by its clock)."""


def _put_time(args: dict[str, Any], event_time: object) -> None:
    """``event_time`` as the wire carries it: ISO 8601 in UTC (``+00:00``).

    What the database refuses whatever the moment the event arrives is refused here, at
    the call: a time before 1900-01-01 UTC, or more than 24 hours ahead. "Ahead" is
    measured by this machine's clock, the only one the producer has; the database's own
    check, by its clock when a worker applies the event, stays the authority. A
    producer whose clock runs ``s`` ahead of the database's may thus pass a time that
    the worker dead-letters (up to ``s`` past the database's limit, less the time the
    event spent queued); one whose clock runs behind refuses times up to ``s`` short
    of it. Keep the clocks in sync (NTP) and this does not matter.

    Sent in UTC: the same instant, and a form ``apply_events`` always reads (an offset
    with seconds or microseconds, which Python allows, has no ISO 8601 text it takes).
    """
    checked = t.check_timestamp(event_time, "event_time")
    if checked is None:
        return
    if checked < EARLIEST_EVENT_TIME:
        raise t.invalid("event_time", f"{checked.isoformat()} is before 1900")
    if checked > datetime.now(UTC) + MAX_EVENT_TIME_AHEAD:
        raise t.invalid(
            "event_time",
            f"{checked.isoformat()} is more than 24 hours in the future (by this machine's clock)",
        )
    args["event_time"] = checked.astimezone(UTC).isoformat()


def _event(op: str, namespace: str, args: dict[str, Any], called: datetime) -> dict[str, Any]:
    """An event for the wire. A consume or allocate without an ``event_time`` carries the
    time of its call (``occurred_at``, :mod:`meter.wire`): the database dates its row by it
    rather than by when a worker applies it, and counts it in no fingerprint (sql 068)."""
    event: dict[str, Any] = {"op": op, "namespace": namespace, "args": args}
    if op in ("consume", "allocate") and "event_time" not in args:
        event["occurred_at"] = called.astimezone(UTC).isoformat()
    return event


def _occurred_at(params: dict[str, Any], op: str) -> datetime | None:
    """A ``send_many`` item's ``occurred_at`` (popped from ``params``): the time of the call
    that first sent it, as :class:`~meter.errors.PublishError` hands an event back, so that
    sending it again dates it as that call did. Only a consume or allocate has one."""
    if "occurred_at" not in params:
        return None
    value = t.check_timestamp(params.pop("occurred_at"), "occurred_at")
    if value is not None and op not in ("consume", "allocate"):
        raise t.invalid("occurred_at", f"only a consume or allocate takes it, not {op}")
    return value


def _resendable(event: Mapping[str, Any]) -> dict[str, Any]:
    """An event as built for the wire, turned back into a ``send_many`` item: the same
    call with the key (and reservation id) it was sent with."""
    try:
        args = copy.deepcopy(event["args"])
    except RecursionError:  # metadata nested deeper than deepcopy goes (the JSON limit is not)
        args = dict(event["args"])
    item: dict[str, Any] = {"op": event["op"], **args}
    if "event_time" in item:
        item["event_time"] = datetime.fromisoformat(item["event_time"])
    if "occurred_at" in event:  # sent again, dated at the first call still
        item["occurred_at"] = datetime.fromisoformat(event["occurred_at"])
    return item


class MeterProducer:
    """Enqueue recording events for the Celery workers, fire-and-forget.

    Parameters:
        broker_url: the Redis broker (default: ``$METER_BROKER_URL``, else
            ``redis://127.0.0.1:6379/0``).
        namespace: the tenant every event is recorded in.
        batch_size: buffered mode: send an ``apply_batch`` message once the buffer holds
            this many events (1..1000; default 500 when only ``linger_ms`` is given).
        linger_ms: buffered mode: send the buffer at the latest this many milliseconds
            after its first event (default 50 when only ``batch_size`` is given).
        results: store every event's outcome so that :meth:`EventHandle.wait` works
            (costs a result write per task); per call, ``want_result=`` overrides it.
        chunk_size: events per ``apply_batch`` message for :meth:`send_many` (1..1000).
        signing_key: the namespace's signing key (``meter keys derive NAMESPACE``; default
            ``$METER_PRODUCER_KEY``). Every message is signed with it (:mod:`meter.signing`);
            workers with ``METER_SIGNING_SECRET`` set refuse unsigned messages.
        broker_timeout: seconds one publish may wait for the broker (1..3600; default
            :data:`BROKER_TIMEOUT_SECONDS`).
        max_buffered: buffered mode: the most events the buffer holds (batch_size..10**7;
            default 10 x ``batch_size``). A call that finds it full first sends the oldest
            batches itself until it is not (back-pressure); if the broker refuses, the
            call raises ``PublishError`` with its own event in ``exc.events``, unbuffered.
            (Exceeded only after an interrupt: see Broker failures below.)

    Durability: in direct mode (neither ``batch_size`` nor ``linger_ms``) an event is in the
    broker when the call returns. In buffered mode, **events in the buffer are lost if the
    process dies before they are sent** (at most ``batch_size`` events or ``linger_ms``
    milliseconds of them while the broker takes the messages; while it refuses them, at
    most ``max_buffered``, plus the batch each call then under way was sending: the one
    it filled, its own event included); ``flush()``, ``close()`` and interpreter exit
    (that of a ``multiprocessing`` child included) send them.

    The recording methods take the same parameters as ``MeterClient``'s, validate them the
    same way (``ValidationError`` at once, nothing enqueued; ``metadata`` nested more than
    :data:`MAX_METADATA_DEPTH` levels too, which the client takes), and return an
    :class:`EventHandle` without waiting for the database. ``idempotency_key`` is generated
    (uuid4) when not given, so a message delivered twice is applied once. The producer is
    thread-safe and reuses broker connections from a pool.

    Broker failures raise :class:`~meter.errors.PublishError` (a ``MeterConnectionError``;
    a broker that stops answering, after about 5 x ``broker_timeout``; with results, about
    4 x ``broker_timeout`` more, as Celery first subscribes to the result): the
    broker did not confirm the message, which may or may not have reached it (a reply lost
    after the broker took it looks like a refusal). Its ``events`` hold what is in
    doubt, each with the key it was sent with, so ``send_many(exc.events)`` applies each
    once either way; calling the method again without that key would be a second event
    if the first message had got through. In buffered mode the call whose event fills
    the batch sends it; if that fails, its own event is taken out of the buffer (it is
    ``exc.events``) and the others stay buffered for the next attempt (unless other calls
    have filled the buffer to ``max_buffered`` meanwhile: they are in ``exc.events``
    too, and their handles' ``wait()`` raises; after an error that is not the broker's,
    the call raises instead a ``PublishError`` chained from it, with them and its own
    event; after an interrupt, they stay buffered whatever the room). A call that finds
    the buffer full and cannot send its oldest batch raises with its own event, not
    buffered. ``send_many`` sends chunk by chunk: the chunks confirmed before a failure
    stay sent, and ``exc.events`` holds the rest.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        namespace: str = "default",
        *,
        batch_size: int | None = None,
        linger_ms: int | None = None,
        results: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        signing_key: str | None = None,
        broker_timeout: int = BROKER_TIMEOUT_SECONDS,
        max_buffered: int | None = None,
    ) -> None:
        self._namespace: str = _ident(namespace, "namespace")
        timeout = t.check_int(broker_timeout, "broker_timeout", min_value=1, max_value=3600)
        if signing_key is None:
            signing_key = os.environ.get(signing.KEY_ENV) or None
        if signing_key is not None and (not isinstance(signing_key, str) or not signing_key):
            raise t.invalid("signing_key", "must be a non-empty string (a namespace key)")
        self._signing_key: str | None = signing_key
        self._results = t.check_bool(results, "results")
        self._chunk_size = t.check_int(
            chunk_size, "chunk_size", min_value=1, max_value=MAX_CHUNK_SIZE
        )
        self._buffered = batch_size is not None or linger_ms is not None
        self._batch_size = t.check_int(
            DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            "batch_size",
            min_value=1,
            max_value=MAX_CHUNK_SIZE,
        )
        self._max_buffered = t.check_int(
            BUFFERED_BATCHES * self._batch_size if max_buffered is None else max_buffered,
            "max_buffered",
            min_value=self._batch_size,  # room for a full batch
            max_value=MAX_BUFFERED,
        )
        self._linger = (
            t.check_int(
                DEFAULT_LINGER_MS if linger_ms is None else linger_ms,
                "linger_ms",
                min_value=1,
                max_value=3_600_000,
            )
            / 1000.0
        )
        self._broker_url = wire.broker_url_from_env(broker_url)
        self._app = Celery("meter-producer", set_as_current=False)
        config = wire.celery_config(self._broker_url)
        config["broker_transport_options"] = {
            **config["broker_transport_options"],
            "socket_timeout": timeout,
            "socket_connect_timeout": min(timeout, BROKER_CONNECT_TIMEOUT_SECONDS),
        }
        # The same bounds for the result backend: a publish with results subscribes to its
        # result first, and wait() reads it, both through the backend's own connections.
        config["redis_socket_timeout"] = timeout
        config["redis_socket_connect_timeout"] = min(timeout, BROKER_CONNECT_TIMEOUT_SECONDS)
        config["result_backend_transport_options"] = {
            **config["result_backend_transport_options"],
            "retry_policy": dict(_RESULT_RETRY_POLICY),
        }
        self._app.conf.update(config)
        self._broker_timeout = timeout
        self._closed = False
        # Set when the first close() has finished; a close() made meanwhile waits for it.
        self._close_done = threading.Event()
        self._closer: threading.Thread | None = None
        self._close_error: BaseException | None = None  # what the first close() raised
        # Buffered mode: _lock guards _batch (the open batch) and _unsent (batches a flush
        # is sending, which stay there until the broker confirms them, full batches the
        # broker refused, or a signal handler filled during a send: oldest first, each kept
        # whole so its handles stay valid). Together they hold at most _max_buffered events
        # (but after an interrupt: _keep_batch_mates); a batch the call that filled it is
        # sending is out of both, that call's (in _filling, which a flush waits for);
        # _send_lock serialises sending, so flush() returns only after every batch taken
        # before it has reached the broker. Reentrant only so that a call re-entering on
        # the same thread (a signal handler) can tell that it did (_held_here) and refuse,
        # where a plain lock would wait for itself for ever.
        self._lock = threading.RLock()
        self._send_lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._batch: _Batch | None = None
        self._unsent: deque[_Batch] = deque()
        # The batches that the calls which filled them are sending (each batch's filler is
        # that call's thread), which close() and a flush wait for: a batch such a call
        # fails to send goes back to _unsent, where they find it. _filled is notified as
        # each one ends.
        self._filling: list[_Batch] = []
        self._filled = threading.Condition(self._lock)
        # Set (under _lock) when close() starts its flush; a filler ending after that has
        # nobody left to send its batch-mates.
        self._close_flushing = False
        self._linger_thread: threading.Thread | None = None
        # The linger thread's hold on this producer: [self] while the buffer holds events
        # (set under _lock by whoever puts them there), so that a producer dropped without
        # close() is not collected with its events; emptied once nothing is buffered.
        self._linger_keep: list[MeterProducer] = []
        self._atexit: Callable[[], None] | None = None
        self._exit_flush: multiprocessing.util.Finalize | None = None
        if self._buffered:
            ref = weakref.ref(self)
            self._atexit = lambda: _flush_ref(ref)
            atexit.register(self._atexit)
            os.register_at_fork(after_in_child=lambda: _reset_ref_after_fork(ref))
            # A process started by multiprocessing ends with os._exit(), which runs no
            # atexit hook, only multiprocessing's finalizers: one flushes the buffer (and
            # another, registered anew after a fork, in a forked child).
            _register_exit_flush(self)
            multiprocessing.util.register_after_fork(self, _register_exit_flush)
            # A Celery prefork (billiard) child ends with os._exit() before either runs:
            # Celery's worker_process_shutdown, sent in the child just before, sends it.
            _BUFFERED.add(self)
            _connect_pool_child_exit()

    # ------------------------------------------------------------------ lifecycle

    @property
    def namespace(self) -> str:
        """The namespace (tenant) events are recorded in."""
        return self._namespace

    @property
    def app(self) -> Celery:
        """The Celery app used to publish (its settings come from :mod:`meter.wire`)."""
        return self._app

    def flush(self) -> None:
        """Send the events buffered when it is called (buffered mode; a no-op otherwise).

        Returns once they are in the broker, including a batch another thread was sending
        (or, having filled it, was about to send). Events recorded while it runs are left
        to the next send (batch, linger, flush, close): under steady traffic it still ends.

        Raises:
            PublishError: the broker did not confirm a batch; the events stay in the buffer
                and the next flush sends them again (with their keys: applied once).
                ``exc.events`` lists the events buffered (and not being sent by another
                call) when it failed, for a caller that will not flush again
                (``close()`` raising it empties the buffer). Raised too when events
                buffered before it were handed back meanwhile by the call that filled
                their batch (it could not send it and, the buffer full, had no room to keep
                them; they are in that call's error as well): they head ``exc.events``.
                So a flush that returns has every event buffered before it in the broker.
        """
        if self._buffered:
            self._refuse_reentry("flush()")
            self._flush(hand_over=True)

    def _refuse_reentry(self, what: str, *, sending: bool = True) -> None:
        """Raise if this thread is inside this producer's locked code already (the buffer's
        lock, or with ``sending`` the send lock): a signal handler run in the middle of a
        call (Python runs handlers between any two bytecodes of the main thread), which
        would wait for what the interrupted call holds."""
        if _held_here(self._lock) or (sending and _held_here(self._send_lock)):
            raise MeterConnectionError(
                f"{what} was called inside a call of this MeterProducer on the same thread "
                "(a signal handler?), which it cannot wait for; the interrupted call goes on "
                "when the handler returns: call it after that (what is buffered stays "
                "buffered, and is sent at exit)"
            )

    def _flush(
        self, *, hand_over: bool = False, empty: bool = False, deadline: float | None = None
    ) -> None:
        """Send what the buffer holds when the flush starts, oldest first, and stop: events
        buffered meanwhile are left to the next send, so a flush ends under steady traffic.

        ``hand_over`` (flush(), close(), wait()): the open batch is closed and sent, and a
        batch that a call filled before this flush and has taken out of the buffer to send
        is waited for (on another thread: on this one, a signal handler inside that call,
        it would wait for itself); a batch-mate that call put back is sent here. On a
        PublishError, ``exc.events`` lists the buffer (the linger thread, which retries on
        its own, goes without), and ``empty`` then drops it (close). Without it (the linger
        thread): the unsent batches, then the open one if it is still open.

        ``deadline`` (wait()): TimeoutError if the fillers or the send lock are not free
        by then. ``exc.events`` is listed under _send_lock: no other sender then holds a
        batch taken from the buffer, so it misses nothing that a failed send puts back.
        """
        me = threading.get_ident()
        with self._lock:
            # The open batch: closed (the next call opens another) and sent from _unsent,
            # where it stays until the broker has confirmed it. By the linger thread only
            # once the unsent batches are sent (if still open then: not refused meanwhile).
            lingering = None if hand_over else self._batch
            if self._batch is not None and (
                hand_over or (not self._unsent and self._lingered(self._batch))
            ):
                self._unsent.append(self._batch)
                self._batch = lingering = None
            targets = list(self._unsent)
            retrying = any(batch.refused for batch in targets)
            if hand_over:
                targets += [batch for batch in self._filling if batch.filler != me]
                while any(batch.filler not in (None, me) for batch in targets):
                    self._filled.wait(_remaining(deadline, "a batch is still being sent"))
        if not targets:
            return
        if not self._send_lock.acquire(timeout=_remaining(deadline, "another call is sending", -1)):
            raise TimeoutError("another call of this producer is still sending")
        try:
            mine = {id(batch) for batch in targets}
            while True:
                with self._lock:
                    batch = next((b for b in self._unsent if id(b) in mine), None)
                    if (
                        batch is None
                        and lingering is not None
                        and self._batch is lingering
                        # due, or behind refused batches retried (they go together)
                        and (retrying or self._lingered(lingering))
                    ):
                        self._unsent.append(lingering)
                        self._batch = None
                        batch, lingering = lingering, None
                        mine.add(id(batch))
                    if batch is None:
                        break
                # wait()'s deadline between batches too: what is left stays buffered
                _remaining(deadline, "the buffer is still being sent")
                self._send_batch(batch)
            handed = [b for b in targets if b.handed and not b.sent] if hand_over else []
            if handed:
                raise PublishError(
                    f"{sum(len(b.events) for b in handed)} events buffered before this flush "
                    "were not sent: the call that filled their batch could not send it and, "
                    "the buffer full (max_buffered), handed them back in its error; they are "
                    "in exc.events too, with their keys"
                )
        except PublishError as exc:
            if hand_over:
                # What this flush was to send and could not: batches handed back by their
                # fillers meanwhile, then the buffer (a snapshot, oldest first).
                gone = [
                    _resendable(event)
                    for b in targets
                    if b.handed and not b.sent
                    for event in b.events
                ]
                exc.events = [*gone, *self._buffered_events()]
                if empty:
                    self._hand_over_buffer()
            raise
        finally:
            self._send_lock.release()

    def _hand_over_buffer(self) -> None:
        """Drop the buffer, its events handed back in a close()'s error."""
        with self._lock:
            for batch in self._unsent:
                batch.handed = True
            if self._batch is not None:
                self._batch.handed = True
            self._unsent.clear()
            self._batch = None

    def close(self) -> None:
        """Flush the buffer, stop the linger thread and release the broker connections.

        Idempotent. Later recording calls raise ``MeterConnectionError``. A ``close()``
        made while another one is under way returns once that one has finished, or raises
        ``MeterConnectionError`` if that one failed: what it could not send is in that
        call's error.

        Raises:
            PublishError: the broker did not confirm the last batches. The producer is
                closed all the same and its buffer emptied: ``exc.events`` is what it held
                (keep them, or send them again through another producer).
            MeterConnectionError: another close() failed (above); or this one was made
                (by a signal handler) inside a call of this thread that is sending the
                batch it filled, while another thread closes: that close() waits for the
                call, and sends the buffer after it. Or made by a signal handler inside a
                call of this producer on the same thread (its locks held), which that
                close() cannot wait for: nothing is changed, the interrupted call goes on
                when the handler returns, and the buffer is sent by a later close() or at
                exit.
        """
        if self._closer is not threading.current_thread():
            # (Inside this thread's own close(), that close() goes on: returned below.)
            self._refuse_reentry("close()")
        with self._lock:
            closer = self._closer
            me = threading.get_ident()
            filling = any(batch.filler == me for batch in self._filling)
            if closer is None:
                # Closed first: no call buffers an event that this flush would not see.
                self._closed = True
                self._closer = threading.current_thread()
                self._wakeup.notify_all()
        if closer is not None:
            if filling and closer is not threading.current_thread() and closer.is_alive():
                # A signal handler inside a call that is sending the batch it filled: the
                # first close() waits for that call, so waiting for it here would hang both.
                raise MeterConnectionError(
                    "the MeterProducer is being closed by another thread, which sends the "
                    "buffer once the call this close() interrupted has sent its batch"
                )
            # Returning before the first close() has sent the buffer would tell this caller
            # "sent" too early. (Not from the closing thread itself: a handler run inside
            # that close() would wait for itself; nor for a thread that is gone, as the
            # closer is in a child forked while it closed.)
            concurrent = not self._close_done.is_set()
            while closer is not threading.current_thread() and closer.is_alive():
                if self._close_done.wait(0.1):
                    break
            if concurrent and self._close_error is not None:
                raise MeterConnectionError(
                    "the MeterProducer was being closed by another thread, which could not "
                    f"send everything: its error holds the events ({self._close_error})"
                )
            return
        try:
            with self._lock:
                # A call that filled a batch before this close() has taken it out of the
                # buffer: wait until it has sent it or put it back. (Not for one on this
                # thread: a signal handler that closes inside that call.)
                while any(batch.filler != me for batch in self._filling):
                    self._filled.wait()
                self._close_flushing = True
            self._flush(hand_over=True, empty=True)
        except BaseException as exc:
            self._close_error = exc
            raise
        finally:
            try:
                if self._atexit is not None:
                    atexit.unregister(self._atexit)
                    self._atexit = None
                if self._exit_flush is not None:
                    self._exit_flush.cancel()
                    self._exit_flush = None
                thread = self._linger_thread
                if thread is not None and thread is not threading.current_thread():
                    thread.join(timeout=5)
                self._app.close()
            finally:
                self._close_done.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = (
            f"buffered batch_size={self._batch_size} linger_ms={int(self._linger * 1000)}"
            if self._buffered
            else "direct"
        )
        return f"<MeterProducer namespace={self._namespace!r} {mode}>"

    # ------------------------------------------------------------------ recording

    def consume(
        self,
        user_id: str,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        check_balance: bool = False,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue a consumption; parameters as :meth:`meter.MeterClient.consume`.

        ``want_result`` overrides the producer's ``results`` for this event. Without an
        ``event_time`` the consumption is dated at this call (this machine's clock, in
        UTC), not when a worker applies it: after a backlog, an outage's retries or a dead
        letter's retry it still counts in the month of the call, and in its billing period
        when it applies before the roll closes that period (after, as an explicit
        ``event_time`` there: it changes the balance, not the closed period's record). That
        time is not part of the request its ``idempotency_key`` replays: sent again with
        the key, it replays the first (its row keeps the first call's time). A time this
        call cannot date (the clock before 1900 or more than 24 hours ahead of the
        database's) is ignored: the row is then dated when a worker applies it.
        ``PublishError.events`` carry this call's time as ``occurred_at``: resent with
        :meth:`send_many`, the event is dated at this call still (calling ``consume`` again
        dates it at that call). An explicit ``event_time`` dates it instead and is part of
        the request (another time with the same key is a conflict).

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._consume_args(
            user_id, event_type, amount, unit, resource, check_balance, idempotency_key,
            event_time, metadata,
        )  # fmt: skip
        return self._submit("consume", args, key, rid, want_result)

    def allocate(
        self,
        user_id: str | None,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue an allocation; parameters as :meth:`meter.MeterClient.allocate`.

        Without an ``event_time`` it is dated at this call, not when a worker applies it,
        as :meth:`consume`.

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._allocate_args(
            user_id, event_type, amount, unit, resource, idempotency_key, event_time, metadata
        )
        return self._submit("allocate", args, key, rid, want_result)

    def reserve(
        self,
        user_id: str,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        reservation_id: str | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue a reservation; parameters as :meth:`meter.MeterClient.reserve`.

        The reservation id, when not given, is made here and returned in the handle, so
        that commit or release can be enqueued right away: a uuid4 without
        ``idempotency_key`` (the id is then the reserve's key), else derived from the
        namespace and the key (:func:`meter.types.keyed_reservation_id`, as
        ``MeterClient`` derives it), so that the same call sent again with its key replays,
        through either, and another request under that key is an
        ``IdempotencyConflictError``.
        The hold's TTL counts from when a worker applies the reserve.

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._reserve_args(
            user_id, event_type, amount, unit, resource, ttl_seconds, idempotency_key,
            metadata, reservation_id,
        )  # fmt: skip
        return self._submit("reserve", args, key, rid, want_result)

    def commit(
        self,
        reservation_id: str,
        actual_amount: Amount,
        metadata: dict[str, Any] | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue a commit; parameters as :meth:`meter.MeterClient.commit`.

        A commit that reaches a worker before its reserve is retried until the reserve has
        been applied (up to the worker's ``METER_ORPHAN_HORIZON_SECONDS``). Its usage is
        dated when a worker applies it, and the database's clock then judges whether the
        hold has expired (unlike a consume, it is not dated at this call).

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._commit_args(reservation_id, actual_amount, metadata)
        return self._submit("commit", args, key, rid, want_result)

    def release(
        self,
        reservation_id: str,
        idempotency_key: str | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue a release; parameters as :meth:`meter.MeterClient.release`.

        Like commit, a release arriving before its reserve waits for it.

        The event carries ``idempotency_key`` (generated when not given, in the handle),
        which the hold records when this event releases it (sql 067): the same event
        sent again (``send_many(exc.events)`` after a ``PublishError`` whose first message
        did get through, or that message delivered again) then reports true, as the
        release that happened, from any message. Each call is a request of its own: a
        second ``release()`` of the same hold, with another key, reports false (the hold
        is no longer active), as ``MeterClient.release`` does. The key is matched against
        this hold's only: given to a release of another hold too, it releases that one as
        well, and it conflicts with no other op's use of it (it is not claimed in
        ``meter.idempotency_keys``).

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._release_args(reservation_id, idempotency_key)
        return self._submit("release", args, key, rid, want_result)

    def adjust(
        self,
        user_id: str | None,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        reference_id: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        want_result: bool | None = None,
    ) -> EventHandle:
        """Enqueue an adjustment; parameters as :meth:`meter.MeterClient.adjust`.

        Dated when a worker applies it (as ``MeterClient.adjust``, which takes no time).

        Raises:
            ValidationError; PublishError (the event is in doubt: resend ``exc.events``);
            MeterConnectionError (the producer is closed: nothing was sent).
        """
        args, key, rid = self._adjust_args(
            user_id, event_type, amount, unit, resource, reference_id, idempotency_key,
            metadata,
        )  # fmt: skip
        return self._submit("adjust", args, key, rid, want_result)

    def send_many(
        self, events: Iterable[Mapping[str, Any]], *, want_result: bool | None = None
    ) -> list[EventHandle]:
        """Enqueue many events at once, as ``apply_batch`` messages of ``chunk_size`` events.

        Each event is a mapping with ``"op"`` (``consume``, ``allocate``, ``adjust``,
        ``reserve``, ``commit``, ``release``) and that method's parameters by name, e.g.
        ``{"op": "consume", "user_id": "u1", "event_type": "tokens", "amount": 3,
        "unit": "tok"}``. Every event is validated before anything is sent. Sent at once,
        whatever the buffering mode. A worker applies each message in one transaction, or
        one of more than 100 events of which any goes one by one (a reserve, commit or
        release, a checked consume, an adjust naming an entry, a key's second use) in
        transactions of at most 100, in order; an event that can never succeed is
        dead-lettered alone. A consume or allocate without ``event_time`` is dated at this
        call, as :meth:`consume`, or at its item's ``occurred_at`` (a ``datetime`` with its
        offset): the time of the call that first sent it, which the items of
        ``PublishError.events`` carry. Like that call's own time, ``occurred_at`` is not
        part of the request its key replays; another op given one is refused.

        Returns:
            One handle per event, in order (batch-mates share ``task_id``).

        Raises:
            ValidationError: an event is invalid (the message starts with
                ``events[i]:``); nothing was sent.
            PublishError: the broker did not confirm a chunk; the chunks confirmed before it
                stay sent, and ``exc.events`` holds that chunk's events and all after it,
                with their keys: ``send_many(exc.events)`` applies each once.
        """
        self._check_open()
        if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
            raise t.invalid(
                "events", f"must be an iterable of event mappings, got {type(events).__name__}"
            )
        want = self._results if want_result is None else t.check_bool(want_result, "want_result")
        called = datetime.now(UTC)
        built: list[tuple[str, dict[str, Any], str, str | None, datetime]] = []
        for i, spec in enumerate(events):
            try:
                if not isinstance(spec, Mapping):
                    raise t.invalid("event", f"must be a mapping, got {type(spec).__name__}")
                params = dict(spec)
                op = params.pop("op", None)
                builder = self._builders.get(op) if isinstance(op, str) else None
                if builder is None:
                    raise t.invalid(
                        "op", f"must be one of {', '.join(wire.OPS)}, got {t.shown(op)}"
                    )
                first_called = _occurred_at(params, op)
                try:
                    args, key, rid = builder(self, **params)
                except TypeError as exc:  # unknown or missing parameter
                    problem = str(exc).split("() ", 1)[-1]  # "got an unexpected keyword..."
                    raise t.invalid("event", f"{op}: {problem}") from None
            except ValidationError as exc:
                raise ValidationError(
                    f"events[{i}]: {exc.message}", sqlstate="MT001", parameter=exc.parameter
                ) from None
            built.append((op, args, key, rid, first_called or called))
        handles: list[EventHandle] = []
        for start in range(0, len(built), self._chunk_size):
            chunk = built[start : start + self._chunk_size]
            task_id = t.new_id()
            batch = _Batch(task_id)
            batch.sent = True
            batch.want_result = want
            batch.events = [
                _event(op, self._namespace, args, when) for op, args, _, _, when in chunk
            ]
            try:
                self._publish(
                    wire.APPLY_BATCH,
                    batch.events,
                    task_id,
                    want,
                    f"<{len(chunk)} events>",
                    batch,
                )
            except PublishError as exc:
                exc.events = [
                    _resendable(_event(op, self._namespace, args, when))
                    for op, args, _, _, when in built[start:]
                ]
                raise
            handles.extend(
                EventHandle(self, op, key, rid, task_id, want, batch, i)
                for i, (op, _, key, rid, _) in enumerate(chunk)
            )
        return handles

    bulk = send_many

    # ------------------------------------------------------------ argument building
    # Each returns (args, idempotency_key, reservation_id); validation as MeterClient's, in
    # the signature's order, so that the first bad argument is the one named, as there.
    # An event_time's range, which the client leaves to the database, is checked last.

    def _consume_args(
        self,
        user_id: str,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        check_balance: bool = False,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], str, None]:
        args = _account_args(user_id, event_type, amount, unit, resource, "positive", pool=False)
        if t.check_bool(check_balance, "check_balance"):
            args["check_balance"] = True
        key = _ident(idempotency_key, "idempotency_key", nullable=True) or t.new_id()
        args["idempotency_key"] = key
        when = t.check_timestamp(event_time, "event_time")
        meta: dict[str, Any] = {}
        _put_metadata(meta, metadata)
        _put_time(args, when)  # its range last, as the client's database checks it
        args.update(meta)
        return args, key, None

    def _allocate_args(
        self,
        user_id: str | None,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        idempotency_key: str | None = None,
        event_time: datetime | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], str, None]:
        args = _account_args(user_id, event_type, amount, unit, resource, "positive", pool=True)
        key = _ident(idempotency_key, "idempotency_key", nullable=True) or t.new_id()
        args["idempotency_key"] = key
        when = t.check_timestamp(event_time, "event_time")
        meta: dict[str, Any] = {}
        _put_metadata(meta, metadata)
        _put_time(args, when)  # its range last, as the client's database checks it
        args.update(meta)
        return args, key, None

    def _adjust_args(
        self,
        user_id: str | None,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        reference_id: int | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], str, None]:
        args = _account_args(user_id, event_type, amount, unit, resource, "nonzero", pool=True)
        ref = t.check_int(
            reference_id,
            "reference_id",
            min_value=-t.INT8_MAX - 1,
            max_value=t.INT8_MAX,
            nullable=True,
        )
        if ref is not None:
            args["reference_id"] = ref
        key = _ident(idempotency_key, "idempotency_key", nullable=True) or t.new_id()
        args["idempotency_key"] = key
        _put_metadata(args, metadata)
        return args, key, None

    def _reserve_args(
        self,
        user_id: str,
        event_type: str,
        amount: Amount,
        unit: str,
        resource: str | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        reservation_id: str | None = None,
    ) -> tuple[dict[str, Any], str, str]:
        args = _account_args(user_id, event_type, amount, unit, resource, "positive", pool=False)
        ttl = t.check_int(ttl_seconds, "ttl_seconds", min_value=1, max_value=t.MAX_TTL_SECONDS)
        key = _ident(idempotency_key, "idempotency_key", nullable=True)
        meta: dict[str, Any] = {}
        _put_metadata(meta, metadata)
        rid = _ident(reservation_id, "reservation_id", nullable=True)
        if rid is None:
            rid = t.new_id() if key is None else t.keyed_reservation_id(self._namespace, key)
        args["reservation_id"] = rid
        if ttl != DEFAULT_TTL_SECONDS:
            args["ttl_seconds"] = ttl
        if key is not None:
            args["idempotency_key"] = key
        args.update(meta)
        # The client-chosen reservation id is itself idempotent: it is the reserve's key.
        return args, key or rid, rid

    def _commit_args(
        self,
        reservation_id: str,
        actual_amount: Amount,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], str, str]:
        rid = _ident(reservation_id, "reservation_id")
        args: dict[str, Any] = {
            "reservation_id": rid,
            "actual_amount": _amount_text(actual_amount, "actual_amount", "nonnegative"),
        }
        _put_metadata(args, metadata)
        return args, rid, rid

    def _release_args(
        self, reservation_id: str, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], str, str]:
        rid = _ident(reservation_id, "reservation_id")
        # A key of the event's own, not the reservation id: keyed by its task (the
        # worker's default), the event sent again in a new message after a PublishError
        # whose first message applied read False for the release that happened; keyed by
        # the reservation id, every release() of the hold would be the same request.
        key = _ident(idempotency_key, "idempotency_key", nullable=True) or t.new_id()
        return {"reservation_id": rid, "idempotency_key": key}, key, rid

    _builders: Final[dict[str, Callable[..., tuple[dict[str, Any], str, str | None]]]] = {
        "consume": _consume_args,
        "allocate": _allocate_args,
        "adjust": _adjust_args,
        "reserve": _reserve_args,
        "commit": _commit_args,
        "release": _release_args,
    }

    # ------------------------------------------------------------------ sending

    def _check_open(self) -> None:
        if self._closed:
            raise MeterConnectionError("the MeterProducer is closed")

    def _submit(
        self,
        op: str,
        args: dict[str, Any],
        key: str,
        rid: str | None,
        want_result: bool | None,
    ) -> EventHandle:
        want = self._results if want_result is None else t.check_bool(want_result, "want_result")
        event = _event(op, self._namespace, args, datetime.now(UTC))
        if not self._buffered:
            self._check_open()
            task_id = t.new_id()
            try:
                digest = self._publish(wire.task_name(op), [event], task_id, want, f"[{op} {key}]")
            except PublishError as exc:
                exc.events = [_resendable(event)]
                raise
            return EventHandle(self, op, key, rid, task_id, want, digest=digest)
        # A signal handler inside this thread's locked code would wait for itself; one
        # inside this thread's send (the send lock only) may buffer: see below.
        self._refuse_reentry(f"{op}()", sending=False)
        full: _Batch | None = None
        me = threading.get_ident()
        try:
            while True:
                with self._lock:
                    self._check_open()
                    if self._held() < self._max_buffered:
                        batch = self._batch
                        if batch is None:
                            batch = self._batch = _Batch()
                            self._ensure_linger_thread()
                            self._keep_alive()
                            self._wakeup.notify()
                        index = len(batch.events)
                        batch.events.append(event)
                        batch.want_result = batch.want_result or want
                        if index + 1 >= self._batch_size:
                            self._batch = None
                            if _held_here(self._send_lock):
                                # A signal handler inside this thread's own send, which
                                # nothing may interleave with: the batch waits its turn,
                                # and the linger thread sends it once that send is over.
                                self._unsent.append(batch)
                                self._wakeup.notify()
                            else:
                                full = batch  # (first: the finally then never misses it)
                                self._filling.append(batch)
                                batch.filler = me
                        break
                    if _held_here(self._send_lock):  # a signal handler inside this thread's send
                        raise self._full(op, key, event, "this thread is sending a batch")
                # The buffer is full (the broker has been refusing its batches): back-pressure.
                # This call sends the oldest ones itself, as the call that fills a batch does;
                # if the broker refuses, the event is not buffered but handed back.
                try:
                    room = self._make_room()
                except PublishError as exc:
                    raise self._full(op, key, event, str(exc)) from exc
                if not room:
                    raise self._full(op, key, event, "no batch to send")
            if full is not None:
                # Sent by the caller that filled it: back-pressure (and max_buffered bounds
                # what failures leave). If that fails, this call raises with its own event
                # in the error (no handle): the event is the caller's to send again, so it
                # does not stay buffered too.
                sending = False
                try:
                    with self._send_lock:
                        sending = True
                        self._send_batch(full, own=index)
                except BaseException as exc:
                    if not sending:  # interrupted while waiting to send (a signal handler)
                        self._keep_batch_mates(full, index, exc)
                    raise
        finally:
            if full is not None:
                with self._lock:
                    full.filler = None
                    if full in self._filling:  # (not in a child forked during the send)
                        self._filling.remove(full)
                    self._filled.notify_all()
        return EventHandle(self, op, key, rid, batch.task_id, want, batch, index)

    def _held(self) -> int:
        """How many events the buffer holds: the unsent batches and the open one (called
        with _lock held). A batch that the call which filled it is sending is not counted:
        it is that call's until the send fails and its batch-mates come back."""
        held = len(self._batch.events) if self._batch is not None else 0
        return held + sum(len(batch.events) for batch in self._unsent)

    def _make_room(self) -> bool:
        """Back-pressure for a call that found the buffer full: send the oldest unsent
        batches, under the send lock, until the buffer is below ``max_buffered``. Returns
        whether it is (False: nothing unsent to send).

        Raises:
            PublishError: the broker did not confirm a batch; it stays first in line.
        """
        with self._send_lock:
            while True:
                with self._lock:
                    if self._held() < self._max_buffered:
                        return True
                    if not self._unsent:
                        return False
                    batch = self._unsent[0]
                self._send_batch(batch)

    def _full(self, op: str, key: str, event: dict[str, Any], why: str) -> PublishError:
        """The error of a call that found the buffer full and could not make room: its
        event is in no buffer and in no message, the caller's to send again."""
        return PublishError(
            f"{op} {key}: the buffer holds max_buffered={self._max_buffered} events the "
            f"broker has not taken, and its oldest batch could not be sent ({why}): the "
            "event was not buffered; send exc.events again (with its key) later",
            events=[_resendable(event)],
        )

    def _send_batch(self, batch: _Batch, own: int | None = None) -> None:
        """Publish a batch.

        ``own=None``: a batch of the buffer (in ``_unsent``), sent where it lies: it leaves
        the buffer once the broker has confirmed it, and stays there on failure, first in
        line for the next send. Counted in the buffer meanwhile (``max_buffered``).

        ``own``: a batch the sending call filled and took out of the buffer; the index of
        that call's event, which raises: that event (the batch's last) is left out of what
        is kept and goes in the error's ``events`` instead (``_keep_batch_mates``).

        A batch is kept whole, never merged with another: the handles of its events hold
        it and their index in it.
        """
        try:
            self._publish(
                wire.APPLY_BATCH,
                batch.events,
                batch.task_id,
                batch.want_result,
                f"<{len(batch.events)} events>",
                batch,
            )
        except BaseException as exc:
            batch.refused = True
            if own is not None:
                self._keep_batch_mates(batch, own, exc)
            raise  # (own=None: exc.events set by the caller)
        with self._lock:
            batch.sent = True
            if own is None and batch in self._unsent:  # (not if a close() has handed it over)
                if self._unsent[0] is batch:
                    self._unsent.popleft()
                else:  # batch-mates put back in front of it meanwhile
                    self._unsent.remove(batch)

    def _keep_batch_mates(self, batch: _Batch, own: int, exc: BaseException) -> None:
        """The call that filled ``batch`` failed to send it (``exc``): its own event
        (``own``) is left out, the caller's to send again; the others stay buffered and go
        again with their keys, as close() waits for this call before it flushes. Unless
        close() runs on this very thread (a signal handler inside the call) and has
        flushed: nobody would send them then, so a PublishError lists them too. So it does
        when they do not fit in the buffer any more (``max_buffered``: other calls filled
        it while this one was sending); the batch is then marked handed back.

        ``exc`` not a PublishError (not the broker's: a RuntimeError from Celery, say) has
        no ``events`` to carry them: when they are handed back, this raises instead a
        PublishError chained from it, listing them and the call's own event. An interrupt
        (KeyboardInterrupt, SystemExit: not an ``Exception``) goes on as it is, so its
        batch-mates stay buffered, whatever the room (the one exception to
        ``max_buffered``, by fewer than ``batch_size`` events; exit sends them)."""
        mine = batch.events.pop(own)
        carried = isinstance(exc, Exception)  # (or replaced by a PublishError carrying them)
        with self._lock:
            orphaned = self._close_flushing
            over = self._held() + len(batch.events) > self._max_buffered
            handed = orphaned or (over and carried)
            if batch.events and not handed:
                self._unsent.appendleft(batch)
                self._keep_alive()
                self._wakeup.notify()  # due at once: the linger thread retries it
            batch.handed = handed
        if isinstance(exc, PublishError):
            doubt = [*batch.events, mine] if handed else [mine]
            exc.events = [_resendable(event) for event in doubt]
        elif handed and carried and batch.events:
            raise PublishError(
                f"the batch could not be sent ({type(exc).__name__}: {exc}), and its "
                + (
                    "producer is closed"
                    if orphaned
                    else f"other events no longer fit in the buffer (max_buffered="
                    f"{self._max_buffered})"
                )
                + ": they are handed back with this call's event; send exc.events again "
                "(with their keys)",
                events=[_resendable(event) for event in [*batch.events, mine]],
            ) from exc

    def _publish(
        self, name: str, events: list[dict[str, Any]], task_id: str, want: bool, argsrepr: str,
        batch: _Batch | None = None,
    ) -> str | None:  # fmt: skip
        """Send the message; the digest of its payload that its outcome will echo
        (:func:`meter.wire.digest`) when ``want``, else None (nothing will be read). For a
        ``batch``, the digest is added to its ``digests`` before the send, which may get
        through and still raise."""
        # JSON text made here (meter.wire), never objects for kombu's JSON: its decoder
        # turns an object whose keys are "__type__" and "__value__" (metadata may hold one)
        # into a Python value, or refuses the whole message, and the signature covers the
        # text as sent. A batch is the text apply_events takes (the worker passes it on as
        # it came); a single event the text of its object.
        payload = wire.dumps(events if name == wire.APPLY_BATCH else events[0])
        digest = wire.digest(payload) if want else None
        if batch is not None and digest is not None and digest not in batch.digests:
            batch.digests = (*batch.digests, digest)  # (a retry of the same text: once)
        try:
            self._app.send_task(
                name,
                args=(payload,),
                # which tenant the message writes into, signed when there is a key
                kwargs={"auth": signing.make_auth(self._signing_key, self._namespace, payload)},
                task_id=task_id,
                ignore_result=not want,
                # A short repr: Celery would otherwise saferepr() the whole payload per call.
                argsrepr=argsrepr,
                kwargsrepr="{}",
            )
        # (Celery subscribes to the result in Redis before it publishes, and gives up on a
        # broken subscription with a RuntimeError: nothing was sent then, and sending the
        # events again is as safe as ever.)
        except Exception as exc:
            if not _broker_unreachable(exc):
                raise
            # Maybe enqueued: the broker may have taken the message and the reply been lost
            # (kombu republishes the same message on a connection error, then gives up).
            # The caller says which events are in doubt (exc.events).
            raise PublishError(f"the broker did not confirm the message: {exc}") from exc
        return digest

    # ------------------------------------------------------------------ buffering

    def _ensure_linger_thread(self) -> None:
        # Called with _lock held.
        if self._linger_thread is None or not self._linger_thread.is_alive():
            self._linger_keep = []
            self._linger_thread = threading.Thread(
                target=_linger_loop, args=(weakref.ref(self), self._linger_keep),
                name="meter-producer-linger", daemon=True,
            )  # fmt: skip
            self._linger_thread.start()

    def _keep_alive(self) -> None:
        """Have the linger thread hold this producer while the buffer holds events (called
        with _lock held, by whoever puts events there): a producer its caller drops
        without close() still sends them when they are due."""
        if not self._linger_keep:
            self._linger_keep.append(self)

    def _buffered_events(self) -> list[dict[str, Any]]:
        """Every event the buffer holds, oldest first, as ``send_many`` items."""
        with self._lock:  # a snapshot; the events themselves are never changed
            batches = [*self._unsent, *([self._batch] if self._batch is not None else [])]
            events = [event for batch in batches for event in batch.events]
        return [_resendable(event) for event in events]

    def _lingered(self, batch: _Batch) -> bool:
        """Whether the open ``batch`` is ``linger_ms`` old: due for the linger thread."""
        return batch.created + self._linger <= time.monotonic()

    def _due_batch(self) -> tuple[bool, float | None]:
        """(stop?, seconds until the open batch is due); called with _lock held."""
        if self._closed:
            return True, None
        if self._unsent:
            return False, 0.0  # refused by the broker before (or being sent): try again now
        if self._batch is None:
            return False, None
        return False, self._batch.created + self._linger - time.monotonic()

    def _after_fork(self) -> None:
        # The child inherits a copy of the buffer (the parent sends it) and no thread.
        self._lock = threading.RLock()
        self._send_lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._batch = None
        self._unsent = deque()
        self._filling = []
        self._filled = threading.Condition(self._lock)
        self._linger_thread = None
        self._linger_keep = []

    # ------------------------------------------------------------------ results

    def _outcome_of(self, handle: EventHandle, deadline: float | None) -> dict[str, Any]:
        batch = handle._batch
        if batch is not None:
            while not batch.sent:
                if batch.handed:
                    # Out of the buffer for good, never sent: handed back in the error of a
                    # close() (or fill) that could not send it. No task will ever answer.
                    raise PublishError(
                        f"{handle.op} {handle.idempotency_key}: the event was never sent: a "
                        "close() that could not send the buffer, or the call that filled its "
                        "batch and could not send it (the buffer full), handed it back in its "
                        "error",
                        events=[_resendable(batch.events[handle._index or 0])],
                    )
                if batch.pid != os.getpid():
                    break  # the parent process's buffer, which it sends: wait for the task
                if batch.filler == threading.get_ident():
                    raise MeterConnectionError(
                        "wait() was called inside the call that is sending this event's "
                        "batch (a signal handler?), which it cannot wait for"
                    )
                _remaining(deadline, f"batch {batch.task_id} is not sent yet")
                # Returns once every batch in the buffer, or being sent, is sent; one put
                # back in the buffer meanwhile (by a filler whose send failed) goes round.
                self._refuse_reentry("wait()")
                self._flush(hand_over=True, deadline=deadline)
            if batch.outcome is None:
                outcome = self._fetch(batch.task_id, deadline)
                if not isinstance(outcome, list):
                    raise MeterError(f"task {batch.task_id} returned {outcome!r}")
                batch.outcome = outcome
            result = batch.outcome[handle._index or 0]
            task_id, digests = batch.task_id, batch.digests
        else:
            result = self._fetch(handle.task_id, deadline)
            task_id, digests = handle.task_id, (handle._digest,) if handle._digest else ()
        _check_digest(task_id, result, digests)
        # A batch event whose reservation was not there yet went on in a task of its own,
        # which echoes its batch's digest.
        while isinstance(result, dict) and result.get("status") == "deferred":
            task_id = str(result["task_id"])
            result = self._fetch(task_id, deadline)
            _check_digest(task_id, result, digests)
        if not isinstance(result, dict):
            raise MeterError(f"task {handle.task_id} returned {result!r}")
        return result

    def _fetch(self, task_id: str, deadline: float | None) -> Any:
        async_result = self._app.AsyncResult(task_id)
        refused = 0  # reads refused in a row: Redis restarting
        while True:  # in slices of _WAIT_SLICE, each of which reads the stored outcome first
            remaining = None if deadline is None else deadline - time.monotonic()
            # Another slice only if its read (up to broker_timeout) can end by the deadline.
            last = remaining is not None and remaining - _WAIT_SLICE <= self._broker_timeout
            try:
                value = async_result.get(
                    timeout=max(remaining, 0.001) if last and remaining is not None
                    else _WAIT_SLICE,
                    propagate=False,
                )  # fmt: skip
                break
            except CeleryTimeoutError:
                if last:
                    raise TimeoutError(f"no outcome for task {task_id} yet") from None
                refused = 0
            # The event was sent; only its outcome is unknown.
            except Exception as exc:
                if not _broker_unreachable(exc):
                    raise  # not the connection's: "never call result.get() within a task"...
                # Refused (not: no answer): ride out a restart, as the subscription does.
                pause = _restart_pause(refused)
                if (
                    isinstance(exc, RedisConnectionError)
                    and pause is not None
                    and (deadline is None or deadline - time.monotonic() > pause)
                ):
                    refused += 1
                    time.sleep(pause)
                    continue
                raise MeterConnectionError(
                    f"the outcome of task {task_id} could not be read (the event was sent; "
                    f"wait again once the broker answers): {str(exc).strip()}"
                ) from exc
        if isinstance(value, BaseException) or async_result.state != "SUCCESS":
            raise MeterError(f"task {task_id} failed: {value!r}")
        return value


def _check_digest(task_id: str, outcome: Any, digests: tuple[str, ...]) -> None:
    """Refuse the outcome of another message stored under ``task_id``: one whose echoed
    ``digest`` is none of ``digests``, those of the messages this producer sent under it
    (a batch sent again after a failed publish that got through: each; none: no check).

    A message that reused the task id (crafted, or another producer's) and ran first had
    its outcome stored there, and the result backend keeps the first outcome stored, so
    this event's own never will be: waiting longer would only end in a timeout. An outcome
    with no ``digest`` (a worker from before the echo, the dead letter of a message whose
    body holds no payload text) is taken as it is.
    """
    if not digests or not isinstance(outcome, dict) or "digest" not in outcome:
        return
    if outcome["digest"] not in digests:
        raise MeterError(
            f"task {task_id}: the outcome stored under this task id is another message's "
            "(its digest is not the one of the message sent): a message reusing the task id "
            "ran first, and this event's own outcome is not stored; its effect, if any, is "
            "in the ledger under its key"
        )


_UNREACHABLE: Final = (KombuOperationalError, RedisConnectionError, RedisTimeoutError, OSError)


def _restart_pause(retries: int) -> float | None:
    """Seconds to wait before retry ``retries + 1`` of a refused read, by
    ``_RESULT_RETRY_POLICY``; None once its retries are spent."""
    policy = _RESULT_RETRY_POLICY
    if retries >= policy["max_retries"]:
        return None
    return float(
        min(policy["interval_start"] + retries * policy["interval_step"], policy["interval_max"])
    )


def _broker_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker's Redis could not be reached: kombu's or redis'
    connection errors, or the RuntimeError ("retry limit exceeded") that Celery's result
    backend raises from one when it gives up reconnecting. Any other RuntimeError (Celery's
    "never call result.get() within a task", a RecursionError) is not the broker's."""
    if isinstance(exc, RuntimeError):
        return isinstance(exc.__cause__, _UNREACHABLE)
    return isinstance(exc, _UNREACHABLE)


def _remaining(deadline: float | None, what: str, forever: float | None = None) -> Any:
    """Seconds left until ``deadline`` (``forever`` without one); TimeoutError (``what``)
    once it has passed."""
    if deadline is None:
        return forever
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"{what} at the deadline")
    return remaining


def _held_here(lock: Any) -> bool:
    """Whether this thread holds ``lock`` (an RLock), as threading.Condition asks it."""
    return bool(lock._is_owned())


def _flush_ref(ref: weakref.ReferenceType[MeterProducer]) -> None:
    """atexit: send what a still-alive buffered producer holds."""
    producer = ref()
    if producer is not None:
        producer.close()  # also when another thread is closing it: waits for that one


def _reset_ref_after_fork(ref: weakref.ReferenceType[MeterProducer]) -> None:
    producer = ref()
    if producer is not None:
        producer._after_fork()


def _register_exit_flush(producer: MeterProducer) -> None:
    """Have multiprocessing's exit (a child it started ends with ``os._exit()``, which runs
    no atexit hook) send what ``producer`` holds, by a weak reference: the finalizer goes
    with the producer. Called at creation, and again in a child forked by multiprocessing
    (its finalizers are cleared at the child's start; this runs after that)."""
    ref = weakref.ref(producer)
    producer._exit_flush = multiprocessing.util.Finalize(
        producer, _flush_ref, args=(ref,), exitpriority=0
    )


_BUFFERED: Final[weakref.WeakSet[MeterProducer]] = weakref.WeakSet()
"""The buffered producers alive in this process (a forked child inherits the set)."""

_pool_child_exit_connected = False


def _connect_pool_child_exit() -> None:
    """Have Celery's ``worker_process_shutdown`` close this process's buffered producers.

    A child of a Celery prefork pool (billiard) leaves by ``os._exit()`` right after that
    signal, from its pool's own exit path: neither atexit hooks nor multiprocessing's
    finalizers run, so the buffer of a producer its tasks recorded through (created at
    import, in the parent, as task modules do) was dropped at each recycle
    (``max_tasks_per_child``, ``max_memory_per_child``) and at shutdown. What could not be
    sent is logged there (:func:`_close_buffered`), the child's last word on it."""
    global _pool_child_exit_connected
    if _pool_child_exit_connected:
        return
    worker_process_shutdown.connect(
        _close_buffered, weak=False, dispatch_uid="meter.producer.close_buffered"
    )
    _pool_child_exit_connected = True


def _close_buffered(**_: Any) -> None:
    """``worker_process_shutdown``: send what this process's buffered producers hold, each
    in turn, and log each one that could not, with its events.

    Nobody is left to take a ``close()``'s error with its events: Celery logs what a
    receiver raises as its ``repr``, without the events, so raising the first error left
    the events of every producer unknown, and those of the others unmentioned too. Each
    is logged as ``send_many`` items (``event_time`` and ``occurred_at`` as ISO 8601
    text), with the keys they were sent with: sent again, each applies once."""
    for producer in list(_BUFFERED):
        try:
            producer.close()
        except Exception as exc:
            events: list[dict[str, Any]] = getattr(exc, "events", None) or []
            _log.error(
                "%r: %d buffered event(s) not sent at this pool process's exit (%s); "
                "send them again with send_many, keys kept: %s",
                producer, len(events), exc, _events_text(events),
            )  # fmt: skip


def _events_text(events: list[dict[str, Any]]) -> str:
    """``send_many`` items as JSON text for a log line; their keys alone if they cannot be
    written (metadata nested deeper than the encoder goes)."""
    items = [
        {k: v.isoformat() if isinstance(v, datetime) else v for k, v in e.items()} for e in events
    ]
    try:
        return t.dumps(items)
    except (TypeError, ValueError, RecursionError):
        return "keys " + ", ".join(
            str(e.get("idempotency_key") or e.get("reservation_id")) for e in events
        )


def _linger_loop(ref: weakref.ReferenceType[MeterProducer], keep: list[MeterProducer]) -> None:
    """Background thread of a buffered producer: send each batch once it is linger_ms old.

    ``keep`` holds the producer while its buffer holds events (the producer puts itself
    there, under its lock, as events enter the buffer), so one its caller dropped without
    ``close()`` still sends them when due. Otherwise the thread holds only a weak reference
    between rounds, so an abandoned producer with nothing buffered can be collected (its
    atexit hook and multiprocessing finalizer are weak too), and the thread ends.
    """
    while True:
        producer = ref()
        if producer is None:
            return
        due = False
        with producer._lock:
            stop, wait = producer._due_batch()
            if stop:
                keep.clear()
                return
            if wait is None or wait > 0:
                # Woken by the first event of a new batch, or by close(); re-check either way.
                producer._wakeup.wait(timeout=1.0 if wait is None else wait)
            else:
                due = True
        if due:
            try:
                producer._flush()
            except Exception:  # broker down: the events are back in the buffer; retry later
                time.sleep(min(producer._linger, 1.0))
        with producer._lock:  # the producer's _keep_alive() sets it again, under this lock
            if producer._batch is None and not producer._unsent:
                keep.clear()
        del producer  # no strong reference while looping: an abandoned producer is collected
