-- Two callers creating the same ledger partition no longer fail one of them, and creating
-- one no longer stops every other writer.
--
-- Why: create_partition takes the month's advisory lock, then checks again that the
-- partition is missing. But the check reads the catalog through the snapshot the statement
-- took before it waited for the lock, and taking an advisory lock does not refresh it: the
-- second caller did not see the partition the first had just committed, and its CREATE
-- TABLE failed with 42P07 (duplicate_table) -- reproduced every time with two callers
-- (found by review). A backdated consume or a batch could fail, or be dead-lettered, for a
-- month another transaction was creating at the same moment: an error the caller cannot
-- act on (SPEC 3.5).
--
-- Also: the partition was created as `PARTITION OF meter.ledger`, which holds ACCESS
-- EXCLUSIVE on the whole ledger until the creating transaction ends: every writer waited
-- for it, and one holding an account that transaction then needed deadlocked with it (seen
-- by review under load). The table is now created alone and attached, which takes SHARE
-- UPDATE EXCLUSIVE on the ledger: writers and readers go on.
--
-- Now a duplicate_table at creation means another caller created it: returns NULL, as the
-- check would have. Migrations once applied are never edited, so the function is replaced
-- whole; only the creation (exception block, LIKE, ATTACH) is new.

CREATE OR REPLACE FUNCTION meter.create_partition(p_year integer, p_month integer) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_name text;
    v_from timestamptz;
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
    PERFORM pg_advisory_xact_lock(19781, p_year * 100 + p_month);
    IF to_regclass('meter.' || v_name) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    v_from := make_timestamptz(p_year, p_month, 1, 0, 0, 0, 'UTC');
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
                   v_name, v_from, v_from + interval '1 month');
    EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON meter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION meter._refuse_change()', v_name);
    RETURN v_name;
END
$$;
