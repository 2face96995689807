-- Group roles and their grants (Appendix C). Applied by `meter migrate --with-roles` after
-- the migrations, every time: everything here is idempotent.
--
-- meter_app:         execute the API, read the tables (row-level security applies), never
--                    write a table directly.
-- meter_maintenance: what workers and beat need: the API for any namespace without a tenant,
--                    partition management, the all-namespace expiry sweep.
-- Login roles receive these by membership (GRANT meter_app TO billing_service); nothing here
-- relies on role attributes such as BYPASSRLS, which membership does not pass on.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        CREATE ROLE meter_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        CREATE ROLE meter_maintenance NOLOGIN;
    END IF;
END
$$;

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;
GRANT USAGE ON SCHEMA meter TO meter_app, meter_maintenance;

-- Tables by name: never partitions, which carry no row-level security of their own.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'ledger', 'reservations', 'idempotency_keys',
                             'periods', 'period_config_changes', 'ledger_checkpoints',
                             'dead_letters', 'schema_migrations']
    LOOP
        IF to_regclass('meter.' || t) IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON meter.%I FROM meter_app, meter_maintenance', t);
            EXECUTE format('GRANT SELECT ON meter.%I TO meter_app, meter_maintenance', t);
        END IF;
    END LOOP;
END
$$;

-- The API: every function whose name does not start with '_' (internal helpers run with the
-- rights of the API function that calls them and are granted to no one), except the
-- row-visibility helpers that policies call with the reader's rights.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'meter'::regnamespace AND p.prokind = 'f'
          AND (p.proname NOT LIKE '\_%' OR p.proname IN ('_row_visible', '_is_privileged'))
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO meter_app, meter_maintenance', f);
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION meter.create_partition(integer, integer),
                           meter.ensure_partitions(integer),
                           meter.drop_old_partitions(integer),
                           meter.retention_backlog(integer)
    FROM meter_app;

-- Cluster-wide maintenance (sql/009_beat.sql): the functions refuse a tenant themselves; the
-- grants say the same, so an application role never even reaches them.
REVOKE EXECUTE ON FUNCTION meter.record_maintenance_run(text, boolean, jsonb, text, timestamptz),
                           meter.get_maintenance_runs(),
                           meter.prune_idempotency_keys(integer, integer, timestamptz)
    FROM meter_app;
