"""outbox: a transactional-outbox relay for PostgreSQL -> RabbitMQ.

Producers write rows with `enqueue` / `enqueue_async` (or plain SQL) in their own transaction;
`outbox relay` publishes them with publisher confirms; consumers dedupe with the inbox table.
"""

from outbox.exceptions import OutboxError
from outbox.producer import enqueue, enqueue_async
from outbox.settings import Settings

__all__ = ["OutboxError", "Settings", "enqueue", "enqueue_async"]
__version__ = "0.1.0"
