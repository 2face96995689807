"""Message signing of the pipeline: which tenant a message may write into.

Trust model (``docs/reliability.md``, "Tenant isolation"): the broker is shared, and
anyone who can publish to it could otherwise ask a worker (which runs as the maintenance
role, across every namespace) to write into any tenant. With ``METER_SIGNING_SECRET`` set
on the workers, every message must carry an HMAC-SHA256 made with the key of one
namespace, and every event in it must name that namespace:

- the *worker secret* (``METER_SIGNING_SECRET``) stays on the workers;
- a *namespace key* is derived from it, ``HMAC-SHA256(secret, "meter-ns:" + namespace)``
  (hex), and given to the producers of that tenant only (``meter keys derive NAMESPACE``;
  the producer reads it from ``signing_key=`` or ``$METER_PRODUCER_KEY``);
- a message's signature is ``HMAC-SHA256(namespace key, canonical body)`` where the body
  is the namespace, the message's event (or list of events) and the time it was signed,
  in :func:`canonical` form.

A producer holding tenant A's key can thus sign only messages for A; a message whose
signature is missing or wrong, or that names another namespace, is dead-lettered with
``MT004`` and never applied.

Replays. Anyone who can read the broker can copy a signed message and publish it again.
Within the idempotency keys' retention that is harmless: the events carry their keys and
replay. After it, their keys pruned, they would apply again. So the signature covers when
the message was signed (``signed_at``, Unix seconds), and workers refuse a message signed
longer ago than keys are kept, less an hour (:func:`message_max_age`), or more than
:data:`MAX_CLOCK_AHEAD_SECONDS` ahead of their clock. A message with no ``signed_at``
(signed by a producer from before it) is still taken, without that bound.

The signature travels in the task's ``auth`` keyword argument: ``{"namespace": ns,
"signed_at": seconds, "mac": hex}`` (``signed_at`` and ``mac`` absent when the producer
has no key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "KEY_ENV",
    "SECRET_ENV",
    "canonical",
    "derive_key",
    "make_auth",
    "message_max_age",
    "sign",
    "verify",
]

SECRET_ENV: Final = "METER_SIGNING_SECRET"
"""The worker-side secret; when set, workers refuse unsigned or mis-signed messages."""

KEY_ENV: Final = "METER_PRODUCER_KEY"
"""A producer's namespace key (as printed by ``meter keys derive NAMESPACE``)."""

_KEY_PREFIX: Final = "meter-ns:"

MAX_CLOCK_AHEAD_SECONDS: Final = 300
"""How far ahead of a worker's clock a message may be signed (the producer's clock runs
ahead): more is refused, since it would extend the message's replay bound by as much."""

_MAX_SIGNED_AT: Final = 2**53
"""The largest ``signed_at`` taken: every int up to it is exact as a float."""

_MARGIN_SECONDS: Final = 3600
"""How much sooner than its keys are pruned a message stops being taken."""


def message_max_age(key_retention_days: int) -> int:
    """The oldest a signed message may be, in seconds, when idempotency keys are kept
    ``key_retention_days``: an hour less (at least an hour), so that a replay of a message
    older than that cannot find its events' keys pruned."""
    return max(key_retention_days * 86400 - _MARGIN_SECONDS, _MARGIN_SECONDS)


def derive_key(secret: str, namespace: str) -> str:
    """The signing key of ``namespace``: ``HMAC-SHA256(secret, "meter-ns:" + namespace)``, hex."""
    return hmac.new(
        secret.encode("utf-8"), (_KEY_PREFIX + namespace).encode("utf-8"), hashlib.sha256
    ).hexdigest()


def _default(value: Any) -> Any:
    # Decimals travel through kombu's JSON as Decimal; their text is exact and stable.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot sign a value of type {type(value).__name__}")


def canonical(namespace: str, payload: Any, signed_at: int | None = None) -> bytes:
    """The bytes a signature covers: sorted keys, no white space, ASCII escapes.

    ``signed_at`` is part of the body when given (messages from producers before it have
    none, and their body is as it was).

    The same on both ends of the broker: the worker computes it from the message as
    decoded by Celery. Producers send (and sign) the JSON text of their events
    (:mod:`meter.wire`), a string that Celery's JSON carries unchanged. An event sent as an
    object (by an older producer) round-trips too (``Decimal``, ``int``, ``str``, lists,
    dicts), unless it holds an object whose keys are ``__type__`` and ``__value__``, which
    kombu's decoder turns into another value: such a message fails verification.
    """
    body: dict[str, Any] = {"namespace": namespace, "payload": payload}
    if signed_at is not None:
        body["signed_at"] = signed_at
    text = json.dumps(
        body,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_default,
    )
    return text.encode("ascii")


def sign(key: str, namespace: str, payload: Any, signed_at: int | None = None) -> str:
    """The hex HMAC-SHA256 of ``payload`` (signed at ``signed_at``) for ``namespace`` with
    the namespace ``key``."""
    body = canonical(namespace, payload, signed_at)
    return hmac.new(key.encode("utf-8"), body, hashlib.sha256).hexdigest()


def make_auth(
    key: str | None, namespace: str, payload: Any, *, now: float | None = None
) -> dict[str, Any]:
    """The ``auth`` task argument: the namespace, and when there is a key the time of
    signing (``now``, default the clock) and the signature."""
    auth: dict[str, Any] = {"namespace": namespace}
    if key:
        signed_at = int(time.time() if now is None else now)
        auth["signed_at"] = signed_at
        auth["mac"] = sign(key, namespace, payload, signed_at)
    return auth


def verify(
    secret: str, auth: Any, payload: Any, *, max_age: float, now: float | None = None
) -> str:
    """Check a message's ``auth`` against the worker ``secret``; the namespace it covers.

    ``max_age``: the oldest, in seconds, a message signed with a time may be (see
    :func:`message_max_age`); ``now`` defaults to the clock.

    Raises:
        ValueError: ``auth`` is missing or malformed, the signature does not match, or the
            message was signed longer than ``max_age`` ago or ahead of the clock (the
            message must not be applied). The message says which.
    """
    if not isinstance(auth, dict):
        raise ValueError("message: unsigned (no auth); the workers require signed messages")
    namespace, mac = auth.get("namespace"), auth.get("mac")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("message: auth names no namespace")
    if not isinstance(mac, str) or not mac:
        raise ValueError(f"message: unsigned message for namespace {namespace!r}")
    signed_at = auth.get("signed_at")
    # Bounded too: one past a float's range made the age below raise OverflowError, which
    # failed the task and lost its message (no dead letter).
    if signed_at is not None and (
        type(signed_at) is not int or not 0 <= signed_at <= _MAX_SIGNED_AT
    ):
        raise ValueError("message: auth's signed_at is not a whole number of seconds (0 to 2**53)")
    try:
        expected = sign(derive_key(secret, namespace), namespace, payload, signed_at)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("message: its body cannot be put in canonical form") from None
    if not hmac.compare_digest(expected, mac):
        raise ValueError(f"message: bad signature for namespace {namespace!r}")
    if signed_at is not None:
        age = (time.time() if now is None else now) - signed_at
        if age > max_age:
            raise ValueError(
                f"message: signed {age / 86400:.1f} days ago, longer than the idempotency "
                f"keys are kept less an hour ({max_age / 86400:.1f} days): applied now, "
                "a copy of an old message (a replay) could apply its events twice"
            )
        if -age > MAX_CLOCK_AHEAD_SECONDS:
            raise ValueError(
                f"message: signed {-age:.0f} s ahead of this worker's clock (at most "
                f"{MAX_CLOCK_AHEAD_SECONDS}): check the producer's clock"
            )
    return namespace
