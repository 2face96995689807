-- A month's partition and retention's month are months of UTC whatever the session's
-- TimeZone.
--
-- Why (found by a review of time handling, reproduced under TimeZone America/New_York and
-- Pacific/Chatham; the ledger is partitioned by month of event_time in UTC, Appendix C):
-- 1. create_partition computed a month's upper bound as `v_from + interval '1 month'` on a
--    timestamptz, and PostgreSQL adds months in the session's TimeZone. Nothing sets that
--    zone to UTC: the SDK's and the worker's sessions take the server's, database's or
--    role's default, or the client's PGTZ. Under any zone west of UTC (v_from is then the
--    last day of the month before, local) a month after a shorter one was cut short:
--    March 2030 under America/New_York ran from March 1 00:00 UTC to March 28 23:00 UTC,
--    and an event dated March 29-31 found its month's partition present and no partition
--    for its row (23514: a dead letter in the pipeline, an error for the SDK); the next
--    month began on April 1, leaving a hole. East of UTC, across a change of daylight
--    saving time, a month ran into the next one: April 2031 under Pacific/Chatham ended
--    on May 1 01:00 UTC, and May's partition could not be created at all (42P17, "would
--    overlap"), refusing every event of May. Whichever session created the partition (the
--    beat's ensure_partitions or a writer's on-demand creation) decided it for everyone.
--    The bounds are now written as UTC text (ISO, year first, so DateStyle's field order
--    does not apply).
-- 2. drop_old_partitions computed each month's end the same way. Under a zone west of UTC a
--    month ended early (March on the 28th), at or before the cutoff 036 lowers to the
--    first day a due roll still needs (any day, not a month start): the month holding
--    those days was dropped, and the late roll counted their rows as before the period's
--    end (the invented carry-over 036 fixed came back). It is now the month's end in UTC.
--
-- Partitions created before this migration under a zone other than UTC keep their bounds
-- here; 058 gives them the bounds of their month in UTC (`SELECT relname,
-- pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname ~ '^ledger_[0-9]{4}_[0-9]{2}$'`
-- shows them).
--
-- Also, drop_old_partitions folds a month into the checkpoints under any DateStyle.
-- Why (found by a review of time handling, reproduced): when it folds a month under the
-- ledger's lock (every month after the first it drops, or the first when a backdated
-- write committed during its read), it built the INSERT as text with the month's end
-- quoted in (`%L::timestamptz`). A timestamptz becomes text in the session's DateStyle
-- and is read back in that DateStyle's field order, and one style cannot read what it
-- writes: under `DateStyle = 'SQL, YMD'` the end of February 2020 is written
-- '03/01/2020 00:00:00 UTC' and read as year 03 (22008, "date/time field value out of
-- range"), so a retention dropping two months or more failed whole, every run. (The
-- worker, the SDK and the CLI set DateStyle ISO on their own connections; a psql or cron
-- caller keeps the server's, database's, role's or PGDATESTYLE's.) The end is now passed
-- as a parameter (USING), which never becomes text.
--
-- Lock order: unchanged (create_partition, as 055 made it: the ledger's SHARE UPDATE
-- EXCLUSIVE lock, then its advisory lock; drop_old_partitions: its advisory lock, then
-- the ledger, then each month).
--
-- Migrations once applied are never edited: 055's create_partition and 045's
-- drop_old_partitions are replaced whole; only the lines marked 056 changed.

CREATE OR REPLACE FUNCTION meter.create_partition(p_year integer, p_month integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
    v_from text;  -- 056: the bounds as UTC text, read the same under any TimeZone/DateStyle
    v_to text;
BEGIN
    IF p_year IS NULL OR p_year < 1900 OR p_year > 9999 THEN
        PERFORM meter._fail('MT001', 'year', format('must be between 1900 and 9999, got %s',
                                                    coalesce(p_year::text, 'NULL')));
    END IF;
    IF p_month IS NULL OR p_month < 1 OR p_month > 12 THEN
        PERFORM meter._fail('MT001', 'month', format('must be between 1 and 12, got %s',
                                                     coalesce(p_month::text, 'NULL')));
    END IF;
    v_name := format('ledger_%s_%s', lpad(p_year::text, 4, '0'), lpad(p_month::text, 2, '0'));
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- 055: the ledger's partition lock (ATTACH's, SHARE UPDATE EXCLUSIVE, held to the end
    -- of the transaction) before the month's advisory lock, not after it: a roll holds
    -- the ledger's lock from before its first account (below), and a creator that waited
    -- for it holding the month's advisory lock deadlocked with that roll making the month
    LOCK TABLE ONLY meter.ledger IN SHARE UPDATE EXCLUSIVE MODE;                        -- 055
    PERFORM pg_advisory_xact_lock(19781, p_year * 100 + p_month);
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- 056: the month's bounds in UTC. They were v_from + interval '1 month' on a
    -- timestamptz, a month of the session's TimeZone: under America/New_York March ended
    -- on the 28th at 23:00 UTC (the rest of March had no partition, 23514), and under
    -- Pacific/Chatham April ran into May, whose partition then overlapped it (42P17).
    -- (p_year is 1900..9999, so four digits; December 9999 ends in year 10000)
    v_from := format('%s-%s-01 00:00:00+00', p_year, lpad(p_month::text, 2, '0'));
    v_to := format('%s-%s-01 00:00:00+00', p_year + p_month / 12,
                   lpad((p_month % 12 + 1)::text, 2, '0'));
    BEGIN
        EXECUTE format('CREATE TABLE meter.%I (LIKE meter.ledger INCLUDING DEFAULTS '
                       'INCLUDING CONSTRAINTS)', v_name);
    EXCEPTION WHEN duplicate_table THEN
        RETURN NULL;  -- created by the caller we waited for (see above)
    END;
    -- Attached rather than created as PARTITION OF: that takes ACCESS EXCLUSIVE on the
    -- ledger until this transaction ends, blocking every writer meanwhile (and a writer
    -- holding an account this transaction then needs was a deadlock). ATTACH takes SHARE
    -- UPDATE EXCLUSIVE, which writers and readers pass; the table is empty, so its check
    -- of the bounds costs nothing, and the ledger's indexes, constraint and row trigger
    -- come to it as with PARTITION OF.
    EXECUTE format('ALTER TABLE meter.ledger ATTACH PARTITION meter.%I FOR VALUES FROM (%L) TO (%L)',
                   v_name, v_from, v_to);  -- 056
    EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON meter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_change()', v_name);
    RETURN v_name;
END
$$;

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
        -- 056: a month of UTC, not of the session's TimeZone: under America/New_York
        -- March ended on the 28th at 23:00 UTC, at or before a roll's cutoff (036) that its
        -- last days were kept for, and the month was dropped under a roll still due.
        v_upper := (v_part.month_start AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
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
            -- 056: the month's end as a parameter: quoted in as text it was read back in
            -- the session's DateStyle, which under 'SQL, YMD' cannot read its own output
            EXECUTE format(
                'INSERT INTO meter.ledger_checkpoints AS c (namespace, account_id, balance, entries, through)
                 SELECT namespace, account_id, sum(amount), count(*), $1
                 FROM meter.%I GROUP BY namespace, account_id
                 ON CONFLICT (namespace, account_id) DO UPDATE
                 SET balance = c.balance + excluded.balance,
                     entries = c.entries + excluded.entries,
                     through = greatest(c.through, excluded.through),
                     updated_at = now()', v_part.relname) USING v_upper;  -- 056
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
