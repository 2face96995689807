"""Messages the worker cannot even call its task with: never acknowledged unrecorded.

Each of these was acknowledged and dropped, with neither an effect nor a dead letter
(found by a worker review): Celery calls the task function with the message's arguments
as they are, and the ``TypeError`` of a call that does not match the signature failed the
task, which ``task_acks_on_failure`` acknowledges.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.integration.test_pipeline import ET, UNIT, dead_letters, eventually

EVENT = {"op": "allocate", "namespace": "default",
         "args": {"user_id": "u1", "event_type": ET, "amount": "1", "unit": UNIT,
                  "idempotency_key": "k1"}}  # fmt: skip


def _effects(db: psycopg.Connection[Any]) -> list[Any]:
    return [
        db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone(),
        db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone(),
        db.execute("SELECT count(*) AS n FROM meter.reservations").fetchone(),
    ]


@pytest.mark.parametrize(
    ("name", "args", "kwargs"),
    [
        ("meter.allocate", (EVENT,), {"trace": "x"}),
        ("meter.allocate", (), {}),
        ("meter.consume", (EVENT, None, None, None, "extra"), {}),
        ("meter.apply_batch", ([EVENT],), {"bogus": 1}),
    ],
    ids=["unknown-kwarg", "no-event", "extra-positional", "batch-unknown-kwarg"],
)
def test_a_message_whose_arguments_do_not_fit_its_task_is_a_dead_letter(
    pipeline, db, name, args, kwargs
):
    before = _effects(db)
    task_id = str(uuid.uuid4())
    pipeline.send_task(name, args=args, kwargs=kwargs, task_id=task_id, ignore_result=False)
    outcome = pipeline.AsyncResult(task_id).get(timeout=30)
    assert outcome["status"] == "error" and outcome["error_sqlstate"] == "MT001"
    (row,) = eventually(lambda: dead_letters(db), timeout=30)
    assert (row["namespace"], row["op"], row["error_sqlstate"], row["source"]) == (
        "",
        name.removeprefix("meter."),
        "MT001",
        task_id,
    )
    assert row["payload"] == {"args": list(args), "kwargs": kwargs}
    assert "arguments" in row["error_message"]
    assert _effects(db) == before  # nothing applied
