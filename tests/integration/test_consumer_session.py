"""The consumer's own psycopg connection gets outbox's session settings (outbox.store.connect),
with the deadlines of a handler's transaction rather than the relay's."""

from __future__ import annotations

import uuid
from typing import Any

import aiormq
import psycopg
import pytest
from pamqp import commands as spec

from outbox.consumer import Consumer, Message
from outbox.settings import Settings
from tests import support

pytestmark = pytest.mark.timeout(60)

SHOWN = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
         "synchronous_commit", "jit", "application_name")


async def test_handler_runs_under_the_consumer_session_settings(settings: Settings,
                                                                  queue: str) -> None:
    seen: dict[str, str] = {}

    async def handle(conn: psycopg.AsyncConnection[Any], message: Message) -> None:
        for name in SHOWN:
            cur = await conn.execute("SELECT current_setting(%s)", (name,))
            row = await cur.fetchone()
            assert row is not None
            seen[name] = row[0]

    amqp = await aiormq.connect(support.AMQP_URL)
    try:
        channel = await amqp.channel(publisher_confirms=True)
        await channel.basic_publish(b"{}", routing_key=queue, properties=spec.Basic.Properties(
            message_id=str(uuid.uuid4()), delivery_mode=2))
        consumer = Consumer(queue, handle, name="test", settings=settings, max_attempts=1,
                            handler_timeout=7.5, pipeline=False)
        try:
            async with consumer:
                await consumer.wait_for(lambda c: c.applied == 1, timeout=30)
        finally:
            await channel.queue_delete(f"{queue}.dead")
    finally:
        await amqp.close()
    assert seen == {
        # the handler's deadline, not the relay's short db_timeout
        "statement_timeout": "7500ms", "lock_timeout": "7500ms",
        "idle_in_transaction_session_timeout": f"{int((7.5 + settings.db_timeout) * 1000)}ms",
        # the ack follows the commit: it must be durable, unlike the relay's marks
        "synchronous_commit": "on",
        "jit": "off",
        "application_name": "outbox-consumer",
    }
