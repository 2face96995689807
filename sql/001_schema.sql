-- Meter schema: tables, indexes, row-level security and the ledger's immutability.
--
-- Invariants kept by the functions in the later files (and checked by meter.reconcile):
--   accounts.balance  = ledger_checkpoints.balance + sum(ledger.amount)      per account
--   accounts.reserved = sum(reservations.amount WHERE status = 'active')   per account
--   accounts.total_credited - accounts.total_debited = accounts.balance
-- Every unique key starts with `namespace`, so the schema can be distributed by namespace.
-- No foreign keys: every write goes through meter.* functions that keep the references.

CREATE SCHEMA IF NOT EXISTS meter;

-- Functions are not callable by PUBLIC: every migration ends by revoking EXECUTE from
-- PUBLIC (per-schema default privileges cannot take away the global default), and
-- sql/roles.sql grants what each role may call.

-- One row per (namespace, user, event type, resource, unit). user_id NULL is the namespace
-- pool; resource '' is "no resource". The key is enforced by the expression index below so
-- that the pool (NULL) is one account, not many.
CREATE TABLE meter.accounts (
    namespace         text        NOT NULL,
    account_id        bigint      GENERATED ALWAYS AS IDENTITY,
    user_id           text,
    event_type        text        NOT NULL,
    resource          text        NOT NULL DEFAULT '',
    unit              text        NOT NULL,
    balance           numeric     NOT NULL DEFAULT 0,
    reserved          numeric     NOT NULL DEFAULT 0,
    total_credited    numeric     NOT NULL DEFAULT 0,
    total_debited     numeric     NOT NULL DEFAULT 0,
    period_start      date,
    period_allocation numeric,
    carry_over_limit  numeric,
    period_interval   interval,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, account_id),
    -- One constraint rather than one per column: PostgreSQL re-reads and prepares every
    -- CHECK expression of a table in each statement that writes it (the hot path's UPDATE).
    CONSTRAINT accounts_nonnegative
        CHECK (reserved >= 0 AND total_credited >= 0 AND total_debited >= 0)
);
CREATE UNIQUE INDEX accounts_key
    ON meter.accounts (namespace, (coalesce(user_id, '')), event_type, resource, unit);

-- The sign an entry type requires (constraint ledger_sign). A function rather than the
-- CASE written out in the constraint: PostgreSQL re-reads and prepares a table's CHECK
-- expressions in every statement that inserts into it, and a CASE over five entry types
-- cost ~6% of a consume's server time that way; a call of this function is one node.
CREATE FUNCTION meter._ledger_sign_ok(p_entry_type text, p_amount numeric) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN CASE p_entry_type
        WHEN 'allocation'  THEN p_amount > 0
        WHEN 'carry_over'  THEN p_amount > 0
        WHEN 'consumption' THEN p_amount < 0
        WHEN 'expiration'  THEN p_amount < 0
        WHEN 'adjustment'  THEN p_amount <> 0
        ELSE false
    END;
END
$$;

-- The ledger: one immutable row per balance change, partitioned by month of event_time
-- (UTC). Partitions are created by meter.create_partition, on demand for backdated events.
CREATE SEQUENCE meter.ledger_id_seq AS bigint;
CREATE TABLE meter.ledger (
    id              bigint      NOT NULL DEFAULT nextval('meter.ledger_id_seq'),
    namespace       text        NOT NULL,
    account_id      bigint      NOT NULL,
    user_id         text,
    event_type      text        NOT NULL,
    resource        text        NOT NULL,
    unit            text        NOT NULL,
    entry_type      text        NOT NULL,
    amount          numeric     NOT NULL,
    balance_after   numeric     NOT NULL,
    event_time      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    reservation_id  text,
    reference_id    bigint,
    actor_id        text,
    on_behalf_of    text,
    reason          text,
    request_id      text,
    metadata        jsonb,
    PRIMARY KEY (namespace, id, event_time),
    CONSTRAINT ledger_sign CHECK (meter._ledger_sign_ok(entry_type, amount))
) PARTITION BY RANGE (event_time);
ALTER SEQUENCE meter.ledger_id_seq OWNED BY meter.ledger.id;
-- Serves get_ledger (newest first), get_usage and reconcile per account.
CREATE INDEX ledger_account_time ON meter.ledger (account_id, event_time, id);

-- Holds. Not ledger entries: only commit writes a ledger row.
CREATE TABLE meter.reservations (
    namespace           text        NOT NULL,
    reservation_id      text        NOT NULL,
    account_id          bigint      NOT NULL,
    user_id             text        NOT NULL,
    event_type          text        NOT NULL,
    resource            text        NOT NULL,
    unit                text        NOT NULL,
    amount              numeric     NOT NULL CHECK (amount > 0),
    status              text        NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'committed', 'released', 'expired')),
    ttl_seconds         integer     NOT NULL,
    expires_at          timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    actual_amount       numeric,
    entry_id            bigint,
    idempotency_key     text,
    metadata            jsonb,
    request_hash        text        NOT NULL,   -- what a replay of the reserve must match
    reserve_result      jsonb       NOT NULL,   -- what a replay of the reserve returns
    commit_request_hash text,
    commit_result       jsonb,
    actor               jsonb,                  -- context of the reserve
    completed_actor     jsonb,                  -- context of the commit/release/expiry
    PRIMARY KEY (namespace, reservation_id)
);
-- The expiry sweep's queue.
CREATE INDEX reservations_due ON meter.reservations (expires_at) WHERE status = 'active';

-- Idempotency keys, written in the same transaction as their effect. Only effects claim a
-- key: refusals store nothing, so a retry is evaluated afresh.
CREATE TABLE meter.idempotency_keys (
    namespace      text        NOT NULL,
    key            text        NOT NULL,
    operation      text        NOT NULL,
    request_hash   text        NOT NULL,
    result         jsonb       NOT NULL,
    account_id     bigint,
    reservation_id text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);

-- Billing periods, one row per period of an account: opened by open_period, closed by
-- close_period. A close with no recorded open gets a row with period_start NULL.
CREATE TABLE meter.periods (
    namespace       text        NOT NULL,
    period_id       bigint      GENERATED ALWAYS AS IDENTITY,
    account_id      bigint      NOT NULL,
    user_id         text,
    event_type      text        NOT NULL,
    resource        text        NOT NULL,
    unit            text        NOT NULL,
    period_start    date,
    period_end      date,
    allocation      numeric,
    open_balance    numeric,
    open_entry_id   bigint,
    expired         numeric,
    carried_over    numeric,
    close_balance   numeric,
    opened_at       timestamptz,
    closed_at       timestamptz,
    opened_actor    jsonb,
    closed_actor    jsonb,
    PRIMARY KEY (namespace, period_id),
    UNIQUE (namespace, account_id, period_start),
    UNIQUE (namespace, account_id, period_end)
);

CREATE TABLE meter.period_config_changes (
    namespace         text        NOT NULL,
    change_id         bigint      GENERATED ALWAYS AS IDENTITY,
    account_id        bigint      NOT NULL,
    user_id           text,
    event_type        text        NOT NULL,
    resource          text        NOT NULL,
    unit              text        NOT NULL,
    period_start      date        NOT NULL,
    period_allocation numeric     NOT NULL,
    carry_over_limit  numeric,
    period_interval   interval    NOT NULL,
    changed_at        timestamptz NOT NULL DEFAULT now(),
    actor             jsonb,
    PRIMARY KEY (namespace, change_id)
);

-- What retention folded away: the sum of the dropped ledger rows per account, so that
-- balance = checkpoint + sum(remaining ledger rows) stays true.
CREATE TABLE meter.ledger_checkpoints (
    namespace  text        NOT NULL,
    account_id bigint      NOT NULL,
    balance    numeric     NOT NULL,
    entries    bigint      NOT NULL,
    through    timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, account_id)
);

------------------------------------------------------------------------------------------
-- Immutability: the ledger refuses UPDATE, DELETE and TRUNCATE, for every role.
-- Row triggers on the partitioned parent are cloned to every partition; TRUNCATE triggers
-- are not, so meter.create_partition adds one to each partition it creates.
CREATE FUNCTION meter._refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'meter.ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'MT005',
              HINT = 'Correct a balance with meter.adjust; drop old months with meter.drop_old_partitions.';
END
$$;

CREATE TRIGGER ledger_immutable BEFORE UPDATE OR DELETE ON meter.ledger
    FOR EACH ROW EXECUTE FUNCTION meter._refuse_change();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON meter.ledger
    FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_change();

------------------------------------------------------------------------------------------
-- Row-level security. The API functions are SECURITY DEFINER and check the tenant
-- themselves (meter._guard); these policies govern direct reads by other roles.

-- Whether `p_role` may act across namespaces: a superuser, a BYPASSRLS role, the owner of
-- the schema, or a member of meter_maintenance (membership, not attributes, so a login role
-- granted meter_maintenance qualifies).
CREATE FUNCTION meter._is_privileged(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(r.rolsuper OR r.rolbypassrls), false)
        OR pg_has_role(p_role, (SELECT nspowner FROM pg_namespace WHERE nspname = 'meter'), 'USAGE')
        OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance')
            AND pg_has_role(p_role, 'meter_maintenance', 'USAGE'))
    FROM pg_roles r WHERE r.rolname = p_role
$$;

-- Row visibility for direct reads: the tenant's rows; all rows for privileged roles; an
-- error (never silent emptiness) for anyone else with no tenant set.
CREATE FUNCTION meter._row_visible(p_namespace text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
    IF v_tenant IS NOT NULL THEN
        RETURN p_namespace = v_tenant;
    END IF;
    IF meter._is_privileged(current_user) THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION 'namespace: no tenant is set for role %', current_user
        USING ERRCODE = 'MT004', COLUMN = 'namespace',
              HINT = 'Call meter.set_tenant(''<namespace>'') first.';
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'ledger', 'reservations', 'idempotency_keys',
                             'periods', 'period_config_changes', 'ledger_checkpoints']
    LOOP
        EXECUTE format('ALTER TABLE meter.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_rows ON meter.%I USING (meter._row_visible(namespace))', t);
    END LOOP;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
