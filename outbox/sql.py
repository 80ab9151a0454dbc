"""Loads the named queries of ``queries.sql`` and binds them to a schema.

Identifiers that come from configuration (the schema, the NOTIFY channel) are quoted with
`psycopg.sql.Identifier`; values always travel as parameters.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any
from uuid import UUID

from psycopg import sql

_PYFORMAT = re.compile(r"%\((\w+)\)s")
_BLOCK = re.compile(r"^-- (\w+) --\n((?:--[^\n]*\n)*)(.*?)(?=^-- \w+ --|\Z)", re.M | re.S)


@functools.cache
def raw_queries() -> dict[str, str]:
    """Query name → SQL text with ``{schema}`` placeholders."""
    text = resources.files("outbox").joinpath("queries.sql").read_text()
    return {m.group(1): m.group(3).strip().rstrip(";") for m in _BLOCK.finditer(text)}


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's outbox table (the trigger uses the same)."""
    return f"{schema}.outbox"


class Queries:
    """The queries of one schema, composed once."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        ident = sql.Identifier(schema)
        channel = sql.Identifier(channel_name(schema))
        # Rendered to bytes once: psycopg would otherwise compose each `sql.Composed` again at
        # every execution, on the path of every claim.
        names = {"schema": ident, "channel": channel,
                 "table": sql.Literal(f'"{schema}".outbox')}  # a plain identifier (settings)
        self._q: dict[str, bytes] = {
            name: sql.SQL(text).format(**{k: v for k, v in names.items()
                                          if "{" + k + "}" in text}).as_bytes(None)
            for name, text in raw_queries().items()
        }

    def __getitem__(self, name: str) -> bytes:
        return self._q[name]

    def text(self, name: str) -> str:
        """The query as a plain string, with psycopg's ``%(name)s`` placeholders."""
        return self._q[name].decode()

    def sqlalchemy(self, name: str) -> Any:
        """The query as a SQLAlchemy `text()` clause (``:name`` placeholders), for any driver."""
        from sqlalchemy import text

        return text(_PYFORMAT.sub(r":\1", self.text(name)))


@functools.cache
def for_schema(schema: str) -> Queries:
    return Queries(schema)


def as_uuid(value: Any) -> UUID:
    """A uuid column's value as a `UUID` (a driver under SQLAlchemy's `text()` may give a str)."""
    return value if isinstance(value, UUID) else UUID(str(value))
