-- record_dead_letter stores a source too long to index as its hash.
--
-- Why (found re-reading this stop's change): a dead letter's source (a task id, or
-- apply_events' `<task id>/<idx>`) is part of the index dead_letters_source, which holds
-- about 2.7 kB. A crafted message's task id longer than that made every dead letter of it
-- fail to record. The worker hashed the sources it passes (worker/db.py), a special case
-- beside the mechanism: apply_events' own dead letters still failed, so a refused event
-- of such a message failed its whole call (54000) and was filed by the worker with that
-- reason instead of its own.
--
-- Now record_dead_letter itself stores a source of more than 200 characters as
-- 'sha256:' || the hex SHA-256 of its UTF-8 text, the form the worker used (the same
-- text gives the same stored source, so a redelivered message still counts an attempt on
-- its dead letter, also one the worker recorded before this migration), for every caller.
--
-- Locks: unchanged (025). Migrations once applied are never edited: 025's
-- record_dead_letter is replaced whole; only the line marked 049 changed.

CREATE FUNCTION meter._dead_letter_source(p_source text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN length(p_source) <= 200 THEN p_source
                ELSE 'sha256:' || encode(sha256(convert_to(p_source, 'UTF8')), 'hex') END
$$;

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
    INSERT INTO meter.dead_letters AS d
        (namespace, op, payload, error_sqlstate, error_message, source)
    VALUES (v_namespace, coalesce(p_op, '?'), coalesce(p_payload, 'null'::jsonb),
            p_error_sqlstate, p_error_message, meter._dead_letter_source(p_source))  -- 049
    ON CONFLICT (namespace, source) WHERE source IS NOT NULL AND status = 'dead'
    DO UPDATE SET attempts = d.attempts + 1, last_failed_at = now(),
                  error_sqlstate = EXCLUDED.error_sqlstate,
                  error_message = EXCLUDED.error_message
    RETURNING d.dead_letter_id INTO v_id;
    RETURN v_id;
END
$$;
