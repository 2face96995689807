-- Retention locks the ledger before its month; reconcile reads as of its locks.
--
-- Why (found by a review of retention, three reproductions):
-- 1. A write dated in a month being dropped deadlocked with the drop. drop_old_partitions
--    locked the month's partition (ACCESS EXCLUSIVE), folded it into ledger_checkpoints,
--    then its DROP TABLE took the ledger's own ACCESS EXCLUSIVE lock (a partition's DROP
--    locks its parent). A write dated in a past month takes them the other way round: the
--    ledger's ROW EXCLUSIVE first (036's _ledger_time), then the partition on insert. With
--    that write queued behind another writer of its account, the drop waited for the
--    ledger and the write for the month: 40P01, one of the two rolled back, where both
--    should succeed (balance 16, reconcile() empty).
-- 2. A read arriving during the fold deadlocked with it the same way: get_ledger (any read
--    of the ledger: get_usage, reconcile, get_audit_events) holds the ledger ACCESS SHARE
--    and waits for the month; the DROP then waits for the ledger. The reader was killed
--    (40P01) where it should have waited and answered.
-- 3. reconcile() started while a drop was committing reported the folded amount as a
--    balance_mismatch on a healthy ledger (SPEC 3 item 7). It was STABLE, so its query ran
--    on the calling statement's snapshot, taken before it waited for the ledger's lock:
--    the checkpoint as it was before the fold, and the ledger without the dropped month
--    (the plan made after the wait no longer has that partition).
--
-- Now:
-- 1. drop_old_partitions takes the ledger's ACCESS EXCLUSIVE lock before the month's
--    partition, for every month it drops (LOCK TABLE ONLY meter.ledger; a no-op after the
--    first), so it takes them in the order every writer and reader does. That lock stalls
--    every read and write of the ledger, in every namespace, until the drop commits. To
--    keep it short, the first month's fold is read before it, through the ledger (ACCESS
--    SHARE, the order again), with readers and writers running, and written to the
--    checkpoints (whose rows only this function writes or locks, one call at a time).
--    Under the lock the month is only counted: ledger rows are never updated or deleted
--    (triggers ledger_immutable and ledger_no_truncate), so the rows read are among the
--    month's rows, and as many rows are the same rows. When the count differs (a
--    backdated write committed since the read), the early fold is taken back and the
--    month folded whole under the lock, as before. Later months of one call are folded
--    under the lock already held, so the worker (worker/db.py) calls it once per month,
--    oldest first, each call its own transaction; only its last call (the retention
--    asked for) reports months kept for a roll that is behind.
-- 2. reconcile is VOLATILE: its one query (checkpoints, ledger, accounts and holds
--    together) takes its snapshot after it has its locks (_SPI_execute_plan takes a
--    volatile function's snapshot after GetCachedPlan locked the relations), so a drop it
--    waited for is seen whole: its month gone and its checkpoint folded. Its callers (the
--    SDK's reconcile(), the CLI through it) are unchanged, and CREATE OR REPLACE keeps
--    its grants (meter_app, meter_maintenance). At REPEATABLE READ or SERIALIZABLE the
--    transaction's snapshot is used, taken before any lock: a drop committed after it can
--    still show as a mismatch (DROP TABLE is not MVCC-safe).
--
-- Cost: the stall of every ledger read and write, from the drop's lock to its commit: the
-- month's count(*), the DROP and the commit (which flushes the WAL of the checkpoint rows
-- written before the lock); a whole fold when a backdated write came in meanwhile.
-- Measured on an embedded server (PostgreSQL 18, 2 shared CPUs, the month warm in cache,
-- medians of 3; the longest wait of a reader of the current month looping alongside):
--   100,000 rows, 1,000 accounts:       8 ms (the fold under the lock:  19 ms)
--   1,000,000 rows, 1,000 accounts:    47 ms (the fold under the lock: 155 ms)
--   1,000,000 rows, 100,000 accounts: 284 ms, 57-288 (the fold under the lock: 857 ms)
-- The whole call is slower than the fold alone (36, 384, 1967 ms: the early read gets no
-- parallel plan inside PL/pgSQL), outside the lock. docs/internals.md, "Retention".
--
-- Lock order: drop_old_partitions: its advisory lock, then (first month) the ledger
-- ACCESS SHARE and the month's (its early read) and the month's checkpoint rows, then the
-- ledger ACCESS EXCLUSIVE, then the month's partition ACCESS EXCLUSIVE; the ledger before
-- a partition on every path (writers: the ledger ROW EXCLUSIVE, then the partition;
-- readers: the ledger ACCESS SHARE, then its partitions). No reader or writer of the
-- ledger locks checkpoint rows. reconcile: its locks unchanged, its snapshot after them.
--
-- Migrations once applied are never edited: 036's drop_old_partitions and 005's reconcile
-- are replaced whole; only the lines marked 045 changed.

-- Drop the ledger's monthly partitions that end on or before the first day of the current
-- month minus p_older_than_months, after folding their rows into meter.ledger_checkpoints;
-- but never one holding rows dated on or after the next period start of an account whose
-- period roll is due (036). Returns the partitions dropped.
-- Locks (045): its advisory lock (one dropper at a time); for the first month it drops,
-- the ledger ACCESS SHARE (reading the month through it) and the month's checkpoint rows,
-- then the ledger ACCESS EXCLUSIVE, then the month's partition; every later month of the
-- call under the ledger's lock already held, then its partition. The ledger always before
-- a partition.
CREATE OR REPLACE FUNCTION meter.drop_old_partitions(p_older_than_months integer DEFAULT 24)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_cutoff timestamptz;
    v_part record;
    v_upper timestamptz;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_roll_needs date;
    v_window timestamptz;
    v_kept integer := 0;
    v_locked boolean := false;  -- 045: the ledger's ACCESS EXCLUSIVE lock is held
    v_ns text[];                -- 045: the first month's fold, read before that lock
    v_ids bigint[];
    v_sums numeric[];
    v_counts bigint[];
    v_read bigint;
    v_rows bigint;
BEGIN
    -- The fold must see every row the drop removes. At REPEATABLE READ or SERIALIZABLE its
    -- snapshot is older than the partition's lock: a row committed while this call waited
    -- for that lock would be dropped without being folded.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM meter._fail('MT001', 'transaction_isolation',
            format('drop_old_partitions must run at READ COMMITTED, not %s',
                   upper(current_setting('transaction_isolation'))));
    END IF;
    IF p_older_than_months IS NULL OR p_older_than_months NOT BETWEEN 1 AND 1200 THEN
        PERFORM meter._fail('MT001', 'older_than_months',
            format('must be between 1 and 1200, got %s',
                   coalesce(p_older_than_months::text, 'NULL')));
    END IF;
    -- One dropper at a time. (045: readers and writers are kept out by the ledger's lock.)
    PERFORM pg_advisory_xact_lock(19781, 0);
    v_cutoff := (date_trunc('month', now() AT TIME ZONE 'UTC')
                 - make_interval(months => p_older_than_months)) AT TIME ZONE 'UTC';
    -- 036: what a due roll still has to close as it stood: the rows dated from the next
    -- period start on (from the configured start, for a period configured but not opened,
    -- whose open closes the one before it). The accounts are roll_periods' candidates.
    SELECT min(CASE WHEN c.opened THEN meter._next_period_start(c.namespace, c.account_id,
                                                                c.period_start,
                                                                c.period_interval)
                    ELSE c.period_start END)
    INTO v_roll_needs
    FROM (SELECT a.namespace, a.account_id, a.period_start, a.period_interval,
                 EXISTS (SELECT 1 FROM meter.periods p
                         WHERE p.namespace = a.namespace AND p.account_id = a.account_id
                           AND p.period_start = a.period_start
                           AND p.opened_at IS NOT NULL) AS opened
          FROM meter.accounts a
          WHERE a.period_allocation IS NOT NULL AND a.period_interval IS NOT NULL
            AND a.period_start <= v_today) c
    -- as in roll_periods: only these can be due, and only they need the exact figure
    WHERE NOT c.opened
       OR (CASE WHEN c.period_interval < interval '1000 years'
                THEN (c.period_start + c.period_interval)::date <= v_today ELSE false END)
       OR EXISTS (SELECT 1 FROM meter.periods p
                  WHERE p.namespace = c.namespace AND p.account_id = c.account_id
                    AND p.period_start >= c.period_start
                    AND (p.period_start > c.period_start OR p.period_end IS NOT NULL));
    v_window := v_cutoff;
    IF v_roll_needs IS NOT NULL AND v_roll_needs <= v_today THEN
        v_cutoff := least(v_cutoff, v_roll_needs::timestamp AT TIME ZONE 'UTC');
    END IF;
    FOR v_part IN
        SELECT c.relname,
               make_timestamptz(substr(c.relname, 8, 4)::integer, substr(c.relname, 13, 2)::integer,
                                1, 0, 0, 0, 'UTC') AS month_start
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'meter.ledger'::regclass
          AND c.relname ~ '^ledger_[0-9]{4}_[0-9]{2}$'
        ORDER BY c.relname
    LOOP
        v_upper := v_part.month_start + interval '1 month';
        IF v_upper > v_cutoff THEN
            -- 036: past the window, but kept for the roll
            v_kept := v_kept + (v_upper <= v_window)::integer;
            CONTINUE;
        END IF;
        -- 045: the first month is read before the ledger's lock, through the ledger (its
        -- ACCESS SHARE, then the month's), as of one snapshot: per account its sum and
        -- count, and the month's count; and written to the checkpoints (whose rows no one
        -- but this function, one call at a time, writes or locks). Reads and writes of the
        -- ledger carry on meanwhile.
        IF NOT v_locked THEN
            SELECT array_agg(f.namespace), array_agg(f.account_id), array_agg(f.s),
                   array_agg(f.n), coalesce(sum(f.n), 0)
            INTO v_ns, v_ids, v_sums, v_counts, v_read
            FROM (SELECT l.namespace, l.account_id, sum(l.amount) AS s, count(*) AS n
                  FROM meter.ledger l
                  WHERE l.event_time >= v_part.month_start AND l.event_time < v_upper
                  GROUP BY l.namespace, l.account_id) f;
            INSERT INTO meter.ledger_checkpoints AS c (namespace, account_id, balance, entries,
                                                       through)
            SELECT f.namespace, f.account_id, f.s, f.n, v_upper
            FROM unnest(v_ns, v_ids, v_sums, v_counts) AS f(namespace, account_id, s, n)
            ON CONFLICT (namespace, account_id) DO UPDATE
            SET balance = c.balance + excluded.balance,
                entries = c.entries + excluded.entries,
                through = greatest(c.through, excluded.through),
                updated_at = now();
        END IF;
        -- 045: the ledger before the month, as every writer (036's _ledger_time for a past
        -- month, then the insert) and every reader takes them: the DROP takes the ledger
        -- ACCESS EXCLUSIVE, and taking it after the month's lock deadlocked with both.
        -- Held to commit: every read and write of the ledger waits from here on.
        LOCK TABLE ONLY meter.ledger IN ACCESS EXCLUSIVE MODE;
        EXECUTE format('LOCK TABLE meter.%I IN ACCESS EXCLUSIVE MODE', v_part.relname);
        -- 045: no write of the month is under way now, and this statement's snapshot (READ
        -- COMMITTED, checked above) sees every one committed. Ledger rows are never updated
        -- or deleted (triggers ledger_immutable, ledger_no_truncate), so the rows read
        -- above are among the month's rows now: as many rows are the same rows, and the
        -- checkpoints hold the month. Otherwise (a backdated write committed since the
        -- read) what was read is taken back and the month folded whole, under the lock.
        IF NOT v_locked THEN
            EXECUTE format('SELECT count(*) FROM meter.%I', v_part.relname) INTO v_rows;
        END IF;
        IF v_locked OR v_rows <> v_read THEN
            IF NOT v_locked THEN
                UPDATE meter.ledger_checkpoints c
                SET balance = c.balance - f.s, entries = c.entries - f.n
                FROM unnest(v_ns, v_ids, v_sums, v_counts) AS f(namespace, account_id, s, n)
                WHERE c.namespace = f.namespace AND c.account_id = f.account_id;
            END IF;
            EXECUTE format(
                'INSERT INTO meter.ledger_checkpoints AS c (namespace, account_id, balance, entries, through)
                 SELECT namespace, account_id, sum(amount), count(*), %L::timestamptz
                 FROM meter.%I GROUP BY namespace, account_id
                 ON CONFLICT (namespace, account_id) DO UPDATE
                 SET balance = c.balance + excluded.balance,
                     entries = c.entries + excluded.entries,
                     through = greatest(c.through, excluded.through),
                     updated_at = now()', v_upper, v_part.relname);
        END IF;
        v_locked := true;
        EXECUTE format('DROP TABLE meter.%I', v_part.relname);
        RETURN NEXT v_part.relname;
    END LOOP;
    IF v_kept > 0 THEN
        -- 036: said, since one account whose roll fails at every run would keep them
        RAISE WARNING 'drop_old_partitions kept % month(s) older than % months: the period '
                      'roll has yet to close periods ending from % on (roll_periods reports '
                      'the accounts it cannot roll)',
                      v_kept, p_older_than_months, v_roll_needs - 1;
    END IF;
END
$$;

-- Accounts whose stored figures disagree with what they are derived from (005):
--   balance_mismatch:  balance vs retention checkpoint + sum of ledger amounts;
--   reserved_mismatch: reserved vs sum of active holds.
-- discrepancy = actual - expected. Empty on a healthy ledger.
-- 045: checkpoints and ledger are read by one query, as of a snapshot taken after its
-- locks: a drop_old_partitions it waited for is seen committed, fold and drop together.
CREATE OR REPLACE FUNCTION meter.reconcile(p_namespace text DEFAULT 'default')
RETURNS TABLE (user_id text, event_type text, resource text, unit text, issue_type text,
               expected numeric, actual numeric, discrepancy numeric)
-- 045: VOLATILE, so that its query's snapshot is taken after its locks
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM meter._guard(p_namespace);
    RETURN QUERY
    WITH ledger_sums AS (
        SELECT l.account_id, sum(l.amount) AS total
        FROM meter.ledger l WHERE l.namespace = p_namespace GROUP BY l.account_id
    ), holds AS (
        SELECT r.account_id, sum(r.amount) AS total
        FROM meter.reservations r
        WHERE r.namespace = p_namespace AND r.status = 'active' GROUP BY r.account_id
    ), derived AS (
        SELECT a.*, coalesce(c.balance, 0) + coalesce(ls.total, 0) AS expected_balance,
               coalesce(h.total, 0) AS expected_reserved
        FROM meter.accounts a
        LEFT JOIN ledger_sums ls ON ls.account_id = a.account_id
        LEFT JOIN holds h ON h.account_id = a.account_id
        LEFT JOIN meter.ledger_checkpoints c
               ON c.namespace = a.namespace AND c.account_id = a.account_id
        WHERE a.namespace = p_namespace
    )
    SELECT d.user_id, d.event_type, d.resource, d.unit, 'balance_mismatch'::text,
           d.expected_balance, d.balance, d.balance - d.expected_balance
    FROM derived d WHERE d.balance <> d.expected_balance
    UNION ALL
    SELECT d.user_id, d.event_type, d.resource, d.unit, 'reserved_mismatch'::text,
           d.expected_reserved, d.reserved, d.reserved - d.expected_reserved
    FROM derived d WHERE d.reserved <> d.expected_reserved
    ORDER BY 1, 2, 3, 4, 5;
END
$$;


-- The arguments of drop_old_partitions that drop the ledger's months older than
-- p_older_than_months one at a time, oldest first: each month's age in whole months after
-- its end, at most 1200 (drop_old_partitions' bound: the months older than that go
-- together). The worker drops a backlog one month per call and transaction with them, so
-- that no call holds the ledger's lock across several folds.
-- Locks: none (catalog reads).
CREATE FUNCTION meter.retention_backlog(p_older_than_months integer)
RETURNS TABLE (months integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT DISTINCT least(m.k, 1200)
    FROM (SELECT extract(year FROM now() AT TIME ZONE 'UTC')::integer * 12
                 + extract(month FROM now() AT TIME ZONE 'UTC')::integer
                 - substr(c.relname, 8, 4)::integer * 12 - substr(c.relname, 13, 2)::integer
                 - 1 AS k
          FROM pg_catalog.pg_inherits i
          JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'meter.ledger'::regclass
            AND c.relname ~ '^ledger_[0-9]{4}_[0-9]{2}$') m
    WHERE m.k > p_older_than_months
    ORDER BY 1 DESC
$$;
