"""Retries and dead letters: moving a message the handler could not take, then acking it.

Every move is "publish the copy, await its confirm, then ack the original": a crash in between
leaves two copies, never none, and the inbox absorbs the second one. A copy that is not confirmed
leaves the original unacked: it is requeued after a pause.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiormq import exceptions as amqp_exc
from pamqp import commands as spec

from outbox.consumer.message import (
    ATTEMPT_HEADER,
    DEAD_CONSUMER_HEADER,
    DEAD_QUEUE_HEADER,
    DEAD_REASON_HEADER,
    LAST_ERROR_HEADER,
    REASON_MAX,
    ConsumerCounts,
    _Delivery,
    _Subscription,
    describe,
)
from outbox.consumer.topology import Topology
from outbox.exceptions import BrokerUnavailable
from outbox.retry import RECONNECT_BASE, RECONNECT_CAP, backoff

log = logging.getLogger("outbox.consumer")

BROKER_ERRORS = (amqp_exc.AMQPError, amqp_exc.ChannelInvalidStateError, ConnectionError,
                 BrokerUnavailable, TimeoutError)
"""What a lost broker connection or channel raises."""


class _PublishFailed(Exception):
    """A retry or dead-letter copy was not confirmed: the original is requeued, not acked."""


class Retries:
    """Sends a failed message to its delay queue, or to the dead letters after its last attempt."""

    def __init__(self, topology: Topology, consumer: str, publish_timeout: float,
                 counts: ConsumerCounts, sleep: Callable[[float], Awaitable[None]],
                 rng: random.Random) -> None:
        self.topology = topology
        self.consumer = consumer
        self.publish_timeout = publish_timeout
        self.counts = counts
        self._sleep = sleep
        self._rng = rng

    async def retry_or_dead_letter(self, sub: _Subscription, d: _Delivery, reason: str) -> None:
        assert d.message is not None
        t = self.topology
        attempt = d.message.attempt
        if attempt >= t.max_attempts:
            await self.dead_letter(
                sub, d, f"handler failed {attempt} times; last error: {reason}")
            return
        delay = t.retry_delay(attempt)
        try:
            await self._republish(sub, d, "", t.retry_queue(attempt), {
                ATTEMPT_HEADER: attempt + 1, LAST_ERROR_HEADER: reason[:REASON_MAX]})
        except _PublishFailed as exc:
            await self._hold(d, f"cannot republish for a retry: {exc}")
            return
        self.counts.retried += 1
        log.warning("handler failed; retrying later", extra={"fields": {
            "queue": t.queue, "message_id": str(d.message.message_id), "attempt": attempt,
            "retry_in": delay, "error": reason}})

    async def dead_letter(self, sub: _Subscription, d: _Delivery, reason: str, *,
                          invalid: bool = False) -> None:
        t = self.topology
        message_id = d.message.message_id if d.message is not None else None
        try:
            await self._republish(sub, d, t.dead_letter_exchange, t.dead_letter_routing_key, {
                DEAD_REASON_HEADER: reason[:REASON_MAX],
                DEAD_QUEUE_HEADER: t.queue,
                DEAD_CONSUMER_HEADER: self.consumer})
        except _PublishFailed as exc:
            await self._hold(d, f"cannot dead-letter: {exc}")
            return
        self.counts.dead_lettered += 1
        if invalid:
            self.counts.invalid += 1
        log.error("message dead-lettered", extra={"fields": {
            "queue": t.queue, "message_id": str(message_id) if message_id else None,
            "delivery_tag": d.tag, "reason": reason,
            "dead_letter_exchange": t.dead_letter_exchange,
            "dead_letter_routing_key": t.dead_letter_routing_key}})

    async def _hold(self, d: _Delivery, problem: str) -> None:
        """The copy was not confirmed: requeue the original after a pause (no spinning)."""
        d.ack = False
        log.error("cannot move the message; requeueing it", extra={"fields": {
            "queue": self.topology.queue, "delivery_tag": d.tag, "error": problem}})
        await self._sleep(backoff(3, RECONNECT_BASE, RECONNECT_CAP, self._rng))

    async def _republish(self, sub: _Subscription, d: _Delivery, exchange: str,
                         routing_key: str, extra_headers: Mapping[str, Any]) -> None:
        props = d.raw.header.properties
        headers = dict(props.headers or {})
        headers.update(extra_headers)
        copy = spec.Basic.Properties(
            content_type=props.content_type, content_encoding=props.content_encoding,
            headers=headers, delivery_mode=2, priority=props.priority,
            correlation_id=props.correlation_id, reply_to=props.reply_to,
            message_id=props.message_id, timestamp=props.timestamp,
            message_type=props.message_type, app_id=props.app_id)
        try:
            async with asyncio.timeout(self.publish_timeout):
                if sub.publish.is_closed:  # a refused publish (404 exchange) closes it
                    sub.publish = await sub.channel.connection.channel(
                        publisher_confirms=True, on_return_raises=True)
                await sub.publish.basic_publish(d.raw.body, exchange=exchange,
                                                routing_key=routing_key, properties=copy,
                                                mandatory=True)
        except (*BROKER_ERRORS, ValueError, TypeError) as exc:
            raise _PublishFailed(describe(exc)) from exc
