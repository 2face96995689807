"""The pipeline's tasks: decode the message, call the SQL, map what went wrong.

``meter.<op>(event)`` applies one event, ``meter.apply_batch(events)`` many in one
transaction; both go through ``meter.apply_events`` (``sql/008_pipeline.sql``), which also
records the dead letter of an event that can never succeed, in the same transaction.

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
``meter_orphan_horizon`` seconds, then dead-letters the event (``MT003``; ``meter
dead-letters retry`` applies it once the reserve is there). No hold leaks either way: a
reserve that arrives after its commit was given up is an ordinary hold, which expires by
its TTL and is returned by the expiry sweep (:mod:`worker.schedule`). In a batch, such an
event is handed to a single-event task of its own (deterministic id,
:func:`meter.wire.child_task_id`), so it neither holds up the batch nor gets lost.
"""

from __future__ import annotations

import time
from typing import Any, Final, NoReturn

from celery import Task, shared_task
from celery.app.task import get_actual_ignore_result
from celery.exceptions import Reject
from celery.utils.log import get_task_logger

from meter import wire
from worker import db, deliveries
from worker.retry import backoff, is_transient, sqlstate_of
from worker.settings import Settings

__all__ = ["EventTask", "apply_batch"]

logger = get_task_logger(__name__)

WORKER_LOST: Final = "MTW01"
"""SQLSTATE-like code of a dead letter whose message was delivered ``meter_max_deliveries``
times without its task ever completing (each time the worker died or was killed)."""

RETRIES_EXHAUSTED_MESSAGE: Final = "gave up after {n} retries; last error: {error}"

_KEYED_OPS: Final = frozenset({"consume", "allocate", "adjust"})

Outcome = dict[str, Any]


def _outcome(row: dict[str, Any]) -> Outcome:
    return {
        "ok": row["ok"],
        "status": row["status"],
        "result": row["result"],
        "error_sqlstate": row["error_sqlstate"],
        "error_message": row["error_message"],
    }


def _with_key(event: Any, key: str) -> Any:
    """The event with an idempotency key, derived from its task when it has none.

    Without one a redelivered message would apply twice. commit and release are keyed by
    their reservation id; a reserve without an id gets one.
    """
    if not isinstance(event, dict):
        return event
    op, args = event.get("op"), event.get("args")
    if not isinstance(args, dict):
        return event
    if op in _KEYED_OPS and args.get("idempotency_key") is None:
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


def _op(event: Any, default: str) -> str:
    op = event.get("op") if isinstance(event, dict) else None
    return op if isinstance(op, str) and op else default


class EventTask(Task):
    """Base of Meter's event tasks: delivery counting, retries and dead letters."""

    # Retries are bounded by meter_max_retries, checked here, not by Celery (whose bound
    # would raise and drop the message once exceeded).
    max_retries = None

    # ---------------------------------------------------------------- plumbing

    def settings(self) -> Settings:
        return Settings.from_conf(self.app.conf)

    def count_delivery(self, s: Settings) -> int | None:
        """Redeliveries of this message so far (``None`` on a first delivery)."""
        request = self.request
        if not deliveries.is_redelivered(request):
            return None
        return deliveries.count(self.app.conf.broker_url, request.id, request.retries or 0)

    def done(self, counted: int | None) -> None:
        """The task completed: forget its delivery counter, if it had one."""
        if counted is not None:
            request = self.request
            deliveries.clear(self.app.conf.broker_url, request.id, request.retries or 0)

    def retry_later(
        self, countdown: float, exc: BaseException | None = None, **kwargs: Any
    ) -> NoReturn:
        """Re-send this task (same id, ``retries + 1``) to run in ``countdown`` seconds.

        Celery's ``retry`` rejects the message *without* requeueing when the re-send fails
        (broker down), which would drop it: requeue instead, so it is delivered again.
        """
        request = self.request
        try:
            self.retry(
                args=request.args,
                kwargs={**(request.kwargs or {}), **kwargs},
                countdown=countdown,
                exc=exc,
            )
        except Reject as rejected:
            raise Reject(rejected.reason, requeue=True) from rejected
        raise AssertionError("Task.retry returned")  # pragma: no cover

    def send_child(
        self, event: dict[str, Any], idx: int, countdown: float | None, **kwargs: Any
    ) -> str:
        """Send event ``idx`` of this batch as a single-event task; its task id.

        The id is deterministic, so a batch delivered twice re-sends the same task (applied
        once: same idempotency key), and it stores a result when the batch does.
        """
        request = self.request
        task_id = wire.child_task_id(request.id, idx)
        self.app.send_task(
            wire.task_name(event["op"]),
            args=(event,),
            kwargs=kwargs,
            task_id=task_id,
            countdown=countdown,
            ignore_result=get_actual_ignore_result(self, request),
            argsrepr=f"[{event['op']} from batch {request.id}]",
            kwargsrepr=repr(kwargs),
        )
        return task_id

    # ---------------------------------------------------------------- outcomes

    def dead_letter(
        self, s: Settings, op: str, payload: Any, sqlstate: str | None, message: str,
        counted: int | None, *, source: str | None = None,
    ) -> Outcome:  # fmt: skip
        """Record a dead letter and complete; if even that fails, retry recording it later."""
        try:
            dead_letter_id = db.record_dead_letter(
                s.database_url,
                s.db_pool_size,
                op=op,
                payload=payload,
                sqlstate=sqlstate,
                message=message,
                source=source or self.request.id,
                namespace=_namespace(payload),
            )
        except Exception as exc:
            # The verdict travels with the retry: the event is not tried again, only recorded.
            logger.warning("cannot record the dead letter of %s yet: %r", self.request.id, exc)
            self.retry_later(
                backoff(self.request.retries or 0, s.retry_backoff_base, s.retry_backoff_max),
                exc=exc,
                verdict={"sqlstate": sqlstate, "message": message},
            )
        logger.error("dead letter %s (%s): %s", dead_letter_id, sqlstate, message)
        self.done(counted)
        return {
            "ok": False,
            "status": "error",
            "result": None,
            "error_sqlstate": sqlstate,
            "error_message": message,
            "dead_letter_id": dead_letter_id,
        }

    def transient(self, s: Settings, exc: BaseException) -> None:
        """Retry after a transient failure, unless retries are exhausted (then return)."""
        retries = self.request.retries or 0
        if retries < s.max_retries:
            logger.info("transient failure of %s, retrying: %r", self.request.id, exc)
            self.retry_later(backoff(retries, s.retry_backoff_base, s.retry_backoff_max), exc)

    # ---------------------------------------------------------------- single events

    def run_single(
        self, op: str, event: Any, orphan_since: float | None, verdict: dict[str, Any] | None
    ) -> Outcome:
        """Apply one event (the body of ``meter.<op>``)."""
        s = self.settings()
        counted = self.count_delivery(s)
        if verdict is not None:  # a dead letter that could not be recorded last time
            return self.dead_letter(
                s, _op(event, op), event, verdict.get("sqlstate"), str(verdict.get("message")),
                counted,
            )  # fmt: skip
        if not isinstance(event, dict):
            return self.dead_letter(
                s, op, event, "MT001", "message: the event must be a JSON object", counted
            )
        if counted is not None and counted >= s.max_deliveries:
            return self.dead_letter(
                s, _op(event, op), event, WORKER_LOST,
                f"delivered {counted} times without completing: the worker died or was "
                "killed each time", counted,
            )  # fmt: skip
        event = _with_key(event, f"task:{self.request.id}")
        try:
            row = db.apply_events(s.database_url, s.db_pool_size, [event], self.request.id)[0]
        except Exception as exc:
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

    def orphan(
        self, s: Settings, event: dict[str, Any], since: float | None, counted: int | None
    ) -> Outcome:
        """A commit or release whose reservation does not exist (yet): wait for it."""
        now = time.time()
        since = now if since is None else float(since)
        left = since + s.orphan_horizon - now
        op = _op(event, "commit")
        if left <= 0:
            rid = (event.get("args") or {}).get("reservation_id")
            return self.dead_letter(
                s, op, event, "MT003",
                f"reservation_id: no reservation {rid!r} after waiting "
                f"{s.orphan_horizon:g} s for its reserve; a hold that arrives later "
                "expires by its TTL", counted,
            )  # fmt: skip
        retries = self.request.retries or 0
        if retries >= s.max_retries:
            return self.dead_letter(
                s, op, event, "MT003",
                f"reservation_id: reservation not found after {retries} retries", counted,
            )  # fmt: skip
        delay = backoff(retries, s.retry_backoff_base, s.retry_backoff_max)
        self.retry_later(min(delay, max(left, 0.01)), orphan_since=since)


def _single(op: str) -> Any:
    def run(
        self: EventTask,
        event: Any,
        orphan_since: float | None = None,
        verdict: dict[str, Any] | None = None,
    ) -> Outcome:
        return self.run_single(op, event, orphan_since, verdict)

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
    self: EventTask, events: Any, verdict: dict[str, Any] | None = None
) -> list[Outcome] | Outcome:
    """Apply many events in one transaction (``meter.apply_events``); their outcomes.

    A bad event is dead-lettered alone by the SQL while the others apply. An event whose
    reservation is not there yet is handed to a single-event task (outcome ``deferred``).
    A batch that cannot be applied as a whole (a permanent error of the call, or too many
    deliveries) is split into single-event tasks, so each event meets its own fate.
    """
    s = self.settings()
    counted = self.count_delivery(s)
    request = self.request
    if verdict is not None:
        return self.dead_letter(
            s, "apply_batch", events, verdict.get("sqlstate"), str(verdict.get("message")),
            counted,
        )  # fmt: skip
    if not isinstance(events, list):
        return self.dead_letter(
            s, "apply_batch", events, "MT001", "message: apply_batch takes a JSON array",
            counted,
        )  # fmt: skip
    events = [_with_key(e, f"task:{request.id}:{i}") for i, e in enumerate(events)]
    if counted is not None and counted >= s.max_deliveries:
        logger.error(
            "batch %s delivered %d times without completing: splitting it", request.id, counted
        )
        return _split(self, s, events, counted)
    try:
        rows = db.apply_events(s.database_url, s.db_pool_size, events, request.id)
    except Exception as exc:
        if is_transient(exc):
            self.transient(s, exc)
        else:
            logger.exception("batch %s failed as a whole: splitting it", request.id)
        return _split(self, s, events, counted)
    outcomes: list[Outcome] = []
    try:
        for row in rows:
            if row["status"] == "not_found":
                delay = backoff(0, s.retry_backoff_base, s.retry_backoff_max)
                child = self.send_child(
                    events[row["idx"]], row["idx"], delay, orphan_since=time.time()
                )
                outcomes.append({"ok": False, "status": "deferred", "task_id": child})
            else:
                outcomes.append(_outcome(row))
    except Exception as exc:
        # The broker failed mid-way: have the whole batch delivered again (its applied
        # events replay, the deferred ones are re-sent under the same task ids).
        raise Reject(f"cannot hand over deferred events: {exc!r}", requeue=True) from exc
    self.done(counted)
    return outcomes


def _split(self: EventTask, s: Settings, events: list[Any], counted: int | None) -> list[Outcome]:
    """Hand each event of a batch to a single-event task of its own."""
    outcomes: list[Outcome] = []
    try:
        for idx, event in enumerate(events):
            if isinstance(event, dict) and event.get("op") in wire.OPS:
                child = self.send_child(event, idx, None)
                outcomes.append({"ok": False, "status": "deferred", "task_id": child})
            else:  # no task could take it: it is a dead letter of its own right now
                message = "event: not a valid event object"
                dead_letter_id = db.record_dead_letter(
                    s.database_url, s.db_pool_size, op=_op(event, "?"), payload=event,
                    sqlstate="MT001", message=message, source=f"{self.request.id}/{idx}",
                    namespace=_namespace(event),
                )  # fmt: skip
                outcomes.append(
                    {"ok": False, "status": "error", "result": None, "error_sqlstate": "MT001",
                     "error_message": message, "dead_letter_id": dead_letter_id}
                )  # fmt: skip
    except Exception as exc:
        # Broker or database down mid-way: have the batch delivered again and split again
        # (same child task ids, same dead-letter sources: nothing doubles).
        raise Reject(f"cannot split the batch: {exc!r}", requeue=True) from exc
    self.done(counted)
    return outcomes
