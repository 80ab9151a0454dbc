-- Least-privilege roles for outbox (docs/operations.md explains each grant).
--
-- Run as the owner of the outbox tables (the role `outbox migrate` ran as), after the migration:
--
--   psql "$OWNER_URL" -v ON_ERROR_STOP=1 -f sql/roles.sql \
--        -v schema=public \
--        -v relay_role=outbox_relay       -v relay_password="$RELAY_PASSWORD" \
--        -v producer_role=outbox_producer -v producer_password="$PRODUCER_PASSWORD" \
--        -v consumer_role=outbox_consumer -v consumer_password="$CONSUMER_PASSWORD"
--
-- Every variable is optional (defaults: schema public, roles outbox_relay, outbox_producer and
-- outbox_consumer). A role is created if missing; a password is set only when one is given (with
-- certificate or IAM authentication give none). Running it again changes nothing.
--
--   relay     claims, publishes and settles rows; also `outbox status|dead|cleanup|doctor`.
--             Nothing on the inbox, no INSERT, no DDL.
--   producer  INSERT of the producer-facing columns only, plus reading back id and message_id
--             (INSERT ... RETURNING message_id).
--   consumer  records processed message ids in the inbox (INSERT, SELECT) and prunes it
--             (`outbox inbox prune`: DELETE).

\if :{?schema}
\else
  \set schema public
\endif
\if :{?relay_role}
\else
  \set relay_role outbox_relay
\endif
\if :{?producer_role}
\else
  \set producer_role outbox_producer
\endif
\if :{?consumer_role}
\else
  \set consumer_role outbox_consumer
\endif

BEGIN;

-- Roles (LOGIN, nothing else: no CREATEDB, CREATEROLE, INHERIT of anything).
SELECT format('CREATE ROLE %I LOGIN', r) FROM unnest(ARRAY[:'relay_role', :'producer_role',
       :'consumer_role']) AS r WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r)
\gexec
\if :{?relay_password}
  ALTER ROLE :"relay_role" PASSWORD :'relay_password';
\endif
\if :{?producer_password}
  ALTER ROLE :"producer_role" PASSWORD :'producer_password';
\endif
\if :{?consumer_password}
  ALTER ROLE :"consumer_role" PASSWORD :'consumer_password';
\endif

-- CONNECT is granted to PUBLIC by default; hardened databases revoke it, so grant it explicitly.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I, %I', current_database(), :'relay_role',
              :'producer_role', :'consumer_role')
\gexec

-- USAGE lets a role name objects of the schema; CREATE (DDL) is never granted.
GRANT USAGE ON SCHEMA :"schema" TO :"relay_role", :"producer_role", :"consumer_role";

-- relay: read rows (claim, status, dead list); update only its bookkeeping columns (settle,
-- retry, park dead, dead retry; SELECT ... FOR UPDATE needs an UPDATE privilege too); delete
-- confirmed rows (on-sent delete, cleanup, dead discard). It cannot rewrite a payload, insert
-- events, or touch the inbox.
GRANT SELECT, DELETE ON :"schema".outbox TO :"relay_role";
GRANT UPDATE (attempts, available_at, last_error, dead_at, sent_at)
   ON :"schema".outbox TO :"relay_role";
-- `outbox doctor` compares the schema's revision with the relay's.
GRANT SELECT ON :"schema".outbox_schema_version TO :"relay_role";
-- The relay lowers the wake-up flag while it is busy, so that inserts skip the NOTIFY then
-- (alembic/versions/0002; everyone may read it, the trigger does).
GRANT SELECT, UPDATE ON :"schema".outbox_wakeup TO :"relay_role";

-- producer: insert events (the producer contract's columns; the relay's bookkeeping columns keep
-- their defaults) and read back what RETURNING asks for. The identity column needs no sequence
-- grant. The NOTIFY trigger runs with the producer's rights and needs none either (the wake-up flag
-- it reads is readable by every role).
GRANT INSERT (message_id, exchange, routing_key, payload, payload_bytes, content_type, headers,
              ordering_key, message_type, correlation_id, available_at)
   ON :"schema".outbox TO :"producer_role";
GRANT SELECT (id, message_id) ON :"schema".outbox TO :"producer_role";

-- consumer: the inbox insert (ON CONFLICT DO NOTHING needs only INSERT) and reading it back;
-- DELETE for `outbox inbox prune` (run it as the consumer, e.g. from a CronJob).
GRANT SELECT, INSERT, DELETE ON :"schema".inbox TO :"consumer_role";

COMMIT;
