"""`outbox migrate`: apply the Alembic revisions, from a git checkout or an installed wheel."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from alembic import command
from outbox.settings import Settings


def script_location() -> Path:
    """The revisions: ``outbox/_alembic`` in a wheel, the checkout's ``alembic/`` otherwise."""
    packaged = Path(str(resources.files("outbox"))) / "_alembic"
    if (packaged / "env.py").exists():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "alembic"
    if (checkout / "env.py").exists():
        return checkout
    raise FileNotFoundError("the outbox migrations are missing from this installation")


def sqlalchemy_url(database_url: str) -> str:
    """A libpq URL as SQLAlchemy wants it for psycopg 3."""
    scheme, _, rest = database_url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else database_url


def _config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["schema"] = settings.schema
    cfg.attributes["sqlalchemy_url"] = sqlalchemy_url(settings.database_url)
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to ``revision``; returns (before, after). A second run changes nothing."""
    before = current_revision(settings)
    command.upgrade(_config(settings), revision)
    return before, current_revision(settings)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(_config(settings), revision)


def head_revision() -> str | None:
    return ScriptDirectory(str(script_location())).get_current_head()


def current_revision(settings: Settings) -> str | None:
    engine = create_engine(sqlalchemy_url(settings.database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "version_table": "outbox_schema_version",
                "version_table_schema": settings.schema,
            })
            return ctx.get_current_revision()
    finally:
        engine.dispose()
