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
  is the namespace and the message's event (or list of events), in :func:`canonical` form.

A producer holding tenant A's key can thus sign only messages for A; a message whose
signature is missing or wrong, or that names another namespace, is dead-lettered with
``MT004`` and never applied.

The signature travels in the task's ``auth`` keyword argument: ``{"namespace": ns,
"mac": hex}`` (``mac`` absent when the producer has no key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any, Final

__all__ = [
    "KEY_ENV",
    "SECRET_ENV",
    "canonical",
    "derive_key",
    "make_auth",
    "sign",
    "verify",
]

SECRET_ENV: Final = "METER_SIGNING_SECRET"
"""The worker-side secret; when set, workers refuse unsigned or mis-signed messages."""

KEY_ENV: Final = "METER_PRODUCER_KEY"
"""A producer's namespace key (as printed by ``meter keys derive NAMESPACE``)."""

_KEY_PREFIX: Final = "meter-ns:"


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


def canonical(namespace: str, payload: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no white space, ASCII escapes.

    The same on both ends of the broker: the worker computes it from the message as
    decoded by Celery. Producers send (and sign) the JSON text of their events
    (:mod:`meter.wire`), a string that Celery's JSON carries unchanged. An event sent as an
    object (by an older producer) round-trips too (``Decimal``, ``int``, ``str``, lists,
    dicts), unless it holds an object whose keys are ``__type__`` and ``__value__``, which
    kombu's decoder turns into another value: such a message fails verification.
    """
    text = json.dumps(
        {"namespace": namespace, "payload": payload},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_default,
    )
    return text.encode("ascii")


def sign(key: str, namespace: str, payload: Any) -> str:
    """The hex HMAC-SHA256 of ``payload`` for ``namespace`` with the namespace ``key``."""
    return hmac.new(key.encode("utf-8"), canonical(namespace, payload), hashlib.sha256).hexdigest()


def make_auth(key: str | None, namespace: str, payload: Any) -> dict[str, str]:
    """The ``auth`` task argument: the namespace, and its signature when there is a key."""
    auth = {"namespace": namespace}
    if key:
        auth["mac"] = sign(key, namespace, payload)
    return auth


def verify(secret: str, auth: Any, payload: Any) -> str:
    """Check a message's ``auth`` against the worker ``secret``; the namespace it covers.

    Raises:
        ValueError: ``auth`` is missing or malformed, or the signature does not match
            (the message must not be applied). The message says which.
    """
    if not isinstance(auth, dict):
        raise ValueError("message: unsigned (no auth); the workers require signed messages")
    namespace, mac = auth.get("namespace"), auth.get("mac")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("message: auth names no namespace")
    if not isinstance(mac, str) or not mac:
        raise ValueError(f"message: unsigned message for namespace {namespace!r}")
    try:
        expected = sign(derive_key(secret, namespace), namespace, payload)
    except (TypeError, ValueError, RecursionError):
        raise ValueError("message: its body cannot be put in canonical form") from None
    if not hmac.compare_digest(expected, mac):
        raise ValueError(f"message: bad signature for namespace {namespace!r}")
    return namespace
