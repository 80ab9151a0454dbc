"""Consume a queue so that every message has its effect exactly once: the inbox pattern, on aiormq.

    async def handle(conn: psycopg.AsyncConnection, message: Message) -> None:
        await conn.execute("UPDATE accounts SET ... WHERE id = %s", (message.json()["id"],))

    consumer = Consumer("billing.orders", handle, name="billing", settings=Settings.load())
    await consumer.run()            # until consumer.stop(); reconnects by itself

For each message the consumer opens a database transaction, records ``(name, message_id)`` in the
``inbox`` table (``INSERT … ON CONFLICT DO NOTHING``), runs the handler only if the row was new,
commits, and only then acks. A redelivered or twice-published message finds its row and is acked
without running the handler again.

Micro-batches. Messages that arrived together (up to ``batch_size``, within the ``prefetch``
window) share one transaction: one inbox statement for the batch, the handlers' statements
pipelined (psycopg pipeline mode), one commit, one ``basic.ack(multiple=True)``. If anything in a
batch fails, the transaction is rolled back and the batch is run again one message per transaction,
so one bad message never undoes the others' effects.

Retries. A handler that raises is rolled back; the message is republished (with publisher confirms)
to a delay queue ``<queue>.retry.<ms>`` whose ``x-message-ttl`` dead-letters it back to ``<queue>``
after the delay, with the header ``x-outbox-attempt`` counting attempts; only then is the original
acked. After ``max_attempts`` the message is republished to the dead-letter exchange (default: the
queue ``<queue>.dead``) with its reason in ``x-outbox-dead-reason``. Every step is "publish,
confirm, then ack": a crash in between leaves two copies, never none, and the inbox absorbs the
second one. Each delay queue has one fixed TTL, so its messages expire in order (a per-message TTL
would wait behind longer ones).

Messages without a ``message_id``, or whose ``message_id`` is not a UUID, go to the dead-letter
exchange at once with the reason; they cannot be deduplicated.

Broker or database unavailable: the consumer reconnects with capped exponential backoff and jitter;
a batch whose database is unreachable is held (unacked, no transaction open) and retried without
counting attempts. A statement that fails on a live connection (statement or lock timeout,
deadlock, serialization failure) is a handler error, with psycopg as with SQLAlchemy.
A ``basic.cancel`` from the broker (the queue was deleted) ends the subscription and the consumer
subscribes again (declaring the queue again when ``declare`` is set).

Where things are: `Consumer` (outbox.consumer.consumer) subscribes, batches and acks; `Message`
and `ConsumerCounts` (outbox.consumer.message) are what a handler sees and what a consumer counts;
outbox.consumer.database runs the transaction on psycopg or SQLAlchemy; outbox.consumer.topology
names and declares the queues; outbox.consumer.retries moves failed messages.
"""

from outbox.consumer.consumer import Consumer
from outbox.consumer.message import (
    ATTEMPT_HEADER,
    DEAD_CONSUMER_HEADER,
    DEAD_QUEUE_HEADER,
    DEAD_REASON_HEADER,
    LAST_ERROR_HEADER,
    BatchHandler,
    ConsumerCounts,
    Handler,
    Message,
)
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP

__all__ = [
    "ATTEMPT_HEADER",
    "DEAD_CONSUMER_HEADER",
    "DEAD_QUEUE_HEADER",
    "DEAD_REASON_HEADER",
    "LAST_ERROR_HEADER",
    "RECONNECT_BASE",
    "RECONNECT_CAP",
    "BatchHandler",
    "Consumer",
    "ConsumerCounts",
    "Handler",
    "Message",
]
