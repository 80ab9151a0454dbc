"""The queues of one consumer: the queue it consumes, its retry delay queues, its dead letters.

A handler that fails sends its message to the delay queue ``<queue>.retry.<ms>``, whose
``x-message-ttl`` dead-letters it back to ``<queue>`` after the delay. Each delay queue has one
fixed TTL, so its messages expire in order (a per-message TTL would wait behind longer ones); the
delay is therefore the same for every message of an attempt, without jitter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiormq
from aiormq import exceptions as amqp_exc

from outbox.retry import backoff


@dataclass(frozen=True)
class Topology:
    """Names and delays of a consumer's queues; `declare` creates them."""

    queue: str
    max_attempts: int
    retry_base: float
    retry_max: float
    dead_letter_exchange: str
    dead_letter_routing_key: str
    queue_arguments: Mapping[str, Any] | None

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1 for the first retry)."""
        return backoff(attempt, self.retry_base, self.retry_max, jitter=False)

    def retry_queue(self, attempt: int) -> str:
        """The delay queue of retry number ``attempt``."""
        return f"{self.queue}.retry.{round(self.retry_delay(attempt) * 1000)}"

    async def declare(self, channel: aiormq.abc.AbstractChannel,
                      conn: aiormq.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
        """Declare the queues (durable); returns a usable channel (a refused declare closes
        one)."""
        arguments = dict(self.queue_arguments) if self.queue_arguments else None
        try:
            await channel.queue_declare(self.queue, durable=True, arguments=arguments)
        except amqp_exc.ChannelPreconditionFailed:
            # It exists with other arguments: use it as it is.
            channel = await conn.channel(publisher_confirms=False)
            await channel.queue_declare(self.queue, passive=True)
        delays = sorted({round(self.retry_delay(a) * 1000) for a in range(1, self.max_attempts)})
        for ms in delays:
            await channel.queue_declare(f"{self.queue}.retry.{ms}", durable=True, arguments={
                "x-message-ttl": ms, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.queue})
        if not self.dead_letter_exchange:
            await channel.queue_declare(self.dead_letter_routing_key, durable=True)
        return channel
