-- Reservations get the backstop the ledger and the accounts already have: a hold's outcome
-- columns must agree with its status, and its TTL with what reserve accepts. The API
-- functions keep this true; the constraint stops a bug or a hand-written UPDATE from
-- leaving a hold, say, committed without its actual amount, or active and completed.
--
--   active               completed_at, actual_amount, entry_id, commit_result all NULL
--   committed            completed_at and commit_result set; actual_amount >= 0; a ledger
--                        entry (entry_id) exactly when actual_amount > 0
--   released / expired   completed_at set; actual_amount, entry_id, commit_result NULL
--
-- One function call rather than the CASE written out in the constraint, for the reason
-- given at meter._ledger_sign_ok (001_schema.sql): a table's CHECK expressions are re-read
-- and prepared in every statement that writes it.
CREATE FUNCTION meter._reservation_ok(p_status text, p_ttl_seconds integer,
                                      p_completed_at timestamptz, p_actual_amount numeric,
                                      p_entry_id bigint, p_commit_result jsonb)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_ttl_seconds IS NULL OR p_ttl_seconds < 1 OR p_ttl_seconds > 86400 THEN
        RETURN false;
    END IF;
    -- coalesce: a NULL (an unknown comparison) would pass a CHECK
    RETURN coalesce(CASE p_status
        WHEN 'active' THEN p_completed_at IS NULL AND p_actual_amount IS NULL
                           AND p_entry_id IS NULL AND p_commit_result IS NULL
        WHEN 'committed' THEN p_completed_at IS NOT NULL AND p_commit_result IS NOT NULL
                              AND p_actual_amount >= 0
                              AND (p_entry_id IS NOT NULL) = (p_actual_amount > 0)
        WHEN 'released' THEN p_completed_at IS NOT NULL AND p_actual_amount IS NULL
                             AND p_entry_id IS NULL AND p_commit_result IS NULL
        WHEN 'expired' THEN p_completed_at IS NOT NULL AND p_actual_amount IS NULL
                            AND p_entry_id IS NULL AND p_commit_result IS NULL
        ELSE false
    END, false);
END
$$;
REVOKE EXECUTE ON FUNCTION meter._reservation_ok(text, integer, timestamptz, numeric, bigint,
                                                 jsonb) FROM PUBLIC;

ALTER TABLE meter.reservations ADD CONSTRAINT reservations_consistent
    CHECK (meter._reservation_ok(status, ttl_seconds, completed_at, actual_amount, entry_id,
                                 commit_result));
