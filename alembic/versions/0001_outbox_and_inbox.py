"""outbox and inbox tables

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from alembic import context, op
from psycopg import sql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _s() -> str:
    """The configured schema, quoted (it never reaches SQL unquoted)."""
    return sql.Identifier(context.config.attributes["schema"]).as_string(None)


def upgrade() -> None:
    s = _s()
    op.execute(f"""
CREATE TABLE {s}.outbox (
    -- the producer contract (DESIGN.md): names and meaning are fixed
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    exchange        text        NOT NULL DEFAULT '',
    routing_key     text        NOT NULL,
    payload         jsonb,
    payload_bytes   bytea,
    content_type    text,
    headers         jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    ordering_key    text,
    message_type    text,
    correlation_id  text,
    available_at    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- the relay's bookkeeping
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    dead_at         timestamptz,
    sent_at         timestamptz,
    xact_id         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT outbox_message_id_key UNIQUE (message_id),
    CONSTRAINT outbox_routing_key_not_empty CHECK (routing_key <> ''),
    CONSTRAINT outbox_exactly_one_payload CHECK ((payload IS NULL) <> (payload_bytes IS NULL)),
    CONSTRAINT outbox_headers_is_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_ordering_key_not_empty CHECK (ordering_key <> '')
) WITH (
    -- a queue table: rows come and go all day, so vacuum it by row count, not by fraction,
    -- and without throttling
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
)""")
    op.execute(f"""
COMMENT ON TABLE {s}.outbox IS
  'Events to publish to RabbitMQ. Insert in the same transaction as the business change.'""")
    # The claim of rows without a key walks this index in id order; keyed rows are kept out of
    # it, so a backlog of keyed rows never slows the unkeyed path (docs/ordering.md).
    op.execute(f"""
CREATE INDEX outbox_pending_idx ON {s}.outbox (id)
 WHERE ordering_key IS NULL AND sent_at IS NULL AND dead_at IS NULL""")
    # The head of each key (its first unsent row, dead ones included) is the first entry of the
    # key here; the claim hops from key to key in hash order from a random point, so each claim
    # costs about one index probe per key it looks at, whatever the backlog (docs/ordering.md).
    op.execute(f"""
CREATE INDEX outbox_ordering_key_idx ON {s}.outbox (hashtext(ordering_key), ordering_key, id)
 WHERE ordering_key IS NOT NULL AND sent_at IS NULL""")
    op.execute(f"CREATE INDEX outbox_dead_idx ON {s}.outbox (id) WHERE dead_at IS NOT NULL")
    op.execute(f"CREATE INDEX outbox_sent_idx ON {s}.outbox (sent_at) WHERE sent_at IS NOT NULL")
    # One wake-up per inserting statement, with a constant payload: PostgreSQL folds identical
    # notifications of a transaction into one, so a 1,000-row insert costs one NOTIFY.
    op.execute(f"""
CREATE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$""")
    op.execute(f"""
CREATE TRIGGER outbox_notify AFTER INSERT ON {s}.outbox
   FOR EACH STATEMENT EXECUTE FUNCTION {s}.outbox_notify()""")
    op.execute(f"""
CREATE TABLE {s}.inbox (
    consumer      text        NOT NULL,
    message_id    uuid        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
)""")
    op.execute(f"""
COMMENT ON TABLE {s}.inbox IS
  'Message ids a consumer processed, written in the same transaction as its effect.'""")
    # Rows arrive in time order, so a BRIN index makes pruning cheap at almost no insert cost.
    op.execute(f"CREATE INDEX inbox_processed_at_idx ON {s}.inbox USING brin (processed_at)")


def downgrade() -> None:
    s = _s()
    op.execute(f"DROP TABLE {s}.inbox")
    op.execute(f"DROP TABLE {s}.outbox")
    op.execute(f"DROP FUNCTION {s}.outbox_notify()")
