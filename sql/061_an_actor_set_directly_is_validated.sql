-- An actor context set directly (SET meter.actor_id = ...) is held to the rules of
-- meter.set_actor before anything records it.
--
-- Why (found by a review of tenancy and the audit trail, reproduced as a meter_app login):
-- the actor context lives in four plain settings (meter.actor_id, request_id, on_behalf_of,
-- reason). meter.set_actor and meter.ctx validate what they set (Appendix C: 0..256
-- characters, no control characters, no white space at either end), but any role may set
-- a custom setting itself, and the API functions copied whatever the settings held into
-- the ledger (which no one may change afterwards), the reservations, periods and config
-- changes. `SET meter.on_behalf_of = E'x\nforged line'` and a 100 000-character reason
-- went into ledger rows and get_audit_events as they were.
--
-- Now every write checks the four settings where it checks its caller's tenant:
-- meter._fast_ok (the API functions' fast path), commit's own fast path, meter._guard
-- (the slow paths and every other function taking a namespace), meter._tenant_ok
-- (apply_events, record_dead_letter) and meter._require_maintenance (the cluster-wide
-- roll). Reads that go through meter._guard (get_ledger, get_usage, get_account,
-- get_audit_events, ...) refuse an invalid context too, though they record nothing;
-- get_balance on its own fast path does not look at it. A value set_actor would refuse
-- is refused with its error (MT001 naming the setting as set_actor's parameter), before
-- anything is locked or written. With no actor set the check is one comparison of the
-- four settings' concatenation with ''; with a printable ASCII one (what the SDK sets),
-- four anchored regexes (about 2 us a call, where the full rule per setting cost 10).
--
-- Locks: none (settings only). The helpers replaced keep their signatures, so every
-- function calling them (and those that inline them) picks the check up unchanged.
--
-- Migrations once applied are never edited: 002's and 009's helpers and 030's commit are
-- replaced whole; only the lines marked 061 changed.

-- 061: each setting by the rule of meter._set_actor; raises its error, else true.
CREATE FUNCTION meter._actor_settings_ok() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_name text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['actor_id', 'request_id', 'on_behalf_of', 'reason'] LOOP
        PERFORM meter._ident(v_name, nullif(current_setting('meter.' || v_name, true), ''),
                             256, true);
    END LOOP;
    RETURN true;
END
$$;

-- 061: true when the actor context is empty or valid; raises as set_actor would otherwise.
-- Inlinable: with no actor set it is one comparison in the caller's expression, with a
-- printable ASCII one (as the SDK sets) four anchored regexes (meter._plain_ok); only
-- anything else goes through meter._actor_settings_ok.
CREATE FUNCTION meter._actor_ok() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN concat(current_setting('meter.actor_id', true),
                    current_setting('meter.request_id', true),
                    current_setting('meter.on_behalf_of', true),
                    current_setting('meter.reason', true)) = ''
            THEN true
        WHEN coalesce(meter._plain_ok(nullif(current_setting('meter.actor_id', true), ''),
                                      256), true)
         AND coalesce(meter._plain_ok(nullif(current_setting('meter.request_id', true), ''),
                                      256), true)
         AND coalesce(meter._plain_ok(nullif(current_setting('meter.on_behalf_of', true), ''),
                                      256), true)
         AND coalesce(meter._plain_ok(nullif(current_setting('meter.reason', true), ''),
                                      256), true)
            THEN true
        ELSE meter._actor_settings_ok()
    END
$$;

-- Whether the caller may act in p_namespace (the rule of meter._guard, without raising).
CREATE OR REPLACE FUNCTION meter._tenant_ok(p_namespace text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT meter._actor_ok()  -- 061
       AND CASE
        WHEN nullif(current_setting('meter.tenant', true), '') IS NOT NULL
            THEN current_setting('meter.tenant', true) = p_namespace
        ELSE meter._is_privileged(session_user)
    END
$$;

-- The API functions' fast path: true when the tenant is set to p_namespace and the account
-- key is plain ASCII (meter._plain_ok; p_pool: user_id may be NULL); false or NULL
-- otherwise, and the caller then runs meter._guard and the validators one by one, which
-- accept what is valid and refuse the rest precisely. Inlinable: the whole check is one
-- expression of the caller. An invalid actor context raises here (061).
CREATE OR REPLACE FUNCTION meter._fast_ok(p_namespace text, p_user_id text, p_pool boolean,
                                          p_event_type text, p_unit text, p_resource text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT current_setting('meter.tenant', true) = p_namespace
       AND meter._plain_ok(p_namespace, 1024)
       AND (meter._plain_ok(p_user_id, 256) OR (p_pool AND p_user_id IS NULL))
       AND meter._plain_ok(p_event_type, 256)
       AND meter._plain_ok(p_unit, 64)
       AND (p_resource IS NULL OR p_resource = '' OR meter._plain_ok(p_resource, 256))
       AND meter._actor_ok()  -- 061
$$;

CREATE OR REPLACE FUNCTION meter._guard(p_namespace text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
    PERFORM meter._actor_ok();  -- 061
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

-- Refuse a caller who may not run cluster-wide maintenance (MT004; p_what says what).
CREATE OR REPLACE FUNCTION meter._require_maintenance(p_what text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
       OR NOT meter._is_privileged(session_user) THEN
        RAISE EXCEPTION 'namespace: % needs a privileged role (meter_maintenance) and no tenant',
                        p_what
            USING ERRCODE = 'MT004', COLUMN = 'namespace';
    END IF;
    PERFORM meter._actor_ok();  -- 061
END
$$;

-- commit has a fast path of its own (030), without meter._fast_ok; replaced whole.
-- commit: consume the actual amount of a hold and return the hold.
--   active, before expires_at -> status 'committed': one consumption row for actual (none
--       when 0), hold returned, released = max(hold - actual, 0);
--   expired (swept, or expires_at passed) -> status 'late': the usage is still recorded,
--       the hold returned if the sweep had not yet, released = 0;
--   committed -> 'replayed' with the original figures when actual (and metadata) match,
--       MT002 otherwise;
--   released -> success=false, 'released'; unknown -> success=false, 'not_found'.
-- actual may exceed the hold and may drive the balance negative.
-- An invalid actor context set directly is refused before anything (061).
-- Locks: the reservation, then its account.
CREATE OR REPLACE FUNCTION meter.commit(p_reservation_id text, p_actual_amount numeric,
                             p_metadata jsonb DEFAULT NULL,
                             p_namespace text DEFAULT 'default')
RETURNS TABLE (success boolean, consumed numeric, released numeric, reserved_amount numeric,
               balance numeric, entry_id bigint, status text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_actual numeric;
    v_hash text;
    v_res meter.reservations;
    v_late boolean;
    v_released numeric;
    v_post record;
    v_now timestamptz := now();
BEGIN
    -- Fast path: every check in one expression. Otherwise one by one, for the refusal.
    IF current_setting('meter.tenant', true) = p_namespace
       AND meter._plain_ok(p_namespace, 1024)
       AND meter._plain_ok(p_reservation_id, 128)
       AND meter._metadata_ok(p_metadata)
       AND meter._amount_plain(p_actual_amount, 'nonnegative')
       AND meter._actor_ok() THEN  -- 061
        v_actual := trim_scale(p_actual_amount);
    ELSE
        PERFORM meter._guard(p_namespace);
        PERFORM meter._ident('reservation_id', p_reservation_id, 128),
                meter._metadata(p_metadata);
        v_actual := meter._amount('actual_amount', p_actual_amount, 'nonnegative');
    END IF;
    IF NOT meter._now_ok() THEN
        PERFORM meter._ledger_time('event_time', NULL);
    END IF;
    v_hash := meter._hash('commit', v_actual::text, p_metadata::text);

    SELECT * INTO v_res FROM meter.reservations r
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id
    FOR UPDATE;
    IF NOT FOUND THEN
        success := false; status := 'not_found';
        RETURN NEXT;
        RETURN;
    END IF;

    IF v_res.status = 'committed' THEN
        IF v_res.commit_request_hash <> v_hash THEN
            IF v_res.actual_amount = v_actual THEN  -- then only the metadata differs
                RAISE EXCEPTION 'metadata: reservation % was already committed with other metadata',
                                quote_literal(p_reservation_id)
                    USING ERRCODE = 'MT002', COLUMN = 'metadata';
            END IF;
            RAISE EXCEPTION 'actual_amount: reservation % was already committed with actual amount %',
                            quote_literal(p_reservation_id), v_res.actual_amount
                USING ERRCODE = 'MT002', COLUMN = 'actual_amount';
        END IF;
        success := true;
        consumed := v_res.actual_amount;
        released := (v_res.commit_result->>'released')::numeric;
        reserved_amount := v_res.amount;
        balance := (v_res.commit_result->>'balance')::numeric;
        entry_id := v_res.entry_id;
        status := 'replayed';
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_res.status = 'released' THEN
        success := false; reserved_amount := v_res.amount; status := 'released';
        RETURN NEXT;
        RETURN;
    END IF;

    -- active or expired: the usage happened and is recorded
    v_late := v_res.status = 'expired' OR v_now >= v_res.expires_at;
    v_released := CASE WHEN v_late THEN 0 ELSE greatest(v_res.amount - v_actual, 0) END;
    v_post := meter._post(p_namespace, v_res.account_id, 'consumption', -v_actual, v_now,
                          p_reservation_id, coalesce(p_metadata, v_res.metadata),
                          CASE WHEN v_res.status = 'active' THEN -v_res.amount ELSE 0 END);
    UPDATE meter.reservations r
    SET status = 'committed', completed_at = v_now, actual_amount = v_actual,
        entry_id = v_post.entry_id, commit_request_hash = v_hash,
        commit_result = jsonb_build_object('released', v_released, 'balance', v_post.balance,
                                           'late', v_late),
        completed_actor = meter._actor(),
        -- a late commit of a hold the sweep expired keeps that transition for the audit
        expired_at = CASE WHEN v_res.status = 'expired' THEN v_res.completed_at END,
        expired_actor = CASE WHEN v_res.status = 'expired' THEN v_res.completed_actor END
    WHERE r.namespace = p_namespace AND r.reservation_id = p_reservation_id;

    success := true;
    consumed := v_actual;
    released := v_released;
    reserved_amount := v_res.amount;
    balance := v_post.balance;
    entry_id := v_post.entry_id;
    status := CASE WHEN v_late THEN 'late' ELSE 'committed' END;
    RETURN NEXT;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.commit(text, numeric, jsonb, text) FROM PUBLIC;

-- Internal helpers: run with the rights of the API function that calls them.
REVOKE EXECUTE ON FUNCTION meter._actor_settings_ok(), meter._actor_ok() FROM PUBLIC;

-- And retry_dead_letter (found by a review of the above, reproduced:
-- test_rls.py test_a_dead_letter_retry_refuses_an_actor_set_directly_and_leaves_the_letter)
-- checked nothing itself: the event's API function refused the context (MT001) inside
-- retry_dead_letter's exception block, which caught it as the event's failure: the call
-- returned ok false, and the letter got one more attempt and the caller's `reason: must
-- not contain control characters` in place of the error the event had failed with. It now
-- checks the context first, MT001 naming the setting, before the letter is locked or
-- changed. 016's retry_dead_letter is replaced whole; only the line marked 061 changed.

-- Re-apply a dead letter's payload. On success it is marked 'retried'; otherwise its
-- attempts grow and it stays 'dead'. An event that names a namespace other than the one
-- its dead letter is filed under is never applied (MT004).
-- The actor context is checked first: a refusal leaves the letter as it was (061).
CREATE OR REPLACE FUNCTION meter.retry_dead_letter(p_dead_letter_id bigint)
RETURNS TABLE (ok boolean, status text, result jsonb, error_sqlstate text, error_message text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v meter.dead_letters;
    v_one jsonb;
    v_scope text := meter._dead_letter_scope();
BEGIN
    PERFORM meter._actor_ok();  -- 061: refused before the letter is locked or changed
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

REVOKE EXECUTE ON FUNCTION meter.retry_dead_letter(bigint) FROM PUBLIC;
