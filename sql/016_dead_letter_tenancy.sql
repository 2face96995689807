-- Dead letters keep to their tenant: no one can write into a namespace through one.
--
-- Why: three holes, each reproduced.
-- 1. A tenant's refused event naming another namespace (apply_events, MT004) was filed in
--    the operators' namespace '', and record_dead_letter let any caller file there. The
--    worker files crafted messages there too. retry_dead_letter then applied the payload
--    wherever it pointed: `meter dead-letters retry --all`, run by an operator, credited a
--    tenant with usage another tenant (or anyone who could publish to Redis) had invented.
-- 2. retry_dead_letter and discard_dead_letter chose rows with meter._row_visible, which
--    inside these SECURITY DEFINER functions tests the owner's rights, not the caller's: an
--    application role with no tenant set could discard (lose) any tenant's dead letter.
--
-- Now:
-- - retry_dead_letter applies an event only in the namespace its dead letter is filed under:
--   an event naming another namespace (or none) is refused with MT004, every time, and
--   stays dead for an operator to discard.
-- - Both functions require a tenant, or a privileged role with none (as _guard does: the
--   login role is what counts), and see only the tenant's rows.
-- - record_dead_letter files '' (no usable namespace) under the caller's tenant when one
--   is set, so a tenant's refused events stay its own (and its own to list); '' itself
--   takes a privileged role with no tenant.
-- Migrations once applied are never edited (the runner checks their checksums), so the
-- functions are replaced here.

-- The tenant whose dead letters the caller may handle: its tenant, or NULL (every
-- namespace) for a privileged role with none; MT004 for anyone else.
CREATE FUNCTION meter._dead_letter_scope() RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
    IF v_tenant IS NULL AND NOT meter._is_privileged(session_user) THEN
        RAISE EXCEPTION 'namespace: no tenant is set for role %', session_user
            USING ERRCODE = 'MT004', COLUMN = 'namespace',
                  HINT = 'Call meter.set_tenant(''<namespace>'') first.';
    END IF;
    RETURN v_tenant;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._dead_letter_scope() FROM PUBLIC;

CREATE OR REPLACE FUNCTION meter.record_dead_letter(p_op text, p_payload jsonb,
                                                    p_error_sqlstate text, p_error_message text,
                                                    p_source text DEFAULT NULL,
                                                    p_namespace text DEFAULT 'default')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id bigint;
    v_namespace text := coalesce(p_namespace, '');
BEGIN
    IF v_namespace = '' THEN
        -- a tenant's dead letters stay in its namespace; '' is a privileged role's
        v_namespace := coalesce(meter._dead_letter_scope(), '');
    ELSIF NOT meter._tenant_ok(v_namespace) THEN
        PERFORM meter._guard(v_namespace);
    END IF;
    IF p_source IS NOT NULL THEN
        UPDATE meter.dead_letters d
        SET attempts = d.attempts + 1, last_failed_at = now(),
            error_sqlstate = p_error_sqlstate, error_message = p_error_message
        WHERE d.namespace = v_namespace AND d.source = p_source AND d.status = 'dead'
        RETURNING d.dead_letter_id INTO v_id;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    INSERT INTO meter.dead_letters (namespace, op, payload, error_sqlstate, error_message, source)
    VALUES (v_namespace, coalesce(p_op, '?'), coalesce(p_payload, 'null'::jsonb),
            p_error_sqlstate, p_error_message, p_source)
    RETURNING dead_letter_id INTO v_id;
    RETURN v_id;
END
$$;

-- Re-apply a dead letter's payload. On success it is marked 'retried'; otherwise its
-- attempts grow and it stays 'dead'. An event that names a namespace other than the one
-- its dead letter is filed under is never applied (MT004).
CREATE OR REPLACE FUNCTION meter.retry_dead_letter(p_dead_letter_id bigint)
RETURNS TABLE (ok boolean, status text, result jsonb, error_sqlstate text, error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v meter.dead_letters;
    v_one jsonb;
    v_scope text := meter._dead_letter_scope();
BEGIN
    SELECT * INTO v FROM meter.dead_letters d
    WHERE d.dead_letter_id = p_dead_letter_id AND d.status = 'dead'
      AND (v_scope IS NULL OR d.namespace = v_scope)
    FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM meter._fail('MT003', 'dead_letter_id',
                            format('no dead letter %s waiting to be retried', p_dead_letter_id));
    END IF;
    IF jsonb_typeof(v.payload) = 'object'
       AND v.payload->>'namespace' IS DISTINCT FROM v.namespace THEN
        -- A tenant's event for another tenant, or a message the worker refused: applying
        -- it would write where its sender was not allowed to.
        ok := false;
        status := 'error';
        error_sqlstate := 'MT004';
        error_message := format('namespace: the event names %s but its dead letter is filed'
                                ' under %s; it is never retried (discard it)',
                                coalesce(quote_literal(v.payload->>'namespace'), 'no namespace'),
                                quote_literal(v.namespace));
    ELSE
        BEGIN
            v_one := meter._apply_one(v.payload);
            ok := v_one->>'status' <> 'not_found';
            status := v_one->>'status';
            result := v_one->'result';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS error_sqlstate = RETURNED_SQLSTATE,
                                    error_message = MESSAGE_TEXT;
            ok := false;
            status := 'error';
        END;
    END IF;
    IF ok THEN
        UPDATE meter.dead_letters d SET status = 'retried', resolved_at = now()
        WHERE d.namespace = v.namespace AND d.dead_letter_id = v.dead_letter_id;
    ELSE
        UPDATE meter.dead_letters d
        SET attempts = d.attempts + 1, last_failed_at = now(),
            error_sqlstate = coalesce(retry_dead_letter.error_sqlstate, 'MT003'),
            error_message = coalesce(retry_dead_letter.error_message, 'reservation not found')
        WHERE d.namespace = v.namespace AND d.dead_letter_id = v.dead_letter_id;
    END IF;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION meter.discard_dead_letter(p_dead_letter_id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_scope text := meter._dead_letter_scope();
BEGIN
    UPDATE meter.dead_letters d SET status = 'discarded', resolved_at = now()
    WHERE d.dead_letter_id = p_dead_letter_id AND d.status = 'dead'
      AND (v_scope IS NULL OR d.namespace = v_scope);
    RETURN FOUND;
END
$$;
