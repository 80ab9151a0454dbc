"""refuse at insert the rows AMQP cannot carry

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

What a constraint can say cheaply is refused at insert, with a named constraint, instead of being
parked dead by the relay later: the AMQP short strings (exchange, routing key, content type,
type, correlation id: 255 bytes at most), a created_at an AMQP timestamp can carry (from 1970 on,
finite), and the nesting of headers (outbox/limits.py, MAX_DEPTH). The size of headers is left to
the relay: whether they fit depends on the frame_max each connection negotiates.

NOT VALID: rows already in the table are not checked, so the migration never fails on them and
takes no long lock; the relay parks those with the same reasons.
"""

from alembic import context, op
from psycopg import sql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CONSTRAINTS = {
    **{f"outbox_{column}_at_most_255_bytes": f"octet_length({column}) <= 255"
       for column in ("exchange", "routing_key", "content_type", "message_type",
                      "correlation_id")},
    # the upper bound only needs to be finite and readable by every client
    "outbox_created_at_from_1970":
        "created_at >= '1970-01-01 00:00:00+00' AND created_at < '9999-01-01 00:00:00+00'",
    # a value at level 101 exists exactly when the headers nest deeper than 100
    "outbox_headers_at_most_100_deep": "NOT jsonb_path_exists(headers, 'strict $.**{101}')",
}


def _s() -> str:
    return sql.Identifier(context.config.attributes["schema"]).as_string(None)


def upgrade() -> None:
    s = _s()
    for name, check in CONSTRAINTS.items():
        op.execute(f"ALTER TABLE {s}.outbox ADD CONSTRAINT {name} CHECK ({check}) NOT VALID")


def downgrade() -> None:
    s = _s()
    for name in reversed(CONSTRAINTS):
        op.execute(f"ALTER TABLE {s}.outbox DROP CONSTRAINT IF EXISTS {name}")
