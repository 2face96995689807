-- Validation, errors, and the tenant/actor context.
--
-- Every refusal is raised with a Meter SQLSTATE (docs/internals.md), a message that starts
-- with the parameter's name (without `p_`), and that name in the error's COLUMN field.
-- Validation runs before anything is locked or written, so a refused call changes nothing.

CREATE FUNCTION meter._fail(p_code text, p_param text, p_message text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_param || ': ' || p_message,
                          COLUMN = p_param;
END
$$;

-- Identifiers (Appendix C): bounded length, no control characters, no leading or trailing
-- (Unicode) white space, non-empty. The rule itself, as an inlinable boolean for set-based
-- checks and for the API functions' fast path; NULL for NULL.
-- ASCII fast path: printable ASCII with no space at either end satisfies every part of the
-- rule but the length, and one anchored regex decides it (~0.2 us against ~1.3 us for the
-- three Unicode-aware ones, which run only for other strings).
CREATE FUNCTION meter._ident_ok(p_value text, p_max integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_value ~ '^[!-~]([ -~]*[!-~])?$' THEN length(p_value) <= p_max
        ELSE length(p_value) BETWEEN 1 AND p_max
             AND p_value !~ '[\x01-\x1f\x7f-\x9f]'
             AND p_value !~ '^[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
             AND p_value !~ '[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
    END
$$;

-- The ASCII part of that rule alone, for the API functions' fast path: true for printable
-- ASCII of 1..p_max characters with no space at either end, false (or NULL) for anything
-- else, valid or not -- the caller then checks the full rule. Kept this small because an
-- API function's fast-path expression is set up afresh in every transaction, at a cost that
-- grows with its size.
CREATE FUNCTION meter._plain_ok(p_value text, p_max integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value ~ '^[!-~]([ -~]*[!-~])?$' AND length(p_value) <= p_max
$$;

-- The same rule, raising a message that says which part failed. Returns the value; NULL
-- only when p_nullable.
CREATE FUNCTION meter._ident(p_param text, p_value text, p_max integer,
                             p_nullable boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        IF p_nullable THEN
            RETURN NULL;
        END IF;
        PERFORM meter._fail('MT001', p_param, 'is required');
    END IF;
    IF p_value = '' THEN
        PERFORM meter._fail('MT001', p_param, 'must not be empty');
    END IF;
    IF meter._ident_ok(p_value, p_max) THEN
        RETURN p_value;
    END IF;
    IF length(p_value) > p_max THEN
        PERFORM meter._fail('MT001', p_param,
            format('is %s characters long; at most %s are allowed', length(p_value), p_max));
    END IF;
    IF p_value ~ '[\x01-\x1f\x7f-\x9f]' THEN
        PERFORM meter._fail('MT001', p_param, 'must not contain control characters');
    END IF;
    IF p_value ~ '^[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
       OR p_value ~ '[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$' THEN
        PERFORM meter._fail('MT001', p_param, 'must not start or end with white space');
    END IF;
    PERFORM meter._fail('MT001', p_param, 'is not a valid identifier');
END
$$;

-- resource: NULL and '' both mean "no resource", stored as ''.
CREATE FUNCTION meter._resource(p_value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR p_value = '' THEN
        RETURN '';
    END IF;
    RETURN meter._ident('resource', p_value, 256);
END
$$;

-- Amounts: finite, at most 24 digits before and 12 after the point (after trailing zeros
-- are removed), and the sign the operation needs. Returns the value with trailing zeros
-- removed, which is how amounts are stored and compared.
CREATE FUNCTION meter._amount(p_param text, p_value numeric, p_rule text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v numeric;
BEGIN
    IF p_value IS NULL THEN
        PERFORM meter._fail('MT001', p_param, 'is required');
    END IF;
    IF p_value = 'NaN'::numeric OR p_value = 'Infinity'::numeric
       OR p_value = '-Infinity'::numeric THEN
        PERFORM meter._fail('MT001', p_param, format('must be a finite number, got %s', p_value));
    END IF;
    v := trim_scale(p_value);
    IF scale(v) > 12 THEN
        PERFORM meter._fail('MT001', p_param,
            format('has %s digits after the decimal point; at most 12 are allowed', scale(v)));
    END IF;
    IF abs(v) >= 1e24 THEN
        PERFORM meter._fail('MT001', p_param,
            'has more than 24 digits before the decimal point');
    END IF;
    IF (p_rule = 'positive' AND v <= 0) THEN
        PERFORM meter._fail('MT001', p_param, format('must be greater than 0, got %s', v));
    ELSIF (p_rule = 'nonnegative' AND v < 0) THEN
        PERFORM meter._fail('MT001', p_param, format('must not be negative, got %s', v));
    ELSIF (p_rule = 'nonzero' AND v = 0) THEN
        PERFORM meter._fail('MT001', p_param, 'must not be 0');
    END IF;
    RETURN v;
END
$$;

-- The amount rule as an inlinable boolean for set-based checks (meter.apply_events) and
-- the API functions' fast path.
CREATE FUNCTION meter._amount_ok(p_value numeric, p_rule text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_value IS NULL OR p_value IN ('NaN', 'Infinity', '-Infinity') THEN false
        ELSE scale(trim_scale(p_value)) <= 12 AND abs(p_value) < 1e24
             AND CASE p_rule WHEN 'positive' THEN p_value > 0
                             WHEN 'nonnegative' THEN p_value >= 0
                             WHEN 'nonzero' THEN p_value <> 0
                             ELSE true END
    END
$$;

-- metadata: NULL or a JSON object whose text is at most 64 KiB.
CREATE FUNCTION meter._metadata(p_value jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_value) <> 'object' THEN
        PERFORM meter._fail('MT001', 'metadata',
            format('must be a JSON object, got %s', jsonb_typeof(p_value)));
    END IF;
    IF octet_length(p_value::text) > 65536 THEN
        PERFORM meter._fail('MT001', 'metadata',
            format('is %s bytes as JSON text; at most 65536 are allowed',
                   octet_length(p_value::text)));
    END IF;
    RETURN p_value;
END
$$;

-- The fast path's amount check: true only for an amount that meter._amount accepts as it is
-- (at most 12 digits after the point, below 1e24, the rule's sign); NaN and infinities are
-- false or NULL. Anything else goes through meter._amount. Inlinable; with p_rule a
-- constant, the planner keeps only its branch.
CREATE FUNCTION meter._amount_plain(p_value numeric, p_rule text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT scale(p_value) <= 12 AND CASE p_rule
        WHEN 'positive' THEN p_value > 0 AND p_value < 1e24
        WHEN 'nonnegative' THEN p_value >= 0 AND p_value < 1e24
        WHEN 'nonzero' THEN p_value <> 0 AND abs(p_value) < 1e24
        ELSE false
    END
$$;

-- metadata's rule as an inlinable boolean (the API functions' fast path); NULL is valid.
CREATE FUNCTION meter._metadata_ok(p_value jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value IS NULL
        OR (jsonb_typeof(p_value) = 'object' AND octet_length(p_value::text) <= 65536)
$$;

-- A point in time that a ledger row will be dated at: not more than 24 hours ahead of the
-- database clock, not before 1900; its month's ledger partition is created if missing.
-- Call it before locking any account (creating a partition locks the ledger's parent).
-- Once the current month's partition is known to exist, the session remembers it in the
-- setting meter.ledger_month (YYYY_MM, UTC), so that undated writes can skip this function
-- (meter._now_ok). Only the current month is remembered: meter.drop_old_partitions never
-- drops it, and a rolled-back creation rolls the setting back with it.
CREATE FUNCTION meter._ledger_time(p_param text, p_value timestamptz) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v timestamptz := coalesce(p_value, now());
    v_month text := to_char(coalesce(p_value, now()) AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF p_value IS NOT NULL THEN
        IF p_value > now() + interval '24 hours' THEN
            PERFORM meter._fail('MT001', p_param,
                format('%s is more than 24 hours in the future', p_value));
        END IF;
        IF p_value < timestamptz '1900-01-01 00:00:00+00' THEN
            PERFORM meter._fail('MT001', p_param, format('%s is before 1900', p_value));
        END IF;
    END IF;
    IF to_regclass('meter.ledger_' || v_month) IS NULL THEN
        PERFORM meter.create_partition(extract(year FROM v AT TIME ZONE 'UTC')::integer,
                                       extract(month FROM v AT TIME ZONE 'UTC')::integer);
    END IF;
    IF v_month = to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM') THEN
        PERFORM set_config('meter.ledger_month', v_month, false);
    END IF;
    RETURN v;
END
$$;

-- Whether the current month's ledger partition is known to exist in this session (see
-- meter._ledger_time): an undated write may then use now() without calling it. Inlinable.
CREATE FUNCTION meter._now_ok() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('meter.ledger_month', true)
                    = to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM'), false)
$$;

-- Whether a caller's limit is sane: NULL means p_default, below 1 is refused, above p_max is
-- capped.
CREATE FUNCTION meter._limit(p_param text, p_value integer, p_default integer,
                             p_max integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL THEN
        RETURN p_default;
    END IF;
    IF p_value < 1 THEN
        PERFORM meter._fail('MT001', p_param, format('must be at least 1, got %s', p_value));
    END IF;
    RETURN least(p_value, p_max);
END
$$;

------------------------------------------------------------------------------------------
-- Tenant context.
--
-- API functions call meter._guard(p_namespace) first. When a tenant is set (meter.tenant)
-- it must equal p_namespace. When none is set, only privileged callers (superuser, schema
-- owner, member of meter_maintenance) may proceed: for everyone else the call is refused
-- loudly rather than answered with another tenant's data or silent zeros. session_user is
-- checked because inside a SECURITY DEFINER function current_user is the owner.
-- Whether the caller may act in p_namespace (the rule of meter._guard, without raising).
CREATE FUNCTION meter._tenant_ok(p_namespace text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN nullif(current_setting('meter.tenant', true), '') IS NOT NULL
            THEN current_setting('meter.tenant', true) = p_namespace
        ELSE meter._is_privileged(session_user)
    END
$$;

-- The API functions' fast path: true when the tenant is set to p_namespace and the account
-- key is plain ASCII (meter._plain_ok; p_pool: user_id may be NULL); false or NULL
-- otherwise, and the caller then runs meter._guard and the validators one by one, which
-- accept what is valid and refuse the rest precisely. Inlinable: the whole check is one
-- expression of the caller.
CREATE FUNCTION meter._fast_ok(p_namespace text, p_user_id text, p_pool boolean,
                               p_event_type text, p_unit text, p_resource text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT current_setting('meter.tenant', true) = p_namespace
       AND meter._plain_ok(p_namespace, 1024)
       AND (meter._plain_ok(p_user_id, 256) OR (p_pool AND p_user_id IS NULL))
       AND meter._plain_ok(p_event_type, 256)
       AND meter._plain_ok(p_unit, 64)
       AND (p_resource IS NULL OR p_resource = '' OR meter._plain_ok(p_resource, 256))
$$;

CREATE FUNCTION meter._guard(p_namespace text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
    IF v_tenant = p_namespace AND meter._ident_ok(p_namespace, 1024) THEN
        RETURN;  -- the common case, decided in one expression
    END IF;
    PERFORM meter._ident('namespace', p_namespace, 1024);
    IF v_tenant IS NOT NULL THEN
        IF v_tenant = p_namespace THEN
            RETURN;
        END IF;
        RAISE EXCEPTION 'namespace: % is not the current tenant %', p_namespace, v_tenant
            USING ERRCODE = 'MT004', COLUMN = 'namespace';
    END IF;
    IF meter._is_privileged(session_user) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'namespace: no tenant is set for role %', session_user
        USING ERRCODE = 'MT004', COLUMN = 'namespace',
              HINT = 'Call meter.set_tenant(''<namespace>'') first.';
END
$$;

-- The actor context of the current call, as individual settings (transaction-local when
-- set by meter.ctx, session-wide when set by meter.set_actor).
CREATE FUNCTION meter._actor() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT nullif(jsonb_strip_nulls(jsonb_build_object(
        'actor_id',     nullif(current_setting('meter.actor_id', true), ''),
        'on_behalf_of', nullif(current_setting('meter.on_behalf_of', true), ''),
        'reason',       nullif(current_setting('meter.reason', true), ''),
        'request_id',   nullif(current_setting('meter.request_id', true), ''))), '{}')
$$;

CREATE FUNCTION meter._set_actor(p_actor_id text, p_request_id text, p_on_behalf_of text,
                                 p_reason text, p_local boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('meter.actor_id',
                       coalesce(meter._ident('actor_id', nullif(p_actor_id, ''), 256, true), ''),
                       p_local),
            set_config('meter.request_id',
                       coalesce(meter._ident('request_id', nullif(p_request_id, ''), 256, true), ''),
                       p_local),
            set_config('meter.on_behalf_of',
                       coalesce(meter._ident('on_behalf_of', nullif(p_on_behalf_of, ''), 256, true), ''),
                       p_local),
            set_config('meter.reason',
                       coalesce(meter._ident('reason', nullif(p_reason, ''), 256, true), ''),
                       p_local);
END
$$;

-- The context functions below except meter.ctx are SECURITY DEFINER only so that they may
-- call the internal validators, which no role is granted; the settings they write are the
-- caller's own.

-- The actor part of meter.ctx: validate and set the actor context for the current
-- transaction only. Returns true.
CREATE FUNCTION meter.ctx_actor(p_actor_id text, p_request_id text, p_on_behalf_of text,
                                p_reason text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._set_actor(p_actor_id, p_request_id, p_on_behalf_of, p_reason, true);
    RETURN true;
END
$$;

-- The SDK's per-call context: sets tenant and actor for the current transaction only and
-- returns the namespace, so that it can be passed as an API function's p_namespace and is
-- thereby evaluated before that function runs (one statement, one round trip).
-- The namespace is not validated here: the API function it feeds checks it (meter._guard).
-- A plain SQL expression (no SECURITY DEFINER, no SET) so that the planner inlines it into
-- the calling statement: with no actor given and none set, it is one set_config call. With
-- an actor (or one to clear), meter.ctx_actor validates and sets it. Every name is
-- schema-qualified because an inlined body is parsed under the caller's search_path.
CREATE FUNCTION meter.ctx(p_namespace text, p_actor_id text DEFAULT NULL,
                          p_request_id text DEFAULT NULL, p_on_behalf_of text DEFAULT NULL,
                          p_reason text DEFAULT NULL) RETURNS text
LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN pg_catalog.set_config('meter.tenant', coalesce(p_namespace, ''), true) IS NULL
            THEN NULL  -- never: set_config returns the value set
        WHEN pg_catalog.concat(p_actor_id, p_request_id, p_on_behalf_of, p_reason,
                               pg_catalog.current_setting('meter.actor_id', true),
                               pg_catalog.current_setting('meter.request_id', true),
                               pg_catalog.current_setting('meter.on_behalf_of', true),
                               pg_catalog.current_setting('meter.reason', true))
             OPERATOR(pg_catalog.=) ''
            THEN p_namespace
        WHEN meter.ctx_actor(p_actor_id, p_request_id, p_on_behalf_of, p_reason)
            THEN p_namespace
    END
$$;

-- Set the tenant for the rest of the session (row-level security and API checks).
CREATE FUNCTION meter.set_tenant(p_tenant_id text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('meter.tenant', meter._ident('tenant_id', p_tenant_id, 1024), false);
END
$$;

CREATE FUNCTION meter.clear_tenant() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('meter.tenant', '', false);
END
$$;

-- Set the actor context for the rest of the session; recorded with every ledger entry,
-- reservation transition and period change.
CREATE FUNCTION meter.set_actor(p_actor_id text, p_request_id text DEFAULT NULL,
                                p_on_behalf_of text DEFAULT NULL, p_reason text DEFAULT NULL)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT meter._set_actor(p_actor_id, p_request_id, p_on_behalf_of, p_reason, false)
$$;

CREATE FUNCTION meter.clear_actor() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT meter._set_actor(NULL, NULL, NULL, NULL, false)
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
