-- Runs once, when the postgres container initialises an empty volume, as
-- POSTGRES_USER (the api's role).
--
-- The api normally sends its statement timeout as a startup option
-- (DB_STATEMENT_TIMEOUT_MS), but PgBouncer refuses startup options it does
-- not know, so behind PgBouncer (DB_PGBOUNCER=1) the timeout must live on the
-- role. Setting it here gives every session the same 30 s bound, direct or
-- pooled. Keep it below GUNICORN_TIMEOUT (60 s).
-- For an existing volume run this statement once by hand (README).
ALTER ROLE CURRENT_USER SET statement_timeout = '30s';
-- Django works in UTC. Directly connected, the api sends TimeZone as a startup
-- option; behind PgBouncer it cannot, and a per-session SET TIME ZONE does not
-- survive transaction pooling, so the role carries it too.
ALTER ROLE CURRENT_USER SET timezone = 'UTC';
