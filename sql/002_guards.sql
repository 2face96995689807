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
-- checks; NULL for NULL.
CREATE FUNCTION meter._ident_ok(p_value text, p_max integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT length(p_value) BETWEEN 1 AND p_max
       AND p_value !~ '[\x01-\x1f\x7f-\x9f]'
       AND p_value !~ '^[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
       AND p_value !~ '[ \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
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

-- The amount rule as an inlinable boolean for set-based checks (meter.apply_events).
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

-- A point in time that a ledger row will be dated at: not more than 24 hours ahead of the
-- database clock, not before 1900; its month's ledger partition is created if missing.
-- Call it before locking any account (creating a partition locks the ledger's parent).
CREATE FUNCTION meter._ledger_time(p_param text, p_value timestamptz) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v timestamptz := coalesce(p_value, now());
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
    IF to_regclass('meter.ledger_' || to_char(v AT TIME ZONE 'UTC', 'YYYY_MM')) IS NULL THEN
        PERFORM meter.create_partition(extract(year FROM v AT TIME ZONE 'UTC')::integer,
                                       extract(month FROM v AT TIME ZONE 'UTC')::integer);
    END IF;
    RETURN v;
END
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

CREATE FUNCTION meter._guard(p_namespace text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
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

-- The context functions below are SECURITY DEFINER only so that they may call the internal
-- validators, which no role is granted; the settings they write are the caller's own.

-- The SDK's per-call context: sets tenant and actor for the current transaction only and
-- returns the namespace, so that it can be passed as an API function's p_namespace and is
-- thereby evaluated before that function runs (one statement, one round trip).
CREATE FUNCTION meter.ctx(p_namespace text, p_actor_id text DEFAULT NULL,
                          p_request_id text DEFAULT NULL, p_on_behalf_of text DEFAULT NULL,
                          p_reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- not validated here: the API function it feeds checks it in meter._guard
    PERFORM set_config('meter.tenant', coalesce(p_namespace, ''), true);
    IF p_actor_id IS NOT NULL OR p_request_id IS NOT NULL OR p_on_behalf_of IS NOT NULL
       OR p_reason IS NOT NULL
       OR current_setting('meter.actor_id', true) <> ''
       OR current_setting('meter.request_id', true) <> ''
       OR current_setting('meter.on_behalf_of', true) <> ''
       OR current_setting('meter.reason', true) <> '' THEN
        PERFORM meter._set_actor(p_actor_id, p_request_id, p_on_behalf_of, p_reason, true);
    END IF;
    RETURN p_namespace;
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
