-- A refused write that expires its account's due holds waits for the account first.
--
-- Why (a wait pattern listed in the previous stop's note as unreproduced; reproduced this
-- stop): a checked consume or a reserve is refused on the account's figures as of its
-- statement, without waiting for a row it will not change. It then calls
-- meter._expire_due, which took the account's holds past their TTL (SKIP LOCKED) and only
-- then waited for the account. If a caller's transaction held that account (an earlier
-- write in the same transaction) and came on to commit one of those holds, each waited
-- for the other: a deadlock, detected after deadlock_timeout (1 s), whose victim was
-- either the refused write or the caller's whole transaction.
--
-- Now _expire_due looks without locks at the due holds: none, or too little in them for
-- p_needed, and it returns at once, without a lock (a second review: two refused checked
-- consumes of one account in two caller's transactions, each also writing another
-- account, deadlocked once the first refusal kept the account locked for nothing). It then
-- waits for the account, and only then takes the holds, still with SKIP LOCKED: it never
-- waits while holding a hold, so the cycle cannot form. A transaction that already holds
-- rows (has a transaction id) does not wait for the account at all, by 035's rule: it
-- passes over a held account, and the refusal stands. The locked part runs in a
-- subtransaction (only on this path, which a call reaches when expiring looks enough):
-- should the figures under the lock not be enough after all, it is rolled back and its
-- locks with it (a third review: a write committed while the refusal waited left it
-- short, it kept the account, and two callers' transactions deadlocked).
--
-- Also: it answers true, so that its caller tries once more, when the account has
-- p_needed available already, unlocked at first and again once it holds the account. A
-- review found two checked consumes (or reserves) of one account with a due hold, each
-- enough on its own: the second, refused on the figures before the first committed, found
-- the hold taken (SKIP LOCKED) or already expired, and reported a refusal whose own
-- `available` covered the amount (295 of 600 such pairs; 2 with only the lock order
-- changed, where the first had committed before the second looked).
--
-- Callers (unchanged): meter._apply (checked consume) and meter.reserve after a refusal,
-- with p_needed; meter._close_period, which already holds the account, with p_needed NULL.
--
-- Locks: the account (SKIP LOCKED when the transaction holds rows already), then its due
-- holds (SKIP LOCKED). Migrations once applied are never
-- edited: 019's _expire_due is replaced whole; the lines marked 040 changed.

-- Expire the active holds of one account whose TTL has passed, when that frees enough:
-- with p_needed, only if available would then reach p_needed (otherwise nothing changes);
-- with p_needed NULL, always. True when it expired any, or (040) when, with p_needed, the
-- account has p_needed available already: either way the caller may try again.
-- Locks: the account (040: first; SKIP LOCKED in a transaction that holds rows already),
-- then those holds (SKIP LOCKED).
CREATE OR REPLACE FUNCTION meter._expire_due(p_namespace text, p_user_id text,
                                             p_event_type text, p_resource text,
                                             p_unit text, p_needed numeric)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_account bigint;
    v_ids text[];
    v_total numeric;
    v_available numeric;
BEGIN
    -- 040: the account and its due holds as of one snapshot (read apart, a caller's
    -- expiry committed in between made the holds look gone and the account still short)
    SELECT a.account_id, a.balance - a.reserved,
           CASE WHEN a.reserved > 0
                THEN (SELECT coalesce(sum(r.amount), 0) FROM meter.reservations r
                      WHERE r.namespace = a.namespace AND r.account_id = a.account_id
                        AND r.status = 'active' AND r.expires_at <= now())
                ELSE 0 END
    INTO v_account, v_available, v_total FROM meter.accounts a
    WHERE a.namespace = p_namespace AND coalesce(a.user_id, '') = coalesce(p_user_id, '')
      AND a.event_type = p_event_type AND a.resource = p_resource AND a.unit = p_unit;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- 040: a write committed since the refused statement began has freed enough (another
    -- caller expired these very holds, say): try again
    IF p_needed IS NOT NULL AND v_available >= p_needed THEN
        RETURN true;
    END IF;
    -- 040: no due hold, or not enough in them, and no lock is taken: a refusal that
    -- expiring cannot turn stays as cheap as it was, and holds nothing to its end
    IF v_total = 0 OR (p_needed IS NOT NULL AND v_available + v_total < p_needed) THEN
        RETURN false;
    END IF;
    -- 040: the account before any hold, so that this never waits while holding one; and,
    -- as 035's queue, a transaction that holds rows already (it has a transaction id) does
    -- not wait for another row out of order: it passes (a refusal) if the account is held.
    -- In a subtransaction: should the figures under the lock still not be enough (a write
    -- committed meanwhile took them), the refusal lets the account go again (a third
    -- review: kept to the end of a caller's transaction, it deadlocked two of them)
    BEGIN
        IF pg_current_xact_id_if_assigned() IS NULL THEN
            SELECT a.balance - a.reserved INTO v_available FROM meter.accounts a
            WHERE a.namespace = p_namespace AND a.account_id = v_account
            FOR UPDATE;
        ELSE
            SELECT a.balance - a.reserved INTO v_available FROM meter.accounts a
            WHERE a.namespace = p_namespace AND a.account_id = v_account
            FOR UPDATE SKIP LOCKED;  -- one this transaction holds is not skipped
            IF NOT FOUND THEN
                RETURN false;
            END IF;
        END IF;
        IF p_needed IS NOT NULL AND v_available >= p_needed THEN
            RETURN true;  -- 040: the write we waited for freed enough; try again
        END IF;
        SELECT array_agg(d.reservation_id), sum(d.amount) INTO v_ids, v_total
        FROM (SELECT r.reservation_id, r.amount FROM meter.reservations r
              WHERE r.namespace = p_namespace AND r.account_id = v_account
                AND r.status = 'active' AND r.expires_at <= now()
              FOR UPDATE SKIP LOCKED) d;
        IF v_total IS NULL OR (p_needed IS NOT NULL AND v_available + v_total < p_needed) THEN
            -- still not enough: a refusal changes nothing, and keeps no lock (040)
            RAISE EXCEPTION USING ERRCODE = 'MTX01';
        END IF;
        UPDATE meter.reservations r
        SET status = 'expired', completed_at = now(),
            completed_actor = '{"actor_id": "system:expiry"}'::jsonb
        WHERE r.namespace = p_namespace AND r.reservation_id = ANY (v_ids);
        UPDATE meter.accounts a SET reserved = a.reserved - v_total, updated_at = now()
        WHERE a.namespace = p_namespace AND a.account_id = v_account;
        RETURN true;
    EXCEPTION WHEN SQLSTATE 'MTX01' THEN
        RETURN false;  -- the subtransaction's locks (the account, the holds) go with it
    END;
END
$$;
REVOKE EXECUTE ON FUNCTION meter._expire_due(text, text, text, text, text, numeric) FROM PUBLIC;
