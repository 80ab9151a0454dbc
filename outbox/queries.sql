-- Every runtime query of outbox, in named blocks loaded by outbox/sql.py.
-- `{schema}` is replaced by the configured schema, quoted with psycopg.sql.Identifier.
-- Parameters are psycopg named placeholders. No other module holds SQL.

-- claim --
-- Lock up to %(limit)s ready rows. Rows without a key: oldest first. Keyed rows: only the head of
-- each key (its first unsent row; a key whose head is dead, delayed or in flight is skipped), and
-- only if written by a transaction older than every one still running; found by hopping from key
-- to key in hash order from a random point, one index probe per key (docs/ordering.md). A coin
-- decides whether keyed heads or unkeyed rows fill the batch first, so neither starves the other.
-- The batch is returned in id order. A created_at no client can read (infinite, BC, year 10000 on;
-- a day of margin for the session's time zone) comes back null: the relay parks that row.
-- Rows without a key are claimed by blocks of 256 ids: a block is taken with a transaction-level
-- advisory lock keyed (table, block) before its rows are locked, so a claim hops over the blocks
-- other lanes hold, one index probe each, instead of trying the lock of every row they hold (each
-- a lock-table lookup: with ten relays draining, 30,000 of them per claim; docs/ordering.md).
WITH RECURSIVE
draw AS MATERIALIZED (
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon,
           (floor(random() * 4294967296) - 2147483648)::int AS start,
           random() < 0.5 AS keyed_first,
           {table}::regclass::oid::int AS lock_class),
heads(h, k, id, upper) AS (
    (SELECT f.h, f.k, f.id, f.upper FROM draw, LATERAL (
        (SELECT hashtext(e.ordering_key) AS h, e.ordering_key AS k, e.id,
                2147483647::bigint AS upper
           FROM {schema}.outbox e
          WHERE e.ordering_key IS NOT NULL AND e.sent_at IS NULL
            AND hashtext(e.ordering_key) >= draw.start
          ORDER BY hashtext(e.ordering_key), e.ordering_key, e.id LIMIT 1)
        UNION ALL
        (SELECT hashtext(e.ordering_key), e.ordering_key, e.id, draw.start - 1::bigint
           FROM {schema}.outbox e
          WHERE e.ordering_key IS NOT NULL AND e.sent_at IS NULL
            AND hashtext(e.ordering_key) < draw.start
          ORDER BY hashtext(e.ordering_key), e.ordering_key, e.id LIMIT 1)
        LIMIT 1) f)
    UNION ALL
    -- the next key after (h, k), up to `upper`; past the top of the hash range, wrap around
    SELECT n.h, n.k, n.id, n.upper FROM heads w, draw, LATERAL (
        (SELECT hashtext(e.ordering_key) AS h, e.ordering_key AS k, e.id, w.upper
           FROM {schema}.outbox e
          WHERE e.ordering_key IS NOT NULL AND e.sent_at IS NULL
            AND (hashtext(e.ordering_key), e.ordering_key) > (w.h, w.k)
            AND hashtext(e.ordering_key) <= w.upper
          ORDER BY hashtext(e.ordering_key), e.ordering_key, e.id LIMIT 1)
        UNION ALL
        (SELECT hashtext(e.ordering_key), e.ordering_key, e.id, draw.start - 1::bigint
           FROM {schema}.outbox e
          WHERE w.upper = 2147483647 AND e.ordering_key IS NOT NULL AND e.sent_at IS NULL
            AND hashtext(e.ordering_key) < draw.start
          ORDER BY hashtext(e.ordering_key), e.ordering_key, e.id LIMIT 1)
        LIMIT 1) n),
keyed AS (
    -- a lateral lookup per head, so the plan always walks heads -> primary key, whatever the
    -- table's statistics say
    SELECT l.* FROM heads w, draw, LATERAL (
        SELECT o.id, o.message_id, o.exchange, o.routing_key, o.payload::text AS payload,
               o.payload_bytes, o.content_type, o.headers::text AS headers, o.ordering_key,
               o.message_type, o.correlation_id,
               CASE WHEN o.created_at > '0001-01-02' AND o.created_at < '9999-12-30'
                    THEN o.created_at END AS created_at, o.attempts
          FROM {schema}.outbox o
         WHERE o.id = w.id AND o.sent_at IS NULL AND o.dead_at IS NULL
           AND o.available_at <= now() AND o.xact_id < draw.horizon
           FOR UPDATE SKIP LOCKED) l
     LIMIT %(limit)s),
-- the blocks holding ready rows without a key, oldest first: one index probe per block
blocks(b) AS (
    (SELECT o.id / 256 FROM {schema}.outbox o
      WHERE o.ordering_key IS NULL AND o.sent_at IS NULL AND o.dead_at IS NULL
        AND o.available_at <= now()
      ORDER BY o.id LIMIT 1)
    UNION ALL
    SELECT n.b FROM blocks w, LATERAL (
        SELECT o.id / 256 AS b FROM {schema}.outbox o
         WHERE o.ordering_key IS NULL AND o.sent_at IS NULL AND o.dead_at IS NULL
           AND o.available_at <= now() AND o.id >= (w.b + 1) * 256
         ORDER BY o.id LIMIT 1) n),
-- of which those no other lane holds (the try-lock is evaluated only as far as the batch needs),
-- at most 64: every lock taken holds a slot of the server's shared lock table until the commit
free AS (
    SELECT b FROM blocks, draw
     WHERE pg_try_advisory_xact_lock(draw.lock_class, (b %% 4294967296 - 2147483648)::int)
     LIMIT 64),
-- their id ranges; when 64 blocks do not fill the batch (rows without a key few among keyed
-- ones), then every id past them, row by row (the union reads `free` whole only then)
ranges(lo, hi) AS (
    SELECT b * 256, (b + 1) * 256 FROM free
    UNION ALL
    SELECT (max(b) + 1) * 256, 9223372036854775807 FROM free HAVING count(*) = 64),
plain AS (
    SELECT l.* FROM ranges r, LATERAL (
        SELECT o.id, o.message_id, o.exchange, o.routing_key, o.payload::text AS payload,
               o.payload_bytes, o.content_type, o.headers::text AS headers, o.ordering_key,
               o.message_type, o.correlation_id,
               CASE WHEN o.created_at > '0001-01-02' AND o.created_at < '9999-12-30'
                    THEN o.created_at END AS created_at, o.attempts
          FROM {schema}.outbox o
         WHERE o.ordering_key IS NULL AND o.sent_at IS NULL AND o.dead_at IS NULL
           AND o.available_at <= now() AND o.id >= r.lo AND o.id < r.hi
         ORDER BY o.id
           FOR UPDATE SKIP LOCKED) l
     LIMIT %(limit)s)
-- the limit inside stops the scans (and the locking); the sort sees only the rows claimed
SELECT c.* FROM (
    SELECT * FROM keyed WHERE (SELECT keyed_first FROM draw)
    UNION ALL
    SELECT * FROM plain
    UNION ALL
    SELECT * FROM keyed WHERE NOT (SELECT keyed_first FROM draw)
    LIMIT %(limit)s
) c
ORDER BY c.id;

-- begin --
-- A lane's transaction (outbox/store.py sends it in the same round trip as the claim).
BEGIN;

-- commit --
-- Ends a lane's transaction (sent in the same round trip as the settling writes).
COMMIT;

-- delete_sent --
-- Remove rows the broker confirmed.
DELETE FROM {schema}.outbox WHERE id = ANY(%(ids)s);

-- mark_sent --
-- Keep rows the broker confirmed, marked sent (for `--on-sent mark`; `outbox cleanup` prunes them).
UPDATE {schema}.outbox SET sent_at = now() WHERE id = ANY(%(ids)s);

-- schedule_retry --
-- Count a failed attempt and push the row back by its own delay (seconds), keeping the error.
UPDATE {schema}.outbox o
   SET attempts = o.attempts + 1,
       available_at = now() + make_interval(secs => r.delay),
       last_error = r.error
  FROM unnest(%(ids)s::bigint[], %(delays)s::float8[], %(errors)s::text[]) AS r(id, delay, error)
 WHERE o.id = r.id;

-- park_dead --
-- Park rows as dead with their reason; `counted` is 1 when the failure was a publish attempt.
UPDATE {schema}.outbox o
   SET attempts = o.attempts + r.counted, dead_at = now(), last_error = r.error
  FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(counted)s::int[]) AS r(id, error, counted)
 WHERE o.id = r.id;

-- want_wakeups --
-- Raise or lower the flag the NOTIFY trigger reads (alembic/versions/0002): lowered while every
-- lane of the relay is busy, so that inserts then skip the NOTIFY. One row counts when it changed.
UPDATE {schema}.outbox_wakeup SET wanted = %(wanted)s, changed_at = now()
 WHERE wanted IS DISTINCT FROM %(wanted)s;

-- newest_id --
-- The wake-up probe of an active relay (outbox/wakeup.py): one step down the primary key.
SELECT coalesce(max(id), 0) FROM {schema}.outbox;

-- status --
-- The backlog at a glance (`outbox status`, the gauges of /metrics), and what holds keyed rows back
-- (docs/ordering.md, "The price of the horizon"): the claim publishes a keyed row only once every
-- transaction older than its writer has ended, so the oldest transaction still running anywhere in
-- the cluster that has written something, or a prepared transaction nobody finished, delays every
-- keyed row written after it began. One scan of the table (the held-back count is a filter of the
-- same scan); pg_stat_activity and pg_prepared_xacts have a row per session. The writer's columns
-- are null when there is none; its age is null for other roles' sessions unless this role has
-- pg_read_all_stats (PostgreSQL hides their xact_start), and `horizon_age_seconds` then falls
-- back to the age of the oldest keyed row it holds back.
WITH horizon AS MATERIALIZED (
    -- read once (an InitPlan), not per row: pg_current_snapshot() builds a snapshot per call
    SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin,
           (pg_snapshot_xmax(pg_current_snapshot())::text::numeric
            - pg_snapshot_xmin(pg_current_snapshot())::text::numeric)::bigint AS xids_since),
backlog AS (
    SELECT count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL) AS pending,
           count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL AND available_at <= now())
             AS ready,
           count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL AND attempts > 0)
             AS retrying,
           count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
           count(DISTINCT ordering_key) FILTER (WHERE dead_at IS NOT NULL) AS blocked_keys,
           count(*) FILTER (WHERE sent_at IS NOT NULL) AS sent,
           coalesce(extract(epoch FROM now() - min(created_at)
                            FILTER (WHERE sent_at IS NULL AND dead_at IS NULL
                                    AND isfinite(created_at))), 0)::float8
             AS oldest_pending_age_seconds,
           count(*) FILTER (WHERE ordering_key IS NOT NULL AND sent_at IS NULL
                              AND dead_at IS NULL AND xact_id >= (SELECT xmin FROM horizon))
             AS held_back_rows,
           min(created_at) FILTER (WHERE ordering_key IS NOT NULL AND sent_at IS NULL
                                     AND dead_at IS NULL AND isfinite(created_at)
                                     AND xact_id >= (SELECT xmin FROM horizon))
             AS oldest_held_back
      FROM {schema}.outbox),
writer AS (
    SELECT w.pid, w.database, w.role, w.application_name, w.state, w.prepared,
           -- (greatest() ignores a null: a hidden age would read 0)
           CASE WHEN w.age_seconds IS NOT NULL THEN greatest(0, w.age_seconds) END
             AS age_seconds, h.xids_since
      FROM horizon h, (
            SELECT a.pid, a.datname::text AS database, a.usename::text AS role,
                   a.application_name, a.state, NULL::text AS prepared,
                   extract(epoch FROM clock_timestamp() - a.xact_start)::float8 AS age_seconds,
                   a.backend_xid AS xid
              FROM pg_stat_activity a
             WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
            UNION ALL
            SELECT NULL, p.database::text, p.owner::text, NULL, 'prepared', p.gid,
                   extract(epoch FROM clock_timestamp() - p.prepared)::float8, p.transaction
              FROM pg_prepared_xacts p) w
     ORDER BY age(w.xid) DESC
     LIMIT 1)
SELECT b.pending, b.ready, b.retrying, b.dead, b.blocked_keys, b.sent,
       b.oldest_pending_age_seconds, b.held_back_rows,
       CASE WHEN w.xids_since IS NULL THEN 0
            ELSE coalesce(w.age_seconds,
                          extract(epoch FROM now() - b.oldest_held_back)::float8, 0) END
         AS horizon_age_seconds,
       w.pid, w.database, w.role, w.application_name, w.state, w.prepared, w.age_seconds,
       w.xids_since
  FROM backlog b LEFT JOIN writer w ON true;

-- doctor_horizon --
-- `outbox doctor`: every transaction that has written and is still running, and every prepared
-- one nobody finished (each holds keyed rows back: see `status`), oldest first; the age is null
-- when PostgreSQL hides it from this role.
SELECT w.pid, w.database, w.role, w.application_name, w.state, w.prepared,
       CASE WHEN w.age_seconds IS NOT NULL THEN greatest(0, w.age_seconds) END AS age_seconds
  FROM (SELECT a.pid, a.datname::text AS database, a.usename::text AS role,
               a.application_name, a.state, NULL::text AS prepared,
               extract(epoch FROM clock_timestamp() - a.xact_start)::float8 AS age_seconds
          FROM pg_stat_activity a
         WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
        UNION ALL
        SELECT NULL, p.database::text, p.owner::text, NULL, 'prepared', p.gid,
               extract(epoch FROM clock_timestamp() - p.prepared)::float8
          FROM pg_prepared_xacts p) w
 ORDER BY w.age_seconds DESC NULLS LAST;

-- dead_list --
-- Dead rows, oldest first, optionally filtered by id and routing key.
SELECT id, message_id, exchange, routing_key, ordering_key, attempts, last_error,
       extract(epoch FROM now() - dead_at)::float8 AS dead_for_seconds,
       CASE WHEN isfinite(created_at) THEN extract(epoch FROM now() - created_at)::float8
       END AS age_seconds
  FROM {schema}.outbox
 WHERE dead_at IS NOT NULL
   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
   AND (%(routing_key)s::text IS NULL OR routing_key = %(routing_key)s::text)
 ORDER BY id
 LIMIT %(limit)s;

-- dead_retry --
-- Put dead rows back to pending, attempts reset, to be published now.
UPDATE {schema}.outbox
   SET dead_at = NULL, attempts = 0, available_at = now()
 WHERE dead_at IS NOT NULL
   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
   AND (%(routing_key)s::text IS NULL OR routing_key = %(routing_key)s::text);

-- dead_discard --
-- Delete dead rows for good.
DELETE FROM {schema}.outbox
 WHERE dead_at IS NOT NULL
   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
   AND (%(routing_key)s::text IS NULL OR routing_key = %(routing_key)s::text);

-- cleanup --
-- Delete rows marked sent more than %(older_than)s seconds ago, at most %(limit)s at a time.
DELETE FROM {schema}.outbox
 WHERE id IN (SELECT id FROM {schema}.outbox
               WHERE sent_at < now() - make_interval(secs => %(older_than)s)
               LIMIT %(limit)s);

-- inbox_prune --
-- Forget processed message ids older than %(older_than)s seconds, at most %(limit)s at a time.
DELETE FROM {schema}.inbox
 WHERE (consumer, message_id) IN (
         SELECT consumer, message_id FROM {schema}.inbox
          WHERE processed_at < now() - make_interval(secs => %(older_than)s)
          LIMIT %(limit)s);

-- inbox_record --
-- Record that a consumer processed a message; 0 rows means it was processed before.
INSERT INTO {schema}.inbox (consumer, message_id) VALUES (%(consumer)s, %(message_id)s)
ON CONFLICT DO NOTHING;

-- inbox_record_many --
-- `inbox_record` for a micro-batch (outbox.consumer): returns the ids that were new; the others were
-- processed before. Sorted, so that consumers racing on the same ids lock them in the same order.
INSERT INTO {schema}.inbox (consumer, message_id)
SELECT CAST(%(consumer)s AS text), m FROM unnest(CAST(%(message_ids)s AS uuid[])) AS m ORDER BY m
ON CONFLICT DO NOTHING
RETURNING message_id;

-- enqueue --
-- The producer's insert (outbox.producer); any language can write the same statement.
INSERT INTO {schema}.outbox (exchange, routing_key, payload, payload_bytes, content_type, headers,
                             ordering_key, message_type, correlation_id, available_at)
VALUES (%(exchange)s, %(routing_key)s, CAST(%(payload)s AS jsonb), %(payload_bytes)s,
        %(content_type)s, CAST(%(headers)s AS jsonb), %(ordering_key)s, %(message_type)s,
        %(correlation_id)s, now() + make_interval(secs => %(delay)s))
RETURNING message_id;

-- listen --
-- Wake-ups from the statement-level trigger of the outbox table.
LISTEN {channel};

-- ping --
-- Proves a quiet LISTEN connection is still alive.
SELECT 1;


-- doctor_server --
-- `outbox doctor`: who we are and what the server runs.
SELECT current_user, current_setting('server_version'),
       current_setting('server_version_num')::int, current_setting('autovacuum')::bool;

-- doctor_tables --
-- `outbox doctor`: the outbox's tables present in the schema, with their storage parameters.
SELECT c.relname, coalesce(c.reloptions, ARRAY[]::text[])
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')
   AND c.relname IN ('outbox', 'inbox', 'outbox_schema_version');

-- doctor_revision --
-- `outbox doctor`: the Alembic revision the schema is at.
SELECT version_num FROM {schema}.outbox_schema_version;

-- doctor_indexes --
-- `outbox doctor`: the indexes of the outbox and inbox tables and whether each is usable.
SELECT i.relname, x.indisvalid AND x.indisready
  FROM pg_index x
  JOIN pg_class i ON i.oid = x.indexrelid
  JOIN pg_class t ON t.oid = x.indrelid
  JOIN pg_namespace n ON n.oid = t.relnamespace
 WHERE n.nspname = %(schema)s AND t.relname IN ('outbox', 'inbox');

-- doctor_trigger --
-- `outbox doctor`: the NOTIFY trigger of the outbox table and whether it fires ('D' = disabled).
SELECT t.tgenabled::text
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = 'outbox' AND t.tgname = 'outbox_notify';

-- doctor_privileges --
-- `outbox doctor`: whether the current role can do what the relay does, and whether it can do more.
SELECT has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'DELETE'),
       (SELECT bool_and(has_column_privilege(c.oid, col, 'UPDATE'))
          FROM unnest(ARRAY['attempts', 'available_at', 'last_error', 'dead_at', 'sent_at'])
               AS col),
       pg_has_role(c.relowner, 'USAGE'),
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
       -- null when the wake-up flag's table is missing (a schema before revision 0002)
       (SELECT has_table_privilege(w.oid, 'UPDATE') FROM pg_class w
         WHERE w.relnamespace = n.oid AND w.relname = 'outbox_wakeup')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = 'outbox';

-- doctor_notify --
-- `outbox doctor`: wake the outbox channel without inserting anything (listeners see one wake-up).
SELECT pg_notify(%(channel)s, '');

-- doctor_session --
-- `outbox doctor`: the session settings the relay passes when it connects, as the server applied them.
SELECT name, setting FROM pg_settings
 WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout',
                'synchronous_commit', 'jit');
