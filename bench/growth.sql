-- Growth benchmark data (bench/growth.py, tests/integration/test_plans.py): a consistent
-- ledger generated set-based, bypassing the per-row API functions. Run as a superuser; it
-- creates pg_temp.bench_populate for the session only.
--
-- p_rows ledger rows over p_accounts accounts (user 'g<n>') in namespace p_namespace,
-- spread evenly over the p_months calendar months ending with the current one. Row g
-- belongs to account g % p_accounts; the first row of an account allocates 1e9, every
-- later one consumes 1; event_time grows with g, so each account's rows are in time order.
-- Accounts get the matching balance and totals, so meter.reconcile is empty.
CREATE FUNCTION pg_temp.bench_populate(p_namespace text, p_accounts integer, p_rows bigint,
                                       p_months integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    -- months of UTC: added to a timestamptz they were months of the session's TimeZone,
    -- and under America/New_York the first was a month's first hour and a month was skipped
    v_first timestamptz := (date_trunc('month', now() AT TIME ZONE 'UTC')
                            - make_interval(months => p_months - 1)) AT TIME ZONE 'UTC';
    v_span interval;
    v_base bigint;
    m integer;
BEGIN
    FOR m IN 0 .. p_months - 1 LOOP
        PERFORM meter.create_partition(
            extract(year FROM v_first AT TIME ZONE 'UTC' + make_interval(months => m))::integer,
            extract(month FROM v_first AT TIME ZONE 'UTC' + make_interval(months => m))::integer);
    END LOOP;
    -- up to now, not into the future
    v_span := now() - v_first;
    v_base := coalesce((SELECT max(account_id) FROM meter.accounts), 0);
    INSERT INTO meter.accounts (namespace, account_id, user_id, event_type, resource, unit,
                                balance, total_credited, total_debited)
    OVERRIDING SYSTEM VALUE
    SELECT p_namespace, v_base + a + 1, 'g' || a, 'tokens', '', 'tok',
           1e9 - greatest(n - 1, 0), CASE WHEN n > 0 THEN 1e9 ELSE 0 END, greatest(n - 1, 0)
    FROM (SELECT a, (p_rows / p_accounts + CASE WHEN a < p_rows % p_accounts THEN 1 ELSE 0 END) AS n
          FROM generate_series(0, p_accounts - 1) a) s;
    PERFORM setval(pg_get_serial_sequence('meter.accounts', 'account_id'), v_base + p_accounts);
    INSERT INTO meter.ledger (id, namespace, account_id, user_id, event_type, resource, unit,
                              entry_type, amount, balance_after, event_time, idempotency_key)
    SELECT nextval('meter.ledger_id_seq'), p_namespace, v_base + g % p_accounts + 1,
           'g' || (g % p_accounts), 'tokens', '', 'tok',
           CASE WHEN g < p_accounts THEN 'allocation' ELSE 'consumption' END,
           CASE WHEN g < p_accounts THEN 1e9 ELSE -1 END,
           1e9 - g / p_accounts,
           v_first + v_span * (g::double precision / p_rows),
           NULL
    FROM generate_series(0, p_rows - 1) g;
END
$$;
