"""notify only while a relay waits for it

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A NOTIFY costs the inserting transaction more than it seems: PostgreSQL holds one cluster-wide
lock from a notifying commit until its WAL flush, so the application's inserting transactions
commit one at a time (measured with 8 connections of single-row inserts: about half the commits
per second). While every lane of the relay is busy, each claims again as soon as its batch is
settled and needs no wake-up: the relay then lowers this flag and the trigger skips the NOTIFY.
It raises the flag as soon as a lane sleeps (outbox/wakeup.py).
"""

from alembic import context, op
from psycopg import sql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _s() -> str:
    return sql.Identifier(context.config.attributes["schema"]).as_string(None)


def upgrade() -> None:
    s = _s()
    op.execute(f"""
CREATE TABLE {s}.outbox_wakeup (
    only_row    boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    wanted      boolean     NOT NULL DEFAULT true,
    changed_at  timestamptz NOT NULL DEFAULT now()
)""")
    op.execute(f"""
COMMENT ON TABLE {s}.outbox_wakeup IS
  'Whether a relay waits for a NOTIFY of new rows; only the relay writes it.'""")
    op.execute(f"INSERT INTO {s}.outbox_wakeup DEFAULT VALUES")
    # The trigger runs with the inserting role's rights: anyone may read one boolean, so no
    # producer role needs a new grant.
    op.execute(f"GRANT SELECT ON {s}.outbox_wakeup TO PUBLIC")
    # A missing row or a NULL reads as "wanted": the safe side is the old behaviour.
    op.execute(f"""
CREATE OR REPLACE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT w.wanted FROM {s}.outbox_wakeup w) IS NOT FALSE THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    END IF;
    RETURN NULL;
END
$$""")


def downgrade() -> None:
    s = _s()
    op.execute(f"""
CREATE OR REPLACE FUNCTION {s}.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$""")
    op.execute(f"DROP TABLE {s}.outbox_wakeup")
