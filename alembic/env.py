"""Alembic environment of outbox; run through `outbox migrate` (see outbox/migrate.py)."""

from __future__ import annotations

from alembic import context
from psycopg import sql
from sqlalchemy import create_engine, pool, text

config = context.config
schema: str = config.attributes["schema"]
quoted = sql.Identifier(schema).as_string(None)

engine = create_engine(config.attributes["sqlalchemy_url"], poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        version_table="outbox_schema_version",
        version_table_schema=schema,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        # One migrator at a time (several Jobs or pods may start together).
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('outbox migrate'))"))
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
        context.run_migrations()
engine.dispose()
