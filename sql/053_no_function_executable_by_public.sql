-- No function of the schema is executable by PUBLIC, whether roles.sql has run or not.
--
-- Why (found by a review of the migration runner and the roles, reproduced): PostgreSQL
-- grants EXECUTE on a new function to PUBLIC. Files 001-009 ended with a REVOKE of all
-- functions from PUBLIC and later files revoked their new functions one by one, but seven
-- were left with PUBLIC's EXECUTE: meter._arg_type_ok, _decimal_text_ok,
-- _fast_arg_types_ok, _time_text_ok (032), retention_backlog (045),
-- dead_letters_to_retry (048, SECURITY DEFINER) and _dead_letter_source (049). roles.sql
-- revokes them all, but only when it runs: an installation migrated --with-roles and
-- later upgraded by a plain `meter migrate` (what docs/operations.md says to run before
-- new workers) let meter_app execute the maintenance function retention_backlog and the
-- internal helpers, which roles.sql grants to no one. Nothing they return crosses a
-- tenant (dead_letters_to_retry keeps to the caller's scope; retention_backlog reads
-- partition names from the catalog), so this is least privilege, not a leak.
--
-- Now all of them are revoked from PUBLIC here too, and the two that roles.sql grants
-- are granted here when the roles exist (as 013 and 015 do), so such an upgrade has
-- exactly the grants of a --with-roles run: dead_letters_to_retry to meter_app and
-- meter_maintenance (`meter dead-letters retry --all`), retention_backlog to
-- meter_maintenance (the retention task). tests/integration/test_migrate.py checks both
-- for every migration to come.
--
-- Locks: none on tables (function ACLs in pg_proc only).

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA meter FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_maintenance') THEN
        GRANT EXECUTE ON FUNCTION meter.dead_letters_to_retry(),
                                  meter.retention_backlog(integer)
            TO meter_maintenance;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meter_app') THEN
        GRANT EXECUTE ON FUNCTION meter.dead_letters_to_retry() TO meter_app;
    END IF;
END
$$;
