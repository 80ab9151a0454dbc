"""The RabbitMQ publisher: aiormq, publisher confirms pipelined per batch, ``mandatory=True``.

One connection (to the first reachable of the configured nodes, failing over on loss) and one
confirm-mode channel per lane, kept by `outbox.supervisor`; each batch is written in full, then
its confirms are awaited under one deadline, by `outbox.batch`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import TypeVar

import aiormq

from outbox.batch import Batch
from outbox.ports import BLOCKED, BrokerHealth
from outbox.rows import Result, Row
from outbox.settings import Settings
from outbox.supervisor import Supervisor

T = TypeVar("T")


class AmqpPublisher:
    """Implements `outbox.ports.Publisher` on aiormq."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.broker = Supervisor(settings, rng)

    async def start(self) -> None:
        """Start connecting in the background (and reconnecting for as long as it runs)."""
        await self.broker.start()

    async def guard(self, task: asyncio.Task[T]) -> T:
        """`Supervisor.guard`: the relay's task, ended loudly if the broker side fails for good."""
        return await self.broker.guard(task)

    async def close(self) -> None:
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.ready

    @property
    def blocked(self) -> bool:
        """True while the broker blocks publishers (``connection.blocked``: memory/disk alarm)."""
        return self.broker.blocked

    @property
    def problem(self) -> str:
        """Why the last connection attempt failed or the last connection ended ("" since one
        is in use)."""
        return self.broker.problem

    @property
    def fatal(self) -> BaseException | None:
        """Why this publisher can never work (an unsupported aiormq, a dead supervisor)."""
        return self.broker.fatal

    @property
    def connection(self) -> aiormq.abc.AbstractConnection | None:
        return self.broker.connection

    @property
    def current_url(self) -> str:
        """The node connected to (tracing names it)."""
        return self.broker.current_url

    async def wait_ready(self, timeout: float) -> bool:
        return await self.broker.wait_ready(timeout)

    def health(self) -> BrokerHealth:
        ready, blocked = self.ready, self.blocked
        if blocked:
            problem = BLOCKED
        elif not ready:
            problem = self.problem
        else:
            problem = ""
        return BrokerHealth(ready, blocked, problem)

    async def publish(self, rows: Sequence[Row], lane: int) -> list[Result]:
        return await Batch(self.broker, self.settings, rows, lane,
                           self.settings.publish_timeout).publish()
