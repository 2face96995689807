"""The pipeline's tasks: decode the message, call the SQL, map what went wrong.

``meter.<op>(event)`` applies one event, ``meter.apply_batch(events)`` many in one
transaction (or in parts of at most 100, in order: :func:`apply_batch`); both go through
``meter.apply_events`` (``sql/008_pipeline.sql``), which also records the dead letter of an
event that can never succeed, in the same transaction.

Exactly-once effect on top of at-least-once delivery:

- the message is acknowledged only after the task returns (``task_acks_late``), so a worker
  that dies mid-task leaves it to be delivered again (``task_reject_on_worker_lost``);
- every event carries an idempotency key (the producer generates one; a keyless event
  sent by someone else gets one derived from the task id here), so a second delivery
  replays instead of applying twice;
- failures are sorted (:mod:`worker.retry`): transient ones are retried with backoff,
  permanent ones dead-lettered, and a task never fails with its message dropped;
- a message that keeps killing its worker is given up after ``meter_max_deliveries``
  deliveries (:mod:`worker.deliveries`).

Ordering: a commit or release applied before its reserve gets status ``not_found``; the
task retries with backoff until the reserve has been applied, for at most
``meter_orphan_horizon`` seconds, then gives up through ``meter.record_orphan``: a dead
letter (``MT003``), or the event applied at once if its reserve came meanwhile. A reserve
that arrives later still applies it, in its own transaction (``sql/013_late_reserve.sql``):
a backlog longer than the horizon delays usage but loses none, and leaks no hold. In a
batch, such an
event is handed to a single-event task of its own (deterministic id,
:func:`meter.wire.child_task_id`), so it neither holds up the batch nor gets lost.

Tenancy (:mod:`meter.signing`): every message names the one namespace it writes into
(its ``auth`` argument). With ``METER_SIGNING_SECRET`` set, that name must be signed with
the namespace's key and every event must carry it, otherwise the whole message is
dead-lettered with ``MT004`` and nothing of it is applied. Without a secret (development),
the name is taken on trust, but an event naming another namespace is still dead-lettered
(``MT004``) instead of applied. Those dead letters are filed under the namespace ``''``
(the operators'), never under a tenant the message claimed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, NoReturn

from celery import Task, shared_task
from celery.app.task import get_actual_ignore_result
from celery.exceptions import InvalidTaskError, Reject
from celery.utils.log import get_task_logger
from celery.worker.request import Request

from meter import signing, wire
from meter import types as t
from worker import db, deliveries
from worker.consumer import UNREADABLE
from worker.retry import backoff, is_transient, sqlstate_of
from worker.settings import ETA_HORIZON, Settings

__all__ = ["EventTask", "WorkerTask", "apply_batch"]

logger = get_task_logger(__name__)

TENANT_REFUSED: Final = "MT004"
"""SQLSTATE of a message refused for its tenancy: bad or missing signature, or an event
naming a namespace other than the message's."""

OPERATOR_NAMESPACE: Final = ""
"""Where dead letters of refused messages go: no tenant sees them, operators do."""

WORKER_LOST: Final = "MTW01"
"""SQLSTATE-like code of a dead letter whose message was delivered ``meter_max_deliveries``
times without its task ever completing (each time the worker died or was killed)."""

RETRIES_EXHAUSTED_MESSAGE: Final = "gave up after {n} retries; last error: {error}"

_KEYED_OPS: Final = frozenset({"consume", "allocate", "adjust"})
_ORPHAN_OPS: Final = frozenset({"commit", "release"})
"""The events that wait for their reservation's reserve (``orphan_since``)."""

Outcome = dict[str, Any]


def _outcome(row: dict[str, Any]) -> Outcome:
    return {
        "ok": row["ok"],
        "status": row["status"],
        "result": row["result"],
        "error_sqlstate": row["error_sqlstate"],
        "error_message": row["error_message"],
    }


def _dead_letter_outcome(dead_letter_id: int, sqlstate: str | None, message: str) -> Outcome:
    """The outcome of an event filed as dead letter ``dead_letter_id`` (and its log line)."""
    logger.error("dead letter %s (%s): %s", dead_letter_id, sqlstate, message)
    return {
        "ok": False,
        "status": "error",
        "result": None,
        "error_sqlstate": sqlstate,
        "error_message": message,
        "dead_letter_id": dead_letter_id,
    }


def _with_key(event: Any, key: str) -> Any:
    """The event with an idempotency key, derived from its task when it has none.

    Without one a redelivered message would apply twice. commit is keyed by its
    reservation id; a reserve without an id gets one. A release gets one too (sql 067),
    which the hold records when this event releases it: delivered again after its reply was
    lost, the event is told its own release (true) from another caller's, an expiry or a
    commit (false), where it read false for a release that happened.
    """
    if not isinstance(event, dict):
        return event
    op, args = event.get("op"), event.get("args")
    if not isinstance(args, dict):
        return event
    if (op in _KEYED_OPS or op == "release") and args.get("idempotency_key") is None:
        return {**event, "args": {**args, "idempotency_key": key}}
    if (
        op == "reserve"
        and args.get("reservation_id") is None
        and args.get("idempotency_key") is None
    ):
        return {**event, "args": {**args, "reservation_id": key}}
    return event


def _namespace(event: Any) -> str:
    """Where a dead letter of ``event`` goes: its namespace, or ``''`` when it has none."""
    ns = event.get("namespace") if isinstance(event, dict) else None
    return ns if isinstance(ns, str) and ns else ""


def _namespace_not_text(event: Any) -> str | None:
    """Why ``event``'s namespace is refused for its JSON type, or None.

    ``->>`` in the SQL would read a number, boolean or array as its text (``5`` as the
    namespace ``"5"``): a namespace is a JSON string, as every identifier is (032).
    """
    if not isinstance(event, dict) or "namespace" not in event:
        return None
    ns = event["namespace"]
    if isinstance(ns, str) or ns is None:
        return None
    return f"namespace: must be a string, got {type(ns).__name__} {ns!r:.64}"


def _names_other(event: Any, namespace: str) -> bool:
    """``event`` is an event object naming a namespace other than ``namespace`` (or none)."""
    return isinstance(event, dict) and event.get("namespace") != namespace


def _mismatch_message(event: Any, namespace: str) -> str:
    return (
        f"namespace: the event names {event.get('namespace')!r} but its message writes "
        f"into {namespace!r}"
    )


def _as_verdict(verdict: Any) -> dict[str, Any]:
    """A verdict as the worker writes it; a malformed one (crafted) is itself the error.

    Its fields are text or absent: anything else could not be recorded, ever.
    """
    if isinstance(verdict, dict) and all(
        isinstance(verdict.get(field), str | None) for field in ("sqlstate", "message", "namespace")
    ):
        return verdict
    return {"sqlstate": "MT001", "message": "message: malformed verdict argument"}


def _verdict_namespace(verdict: dict[str, Any], own: str) -> str:
    """Where a verdict carried by a retry is filed: the message's own namespace or ``''``.

    The signature does not cover the keyword arguments, so a verdict naming any other
    namespace (a crafted one) is filed with the operators.
    """
    ns = verdict.get("namespace")
    return ns if ns == own else OPERATOR_NAMESPACE


def _retries(value: Any) -> int:
    """A message's ``retries`` header as a count: the signature does not cover it, and a
    crafted one (text, negative) made the task fail, acked and lost, or retry without a
    back-off (2**-10**9 seconds)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _orphan_since(since: Any, now: float) -> float:
    """When a commit or release began waiting for its reserve: ``now`` on its first run.

    The signature does not cover the keyword arguments, so a crafted value that is not a
    finite number of seconds starts the wait afresh rather than fail the task, which
    would ack the message and lose the event.
    """
    if since is None or isinstance(since, bool) or not isinstance(since, int | float | str):
        return now
    try:
        value = float(since)
    except (ValueError, OverflowError):  # OverflowError: an int past a float's range
        return now
    return value if math.isfinite(value) else now


def _op(event: Any, default: str) -> str:
    op = event.get("op") if isinstance(event, dict) else None
    return op if isinstance(op, str) and op else default


def _digest(payload: Any, auth: Any) -> str | None:
    """The digest a task echoes in its outcomes (:func:`meter.wire.digest`): its batch's, for
    a task the worker sent for a batch's event (``auth["digest"]``), else that of the
    payload text as received; ``None`` for a payload sent as an object (no producer's)."""
    parent = auth.get("digest") if isinstance(auth, dict) else None
    if isinstance(parent, str):
        return parent
    return wire.digest(payload) if isinstance(payload, str) else None


def _echo(outcome: Any, digest: str | None) -> Any:
    """``outcome`` (one, or a batch's list) with ``digest`` in each: ``wait()`` takes only
    an outcome of the message it sent, not one of a message that reused its task id."""
    if isinstance(outcome, dict):
        return {**outcome, "digest": digest}
    if isinstance(outcome, list):
        return [{**o, "digest": digest} if isinstance(o, dict) else o for o in outcome]
    return outcome


def _non_finite_in(value: Any) -> str | None:
    """The first NaN or infinity ``value`` holds, at any depth (as JSON writes it), or None."""
    for item in wire.walk(value):
        if isinstance(item, float | Decimal):
            if not (math.isfinite(item) if isinstance(item, float) else item.is_finite()):
                return "NaN" if item != item else ("Infinity" if item > 0 else "-Infinity")
    return None


def _not_finite(event: Any) -> str | None:
    """Why ``event`` is refused for a NaN or an infinity it holds, naming the argument (or
    field) holding it; None if it holds none.

    A bare ``NaN``, ``Infinity`` or ``-Infinity`` token (a crafted message: no JSON writer
    of Meter's sends one) is read by Python's JSON, kombu's included, as a float that no
    JSON writer, nor ``jsonb``, takes: the call failed before reaching the database and
    was filed as ``XX000``, naming nothing. Called once applying ``event`` failed, so
    that an event without one costs nothing.
    """
    if not isinstance(event, dict):
        return None
    args = event.get("args")
    fields = [*(args.items() if isinstance(args, dict) else ()), *event.items()]
    for name, value in fields:
        if name == "args" and isinstance(args, dict):
            continue
        if (bad := _non_finite_in(value)) is not None:
            if isinstance(value, float | Decimal):
                return f"{name}: must be a finite number, got {bad}"
            return f"{name}: must hold finite numbers only, got {bad}"
    return None


_EMBED_KEYS: Final = frozenset({"callbacks", "errbacks", "chain", "chord"})
"""What Celery's clients put in the third part of a task body (protocol 2)."""


def _is_limit_pair(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value
        )
    )


class WorkerLimitsRequest(Request):
    """Celery's request, run under the worker's time limits, not its message's header.

    The ``timelimit`` header is not signed: a hard limit of -1 or 1e-9 s killed the pool
    process before the task ran (before its delivery was counted), every delivery, once a
    second, forever; one past the visibility timeout would have the broker hand the message
    out again meanwhile. A header that is no pair of numbers or nulls (a text in the pair
    raised in the pool's timeout handler) is refused as invalid. Event tasks and beat's
    (:class:`worker.schedule.MaintenanceTask`) use it, and Celery's built-in tasks
    (:class:`WorkerTask`).

    An ``eta`` header more than :data:`worker.settings.ETA_HORIZON` seconds ahead (or past)
    is dropped, and the task runs now: Meter never sends one (its retries wait at most
    ``METER_RETRY_BACKOFF_MAX``, which the same bound caps), and held unacknowledged that
    long the message was handed out again by the visibility timeout every hour, never run;
    an ETA no timestamp holds (year 9999) was rejected and dropped. Usage is dated by its
    ``event_time`` (a producer's consume or allocate without one by its call's
    ``occurred_at``, sql 068), not by when its message runs, so running it now loses
    nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self._request_dict.get("timelimit")
        if limits is not None and not _is_limit_pair(limits):
            raise InvalidTaskError("the timelimit header must be a pair of numbers or nulls")
        self.time_limits = (None, None)  # task_time_limit
        eta = self._eta
        if eta is not None:
            now = datetime.now(UTC)
            if not now < eta <= now + timedelta(seconds=ETA_HORIZON):
                if eta > now:
                    logger.warning(
                        "task %s: its eta %s is more than %d s ahead; run now",
                        self.id, eta.isoformat(), ETA_HORIZON,
                    )  # fmt: skip
                self._eta = None


class WorkerTask(Task):
    """The app's default task class (``task_cls``): what Celery's built-in tasks
    (``celery.accumulate``, ``celery.chord_unlock``, ``celery.backend_cleanup``...), which
    every worker registers, run as; under the worker's time limits, as Meter's own."""

    Request = "worker.tasks:WorkerLimitsRequest"


class EventRequest(WorkerLimitsRequest):
    """Celery's request of an event task, which an ``expires`` header does not drop.

    Meter's producer never sets one; a message that carried one in the past (another Celery
    client, a crafted header) was revoked as expired, acknowledged and dropped, with neither
    an effect nor a dead letter. Usage that happened is applied however late it comes;
    maintenance tasks keep their expiry (:mod:`worker.schedule`). A task revoked by id (an
    operator's ``celery control revoke``) is still dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A body whose args are no array or kwargs no object (``[[], "kw", {}]``, ``[null,
        # {}, {}]``) failed the call in the pool before the task ran: acked and lost. As an
        # invalid task message, Meter's consumer files it as a dead letter instead.
        if not isinstance(self._args, list | tuple) or not isinstance(self._kwargs, dict):
            raise InvalidTaskError("the body's args must be an array and its kwargs an object")
        # Its third part (Celery's "embed") is merged into the request in the pool, before
        # the task runs: one that is no object failed there (in a prefork pool: acked, lost)
        # and a key other than Celery's four replaced a field of the request (a
        # ``delivery_info`` that is text failed the trace: acked, lost, in any pool).
        body = self._body if self._decoded else self._message.payload
        embed = body[2]
        if embed is not None and (not isinstance(embed, dict) or not embed.keys() <= _EMBED_KEYS):
            raise InvalidTaskError(
                "the body's third part must be an object of callbacks, errbacks, chain, chord"
            )

    def maybe_expire(self) -> bool:
        return False


class EventTask(Task):
    """Base of Meter's event tasks: delivery counting, retries and dead letters."""

    Request = "worker.tasks:EventRequest"

    # Retries are bounded by meter_max_retries, checked here, not by Celery (whose bound
    # would raise and drop the message once exceeded).
    max_retries = None

    # ---------------------------------------------------------------- plumbing

    @functools.cached_property
    def _run_signature(self) -> inspect.Signature:
        """The task's signature, read once (``inspect.signature`` costs some 10 µs, on
        every task)."""
        return inspect.signature(self.run)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task, unless the message's arguments do not fit its signature.

        Celery calls the task with the arguments as the message holds them, which no
        signature covers: a crafted message, or one from a newer producer, whose call does
        not fit raised ``TypeError`` before the task ran, and the message was acknowledged
        as failed and lost. It is a dead letter instead (:meth:`refuse_arguments`).
        """
        misfit: TypeError | None = None
        try:
            self._run_signature.bind(*args, **kwargs)
        except TypeError as exc:
            misfit = exc
        payload = args[0] if args else kwargs.get("event", kwargs.get("events"))
        if self.name == UNREADABLE:
            # its message described, not as sent: the digest the consumer took of its body
            echoed = payload.get("digest") if isinstance(payload, dict) else None
            if misfit is not None:
                return self.refuse_arguments(args, kwargs, misfit)
            outcome = super().__call__(*args, **kwargs)
            if isinstance(echoed, str) and self.wants_result():
                return _echo(outcome, echoed)
            return outcome  # no digest: taken as it is
        digest = _digest(payload, kwargs.get("auth"))
        self.request.meter_digest = digest  # echoed by the tasks it sends for a batch's events
        if misfit is not None:
            outcome = self.refuse_arguments(args, kwargs, misfit)
        else:
            outcome = super().__call__(*args, **kwargs)
        return _echo(outcome, digest) if self.wants_result() else outcome

    def refuse_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: TypeError
    ) -> Outcome:
        """File a message whose arguments do not fit the task as a dead letter (``MT001``).

        The payload is the call as received, ``{"args": [...], "kwargs": {...}}``, filed
        with the operators: nothing of it was checked, its tenancy included.
        """
        s = self.settings()
        self.request.retries = _retries(self.request.retries)
        op = str(self.name).removeprefix("meter.")
        message = f"message: the arguments do not fit {self.name}: {exc}"
        return self.dead_letter(
            s, op, {"args": list(args), "kwargs": kwargs}, "MT001", message, None,
            namespace=OPERATOR_NAMESPACE,
        )  # fmt: skip

    def settings(self) -> Settings:
        return Settings.from_conf(self.app.conf)

    def count_delivery(self, s: Settings) -> int | None:
        """Redeliveries of this message so far (``None`` on a first delivery)."""
        request = self.request
        if not deliveries.is_redelivered(request):
            return None
        return deliveries.count(self.app.conf.broker_url, request.id, request.retries or 0)

    def authorize(self, s: Settings, payload: Any, auth: Any) -> tuple[str | None, str | None]:
        """(the namespace the message writes into, or None; why it is refused, or None).

        With a signing secret, the signature must cover ``payload`` for that namespace,
        signed no longer ago than the idempotency keys are kept, less an hour (replays).
        Without one, the namespace named by ``auth`` is taken as it is (``None`` for a
        message from a producer that sent none: each event then names its own).
        """
        if s.signing_secret:
            try:
                max_age = signing.message_max_age(s.key_retention_days)
                ns = signing.verify(s.signing_secret, auth, payload, max_age=max_age)
            except ValueError as exc:
                return None, str(exc)
            # verified: the time the tasks this one sends itself are signed as of
            self.request.meter_signed_at = auth.get("signed_at")
            return ns, None
        ns = auth.get("namespace") if isinstance(auth, dict) else None
        return (ns if isinstance(ns, str) and ns else None), None

    def child_auth(self, s: Settings, event: dict[str, Any], payload: Any) -> dict[str, Any]:
        """The ``auth`` of a single-event task the worker sends itself (signed if need be):
        ``payload`` is ``event`` as the task carries it (its JSON text, or the object).

        Signed as of when its message was (that message's ``signed_at``, as verified by
        :meth:`authorize` before any child is sent), so a copy of the child is refused when
        a copy of its message would be: signed at the worker's clock, hours after the
        batch first applied its event (a batch split after its deliveries or retries), a
        copy published once the event's key was pruned applied it again. A message without
        ``signed_at`` (an older producer's) has its children signed at the worker's clock.
        """
        ns = _namespace(event)
        key = signing.derive_key(s.signing_secret, ns) if s.signing_secret else None
        signed_at = getattr(self.request, "meter_signed_at", None)
        now = signed_at if type(signed_at) is int else None
        return signing.make_auth(key, ns, payload, now=now)

    def wants_result(self) -> bool:
        """Whether anyone waits for this run's outcome (else the SQL does not even build
        the events' result documents)."""
        return not get_actual_ignore_result(self, self.request)

    def done(self, counted: int | None) -> None:
        """The task completed: forget its delivery counter, if it had one."""
        if counted is not None:
            request = self.request
            deliveries.clear(self.app.conf.broker_url, request.id, request.retries or 0)

    def next_delay(self, s: Settings) -> float:
        """Seconds before this task's next try (its ``retries`` made a count on entry)."""
        return backoff(self.request.retries, s.retry_backoff_base, s.retry_backoff_max)

    def retry_later(
        self, countdown: float, exc: BaseException | None = None, **kwargs: Any
    ) -> NoReturn:
        """Re-send this task (same id, ``retries + 1``) to run in ``countdown`` seconds.

        Celery's ``retry`` rejects the message *without* requeueing when the re-send fails
        (broker down), which would drop it: requeue instead, so it is delivered again.
        It goes to :data:`meter.wire.QUEUE`, every event task's: Celery's routes it by the
        exchange and routing key the message claims (its ``delivery_info``, unsigned), and
        an exchange that routes nowhere dropped it, another queue left it unconsumed.
        """
        request = self.request
        try:
            self.retry(
                args=request.args,
                kwargs={**(request.kwargs or {}), **kwargs},
                countdown=countdown,
                exc=exc,
                queue=wire.QUEUE,
            )
        except Reject as rejected:
            raise Reject(rejected.reason, requeue=True) from rejected
        raise AssertionError("Task.retry returned")  # pragma: no cover

    def send_child(
        self, s: Settings, event: dict[str, Any], idx: int, countdown: float | None,
        **kwargs: Any,
    ) -> str:  # fmt: skip
        """Send event ``idx`` of this batch as a single-event task; its task id.

        The id is deterministic, so a batch delivered twice re-sends the same task (applied
        once: same idempotency key), and it stores a result when the batch does.
        """
        request = self.request
        task_id = wire.child_task_id(request.id, idx)
        # As the object, which every worker reads, also one not upgraded yet during a
        # rolling upgrade (one that cannot read the text form files it where no retry can
        # apply it). Except an event holding an object whose keys are "__type__" and
        # "__value__" (metadata may): kombu's JSON decoder would turn that into a Python
        # value or refuse the whole message, so it goes as JSON text, as producers send
        # single events. So does an event nested deeper than OBJECT_DEPTH (metadata the
        # producer took, up to 800 levels): a prefork worker pickles a message's decoded
        # body to its pool process, which ran out of stack on it. What meter.wire does not
        # write (a NUL escape, which no database stores: the child dead-letters it) stays
        # the object.
        payload: Any = event
        if wire.holds_type_marker(event) or wire.nested_deeper_than(event, wire.OBJECT_DEPTH):
            with contextlib.suppress(ValueError):
                payload = wire.dumps(event)
        auth = self.child_auth(s, event, payload)
        digest = getattr(request, "meter_digest", None)
        if digest is not None:  # echoed by the child, as its batch's (not in the signature)
            auth["digest"] = digest
        kwargs = {**kwargs, "auth": auth}
        self.app.send_task(
            wire.task_name(event["op"]),
            args=(payload,),
            kwargs=kwargs,
            task_id=task_id,
            countdown=countdown,
            ignore_result=not self.wants_result(),
            argsrepr=f"[{event['op']} from batch {request.id}]",
            kwargsrepr=repr({k: v for k, v in kwargs.items() if k != "auth"}),
        )
        return task_id

    # ---------------------------------------------------------------- outcomes

    def dead_letter(
        self, s: Settings, op: str, payload: Any, sqlstate: str | None, message: str,
        counted: int | None, *, source: str | None = None, namespace: str | None = None,
    ) -> Outcome:  # fmt: skip
        """Record a dead letter and complete; if even that fails, retry recording it later.

        ``namespace``: where it is filed (default: the payload's own namespace; what it
        cannot hold, :func:`worker.db.record_dead_letter` files with the operators). A
        failure to record it is retried later: the message is never acked unrecorded.
        """
        if namespace is None:
            namespace = _namespace(payload)
        try:
            dead_letter_id = db.record_dead_letter(
                s.database_url,
                s.db_pool_size,
                op=op,
                payload=payload,
                sqlstate=sqlstate,
                message=message,
                source=source or self.request.id,
                namespace=namespace,
            )
        except Exception as exc:
            # The database cannot write it now (down, read-only during a failover, ...;
            # what it could never store, db.record_dead_letter files with the operators):
            # the verdict travels with the retry, so the event is not tried again, only
            # recorded, and the message is never dropped. An error not foreseen here would
            # be retried as long as it lasts, at the longest back-off, logged each time.
            logger.warning("cannot record the dead letter of %s yet: %r", self.request.id, exc)
            self.retry_later(
                self.next_delay(s),
                exc=exc,
                verdict={"sqlstate": sqlstate, "message": message, "namespace": namespace},
            )
        self.done(counted)
        return _dead_letter_outcome(dead_letter_id, sqlstate, message)

    def transient(self, s: Settings, exc: BaseException) -> None:
        """Retry after a transient failure, unless retries are exhausted (then return)."""
        retries = self.request.retries or 0
        if retries < s.max_retries:
            logger.info("transient failure of %s, retrying: %r", self.request.id, exc)
            self.retry_later(self.next_delay(s), exc)

    # ---------------------------------------------------------------- single events

    def run_single(
        self, op: str, event: Any, orphan_since: float | None, verdict: dict[str, Any] | None,
        auth: Any = None,
    ) -> Outcome:  # fmt: skip
        """Apply one event (the body of ``meter.<op>``).

        ``event``: the JSON text of the event object (what producers send, and the
        worker's own single-event tasks: :mod:`meter.wire`), or the object itself (as
        sent before, and by any other Celery client), applied the same way.
        """
        s = self.settings()
        self.request.retries = _retries(self.request.retries)
        counted = self.count_delivery(s)
        # Tenancy first: a crafted message must not even get its verdict recorded elsewhere.
        ns, refusal = self.authorize(s, event, auth)  # the signature covers the text as sent
        if isinstance(event, str) and refusal is None:
            text = event
            try:
                event = t.loads(text)
            except (ValueError, RecursionError):
                return self.dead_letter(
                    s, op, text, "MT001", "message: the event is not valid JSON text", counted
                )
            self.request.meter_events = event  # for the metrics, parsed once
        if refusal is None and ns is not None and _names_other(event, ns):
            refusal = _mismatch_message(event, ns)
        if refusal is not None:
            return self.dead_letter(
                s, _op(event, op), event, TENANT_REFUSED, refusal, counted,
                namespace=OPERATOR_NAMESPACE,
            )  # fmt: skip
        # Keyed before any dead letter too: a dead letter holds the event as it would apply,
        # so retrying one whose first delivery did commit (MTW01 after a kill before the
        # ack) replays that commit instead of applying the event a second time.
        event = _with_key(event, f"task:{self.request.id}")
        if verdict is not None:  # a dead letter that could not be recorded last time
            verdict = _as_verdict(verdict)
            return self.dead_letter(
                s, _op(event, op), event, verdict.get("sqlstate"), str(verdict.get("message")),
                counted, namespace=_verdict_namespace(verdict, _namespace(event)),
            )  # fmt: skip
        if not isinstance(event, dict):
            return self.dead_letter(
                s, op, event, "MT001", "message: the event must be a JSON object", counted
            )
        if (not_text := _namespace_not_text(event)) is not None:
            return self.dead_letter(s, _op(event, op), event, "MT001", not_text, counted)
        if counted is not None and counted >= s.max_deliveries:
            return self.dead_letter(
                s, _op(event, op), event, WORKER_LOST,
                f"delivered {counted} times without completing: the worker died or was "
                "killed each time", counted,
            )  # fmt: skip
        try:
            row = db.apply_events(
                s.database_url, s.db_pool_size, [event], self.request.id,
                results=self.wants_result(),
            )[0]  # fmt: skip
        except Exception as exc:
            if (not_finite := _not_finite(event)) is not None:
                # what wire.dumps refuses: filed as the refusal it is, not as XX000
                return self.dead_letter(s, _op(event, op), event, "MT001", not_finite, counted)
            if orphan_since is not None and _op(event, op) in _ORPHAN_OPS and is_transient(exc):
                self.transient_orphan(s, exc, orphan_since)
            return self.failed(s, exc, _op(event, op), event, counted)
        if row["status"] == "not_found":
            return self.orphan(s, event, orphan_since, counted)
        self.done(counted)
        return _outcome(row)

    def failed(
        self, s: Settings, exc: BaseException, op: str, event: Any, counted: int | None
    ) -> Outcome:
        """The SQL call raised: retry a transient failure, dead-letter the rest."""
        if is_transient(exc):
            self.transient(s, exc)
            message = RETRIES_EXHAUSTED_MESSAGE.format(n=s.max_retries, error=exc)
        else:
            logger.exception("permanent failure of %s", self.request.id)
            message = str(exc).strip() or type(exc).__name__
        return self.dead_letter(s, op, event, sqlstate_of(exc) or "XX000", message, counted)

    def transient_orphan(self, s: Settings, exc: BaseException, since: Any) -> None:
        """Retry a commit or release that was waiting for its reserve after a transient
        failure, once its retries are spent (before, :meth:`failed` retries it).

        Its wait ends in :meth:`give_up_orphan` (MT003, applied by its late reserve), which
        is retried as long as the database fails; so is the look for the reservation that
        comes first on each try. Filed as the failure once its retries were spent (57P01,
        say: the database still away when a give-up was retried), it read as a failure to
        fix and retry or discard, and a discard lost the commit its reserve would apply.
        """
        if (self.request.retries or 0) < s.max_retries:
            return  # retried as any transient failure, orphan_since kept
        logger.warning("cannot look for the reservation of %s yet: %r", self.request.id, exc)
        self.retry_later(self.next_delay(s), exc, orphan_since=_orphan_since(since, time.time()))

    def orphan(
        self, s: Settings, event: dict[str, Any], since: float | None, counted: int | None
    ) -> Outcome:
        """A commit or release whose reservation does not exist (yet): wait for it."""
        now = time.time()
        since = _orphan_since(since, now)
        left = since + s.orphan_horizon - now
        op = _op(event, "commit")
        if left <= 0:
            rid = (event.get("args") or {}).get("reservation_id")
            message = (
                f"reservation_id: no reservation {rid!r} after waiting {s.orphan_horizon:g} s "
                "for its reserve; applied when the reserve arrives"
            )
            return self.give_up_orphan(s, op, event, message, counted, since)
        retries = self.request.retries or 0
        if retries >= s.max_retries:
            message = (
                f"reservation_id: reservation not found after {retries} retries; applied "
                "when the reserve arrives"
            )
            return self.give_up_orphan(s, op, event, message, counted, since)
        delay = self.next_delay(s)
        self.retry_later(min(delay, max(left, 0.01)), orphan_since=since)

    def give_up_orphan(
        self, s: Settings, op: str, event: dict[str, Any], message: str, counted: int | None,
        since: float,
    ) -> Outcome:  # fmt: skip
        """Stop waiting: file the event as a dead letter that its reserve settles when it
        arrives, or apply it if the reserve came meanwhile (``meter.record_orphan``, under
        the reservation's lock, so a reserve applied at this very moment is not missed)."""
        try:
            row = db.record_orphan(
                s.database_url, s.db_pool_size, payload=event, message=message,
                source=self.request.id,
            )  # fmt: skip
        except Exception as exc:
            if is_transient(exc):
                # Retried whatever the retries so far: the wait is over, what is left is
                # to file it where its late reserve settles it (MT003), as dead_letter
                # retries a dead letter it cannot record yet. Through failed(), a give-up
                # when the retries ran out was filed as a transient failure (57P01, say),
                # which no reserve settles: the commit was never applied.
                logger.warning("cannot give up orphan %s yet: %r", self.request.id, exc)
                self.retry_later(self.next_delay(s), exc, orphan_since=since)
            return self.failed(s, exc, op, event, counted)
        self.done(counted)
        if row["applied"]:
            return _outcome({**row, "ok": True, "error_sqlstate": None, "error_message": None})
        return _dead_letter_outcome(row["dead_letter_id"], "MT003", message)


def _single(op: str) -> Any:
    def run(
        self: EventTask,
        event: Any,
        orphan_since: float | None = None,
        verdict: dict[str, Any] | None = None,
        auth: Any = None,
    ) -> Outcome:
        return self.run_single(op, event, orphan_since, verdict, auth)

    run.__name__ = run.__qualname__ = op
    run.__doc__ = f"Apply one ``{op}`` event (see :mod:`meter.wire`); return its outcome."
    return shared_task(bind=True, base=EventTask, name=wire.task_name(op))(run)


consume = _single("consume")
reserve = _single("reserve")
commit = _single("commit")
release = _single("release")
allocate = _single("allocate")
adjust = _single("adjust")


# -------------------------------------------------------------------- batches


@shared_task(bind=True, base=EventTask, name=wire.APPLY_BATCH)
def apply_batch(
    self: EventTask, events: Any, verdict: dict[str, Any] | None = None, auth: Any = None
) -> list[Outcome] | Outcome:
    """Apply many events in one transaction (``meter.apply_events``); their outcomes.

    ``events``: the JSON text of their array (what producers send, :mod:`meter.wire`), or
    the array itself. A bad event is dead-lettered alone by the SQL while the others
    apply. An event whose reservation is not there yet is handed to a single-event task
    (outcome ``deferred``).
    More than :data:`ONE_BY_ONE_PER_CALL` events of which any may go one by one (a
    reserve, say, or a key's second use) are applied in transactions of that many, in order, as is a larger
    batch whose single call fails otherwise than transiently (the SQL refuses it whole for
    its size, sql 050 and 054, or for any other reason: each part then meets its own).
    A batch that cannot be applied as a whole otherwise (a permanent error of the call, or
    too many deliveries) is split into single-event tasks, so each event meets its own fate.
    A batch refused for its tenancy (module docstring) is one dead letter, applied nowhere.
    """
    s = self.settings()
    self.request.retries = _retries(self.request.retries)
    counted = self.count_delivery(s)
    request = self.request
    ns, refusal = self.authorize(s, events, auth)  # the signature covers the text as sent
    text = events if isinstance(events, str) else None
    if text is not None and refusal is None:
        try:
            events = t.loads(text)
        except (ValueError, RecursionError):
            return self.dead_letter(
                s, "apply_batch", text, "MT001",
                "message: apply_batch's events are not valid JSON text", counted,
            )  # fmt: skip
    request.meter_events = events  # for the metrics (worker/metrics.py), parsed once
    if refusal is None and ns is not None and s.signing_secret and isinstance(events, list):
        # Signed: the signer crafted a message for another tenant; none of it is applied.
        other = next((e for e in events if _names_other(e, ns)), None)
        if other is not None:
            refusal = _mismatch_message(other, ns)
    if refusal is not None:
        return self.dead_letter(
            s, "apply_batch", events, TENANT_REFUSED, refusal, counted,
            namespace=OPERATOR_NAMESPACE,
        )  # fmt: skip
    if verdict is not None:
        verdict = _as_verdict(verdict)
        return self.dead_letter(
            s, "apply_batch", events, verdict.get("sqlstate"), str(verdict.get("message")),
            # Always the operators': the worker files every batch-level dead letter there,
            # and a crafted verdict naming the message's namespace would file another
            # tenant's events under it (found by a review).
            counted, namespace=OPERATOR_NAMESPACE,
        )  # fmt: skip
    if not isinstance(events, list):
        # With the operators: an object here may name any namespace (the tenancy test above
        # reads arrays), and filed under it, a retry would apply it there.
        return self.dead_letter(
            s, "apply_batch", events, "MT001", "message: apply_batch takes a JSON array",
            counted, namespace=OPERATOR_NAMESPACE,
        )  # fmt: skip
    if ns is None:  # an unsigned message of a producer that named no namespace: the first's
        ns = next((_namespace(e) for e in events if isinstance(e, dict)), None) or None
    # Unsigned: an event naming another namespace is dead-lettered alone, the rest applied.
    # ``orig`` maps the index of an event in what is applied to its index in the message.
    outcomes: dict[int, Outcome] = {}
    orig: list[int] = []
    for i, event in enumerate(events):
        if (not_text := _namespace_not_text(event)) is not None:
            outcomes[i] = _refuse_event(self, s, event, i, not_text, "MT001")
        elif ns is not None and _names_other(event, ns):
            outcomes[i] = _refuse_event(self, s, event, i, _mismatch_message(event, ns))
        else:
            orig.append(i)
    kept = [_with_key(events[i], f"task:{request.id}:{i}") for i in orig]
    # Nothing refused or keyed: the text goes to the server as it came, not re-serialised.
    as_sent = (
        text
        if text is not None
        and not outcomes
        and all(k is e for k, e in zip(kept, events, strict=True))
        else None
    )
    if counted is not None and counted >= s.max_deliveries:
        logger.error(
            "batch %s delivered %d times without completing: splitting it", request.id, counted
        )
        return _merge(outcomes, orig, _split(self, s, kept, orig, counted))
    if len(kept) > ONE_BY_ONE_PER_CALL and (
        any(map(_may_go_one_by_one, kept)) or _repeats_a_key(kept)
    ):
        applied = _apply_in_parts(self, s, kept, orig)
    else:
        try:
            payload = as_sent if as_sent is not None else kept
            rows = (
                db.apply_events(
                    s.database_url, s.db_pool_size, payload, request.id, results=self.wants_result()
                )
                if kept
                else []
            )
        except Exception as exc:
            if is_transient(exc):
                self.transient(s, exc)
            elif len(kept) > ONE_BY_ONE_PER_CALL:
                # Refused whole for its size (an event that goes one by one after all, or
                # too many new months: sql 050, 054), or for a reason only some events
                # have: in parts, in order, each in bounds; a part failing whole is split.
                logger.warning("batch %s refused whole (%r): applying it in parts", request.id, exc)
                applied = _apply_in_parts(self, s, kept, orig)
                self.done(counted)
                return _merge(outcomes, orig, applied)
            else:
                logger.exception("batch %s failed as a whole: splitting it", request.id)
            return _merge(outcomes, orig, _split(self, s, kept, orig, counted))
        applied = _handle_rows(self, s, rows, kept, orig)
    self.done(counted)
    return _merge(outcomes, orig, applied)


ONE_BY_ONE_PER_CALL: Final = 100
"""The most events ``meter.apply_events`` takes in one call when any of them goes one by
one (sql 054: each such call's locks sit in the server's shared lock table)."""


def _may_go_one_by_one(event: Any) -> bool:
    """Whether ``meter.apply_events`` may apply ``event`` one by one (not set-based): a
    reserve, commit or release, a checked consume, an adjust naming an entry, anything
    that is not an event. An invalid event goes one by one too; a batch of such ones is
    refused whole, and :func:`apply_batch` then applies it in parts."""
    if not isinstance(event, dict) or event.get("op") not in _KEYED_OPS:
        return True
    args = event.get("args")
    return (
        not isinstance(args, dict)
        or args.get("check_balance") is True
        or args.get("reference_id") is not None
    )


def _repeats_a_key(events: list[Any]) -> bool:
    """Whether two of ``events`` name one idempotency key in one namespace: the second
    goes one by one (it replays the first, or conflicts with it), and a whole call of more
    than :data:`ONE_BY_ONE_PER_CALL` would only be refused (a producer's message repeats
    an event it sent again after a failed publish)."""
    seen: set[tuple[Any, Any]] = set()
    for event in events:
        args = event.get("args") if isinstance(event, dict) else None
        key = args.get("idempotency_key") if isinstance(args, dict) else None
        if key is None:
            continue
        try:
            named = (event.get("namespace"), key)
            if named in seen:
                return True
            seen.add(named)
        except TypeError:  # a key that is no text (unhashable): the SQL refuses it
            return True
    return False


def _apply_in_parts(
    self: EventTask, s: Settings, events: list[Any], orig: list[int]
) -> list[Outcome]:
    """Apply ``events`` in transactions of at most :data:`ONE_BY_ONE_PER_CALL`, in order.

    Each event carries a key (``_with_key``), so a message delivered again after some of
    its parts committed replays them. A part's dead letters are sourced
    ``<task id>@<its first index>/<index in the part>``: the same on every delivery. A part
    that fails as a whole is split into single-event tasks, as a whole batch would be.
    """
    applied: list[Outcome] = []
    for start in range(0, len(events), ONE_BY_ONE_PER_CALL):
        part = events[start : start + ONE_BY_ONE_PER_CALL]
        part_orig = orig[start : start + ONE_BY_ONE_PER_CALL]
        try:
            rows = db.apply_events(
                s.database_url, s.db_pool_size, part, f"{self.request.id}@{start}",
                results=self.wants_result(),
            )  # fmt: skip
        except Exception as exc:
            if is_transient(exc):
                self.transient(s, exc)  # parts before this one replay on the next try
            else:
                logger.exception("part %d of batch %s failed as a whole: splitting it",
                                 start, self.request.id)  # fmt: skip
            applied.extend(_split(self, s, part, part_orig, None))
            continue
        applied.extend(_handle_rows(self, s, rows, part, part_orig))
    return applied


def _handle_rows(
    self: EventTask, s: Settings, rows: list[dict[str, Any]], events: list[Any], orig: list[int]
) -> list[Outcome]:
    """The outcomes of ``apply_events``'s ``rows`` for ``events``; an event whose
    reservation is not there yet is handed to a single-event task (``deferred``)."""
    applied: list[Outcome] = []
    try:
        for row in rows:
            if row["status"] == "not_found":
                delay = backoff(0, s.retry_backoff_base, s.retry_backoff_max)
                child = self.send_child(
                    s, events[row["idx"]], orig[row["idx"]], delay, orphan_since=time.time()
                )
                applied.append({"ok": False, "status": "deferred", "task_id": child})
            else:
                applied.append(_outcome(row))
    except Exception as exc:
        # The broker failed mid-way: have the whole batch delivered again (its applied
        # events replay, the deferred ones are re-sent under the same task ids).
        raise Reject(f"cannot hand over deferred events: {exc!r}", requeue=True) from exc
    return applied


def _merge(refused: dict[int, Outcome], orig: list[int], applied: list[Outcome]) -> list[Outcome]:
    """The outcomes in message order: the refused events' and the applied ones'."""
    out = dict(refused)
    out.update(zip(orig, applied, strict=True))
    return [out[i] for i in sorted(out)]


def _refuse_event(
    self: EventTask, s: Settings, event: Any, idx: int, message: str,
    sqlstate: str = TENANT_REFUSED,
) -> Outcome:  # fmt: skip
    """Dead-letter one event of a batch for its tenancy (``MT004``) or its namespace's JSON
    type (``MT001``), filed with operators.

    Its source is distinct from the SQL's (``<task>/<idx>``), and deterministic: a batch
    delivered again counts an attempt on the same dead letter.
    """
    try:
        dead_letter_id = db.record_dead_letter(
            s.database_url, s.db_pool_size, op=_op(event, "?"), payload=event,
            sqlstate=sqlstate, message=message, source=f"{self.request.id}/ns/{idx}",
            namespace=OPERATOR_NAMESPACE,
        )  # fmt: skip
    except Exception as exc:
        # Nothing of the batch was applied yet: have it run again, after a back-off (put
        # back at once, a failure that lasts would loop as fast as the worker runs).
        logger.warning("cannot record a refused event of %s yet: %r", self.request.id, exc)
        self.retry_later(self.next_delay(s), exc)
    return _dead_letter_outcome(dead_letter_id, sqlstate, message)


def _split(
    self: EventTask, s: Settings, events: list[Any], orig: list[int], counted: int | None
) -> list[Outcome]:
    """Hand each event of a batch to a single-event task of its own.

    ``orig[i]`` is the index of ``events[i]`` in the message (its child's task id). An
    event no task could take (not an event object, or one the broker's serializer refuses:
    nested too deeply, say) is a dead letter of its own right now.
    """
    outcomes: list[Outcome] = []
    try:
        for idx, event in zip(orig, events, strict=True):
            message = "event: not a valid event object"
            if isinstance(event, dict) and event.get("op") in wire.OPS:
                try:
                    child = self.send_child(s, event, idx, None)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    message = f"event: cannot be sent as a task of its own: {exc!r:.200}"
                else:
                    outcomes.append({"ok": False, "status": "deferred", "task_id": child})
                    continue
            dead_letter_id = db.record_dead_letter(
                s.database_url, s.db_pool_size, op=_op(event, "?"), payload=event,
                sqlstate="MT001", message=message, source=f"{self.request.id}/{idx}",
                namespace=_namespace(event),
            )  # fmt: skip
            outcomes.append(_dead_letter_outcome(dead_letter_id, "MT001", message))
    except Exception as exc:
        # Broker or database down mid-way: have the batch run again, after a back-off, and
        # split again (same child task ids, same dead-letter sources: nothing doubles).
        logger.warning("cannot split batch %s yet: %r", self.request.id, exc)
        self.retry_later(self.next_delay(s), exc)
    self.done(counted)
    return outcomes


# -------------------------------------------------------------------- unreadable messages


@shared_task(bind=True, base=EventTask, name=UNREADABLE)
def unreadable(self: EventTask, message: Any, verdict: Any = None) -> Outcome:
    """File a message the consumer could not run as a dead letter (``MT001``, operators').

    Sent by :class:`worker.consumer.Consumer` with ``message`` as
    :func:`worker.consumer.describe` gives it (its ``reason`` included), under the task id
    of the message; the dead letter's source is ``<that id>/unreadable/<delivery tag>``:
    under the id alone, a second message reusing it (crafted, or a newer release's task
    retried under its id) only counted an attempt on the first's dead letter, or on any
    other filed with the operators under that id, and was never stored. Nothing in it is
    applied.
    """
    del verdict  # the same verdict every time: the message itself says why
    s = self.settings()
    self.request.retries = _retries(self.request.retries)
    reason = message.get("reason") if isinstance(message, dict) else None
    tag = message.get("delivery_tag") if isinstance(message, dict) else None
    return self.dead_letter(
        s, "unreadable", message, "MT001", str(reason or "message: unreadable"), None,
        source=f"{self.request.id}/unreadable/{tag}" if isinstance(tag, str) else None,
        namespace=OPERATOR_NAMESPACE,
    )  # fmt: skip
