-- Two deliveries of one message that dead-letter it at the same moment file one dead letter.
--
-- Why: record_dead_letter looked for the letter of the same source (UPDATE ... attempts + 1)
-- and inserted one when there was none. Two deliveries of one message at once (a Redis
-- restart hands an unacknowledged message to a second worker while the first still runs
-- it) both found none and both inserted: the second broke the unique index
-- dead_letters_source (23505). That is not a transient error, so the worker filed the
-- event as a permanent failure under its own source (the task id, where the SQL files
-- '<task>/<idx>'): two dead letters for one message, the second saying "duplicate key".
-- Seen once in the chaos test (109 dead letters for 108 invalid events, no resend).
--
-- Now one INSERT ... ON CONFLICT on that index: the second delivery waits for the first
-- and counts an attempt on its letter. A letter without a source is inserted as before.
-- Migrations once applied are never edited, so the function is replaced whole; only the
-- statement that files the letter changed.

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
            p_error_sqlstate, p_error_message, p_source)
    ON CONFLICT (namespace, source) WHERE source IS NOT NULL AND status = 'dead'
    DO UPDATE SET attempts = d.attempts + 1, last_failed_at = now(),
                  error_sqlstate = EXCLUDED.error_sqlstate,
                  error_message = EXCLUDED.error_message
    RETURNING d.dead_letter_id INTO v_id;
    RETURN v_id;
END
$$;
