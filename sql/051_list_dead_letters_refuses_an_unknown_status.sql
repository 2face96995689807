-- list_dead_letters refuses a status that names none.
--
-- Why (found by a review of the read side, with a reproduction): `p_status` was compared
-- with each letter's status as it came, so a misspelt filter ('Dead', 'failed', 'waiting',
-- '') answered with no letters, as if nothing waited to be retried, while letters did. The
-- Python wrapper (meter.dead_letters, and so the CLI) refuses such a status, but the SQL
-- API, which meter_app may call, did not. get_audit_events refuses an unknown kind for the
-- same reason (039).
--
-- What: a status other than 'dead', 'retried', 'discarded' and 'all' (NULL still lists
-- every status) is refused with MT001 naming `status`, after the namespace checks as
-- before. Nothing else changes.
--
-- Lock order: none (a read).
--
-- Migrations once applied are never edited: 008's list_dead_letters is replaced whole;
-- only the lines marked 051 are new.

CREATE OR REPLACE FUNCTION meter.list_dead_letters(p_status text DEFAULT 'dead',
                                                   p_limit integer DEFAULT 100,
                                                   p_namespace text DEFAULT NULL)
RETURNS SETOF meter.dead_letters
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_namespace IS NULL THEN
        IF nullif(current_setting('meter.tenant', true), '') IS NOT NULL
           OR NOT meter._is_privileged(session_user) THEN
            RAISE EXCEPTION 'namespace: listing every namespace needs a privileged role and no tenant'
                USING ERRCODE = 'MT004', COLUMN = 'namespace';
        END IF;
    ELSE
        PERFORM meter._guard(p_namespace);
    END IF;
    -- 051: a status that names none is refused: it answered with no letters
    IF p_status IS NOT NULL AND p_status NOT IN ('dead', 'retried', 'discarded', 'all') THEN
        PERFORM meter._fail('MT001', 'status',
                            format('must be one of dead, retried, discarded, all; got %s',
                                   quote_literal(left(p_status, 64))));
    END IF;
    RETURN QUERY
    SELECT * FROM meter.dead_letters d
    WHERE (p_namespace IS NULL OR d.namespace = p_namespace)
      AND (p_status IS NULL OR p_status = 'all' OR d.status = p_status)
    ORDER BY d.last_failed_at DESC, d.dead_letter_id DESC
    LIMIT meter._limit('limit', p_limit, 100, 10000);
END
$$;

REVOKE EXECUTE ON FUNCTION meter.list_dead_letters(text, integer, text) FROM PUBLIC;
