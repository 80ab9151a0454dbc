"""The one exception hierarchy of outbox.

Driver errors (psycopg, aiormq) are translated into these at the edge, in `store.py`, `amqp.py`
and `batch.py`; the relay core only ever sees these types.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (a driver's may run to several), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class OutboxError(Exception):
    """An outbox error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(OutboxError):
    """Invalid configuration."""


class StoreUnavailable(OutboxError):
    """The database cannot be reached or the connection was lost."""


class BrokerUnavailable(OutboxError):
    """The broker cannot be reached or the connection was lost."""


class PermanentRefusal(OutboxError):
    """A peer refused us for a reason that retrying soon will not fix.

    Wrong credentials, unknown vhost or database, failed TLS verification. The relay reports it in
    one line, turns not-ready, and retries slowly.
    """


class SchemaMissing(OutboxError):
    """The outbox tables do not exist in the configured schema: run `outbox migrate`."""


DATABASE_AWAY = (StoreUnavailable, PermanentRefusal, SchemaMissing)
"""The database is unreachable, refuses us or is not migrated: the lanes report these; a
background task that meets one only retries."""


class WakeupFlagUnavailable(OutboxError):
    """The wake-up flag (migration 0002) is missing or not writable by this role.

    The relay then leaves it raised: every insert sends a NOTIFY, as before the flag existed.
    """


class UnsupportedClient(OutboxError):
    """The installed aiormq lacks a private part that outbox reads: the relay cannot run safely.

    Raised at start-up (on the first connection and the first channel), never read as False: a
    moved attribute could otherwise hide a dead connection, a blocked broker, or let a returned
    message be marked sent.
    """


class Unframable(OutboxError, ValueError):
    """A row AMQP cannot carry as written (the message says which column and which limit).

    It is parked dead at once: publishing it again can never succeed.
    """
