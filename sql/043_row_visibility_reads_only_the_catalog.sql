-- Row visibility reads only the system catalog, whatever the reader's search_path.
--
-- Why (found by a review of this stop): the row-level security policies call
-- meter._row_visible, which calls meter._is_privileged, with the reader's rights and the
-- reader's search_path. Both read pg_roles and pg_namespace by bare name, and the session's
-- temporary schema is searched for relations before pg_catalog unless named after it. Any
-- role may create temporary objects (PUBLIC has TEMP), so a meter_app login with no tenant
-- ran `CREATE TEMP VIEW pg_roles AS SELECT current_user AS rolname, true AS rolsuper, ...`
-- (or a pg_namespace naming it the schema's owner) and read every tenant's rows of every
-- table, where the same query without the view is refused with MT004. A schema of the
-- reader's own put before pg_catalog in its search_path could do the same with functions
-- or operators.
--
-- Now both functions run with search_path = pg_catalog, pg_temp (pg_temp last: never
-- searched for functions or operators, and after the catalog for relations) and name the
-- catalog's relations with their schema. Their results are unchanged for every real role.
-- They are called by the policies only (the API functions are SECURITY DEFINER, with
-- their own fixed search_path), once per row a role other than the owner reads directly;
-- the SET clause costs that call a GUC save and restore.
--
-- Locks: none (catalog reads).
--
-- Migrations once applied are never edited: 001's two functions are replaced whole; only
-- the lines marked 043 changed.

CREATE OR REPLACE FUNCTION meter._is_privileged(p_role name) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp  -- 043
AS $$
    SELECT coalesce(bool_or(r.rolsuper OR r.rolbypassrls), false)
        OR pg_has_role(p_role, (SELECT nspowner FROM pg_catalog.pg_namespace  -- 043
                                WHERE nspname = 'meter'), 'USAGE')
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'meter_maintenance')  -- 043
            AND pg_has_role(p_role, 'meter_maintenance', 'USAGE'))
    FROM pg_catalog.pg_roles r WHERE r.rolname = p_role  -- 043
$$;

CREATE OR REPLACE FUNCTION meter._row_visible(p_namespace text) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp  -- 043
AS $$
DECLARE
    v_tenant text := nullif(current_setting('meter.tenant', true), '');
BEGIN
    IF v_tenant IS NOT NULL THEN
        RETURN p_namespace = v_tenant;
    END IF;
    IF meter._is_privileged(current_user) THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION 'namespace: no tenant is set for role %', current_user
        USING ERRCODE = 'MT004', COLUMN = 'namespace',
              HINT = 'Call meter.set_tenant(''<namespace>'') first.';
END
$$;
