"""A kombu Redis transport that cannot lose a message to a killed consumer.

Why: kombu's Redis transport takes a message with ``BRPOP`` and only then, in a second round
trip, writes it to its ``unacked`` hash (``QoS.append``). A consumer SIGKILLed between the two
has removed the message from the queue without recording it anywhere: it is gone for good,
whatever ``acks_late`` says (kombu #305, #1836; celery #4354, #7950). And what *is* recorded
comes back only after ``visibility_timeout`` (an hour in Meter, since it must outlast the
longest ETA a worker holds unacknowledged).

What this transport changes (everything else is kombu's, message format included, apart
from the one redis-py client object per pool it shares with the producers' transport,
:mod:`meter.broker`):

1. **Take = one atomic server-side step.** A Lua script (``TAKE``) pops the next message and,
   in the same script, records it in kombu's ``unacked`` hash and ``unacked_index`` and
   marks this consumer as its holder. A message is always in a queue, or in ``unacked``;
   there is no instant where it is in neither.
2. **Blocking without popping.** Lua cannot block, so when ``TAKE`` finds nothing the
   channel sends ``BLMOVE q q RIGHT RIGHT timeout``: it blocks like ``BRPOP`` until ``q``
   holds something, and moving the last element of ``q`` to the end it came from leaves the
   list untouched, so a consumer killed while it waits takes nothing with it. Woken, it
   runs ``TAKE`` at once (the round trip kombu spends on ``QoS.append``); every consumer
   blocked on ``q`` wakes, one of them gets the message. An idle consumer costs one
   ``BLMOVE`` and one ``TAKE`` per ``brpop_timeout`` (1 s), kombu one ``BRPOP``; a busy
   one one ``TAKE`` per message, kombu a ``BRPOP`` and a pipeline. ``BLMOVE`` watches one
   list, the first (highest priority) key of the queue cycle: a message arriving only on
   another queue or priority of an idle consumer waits up to ``brpop_timeout``.
3. **Fast recovery of a dead consumer's messages.** Each consuming channel has an id and a
   heartbeat (a thread, every ``consumer_heartbeat`` s, by the Redis clock). Every
   ``unacked_restore_interval`` (1 s) each consumer sweeps: a message whose holder has
   not beaten for ``consumer_timeout`` (10 s) goes back to its queue, flagged
   ``redelivered`` as kombu does. Recovery window: ``consumer_timeout`` + 1 s after the
   kill (instead of ``visibility_timeout``, which stays as kombu's backstop).
4. **Ack and restore respect the holder.** An ack removes the record only if this consumer
   still holds the message, so a consumer that was presumed dead (a long stall) and acks
   late cannot delete the record of the consumer the message was handed to since.
5. **A live consumer audits what it holds.** The same sweep puts back any message recorded
   under the sweeping consumer's own id for ``consumer_timeout`` that it never received (a
   TAKE whose reply was lost while the channel lived on): a heartbeat vouches only for
   what its consumer knows it holds.

6. **An item that is no message stops nothing.** A list item kombu cannot read as a message
   (not JSON, no ``properties``, a body that does not decode) is delivered wrapped, as the
   body of a message of content type :data:`UNREADABLE_CONTENT_TYPE`, which Celery's
   consumer cannot decode and Meter's (:mod:`worker.consumer`) files as a dead letter;
   it raised out of the event loop, and Celery stopped the worker.

Redis keys (defaults; ``unacked*`` names are kombu transport options, so both transports
share the data when one replaces the other):

==========================  =====  =======================================================
key                         type   holds
==========================  =====  =======================================================
``<queue>``,                list   messages ready for delivery (kombu's: ``LPUSH`` by the
``<queue>\\x06\\x16<pri>``          producer, ``RPOP`` by ``TAKE``)
``unacked``                 hash   delivery tag -> ``[message, exchange, routing_key]``
                                   (kombu's format: its restore code reads it; TAKE
                                   writes ``''`` and the queue it took the message from)
``unacked_index``           zset   delivery tag -> delivery time (Redis clock): kombu's
                                   ``visibility_timeout`` backstop scans it
``unacked_mutex``           str    kombu's lock around its visibility scan
``unacked_owner``           hash   delivery tag -> id of the consumer holding it (new)
``unacked_consumers``       zset   consumer id -> time of its last heartbeat (new); a
                                   holder absent from it counts as dead
==========================  =====  =======================================================

Requires Redis >= 6.2 (``BLMOVE``). Not supported: ``global_keyprefix`` (refused at
channel creation) and Sentinel URLs (:func:`transport_for` leaves those to kombu).
See ``docs/reliability.md`` for what is promised and which test checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from queue import Empty
from time import monotonic
from typing import Any, Final, cast

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from meter import broker

__all__ = ["TRANSPORT", "Channel", "QoS", "Transport", "transport_for"]

logger = logging.getLogger(__name__)

UNREADABLE_CONTENT_TYPE: Final = "application/x-meter-unreadable"
"""The content type of a message wrapping a list item that was no kombu message."""

TRANSPORT: Final = "worker.transport:Transport"
"""The ``broker_transport`` setting that selects this transport."""

DEFAULT_TRANSPORT_OPTIONS: Final[dict[str, Any]] = {
    # kombu runs restore_visible (our sweep) on this period, in seconds (kombu: 10).
    "unacked_restore_interval": 1,
}


def transport_for(broker_url: str) -> str | None:
    """The ``broker_transport`` Celery setting for ``broker_url``.

    This transport for ``redis://`` and ``rediss://`` (with ``rediss://``, set
    ``broker_use_ssl`` too: kombu only infers TLS from the scheme for its own transport);
    ``None`` (kombu's choice by scheme) for anything else.
    """
    return TRANSPORT if broker.scheme(broker_url) in ("redis", "rediss") else None


class _Lua:
    """A script and its SHA1, for EVALSHA with a fallback to EVAL after a Redis restart."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.text, len(keys), *keys, *args)


# KEYS: unacked, unacked_index, unacked_owner, unacked_consumers, then the queue lists in
# priority order. ARGV: consumer id; one '1'/'0' per queue list: record (ack wanted) or not;
# then the queue of each list. Returns false, or {list, message[, delivery tag if recorded]}.
# The record routes the message back to the queue it was taken from (exchange '' and that
# queue as routing key, which kombu's restore resolves to the queue itself), not by the
# exchange the message claims: one that routes nowhere made the restore delete the record
# and push nothing, and a fanout one would push a copy to every bound queue. RPOP comes first so that on
# a full `noeviction` server the script either does nothing or everything: Redis refuses a
# script's first memory-growing write under OOM, never one after a write.
TAKE: Final = _Lua("""
for i = 5, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    if string.sub(ARGV[2], i - 4, i - 4) ~= '1' then return {KEYS[i], item} end
    local ok, msg = pcall(cjson.decode, item)
    local props = ok and type(msg) == 'table' and msg['properties']
    local tag = type(props) == 'table' and props['delivery_tag']
    -- kombu itself cannot read such a message: hand it over unrecorded, as BRPOP would
    if type(tag) ~= 'string' then return {KEYS[i], item} end
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    -- the message text goes in verbatim: re-encoding could alter it
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',"",' .. cjson.encode(ARGV[i - 2]) .. ']')
    redis.call('ZADD', KEYS[2], now, tag)
    redis.call('HSET', KEYS[3], tag, ARGV[1])
    redis.call('ZADD', KEYS[4], now, ARGV[1])
    return {KEYS[i], item, tag}
  end
end
return false
""")

# QoS.append of a message that did not come through TAKE (a fanout message consumed with
# acks, a message bounced by kombu for want of a consumer): same record, same holder.
# KEYS: unacked, unacked_index, unacked_owner, unacked_consumers. ARGV: tag, record, id.
RECORD: Final = _Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[4], now, ARGV[3])
""")

# Ack / reject without requeue. KEYS: unacked, unacked_index, unacked_owner. ARGV: tag, id.
# A record held by another consumer is theirs now (we were presumed dead and the message
# was handed over): leave it. A record without holder is kombu's: remove it, as kombu does.
RELEASE: Final = _Lua("""
local holder = redis.call('HGET', KEYS[3], ARGV[1])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
""")

# KEYS: unacked_consumers. ARGV: id.
BEAT: Final = _Lua("""
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
""")

# {orphans, mine}. orphans: the messages held by dead consumers, {tag, holder, tag,
# holder...}. Dead: no heartbeat for ARGV[1] seconds, or no entry at all (forgotten by an
# earlier sweep whose restore did not finish). Dead entries are forgotten here; a consumer
# that was only stalled puts its entry back with its next heartbeat. mine: the tags held
# by the caller (ARGV[2]) recorded more than ARGV[1] seconds ago, for its self-audit.
# O(messages in flight).
# KEYS: unacked_owner, unacked_consumers, unacked_index.
ORPHANS: Final = _Lua("""
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) + tonumber(t[2]) / 1000000 - tonumber(ARGV[1])
local dead, out, mine = {}, {}, {}
local held = redis.call('HGETALL', KEYS[1])
for i = 1, #held, 2 do
  local holder = held[i + 1]
  if holder == ARGV[2] then
    local at = redis.call('ZSCORE', KEYS[3], held[i])
    if at and tonumber(at) < cutoff then mine[#mine + 1] = held[i] end
  else
    if dead[holder] == nil then
      local beat = redis.call('ZSCORE', KEYS[2], holder)
      dead[holder] = (not beat) or tonumber(beat) < cutoff
    end
    if dead[holder] then
      out[#out + 1] = held[i]
      out[#out + 1] = holder
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. cutoff)
return {out, mine}
""")


def _record(raw: Any) -> Any:
    """``[message, exchange, routing_key]`` of an ``unacked`` record.

    Read as plain JSON when kombu's JSON refuses it: TAKE records an item verbatim once its
    Lua JSON reads a delivery tag in it, and kombu's decoder refuses objects holding a
    ``__type__`` it does not know. Such a record raised in every sweep, which then never
    put back the records after it. Plain, its objects stay objects, and dumped again they
    are the same text; delivered, :meth:`Channel._envelope` wraps it as unreadable.
    """
    text = bytes_to_str(raw)
    try:
        return loads(text)
    except ValueError:
        return json.loads(text)


class _Heartbeat(threading.Thread):
    """Beats for a consuming channel until it is closed or collected.

    A thread, not an event-loop timer: a solo-pool worker runs its task on the event loop,
    and a consumer busy with one long task is still alive.
    """

    def __init__(self, channel: Channel) -> None:
        super().__init__(name=f"meter-redis-heartbeat-{channel.consumer_id[:8]}", daemon=True)
        self._channel = weakref.ref(channel)
        self._interval = float(channel.consumer_heartbeat)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self._interval):
            channel = self._channel()
            if channel is None or channel.closed:
                return
            try:
                channel.beat()
            except Exception as exc:  # Redis down: the sweep of others tolerates a few misses
                logger.debug("heartbeat of consumer %s failed: %r", channel.consumer_id, exc)
            del channel


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, with records written by TAKE and guarded by their holder."""

    channel: Channel

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded = self.channel.recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)  # TAKE wrote the record already
        else:
            self.channel.record(message, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.release(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True, holder=self.channel.consumer_id)
        else:
            self.channel.release(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        channel = self.channel
        try:
            with channel.conn_or_acquire(client) as client:
                for tag in self._delivered:
                    self.restore_by_tag(tag, client=client, holder=channel.consumer_id)
        except channel.connection_errors as exc:
            # Closing after a lost connection: the records are in Redis, held by this
            # consumer, whose heartbeat has stopped; another consumer's sweep restores them.
            logger.warning(
                "cannot restore %d unacked message(s) now (%r): they come back %s s after "
                "the last heartbeat of consumer %s",
                len(self._delivered),
                exc,
                channel.consumer_timeout,
                channel.consumer_id,
            )
        self._delivered.clear()

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        self.channel.maybe_sweep()
        super().restore_visible(start=start, num=num, interval=interval)

    def restore_by_tag(
        self, tag: Any, client: Any = None, leftmost: bool = False, holder: str | None = None
    ) -> None:
        """Put message ``tag`` back on its queue (all or nothing: WATCH/MULTI).

        With ``holder``, only if that consumer (or nobody) still holds it. The message is
        rewritten in Python, as kombu does (``redelivered`` flags): Lua's cjson would not
        give the same JSON back.
        """
        channel = self.channel
        keys = (channel.unacked_key, channel.unacked_owner_key)

        def restore_transaction(pipe: Any) -> None:
            raw = pipe.hget(channel.unacked_key, tag)
            current = pipe.hget(channel.unacked_owner_key, tag)
            if holder is not None and current is not None and bytes_to_str(current) != holder:
                return  # handed to another consumer since
            pipe.multi()
            pipe.zrem(channel.unacked_index_key, tag)
            pipe.hdel(channel.unacked_key, tag)
            pipe.hdel(channel.unacked_owner_key, tag)
            if raw:
                payload, exchange, routing_key = _record(raw)
                channel._do_restore_message(payload, exchange, routing_key, pipe, leftmost)

        with channel.conn_or_acquire(client) as client:
            client.transaction(restore_transaction, *keys)


class Channel(broker.Channel):
    """kombu's Redis channel, taking messages with TAKE / BLMOVE instead of BRPOP (and
    reusing one redis-py client object per pool, as the producers' does)."""

    QoS = QoS

    #: Seconds between heartbeats of a consuming channel.
    consumer_heartbeat: float = 1.0
    #: Seconds without heartbeat after which a consumer's messages are put back.
    consumer_timeout: float = 10.0
    unacked_owner_key: str | None = None  # default: unacked_key + '_owner'
    consumers_key: str | None = None  # default: unacked_key + '_consumers'
    _heartbeat: _Heartbeat | None = None

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "consumer_heartbeat",
        "consumer_timeout",
        "unacked_owner_key",
        "consumers_key",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        problem = (
            "global_keyprefix is not supported"
            if self.global_keyprefix
            else "consumer_timeout must exceed 2 x consumer_heartbeat"
            if self.consumer_timeout <= 2 * self.consumer_heartbeat
            else None
        )
        if problem:
            self.close()
            raise ValueError(f"worker.transport: {problem}")
        self.unacked_owner_key = self.unacked_owner_key or f"{self.unacked_key}_owner"
        self.consumers_key = self.consumers_key or f"{self.unacked_key}_consumers"
        self.consumer_id = uuid.uuid4().hex
        #: Delivery tags TAKE recorded, until QoS.append sees them.
        self.recorded: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._pending: str | None = None  # 'EVALSHA' (TAKE) or 'BLMOVE' sent, reply unread
        self._wait_next = False
        self._take_args: tuple[list[str], list[str]] = ([], [])
        self._swept_at = float("-inf")

    # ------------------------------------------------------------------ taking

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def _take_keys(
        self, queues: Sequence[str], record: bool | None = None
    ) -> tuple[list[str], list[str]]:
        """(KEYS, ARGV) of TAKE for ``queues``, in kombu's BRPOP key order.

        ``record``: whether to record what is taken; default: unless consumed with no_ack.
        """
        lists = [(self._q_for_pri(q, pri), q) for pri in self.priority_steps for q in queues]
        flags = "".join(
            "1" if (record if record is not None else q not in self._no_ack_queues) else "0"
            for _, q in lists
        )
        return [*self._record_keys(), *(key for key, _ in lists)], [
            self.consumer_id,
            flags,
            *(q for _, q in lists),
        ]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys, args = self._take_keys(queues)
        self._take_args = (keys, args)
        if self._wait_next:
            first = keys[4]
            command: tuple[Any, ...] = ("BLMOVE", first, first, "RIGHT", "RIGHT", timeout or 0)
        else:
            command = ("EVALSHA", TAKE.sha, len(keys), *keys, *args)
        self._pending = command[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        pending, self._pending = self._pending, None
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, pending or "EVALSHA", **options
                )
                if pending == "BLMOVE":
                    if reply is None:  # the timeout, as BRPOP's: TAKE next (other lists)
                        self._wait_next = False
                        raise Empty()
                    # woken: take now, on this connection (idle again), as kombu's
                    # QoS.append makes its round trip here
                    reply = TAKE(self.client, *self._take_args)
            except self.connection_errors:
                # as kombu: disconnect, so that the next iteration reconnects
                self.client.connection.disconnect()
                raise
            except NoScriptError:  # Redis restarted, or SCRIPT FLUSH
                with self.conn_or_acquire() as client:
                    client.script_load(TAKE.text)
                raise Empty() from None
            if not reply:
                self._wait_next = True
                raise Empty()
            self._wait_next = False
            dest = bytes_to_str(reply[0]).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            tag = bytes_to_str(reply[2]) if len(reply) > 2 else None
            if tag is not None:
                self.recorded.add(tag)
                self._ensure_heartbeat()
            self.connection._deliver(self._envelope(reply[1], dest, tag), dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        keys, args = self._take_keys([queue], record=not no_ack)
        with self.conn_or_acquire() as client:
            reply = TAKE(client, keys, args)
            self._maybe_update_queues_expire(client, queue)
        if not reply:
            return None
        tag = bytes_to_str(reply[2]) if len(reply) > 2 else None
        if tag is not None:
            self.recorded.add(tag)
            self._ensure_heartbeat()
        message = self.Message(self._envelope(reply[1], queue, tag), channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def _envelope(self, item: Any, queue: str, tag: str | None) -> dict[str, Any]:
        """The kombu message of list item ``item``; for an item that is none, a message
        carrying it as its body, of a content type no consumer accepts.

        A list item that was not a kombu message (not JSON, no ``properties``, a body its
        ``body_encoding`` cannot decode, an object kombu's JSON refuses) raised out of the
        event loop, and Celery stopped the worker ("Unrecoverable error"): any client of
        the broker could stop every worker, one item each, and the item was lost. Wrapped,
        it reaches Celery's consumer as a message that does not decode, which Meter's
        (:mod:`worker.consumer`) files as a dead letter. It keeps the delivery tag TAKE
        recorded it under, if any, so its ack releases that record.
        """
        text = bytes_to_str(item)
        try:
            payload = loads(text)
            self.Message(payload, channel=self)  # what kombu will build from it
            if isinstance(payload["properties"]["delivery_tag"], str):
                return cast(dict[str, Any], payload)
        except Exception as exc:
            logger.error("not a kombu message on %s (%r): %.200r", queue, exc, text)
        return {
            "body": text,
            "content-type": UNREADABLE_CONTENT_TYPE,
            "content-encoding": "utf-8",
            "headers": {},
            "properties": {
                "delivery_tag": tag or uuid.uuid4().hex,
                "delivery_info": {"exchange": queue, "routing_key": queue},
            },
        }

    # ------------------------------------------------------------------ records

    def record(self, message: Any, delivery_tag: str) -> None:
        """Record ``message`` as unacked, held by this consumer (for QoS.append)."""
        delivery = message.delivery_info
        self._ensure_heartbeat()
        with self.conn_or_acquire() as client:
            RECORD(
                client,
                self._record_keys(),
                [
                    delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                    self.consumer_id,
                ],
            )

    def release(self, delivery_tag: str) -> None:
        """Drop the record of ``delivery_tag`` if this consumer still holds it."""
        with self.conn_or_acquire() as client:
            RELEASE(client, self._record_keys()[:3], [delivery_tag, self.consumer_id])

    def _record_keys(self) -> list[str]:
        return [
            self.unacked_key,
            self.unacked_index_key,
            str(self.unacked_owner_key),
            str(self.consumers_key),
        ]

    def _do_restore_message(
        self, payload: Any, exchange: str, routing_key: str, pipe: Any, leftmost: bool = False
    ) -> None:
        """kombu's, except that a ``headers`` or ``delivery_info`` that is no object does not
        keep the message from going back.

        kombu sets the ``redelivered`` flag in both first: in a list or a text (a crafted
        item, recorded by TAKE) that raised ``TypeError``, which it logged ("Could not
        restore message") while the restore transaction still deleted the record: a
        message held by a consumer that died, or requeued, was gone without a dead letter.
        """
        properties = payload.get("properties")
        info = properties.get("delivery_info") if isinstance(properties, dict) else None
        for part in (payload.get("headers"), info):
            if isinstance(part, dict):
                part["redelivered"] = True
        try:
            for queue in self._lookup(exchange, routing_key):
                pri = self._get_message_priority(payload, reverse=False)
                (pipe.lpush if leftmost else pipe.rpush)(
                    self._q_for_pri(queue, pri), dumps(payload)
                )
        except self.connection_errors:
            raise  # aborts the transaction: the record stays
        except Exception:
            logger.critical("Could not restore message: %r", payload, exc_info=True)

    # ------------------------------------------------------------------ liveness

    def beat(self) -> None:
        """Tell the other consumers that this one is alive (Redis clock)."""
        with self.conn_or_acquire() as client:
            BEAT(client, [str(self.consumers_key)], [self.consumer_id])

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None and not self.closed:
            self.beat()
            self._heartbeat = _Heartbeat(self)
            self._heartbeat.start()

    def maybe_sweep(self) -> None:
        """At most every ``unacked_restore_interval``: restore the messages of dead consumers,
        and those held under this consumer's own id that it never received (:meth:`_unknown`).

        No mutex (kombu's would stay locked for ``unacked_mutex_expire`` after a kill
        inside it): concurrent sweeps are harmless, each restore being a WATCH/MULTI
        transaction that pushes a message back only if its record is still there.
        """
        now = monotonic()
        if now - self._swept_at < self.unacked_restore_interval:
            return
        self._swept_at = now
        with self.conn_or_acquire() as client:
            try:
                found, mine = ORPHANS(
                    client,
                    [str(self.unacked_owner_key), str(self.consumers_key), self.unacked_index_key],
                    [self.consumer_timeout, self.consumer_id],
                )
            except ResponseError as exc:
                logger.warning("cannot look for messages of dead consumers: %s", exc)
                return
            if found:
                holders = sorted({bytes_to_str(h) for h in found[1::2]})
                logger.warning(
                    "restoring %d message(s) held by dead consumer(s) %s",
                    len(found) // 2,
                    ", ".join(holders),
                )
            restores = [
                *(
                    (tag, bytes_to_str(holder))
                    for tag, holder in zip(found[::2], found[1::2], strict=True)
                ),
                *((tag, self.consumer_id) for tag in self._unknown(mine)),
            ]
            for tag, holder in restores:
                try:
                    self.qos.restore_by_tag(tag, client=client, holder=holder)
                except self.connection_errors:
                    raise
                except Exception as exc:  # one bad record must not hold back the others
                    logger.error("cannot restore message %s: %r", bytes_to_str(tag), exc)

    def _unknown(self, held: Sequence[Any]) -> list[str]:
        """Of the tags Redis says this consumer has held for ``consumer_timeout``, those it
        never received: put them back rather than leave them to ``visibility_timeout``.

        Why: the heartbeat vouches for every message recorded under this consumer's id,
        but a message recorded by a TAKE whose reply never reached it (a reply lost with
        its connection while the channel lived on) is held by nobody who will ack it.
        Each of the ways known to lose a reply also closes the channel, which ends the
        heartbeat; this audit does not depend on that. Skipped while a TAKE's reply is
        unread (possibly for long, if kombu paused reading while the prefetch is full):
        its message is held but not received yet.
        """
        if not held or self._pending == "EVALSHA":
            return []
        delivered = self.qos._delivered
        unknown = [tag for tag in map(bytes_to_str, held) if tag not in delivered]
        if unknown:
            logger.warning(
                "restoring %d message(s) recorded as held by this consumer (%s) that it "
                "never received: %s",
                len(unknown),
                self.consumer_id,
                ", ".join(unknown),
            )
            self.recorded.difference_update(unknown)
        return unknown

    # ------------------------------------------------------------------ lifecycle

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # After a lost connection kombu drops the transport's link to its Connection before
        # it closes the channels (and Celery acks the tasks that were running): make that a
        # connection error, which both handle, rather than kombu's AttributeError.
        if client is None and (self.connection is None or self.connection.client is None):
            raise RedisConnectionError("the connection of this channel is closed")
        with super().conn_or_acquire(client) as acquired:
            yield acquired

    def close(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stopped.set()
        # kombu restores what the channel holds; what it cannot (Redis unreachable) is
        # restored by the others' sweep once the heartbeat is consumer_timeout old.
        super().close()

    def _after_fork(self) -> None:
        super()._after_fork()
        # The child is another consumer, if it ever consumes; the parent keeps beating.
        self.consumer_id = uuid.uuid4().hex
        self._heartbeat = None
        self.recorded = set()


class Transport(broker.Transport):
    """kombu's Redis transport with :class:`Channel`, and a sweep every second."""

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        client.transport_options = {**DEFAULT_TRANSPORT_OPTIONS, **client.transport_options}
        super().__init__(client, **kwargs)
