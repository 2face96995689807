"""The worker's Celery consumer: a message Celery cannot run is a dead letter, not dropped.

Celery's consumer discards, with a log line and nothing else, a message whose body cannot
be decoded (``on_decode_error``: acknowledged), that names a task this worker does not have
(``on_unknown_task``: a typo, or a task of a newer release during a rolling upgrade), that
is not a task message at all (``on_unknown_message``) or whose headers are invalid
(``on_invalid_task``: a content type refused by ``accept_content``, an ETA that is no
time). A crafted or damaged message would so vanish without a trace in the database. And
one whose headers held a value of the wrong JSON type raised out of Celery's handler and
stopped the worker, then the next one it was delivered to (:meth:`Consumer.create_task_handler`).

Here each is handed to ``meter.unreadable`` (:func:`worker.tasks.unreadable`) with the
message as received and the reason, and acknowledged only once that hand-over is
published; the task files it as a dead letter ``MT001`` with the operators, with the
worker's usual retries while the database is away. The hand-over keeps the message's task
id (without one, an id derived from its delivery tag; for one that is no UTF-8, from
it), so a caller waiting for that id gets the dead letter's outcome (echoing the digest of
the payload text the body holds, :func:`meter.wire.digest`, so that a producer tells its
own message's dead letter from another's that reused the id); the dead letter's
source is that id and the delivery tag, so a message delivered again after a crash between
the publish and the ack counts an attempt on the same dead letter, and another message
reusing the id has one of its own. A hand-over that cannot be published (the broker
away, or refusing writes) leaves the message to be delivered again, after a back-off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from typing import Any, Final

from celery.worker import state
from celery.worker.consumer import Consumer as CeleryConsumer
from vine import promise

from meter import wire
from worker.retry import backoff
from worker.settings import Settings

__all__ = ["UNREADABLE", "Consumer", "describe"]

logger = logging.getLogger(__name__)

UNREADABLE: Final = "meter.unreadable"
"""The task that files a message the consumer could not run as a dead letter."""


KEPT_CHARACTERS: Final = 1 << 20
"""The most of a message's body or headers its dead letter keeps, as text."""


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value if isinstance(value, str) else ascii(value)


def _kept(value: Any) -> str:
    """``value`` as text, its first :data:`KEPT_CHARACTERS` characters when longer, then its
    length and SHA-256. Escaped, a body grows up to eightfold: whole, a large one made a
    hand-over Redis refused, and the message came back to be handed over, for ever."""
    text = _text(value)
    if len(text) <= KEPT_CHARACTERS:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()
    return f"{text[:KEPT_CHARACTERS]}... [{len(text)} characters in all, sha256 {digest}]"


def _digest(body: Any) -> str | None:
    """:func:`meter.wire.digest` of the payload a producer sent in ``body`` (the JSON text
    of its first argument), which the dead letter's outcome echoes so that the producer's
    ``wait()`` takes it as its own; None when the body holds no such text."""
    try:
        args = json.loads(bytes(body) if isinstance(body, bytearray | memoryview) else body)[0]
        return wire.digest(args[0]) if isinstance(args[0], str) else None
    except Exception:  # anything a crafted body holds: no digest, as before the echo
        return None


def describe(message: Any, reason: str) -> dict[str, Any]:
    """The message as received, in plain JSON types (what its dead letter holds); its body
    and headers kept to :data:`KEPT_CHARACTERS` characters each."""
    headers = getattr(message, "headers", None)
    digest = _digest(getattr(message, "body", None))
    return {
        "reason": reason,
        "content_type": _text(getattr(message, "content_type", None)),
        "content_encoding": _text(getattr(message, "content_encoding", None)),
        # as text: a header value may be anything a crafted message holds
        "headers": _kept(headers) if headers is not None else None,
        "body": _kept(getattr(message, "body", None)),
        # kept when it is put back: the dead letter's source (worker.tasks.unreadable)
        "delivery_tag": _text(getattr(message, "delivery_tag", None)),
        # of the producer's payload, if the body holds one: echoed in the outcome
        **({"digest": digest} if digest is not None else {}),
    }


def _task_id(message: Any) -> str:
    headers = getattr(message, "headers", None) or {}
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if isinstance(task_id, str) and task_id:
        try:
            task_id.encode()
        except UnicodeEncodeError:
            # a lone surrogate: no Redis key (the result's) can hold it, so the hand-over
            # would fail every time, and the message come back for good
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meter:unreadable:{task_id!a}"))
        return task_id
    tag = getattr(message, "delivery_tag", None)
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meter:unreadable:{tag}"))


def _wants_result(message: Any) -> bool:
    headers = getattr(message, "headers", None) or {}
    return isinstance(headers, dict) and headers.get("ignore_result") is False


def _forget(message: Any) -> None:
    """Drop the request Celery's strategy reserved for ``message`` before it raised."""
    for request in tuple(state.reserved_requests):
        if getattr(request, "_message", None) is message:
            state.reserved_requests.discard(request)
            with contextlib.suppress(TypeError, KeyError):  # an id may be unhashable
                state.requests.pop(request.id, None)


class Consumer(CeleryConsumer):
    """Celery's consumer, handing the messages it would discard to ``meter.unreadable``."""

    def create_task_handler(self, promise: Any = promise) -> Any:
        """Celery's handler, except that a message it raises on is a dead letter.

        A header of the wrong JSON type (a task name or an id that is a list, a
        ``timelimit`` or ``stamped_headers`` that is no pair or list, a
        ``delivery_info`` that is text) raised out of Celery's handler into the event
        loop, and Celery stopped the worker ("Unrecoverable error"); the message, put back,
        stopped the next worker in turn. The strategy raises before the task reaches the
        pool, so it is handed over and acknowledged instead.
        """
        handle = super().create_task_handler(promise)
        connection_errors = self.connection_errors

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except connection_errors:
                raise
            except Exception as exc:
                logger.exception("Celery cannot take a message; handing it over")
                _forget(message)
                if not message.acknowledged and self.hand_over(
                    message, f"message: the worker cannot take it: {exc!r:.500}"
                ):
                    message.ack_log_error(logger, connection_errors)
                return None

        return on_task_received

    def hand_over(self, message: Any, reason: str) -> bool:
        """Publish the dead letter task of ``message``; False if it could not be sent."""
        try:
            self.app.send_task(
                UNREADABLE,
                args=(describe(message, reason),),
                task_id=_task_id(message),
                queue=wire.QUEUE,
                ignore_result=not _wants_result(message),
            )
        except Exception:
            self._requeue_later(message)
            return False
        self._refused = 0
        return True

    def _requeue_later(self, message: Any) -> None:
        """Put ``message`` back once a back-off has passed (the worker's retry back-off,
        growing with each hand-over refused in a row).

        Put back at once, it was taken again at once and refused again: a loop as fast as
        the worker runs, for as long as Redis refused (out of memory, say). Meanwhile the
        message stays held, unacknowledged, by this consumer (whose heartbeat keeps it
        from the others' sweep), which takes nothing else beyond its prefetch.
        """
        refused = getattr(self, "_refused", 0)
        self._refused = refused + 1
        s = Settings.from_conf(self.app.conf)
        delay = backoff(refused, s.retry_backoff_base, s.retry_backoff_max)
        logger.exception("cannot hand over an unreadable message; it comes back in %.2f s", delay)

        def requeue() -> None:
            if message.acknowledged:
                return
            try:
                message.reject_log_error(logger, self.connection_errors, requeue=True)
            except Exception:  # its channel closed meanwhile: restored by the close or sweep
                logger.exception("cannot put back an unreadable message")

        self.timer.call_after(delay, requeue)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if self.hand_over(message, f"message: cannot decode its body: {exc!r:.500}"):
            super().on_decode_error(message, exc)  # logs, acknowledges

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if self.hand_over(message, "message: not a task message"):
            super().on_unknown_message(body, message)  # logs, rejects

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = getattr(message, "headers", None) or {}
        name = headers.get("task") if isinstance(headers, dict) else None
        if self.hand_over(message, f"message: no task {_text(name)[:200]!r} in this worker"):
            # Celery's also marks the task id failed in the result backend: the dead
            # letter task stores its outcome under that id instead.
            message.reject_log_error(logger, self.connection_errors)
            logger.error("unregistered task %r: handed over as a dead letter", name)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if self.hand_over(message, f"message: invalid task message: {exc!s:.500}"):
            super().on_invalid_task(body, message, exc)  # logs, rejects
