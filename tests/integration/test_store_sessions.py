"""What the PostgreSQL store's lane sessions keep between batches."""

from __future__ import annotations

from outbox.settings import Settings
from outbox.store import PgStore, session_settings


async def test_the_claim_stays_prepared_across_empty_claims(settings: Settings) -> None:
    """An empty claim ends its transaction without a ROLLBACK, at which psycopg would forget
    its prepared statements: the claim would be planned again at every wake-up."""
    session = await PgStore(settings).session()
    try:
        for _ in range(8):
            assert await session.claim(10) == []
            await session.release()
        cur = await session.conn.execute(
            "SELECT generic_plans + custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE %s", ("%WITH RECURSIVE%",))
        assert await cur.fetchall() == [(8,)]
    finally:
        await session.close()


async def test_sessions_run_with_the_relay_settings(settings: Settings) -> None:
    session = await PgStore(settings).session()
    try:
        for name, value in session_settings(settings).items():
            cur = await session.conn.execute("SELECT setting FROM pg_settings WHERE name = %s",
                                             (name,))
            assert await cur.fetchone() == (value,), name
    finally:
        await session.close()
