-- The request fingerprint of an explicit event_time no longer depends on the session's
-- DateStyle.
--
-- Why: allocate, consume and apply_events fingerprint `event_time` as the text of
-- `event_time AT TIME ZONE 'UTC'`, whose format follows the session's DateStyle. The same
-- request sent from a session with another DateStyle (`options=-c datestyle=SQL,DMY`, a
-- worker configured differently) was refused as a different request
-- (IdempotencyConflictError) instead of replayed.
--
-- Now the three functions run with DateStyle 'ISO, MDY' (PostgreSQL's default, under which
-- every stored fingerprint was computed, so stored keys still replay). apply_events also
-- parses event times in that style whatever the session says. The functions' bodies are
-- unchanged: a setting per function costs nothing measurable (consume with a key, one
-- connection: 211-214 µs of server CPU per call either way).

ALTER FUNCTION meter.allocate(text, text, numeric, text, text, text, timestamptz, jsonb, text)
    SET datestyle = 'ISO, MDY';
ALTER FUNCTION meter.consume(text, text, numeric, text, text, boolean, text, timestamptz, jsonb,
                             text)
    SET datestyle = 'ISO, MDY';
ALTER FUNCTION meter.apply_events(jsonb, text, boolean)
    SET datestyle = 'ISO, MDY';
