-- Writes to one account queue on an advisory lock, not on the account's row.
--
-- Why (found measuring the hot-account benchmark, docs/benchmarks.md 2026-11-29): every
-- consume of one account waits for the row that the consume before it updated. PostgreSQL
-- makes such a waiter wait for the updater's transaction id, a lock that every waiter
-- shares: when the holder commits, all of them wake (on average four of the benchmark's
-- seven waiters waited there), one wins the row, and the rest go back to sleep behind it,
-- each through the lock manager (0.8 backends on average waited for its LWLock). Who gets
-- the row next is left to that scramble: at 8 connections a hot-account consume's p99 was
-- 8-11 ms for a p50 of 1.6 ms.
--
-- Now an unchecked single-account write (meter._apply without p_min_available: consume
-- without check_balance, allocate, adjust, and through them the one-by-one events of
-- apply_events) whose transaction has locked no row yet first takes a transaction
-- advisory lock on the account's key. Exclusive advisory locks are
-- granted one waiter at a time, in order: the holder's commit wakes only the next writer,
-- which then finds the row free. Measured on one database, toggling this function: the
-- p99 of the hot account at 8 connections 8.4-8.9 ms -> 2.7-3.0 ms (one run of three
-- 10 ms), its rate unchanged (one durable flush per consume bounds it), consume with a
-- key unchanged (0.36-0.39 of the INSERT rate either way); with the CPUs busy with other
-- work (a test run alongside), the hot account's rate rose by 10-40% in four paired runs
-- (less time lost to wake-ups).
--
-- Why only then. The advisory lock's holder must be the row's holder, or about to be:
-- 1. A transaction that holds a row lock (a batch that locked its accounts first, the
--    caller's own transaction after an earlier call, a commit that holds its reservation)
--    must not wait for an account's advisory lock, since its holder may be waiting for
--    that very row: a deadlock the row alone never had. A transaction without a
--    transaction id holds no row lock (locking a row takes one).
-- 2. A checked write (consume with check_balance) that is refused changes nothing and
--    raises nothing: it would keep the account's advisory lock, without the row and
--    without a transaction id, to the end of a caller's transaction (or of a batch), which
--    could then take other accounts' advisory locks in any order: two such transactions
--    deadlocked (found by a review, with a reproduction; 40P01 where both had committed
--    before). An unchecked write always ends holding the row, or raises, which releases
--    the advisory lock with its (sub)transaction. Checked writes go straight to the row.
-- So a wait on an advisory lock stands where that writer's wait on the row would have
-- been, and the lock order does not change: after the advisory locks of reservation ids
-- and idempotency keys, before reservations and accounts. The lock is held to the end of
-- the transaction, as the row's is. One exception, found by a second review: a
-- transaction with no transaction id may hold the tables' own locks (after a refused
-- checked consume). If drop_old_partitions then waits behind it for the ledger, a writer
-- that took an account's advisory lock queues behind that drop for the ledger, and the
-- first transaction's next unchecked write on the same account waits for that writer: a
-- cycle through a lock queue, which the deadlock detector resolves by reordering the
-- queue (no error) after deadlock_timeout (1 s by default). Without 035 that write would
-- not have waited, though every other new writer waits behind the drop either way.
--
-- Locks: (new) the account's advisory lock, then the account.
--
-- Migrations once applied are never edited: 019's _apply is replaced whole; only the
-- lines marked 035 are new.

-- The account's place in line: a transaction advisory lock on the hash of its key (a
-- 64-bit hash; the idempotency keys' locks hash other text, with another seed).
CREATE FUNCTION meter._queue_for_account(p_namespace text, p_user_id text, p_event_type text,
                                         p_resource text, p_unit text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(
        p_namespace || chr(31) || coalesce(p_user_id, chr(30)) || chr(31) || p_event_type
        || chr(31) || coalesce(p_resource, '') || chr(31) || p_unit, 35))
$$;
REVOKE EXECUTE ON FUNCTION meter._queue_for_account(text, text, text, text, text) FROM PUBLIC;

-- Apply one ledger entry to the account with this key, in one statement (004): move the
-- balance, append the ledger row, claim the idempotency key with the result. An unchecked
-- entry (p_min_available NULL) creates the account when missing; a checked one applies
-- nothing and returns NULLs when the account is missing or has too little available
-- (after expiring its holds past their TTL once, 019).
-- Locks: unchecked, with no transaction id yet: the account's advisory lock (035); then
-- the account's row (or, creating it, its key's unique index entry).
CREATE OR REPLACE FUNCTION meter._apply(p_namespace text, p_user_id text, p_event_type text,
                             p_resource text, p_unit text, p_entry_type text, p_amount numeric,
                             p_event_time timestamptz, p_min_available numeric,
                             p_reference_id bigint, p_metadata jsonb, p_key text,
                             p_operation text, p_hash text,
                             OUT entry_id bigint, OUT balance numeric, OUT reserved numeric)
LANGUAGE plpgsql AS $$
DECLARE
    v_lost boolean;
    v_swept boolean := false;
BEGIN
    -- 035: a write that will hold the row (not a checked one, which a refusal leaves
    -- without it) in a transaction that has locked no row yet (no transaction id) queues
    -- for the account on its advisory lock first, so that only the next in line wakes
    -- when the account's holder commits; otherwise it goes straight to the row.
    IF p_min_available IS NULL AND pg_current_xact_id_if_assigned() IS NULL THEN
        PERFORM meter._queue_for_account(p_namespace, p_user_id, p_event_type, p_resource,
                                         p_unit);
    END IF;
    LOOP
    IF p_key IS NULL THEN
        -- Without a key, the same statement minus the claim: an idle ModifyTable on
        -- idempotency_keys still costs its set-up in every execution.
        WITH acc AS (
            UPDATE meter.accounts t
            SET balance = t.balance + p_amount,
                total_credited = t.total_credited + greatest(p_amount, 0),
                total_debited = t.total_debited + greatest(-p_amount, 0),
                updated_at = now()
            WHERE t.namespace = p_namespace AND coalesce(t.user_id, '') = coalesce(p_user_id, '')
              AND t.event_type = p_event_type AND t.resource = p_resource AND t.unit = p_unit
              AND (p_min_available IS NULL OR t.balance - t.reserved >= p_min_available)
            RETURNING t.account_id, t.balance, t.reserved
        )
        INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                                  entry_type, amount, balance_after, event_time, reference_id,
                                  actor_id, on_behalf_of, reason, request_id, metadata)
        SELECT nextval('meter.ledger_id_seq'), p_namespace, acc.account_id, p_user_id,
               p_event_type, p_resource, p_unit, p_entry_type, p_amount, acc.balance,
               p_event_time, p_reference_id,
               nullif(current_setting('meter.actor_id', true), ''),
               nullif(current_setting('meter.on_behalf_of', true), ''),
               nullif(current_setting('meter.reason', true), ''),
               nullif(current_setting('meter.request_id', true), ''),
               p_metadata
        FROM acc
        RETURNING id, balance_after, (SELECT acc.reserved FROM acc)
        INTO entry_id, balance, reserved;
        EXIT WHEN entry_id IS NOT NULL;
        IF p_min_available IS NOT NULL THEN
            -- refused: holds past their TTL reserve nothing any more; once, expire them
            EXIT WHEN v_swept OR NOT meter._expire_due(p_namespace, p_user_id, p_event_type,
                                                       p_resource, p_unit, p_min_available);
            v_swept := true;
            CONTINUE;
        END IF;
        PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, p_resource, p_unit);
        CONTINUE;
    END IF;
    WITH acc AS (
        UPDATE meter.accounts t
        SET balance = t.balance + p_amount,
            total_credited = t.total_credited + greatest(p_amount, 0),
            total_debited = t.total_debited + greatest(-p_amount, 0),
            updated_at = now()
        WHERE t.namespace = p_namespace AND coalesce(t.user_id, '') = coalesce(p_user_id, '')
          AND t.event_type = p_event_type AND t.resource = p_resource AND t.unit = p_unit
          AND (p_min_available IS NULL OR t.balance - t.reserved >= p_min_available)
        RETURNING t.account_id, t.balance, t.reserved
    ), led AS (
        INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                                  entry_type, amount, balance_after, event_time, idempotency_key,
                                  reference_id, actor_id, on_behalf_of, reason, request_id,
                                  metadata)
        SELECT nextval('meter.ledger_id_seq'), p_namespace, acc.account_id, p_user_id,
               p_event_type, p_resource, p_unit, p_entry_type, p_amount, acc.balance,
               p_event_time, p_key, p_reference_id,
               nullif(current_setting('meter.actor_id', true), ''),
               nullif(current_setting('meter.on_behalf_of', true), ''),
               nullif(current_setting('meter.reason', true), ''),
               nullif(current_setting('meter.request_id', true), ''),
               p_metadata
        FROM acc
        RETURNING id
    ), claim AS (
        INSERT INTO meter.idempotency_keys
            (namespace, key, operation, request_hash, result, account_id)
        SELECT p_namespace, p_key, p_operation, p_hash,
               jsonb_build_object('balance', acc.balance, 'reserved', acc.reserved,
                                  'entry_id', led.id),
               acc.account_id
        FROM acc, led
        WHERE p_key IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT led.id, acc.balance, acc.reserved,
           p_key IS NOT NULL AND NOT EXISTS (SELECT FROM claim)
    INTO entry_id, balance, reserved, v_lost FROM acc, led;
    EXIT WHEN entry_id IS NOT NULL;
    IF p_min_available IS NOT NULL THEN
        EXIT WHEN v_swept OR NOT meter._expire_due(p_namespace, p_user_id, p_event_type,
                                                   p_resource, p_unit, p_min_available);
        v_swept := true;
        CONTINUE;
    END IF;
    PERFORM meter._create_account(p_namespace, p_user_id, p_event_type, p_resource, p_unit);
    END LOOP;
    IF v_lost THEN
        -- Another path (a batch) claimed the key after our look-up; retrying replays it.
        RAISE EXCEPTION 'idempotency_key: % was claimed concurrently; retry to replay it',
                        quote_literal(p_key)
            USING ERRCODE = '40001', COLUMN = 'idempotency_key';
    END IF;
END
$$;
