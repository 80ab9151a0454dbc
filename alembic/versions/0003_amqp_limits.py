"""refuse at insert the rows AMQP cannot carry

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

What the database can say cheaply is refused at insert, as a check violation naming the limit,
instead of being parked dead by the relay later: the AMQP short strings (exchange, routing key,
content type, type, correlation id: 255 bytes at most), a created_at an AMQP timestamp can carry
(from 1970 on, finite), and the nesting of headers (outbox/limits.py, MAX_DEPTH). The size of
headers is left to the relay: whether they fit depends on the frame_max each connection
negotiates.

A trigger on INSERT rather than CHECK constraints: a CHECK holds for every UPDATE too, so the
relay could not park (or reschedule) a row written before this revision, and `outbox dead retry`
would fail on one; and a migration must never fail on old rows. Its WHEN clause is evaluated
without calling the function, so a good row costs about what a CHECK costs.
"""

from alembic import context, op
from psycopg import sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# the name each violation reports (as a constraint would), and its condition for refusal
LIMITS = {
    **{f"outbox_{column}_at_most_255_bytes": f"octet_length(NEW.{column}) > 255"
       for column in ("exchange", "routing_key", "content_type", "message_type",
                      "correlation_id")},
    # the upper bound only needs to be finite and readable by every client
    "outbox_created_at_from_1970":
        "NOT (NEW.created_at >= '1970-01-01 00:00:00+00' "
        "AND NEW.created_at < '9999-01-01 00:00:00+00')",
    # a value at level 101 exists exactly when the headers nest deeper than 100
    "outbox_headers_at_most_100_deep": "jsonb_path_exists(NEW.headers, 'strict $.**{101}')",
}


def _s() -> str:
    return sql.Identifier(context.config.attributes["schema"]).as_string(None)


def upgrade() -> None:
    s = _s()
    cases = "\n".join(f"        WHEN {cond} THEN '{name}'" for name, cond in LIMITS.items())
    op.execute(f"""
CREATE FUNCTION {s}.outbox_refuse_unframable() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    refused text := CASE
{cases}
    END;
BEGIN
    RAISE EXCEPTION 'new row for relation "%" violates check constraint "%"',
                    TG_TABLE_NAME, refused
        USING ERRCODE = 'check_violation', CONSTRAINT = refused, SCHEMA = TG_TABLE_SCHEMA,
              TABLE = TG_TABLE_NAME,
              HINT = 'AMQP cannot carry this row as written: see "Rows AMQP cannot carry" '
                     'in the outbox README';
END
$$""")
    when = "\n      OR ".join(f"({cond})" for cond in LIMITS.values())
    op.execute(f"""
CREATE TRIGGER outbox_refuse_unframable BEFORE INSERT ON {s}.outbox FOR EACH ROW
  WHEN ({when})
  EXECUTE FUNCTION {s}.outbox_refuse_unframable()""")


def downgrade() -> None:
    s = _s()
    op.execute(f"DROP TRIGGER outbox_refuse_unframable ON {s}.outbox")
    op.execute(f"DROP FUNCTION {s}.outbox_refuse_unframable()")
