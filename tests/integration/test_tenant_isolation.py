"""Tenant isolation: the SQL API as the application role, and the Celery path.

SQL: ``tests/integration/test_rls.py`` calls every tenant-scoped function of Appendix A
for another namespace (``API_CALLS``) and with another tenant's reservation and entry ids.
Here: a check that its table really names *every* function taking ``p_namespace`` (a new
function cannot slip through untested), the pipeline's own functions (``apply_events``,
dead letters) for another tenant, and another tenant's dead-letter ids.

Celery: with ``METER_SIGNING_SECRET`` set on the worker (``meter_signing_secret`` on the
test app), only messages signed with the key of the namespace they write into are applied
(:mod:`meter.signing`); a crafted message is a dead letter ``MT004`` in the operators'
namespace ``''``, and nothing of it reaches a ledger. Without a secret, a message still
writes into one namespace only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from meter import signing, wire
from meter.cli import main as cli
from meter.errors import ValidationError
from tests.integration.test_pipeline import eventually
from tests.integration.test_rls import API_CALLS, connect, outcome, run

D = Decimal
ET = "tokens"
UNIT = "tok"
SECRET = "test-worker-secret"


# ---------------------------------------------------------------- SQL, as the app role

# The functions beyond test_rls.API_CALLS (the pipeline's, beat's), called as tenant 'a'
# for namespace 'b' (or for b's rows).
PIPELINE_CALLS: dict[str, str] = {
    "apply_events": "SELECT * FROM meter.apply_events(%(events)s::jsonb, 'src-1')",
    "record_dead_letter": "SELECT meter.record_dead_letter('consume', '{}'::jsonb, 'MT001',"
    " 'x', NULL, %(ns)s)",
    "record_orphan": "SELECT * FROM meter.record_orphan(%(orphan)s::jsonb, 'x')",
    "list_dead_letters": "SELECT * FROM meter.list_dead_letters('all', 100, %(ns)s)",
    "list_dead_letters_all": "SELECT * FROM meter.list_dead_letters('all', 100, NULL)",
    "retry_dead_letter": "SELECT * FROM meter.retry_dead_letter(%(dl)s)",
    "discard_dead_letter": "SELECT meter.discard_dead_letter(%(dl)s)",
    "roll_periods": "SELECT * FROM meter.roll_periods(p_namespace => %(ns)s)",
    "get_periods": "SELECT * FROM meter.get_periods(p_user_id => 'u1', p_namespace => %(ns)s)",
}

# Functions taking p_namespace that *set* the tenant rather than act in it: the tenant is
# the application's declaration (SDK: meter.ctx per call), so they take any namespace.
CONTEXT_SETTERS = {"ctx"}


def _event(ns: str, op: str = "allocate", **args: Any) -> dict[str, Any]:
    base = {"user_id": "u1", "event_type": ET, "amount": "7", "unit": UNIT}
    return {"op": op, "namespace": ns, "args": {**base, **args}}


@pytest.fixture
def app_conn(app_url: str) -> Iterator[psycopg.Connection[Any]]:
    with connect(app_url) as conn:
        yield conn


@pytest.fixture
def b_dead_letter(db: psycopg.Connection[Any]) -> int:
    """A dead letter of namespace 'b' (an allocate that would apply if retried)."""
    row = db.execute(
        "SELECT meter.record_dead_letter('allocate', %s::jsonb, 'MT003', 'x', 'b-src', 'b') AS id",
        (psycopg.types.json.Jsonb(_event("b")),),
    ).fetchone()
    return int(row["id"])


def test_every_namespaced_function_is_in_the_isolation_tables(db):
    """Each function with a p_namespace parameter is exercised for another tenant."""
    names = {
        r["proname"]
        for r in db.execute(
            "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace"
            " AND p.proname NOT LIKE '\\_%%' AND 'p_namespace' = ANY (p.proargnames)"
        ).fetchall()
    }
    covered = {name.removesuffix("_checked").removesuffix("_all") for name in API_CALLS}
    covered |= {name.removesuffix("_all") for name in PIPELINE_CALLS} | CONTEXT_SETTERS
    assert names - covered == set()
    assert len(names) >= 20  # the query found the API (Appendix A and the pipeline)


def test_pipeline_functions_refuse_another_tenant(app_conn, db, b_dead_letter, snapshot):
    run(app_conn, "SELECT meter.set_tenant('a')")
    before = snapshot()
    orphan = {"op": "commit", "namespace": "b", "args": {"reservation_id": "r-b"}}
    params = {"ns": "b", "dl": b_dead_letter, "orphan": psycopg.types.json.Jsonb(orphan)}
    got = {
        name: outcome(app_conn, sql, params)
        for name, sql in PIPELINE_CALLS.items()
        if name not in ("apply_events", "retry_dead_letter", "discard_dead_letter")
    }
    assert got == {
        "roll_periods": "MT004",
        "get_periods": "MT004",
        "record_dead_letter": "MT004",
        "record_orphan": "MT004",
        "list_dead_letters": "MT004",
        "list_dead_letters_all": "MT004",
    }
    # b's dead letter is invisible to a: unknown id, nothing applied, nothing discarded
    assert outcome(app_conn, PIPELINE_CALLS["retry_dead_letter"], params) == "MT003"
    assert run(app_conn, PIPELINE_CALLS["discard_dead_letter"], params) == [
        {"discard_dead_letter": False}
    ]
    assert snapshot() == before


def test_a_tenant_cannot_file_a_dead_letter_with_the_operators(app_conn, db, snapshot):
    # '' (and NULL) would be the operators' namespace: a tenant's letter stays its own
    run(app_conn, "SELECT meter.set_tenant('a')")
    payload = psycopg.types.json.Jsonb(_event("b"))
    for ns in ("", None):
        run(
            app_conn,
            "SELECT meter.record_dead_letter('allocate', %(p)s, 'MT001', 'x', NULL, %(ns)s)",
            {"p": payload, "ns": ns},
        )
    letters = db.execute(
        "SELECT dead_letter_id AS id, namespace FROM meter.dead_letters"
    ).fetchall()
    assert [d["namespace"] for d in letters] == ["a", "a"]
    before = snapshot()
    for d in letters:  # its event names b: never applied, whoever retries it
        (row,) = run(db, "SELECT * FROM meter.retry_dead_letter(%(id)s)", {"id": d["id"]})
        assert (row["ok"], row["error_sqlstate"]) == (False, "MT004")
    assert {k: v for k, v in snapshot().items() if k != "dead_letters"} == {
        k: v for k, v in before.items() if k != "dead_letters"
    }
    assert db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"] == 0


def test_dead_letters_need_a_tenant_for_the_app_role(app_conn, db, b_dead_letter, snapshot):
    # No tenant set: refused loudly, b's dead letter neither discarded nor applied.
    before = snapshot()
    params = {"dl": b_dead_letter, "ns": None}
    assert outcome(app_conn, PIPELINE_CALLS["discard_dead_letter"], params) == "MT004"
    assert outcome(app_conn, PIPELINE_CALLS["retry_dead_letter"], params) == "MT004"
    assert outcome(app_conn, PIPELINE_CALLS["record_dead_letter"], params) == "MT004"
    assert snapshot() == before


def test_apply_events_as_another_tenant_applies_nothing_there(app_conn, db, snapshot):
    run(app_conn, "SELECT meter.set_tenant('a')")
    before = snapshot()
    events = psycopg.types.json.Jsonb(
        [_event("b"), _event("b", "consume", idempotency_key="k1"), _event("b", "reserve")]
    )
    rows = run(app_conn, PIPELINE_CALLS["apply_events"], {"events": events})
    assert [(r["ok"], r["status"], r["error_sqlstate"]) for r in rows] == [
        (False, "error", "MT004")
    ] * 3
    after = snapshot()
    # nothing in any tenant table; the refusals are on record as a's own dead letters
    assert {k: v for k, v in after.items() if k != "dead_letters"} == {
        k: v for k, v in before.items() if k != "dead_letters"
    }
    letters = db.execute(
        "SELECT dead_letter_id AS id, namespace, error_sqlstate FROM meter.dead_letters"
    ).fetchall()
    assert [(d["namespace"], d["error_sqlstate"]) for d in letters] == [("a", "MT004")] * 3
    assert len(run(app_conn, "SELECT * FROM meter.list_dead_letters('dead', 100, 'a')")) == 3
    # retried, by a or by an operator, they still write nothing into b
    for d in letters:
        for conn in (app_conn, db):
            (row,) = run(conn, "SELECT * FROM meter.retry_dead_letter(%(id)s)", {"id": d["id"]})
            assert (row["ok"], row["status"], row["error_sqlstate"]) == (False, "error", "MT004")
            assert "never retried" in row["error_message"]
    assert {k: v for k, v in snapshot().items() if k != "dead_letters"} == {
        k: v for k, v in before.items() if k != "dead_letters"
    }
    assert db.execute("SELECT count(*) AS n FROM meter.accounts").fetchone()["n"] == 0


def test_apply_events_for_own_tenant_works(app_conn, db):
    # Positive control: the same call for 'a' applies.
    run(app_conn, "SELECT meter.set_tenant('a')")
    events = psycopg.types.json.Jsonb([_event("a")])
    rows = run(app_conn, PIPELINE_CALLS["apply_events"], {"events": events})
    assert [(r["ok"], r["status"]) for r in rows] == [(True, "applied")]
    assert db.execute("SELECT namespace, balance FROM meter.accounts").fetchall() == [
        {"namespace": "a", "balance": D(7)}
    ]


# ---------------------------------------------------------------- signing, pure


def test_namespace_keys_are_distinct_and_bound_to_the_secret():
    ka, kb = signing.derive_key(SECRET, "a"), signing.derive_key(SECRET, "b")
    assert ka != kb and len(ka) == 64
    assert signing.derive_key("other", "a") != ka
    event = _event("a")
    auth = signing.make_auth(ka, "a", event)
    assert signing.verify(SECRET, auth, event, max_age=60) == "a"
    for bad_auth, bad_event, why in [
        (None, event, "unsigned"),
        ({"namespace": "a"}, event, "unsigned"),
        ({**auth, "namespace": "b"}, event, "bad signature"),
        (auth, {**event, "args": {**event["args"], "amount": "8"}}, "bad signature"),
        (signing.make_auth(kb, "a", event), event, "bad signature"),
        ({"namespace": "", "mac": auth["mac"]}, event, "no namespace"),
    ]:
        with pytest.raises(ValueError, match=why):
            signing.verify(SECRET, bad_auth, bad_event, max_age=60)


def test_a_signature_covers_its_time_and_bounds_replays():
    """Anyone reading the broker can publish a signed message again; once its events' keys
    are pruned, they would apply again. A message signed longer ago than keys are kept
    (less an hour), or ahead of the worker's clock, is refused; its time cannot be edited;
    one signed before messages carried a time (no ``signed_at``) is still taken."""
    ka = signing.derive_key(SECRET, "a")
    event = _event("a")
    now = 1_800_000_000.0
    auth = signing.make_auth(ka, "a", event, now=now)
    assert auth["signed_at"] == 1_800_000_000 and set(auth) == {"namespace", "signed_at", "mac"}
    bound = signing.message_max_age(35)
    assert bound == 35 * 86400 - 3600 and signing.message_max_age(0) == 3600
    assert signing.verify(SECRET, auth, event, max_age=bound, now=now + bound) == "a"
    with pytest.raises(ValueError, match=r"signed 35\.0 days ago, longer than the idempotency"):
        signing.verify(SECRET, auth, event, max_age=bound, now=now + bound + 1)
    assert signing.verify(SECRET, auth, event, max_age=bound, now=now - 300) == "a"
    with pytest.raises(ValueError, match=r"signed 301 s ahead of this worker's clock"):
        signing.verify(SECRET, auth, event, max_age=bound, now=now - 301)
    for edited in (auth["signed_at"] + 86400, None):  # made younger, or its time dropped
        forged = {k: v for k, v in {**auth, "signed_at": edited}.items() if v is not None}
        with pytest.raises(ValueError, match="bad signature"):
            signing.verify(SECRET, forged, event, max_age=bound, now=now + bound + 1)
    for odd in ("1800000000", 1.8e9, True, -1):
        with pytest.raises(ValueError, match="signed_at is not a whole number of seconds"):
            signing.verify(SECRET, {**auth, "signed_at": odd}, event, max_age=bound, now=now)
    old = {"namespace": "a", "mac": signing.sign(ka, "a", event)}  # an older producer's
    assert signing.verify(SECRET, old, event, max_age=bound, now=now) == "a"
    assert signing.make_auth(None, "a", event) == {"namespace": "a"}


def test_a_task_the_worker_sends_itself_keeps_the_time_its_message_was_signed():
    """A batch's event sent as a task of its own (deferred, or the batch split) was signed
    with the worker's clock: a copy of that task, published again up to 35 days after it,
    was taken, although its event's key was claimed when the batch first applied, maybe
    hours earlier (a batch split after ten deliveries, or after its retries): pruned 35
    days after that, and the copy applied it again. The child carries its message's
    ``signed_at``; a message that had none (an older producer's) gets the worker's clock."""
    from worker.settings import Settings
    from worker.tasks import apply_batch

    s = Settings(signing_secret=SECRET)
    event = _event("a", idempotency_key="c1")
    payload = wire.dumps(event)
    ka = signing.derive_key(SECRET, "a")
    signed_at = int(time.time()) - 5 * 3600
    parent = signing.make_auth(ka, "a", [event], now=signed_at)
    older = {"namespace": "a", "mac": signing.sign(ka, "a", [event])}  # no signed_at
    # the auth as verified, wherever the message carried it (as a keyword, or positionally)
    for auth, expected in ((parent, signed_at), (older, None)):
        apply_batch.push_request(args=[[event], None, auth], kwargs={})
        try:
            before = int(time.time())
            assert apply_batch.authorize(s, [event], auth) == ("a", None)
            child = apply_batch.child_auth(s, event, payload)
        finally:
            apply_batch.pop_request()
        assert signing.verify(SECRET, child, payload, max_age=86400) == "a"
        if expected is None:
            assert child["signed_at"] >= before
        else:
            assert child["signed_at"] == expected


def test_worker_reads_the_secret_and_never_prints_it():
    from worker.settings import Settings

    s = Settings.from_env({signing.SECRET_ENV: "hush-123"})
    assert s.signing_secret == "hush-123"
    assert "hush-123" not in repr(s)
    assert Settings.from_conf(s.as_conf()).signing_secret == "hush-123"
    assert Settings.from_env({}).signing_secret == ""


def test_canonical_form_survives_the_celery_json_round_trip():
    from kombu.utils.json import dumps, loads

    payload = [_event("a", metadata={"z": D("1.50"), "a": [1, "é", None, True]})]
    assert signing.canonical("a", loads(dumps(payload))) == signing.canonical("a", payload)


def test_cli_derives_the_same_key():
    result = CliRunner().invoke(cli, ["keys", "derive", "acme"], env={signing.SECRET_ENV: "s"})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == signing.derive_key("s", "acme")
    bad = CliRunner().invoke(cli, ["keys", "derive", " acme"], env={signing.SECRET_ENV: "s"})
    assert bad.exit_code == 2 and "namespace" in bad.output


def test_producer_refuses_a_bad_signing_key(broker_url):
    from meter.producer import MeterProducer

    with pytest.raises(ValidationError) as exc:
        MeterProducer(broker_url, "a", signing_key="")
    assert exc.value.parameter == "signing_key"


# ---------------------------------------------------------------- the Celery path


@pytest.fixture
def signed_pipeline(pipeline: Any) -> Iterator[Any]:
    """The worker of ``pipeline`` with a signing secret (restored afterwards)."""
    pipeline.conf.meter_signing_secret = SECRET
    try:
        yield pipeline
    finally:
        pipeline.conf.meter_signing_secret = ""


def dead_letters(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT namespace, op, error_sqlstate, error_message FROM meter.dead_letters"
        " ORDER BY dead_letter_id"
    ).fetchall()


def tenant_tables(snapshot: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in snapshot().items() if k != "dead_letters"}


def send(app: Any, name: str, payload: Any, auth: Any) -> None:
    kwargs = {} if auth is None else {"auth": auth}
    app.send_task(name, args=(payload,), kwargs=kwargs, task_id=str(uuid.uuid4()))


def test_signed_producer_applies_in_its_namespace(signed_pipeline, make_producer, db):
    key = signing.derive_key(SECRET, "a")
    producer = make_producer("a", signing_key=key)
    producer.allocate("u1", ET, 10, UNIT)
    producer.consume("u1", ET, 3, UNIT)
    # a commit before its reserve, in one batch: the worker defers it to a task of its
    # own, which it signs itself
    producer.send_many(
        [
            {"op": "commit", "reservation_id": "r1", "actual_amount": 2},
            {"op": "reserve", "user_id": "u1", "event_type": ET, "amount": 4, "unit": UNIT,
             "reservation_id": "r1"},
        ]
    )  # fmt: skip
    eventually(
        lambda: (
            db.execute(
                "SELECT balance, reserved FROM meter.accounts WHERE namespace = 'a'"
            ).fetchall()
            == [{"balance": D(5), "reserved": D(0)}]
        )
    )
    assert dead_letters(db) == []


def test_key_from_the_environment(signed_pipeline, make_producer, db, monkeypatch):
    monkeypatch.setenv(signing.KEY_ENV, signing.derive_key(SECRET, "a"))
    make_producer("a").allocate("u1", ET, 10, UNIT)
    eventually(lambda: db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 1)


@pytest.mark.parametrize(
    "case", ["unsigned", "key_of_another_namespace", "wrong_secret", "batch_unsigned"]
)
def test_unsigned_or_missigned_producer_is_refused(
    case, signed_pipeline, make_producer, db, snapshot
):
    before = tenant_tables(snapshot)
    if case == "unsigned":
        make_producer("b").allocate("u1", ET, 10, UNIT)
    elif case == "key_of_another_namespace":
        make_producer("b", signing_key=signing.derive_key(SECRET, "a")).allocate("u1", ET, 10, UNIT)
    elif case == "wrong_secret":
        make_producer("b", signing_key=signing.derive_key("guess", "b")).allocate(
            "u1", ET, 10, UNIT
        )
    else:
        make_producer("b").send_many(
            [{"op": "allocate", "user_id": "u1", "event_type": ET, "amount": 1, "unit": UNIT}] * 3
        )
    letters = eventually(lambda: dead_letters(db))
    assert [(d["namespace"], d["error_sqlstate"]) for d in letters] == [("", "MT004")]
    assert "namespace 'b'" in letters[0]["error_message"]
    assert tenant_tables(snapshot) == before


def test_crafted_messages_cannot_write_into_another_tenant(signed_pipeline, db, db_url, snapshot):
    """A holder of a's key signs messages whose events name b: all refused, whole."""
    app = signed_pipeline
    ka = signing.derive_key(SECRET, "a")
    before = tenant_tables(snapshot)
    single_b = _event("b", idempotency_key="x1")
    mixed = [_event("a", idempotency_key="x2"), _event("b", idempotency_key="x3")]
    tampered = _event("a", idempotency_key="x4")
    tampered_auth = signing.make_auth(ka, "a", tampered)
    tampered = {**tampered, "namespace": "b"}
    messages = [
        # signed by a, for a, but the event names b
        (wire.task_name("allocate"), single_b, signing.make_auth(ka, "a", single_b)),
        # a batch mixing a's and b's events: refused whole, a's event not applied either
        (wire.APPLY_BATCH, mixed, signing.make_auth(ka, "a", mixed)),
        # signed, then the namespace edited
        (wire.task_name("allocate"), tampered, tampered_auth),
        # auth claims b, signed with a's key
        (wire.task_name("allocate"), single_b, {"namespace": "b", "mac": ka}),
        # no auth at all (a stock Celery client)
        (wire.task_name("allocate"), single_b, None),
        # a forged verdict asking to file a dead letter in b
        (wire.task_name("allocate"), single_b, {"namespace": "b", "mac": "0" * 64}),
    ]
    for name, payload, auth in messages:
        send(app, name, payload, auth)
    app.send_task(
        wire.task_name("allocate"), args=(single_b,), task_id=str(uuid.uuid4()),
        kwargs={"verdict": {"sqlstate": "MT001", "message": "x", "namespace": "b"}},
    )  # fmt: skip
    letters = eventually(lambda: (rows := dead_letters(db)) and len(rows) >= 7 and rows)
    assert {(d["namespace"], d["error_sqlstate"]) for d in letters} == {("", "MT004")}
    assert len(letters) == 7
    assert tenant_tables(snapshot) == before
    # an operator retrying them all (`meter dead-letters retry --all`) applies none
    result = CliRunner().invoke(
        cli, ["dead-letters", "retry", "--all", "--database-url", db_url], catch_exceptions=False
    )
    assert "retried 0 of 7" in result.output, result.output
    assert tenant_tables(snapshot) == before


def test_a_copy_of_a_message_signed_longer_ago_than_keys_are_kept_is_refused(
    signed_pipeline, db, snapshot
):
    """A message of a's, copied from the broker and published again once its events' keys
    are pruned (35 days), would apply them again: one signed 35 days ago is a dead letter
    MT004 with the operators, and nothing is applied; one signed a day ago applies."""
    ka = signing.derive_key(SECRET, "a")
    before = tenant_tables(snapshot)
    old = _event("a", idempotency_key="r1")
    send(signed_pipeline, wire.APPLY_BATCH, [old],
         signing.make_auth(ka, "a", [old], now=time.time() - 35 * 86400))  # fmt: skip
    (letter,) = eventually(lambda: dead_letters(db))
    assert (letter["namespace"], letter["error_sqlstate"]) == ("", "MT004")
    assert (
        "signed 35.0 days ago, longer than the idempotency keys are kept"
        in (letter["error_message"])
    )
    assert tenant_tables(snapshot) == before
    recent = _event("a", idempotency_key="r2")
    send(signed_pipeline, wire.task_name("allocate"), recent,
         signing.make_auth(ka, "a", recent, now=time.time() - 86400))  # fmt: skip
    eventually(
        lambda: db.execute("SELECT balance FROM meter.accounts WHERE namespace = 'a'").fetchone()
    )
    assert len(dead_letters(db)) == 1


def test_a_signed_time_too_large_for_the_clock_is_a_dead_letter_not_lost(
    signed_pipeline, db, snapshot
):
    """``signed_at`` is covered by the MAC but chosen by the signer: one too large for a
    float (``time.time() - 10**309``) raised OverflowError out of the check, the task failed
    and its message was acked and lost, with no dead letter. It is refused (MT004, with the
    operators) like any other bad time, and nothing is applied."""
    ka = signing.derive_key(SECRET, "a")
    before = tenant_tables(snapshot)
    event = wire.dumps(_event("a", idempotency_key="huge"))
    signed_at = 10**309
    auth = {"namespace": "a", "signed_at": signed_at,
            "mac": signing.sign(ka, "a", event, signed_at)}  # fmt: skip
    send(signed_pipeline, wire.task_name("allocate"), event, auth)
    (letter,) = eventually(lambda: dead_letters(db))
    assert (letter["namespace"], letter["error_sqlstate"]) == ("", "MT004")
    assert "signed_at" in letter["error_message"]
    assert tenant_tables(snapshot) == before


def test_a_signed_batch_that_is_no_array_is_filed_with_the_operators(
    signed_pipeline, db, db_url, snapshot
):
    """A holder of a's key signs an apply_batch whose events are one object naming b. The
    tenancy test reads arrays only, and the MT001 dead letter ("takes a JSON array") was
    filed under b, holding b's event: retrying it applied it in b (found by a review)."""
    ka = signing.derive_key(SECRET, "a")
    before = tenant_tables(snapshot)
    single_b = _event("b", idempotency_key="x1")
    send(signed_pipeline, wire.APPLY_BATCH, single_b, signing.make_auth(ka, "a", single_b))
    (letter,) = eventually(lambda: dead_letters(db))
    assert (letter["namespace"], letter["error_sqlstate"]) == ("", "MT001")
    result = CliRunner().invoke(
        cli, ["dead-letters", "retry", "--all", "--database-url", db_url], catch_exceptions=False
    )
    assert "retried 0 of 1" in result.output, result.output
    assert tenant_tables(snapshot) == before


def test_dev_mode_keeps_a_message_in_one_namespace(pipeline, db, make_producer):
    """No secret: an event of a batch naming another namespace is dead-lettered alone."""
    app = pipeline
    batch = [_event("a", idempotency_key="d1"), _event("b", idempotency_key="d2"),
             _event("a", idempotency_key="d3")]  # fmt: skip
    send(app, wire.APPLY_BATCH, batch, {"namespace": "a"})
    send(app, wire.task_name("allocate"), _event("b", idempotency_key="d4"), {"namespace": "a"})
    # a message without auth (older producer): the first event's namespace is the message's
    send(app, wire.APPLY_BATCH, [_event("c", idempotency_key="d5"), _event("b")], None)
    make_producer("d").allocate("u1", ET, 1, UNIT)  # the producer's own messages still apply
    # a verdict (the worker's own retry argument) cannot file a dead letter in another tenant
    pipeline.send_task(
        wire.task_name("allocate"), args=(_event("a", idempotency_key="d6"),),
        kwargs={"auth": {"namespace": "a"}, "verdict": {"sqlstate": "MT001", "message": "x",
                                                        "namespace": "b"}},
        task_id=str(uuid.uuid4()),
    )  # fmt: skip
    eventually(lambda: len(dead_letters(db)) == 4)
    eventually(lambda: db.execute("SELECT count(*) AS n FROM meter.ledger").fetchone()["n"] == 4)
    balances = db.execute(
        "SELECT namespace, balance FROM meter.accounts ORDER BY namespace"
    ).fetchall()
    assert balances == [
        {"namespace": "a", "balance": D(14)},
        {"namespace": "c", "balance": D(7)},
        {"namespace": "d", "balance": D(1)},
    ]
    assert sorted((d["namespace"], d["error_sqlstate"]) for d in dead_letters(db)) == [
        ("", "MT001"), ("", "MT004"), ("", "MT004"), ("", "MT004")
    ]  # fmt: skip
