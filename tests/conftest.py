"""Fixtures for every tier. Services are the real ones on this machine; on CI (CI=true) a missing
service fails the run instead of skipping it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from outbox.settings import Settings
from tests import support


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1",
                                       parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    services = _reachable(support.DATABASE_URL, 5432) and _reachable(support.AMQP_URL, 5672)
    for item in items:
        path = str(item.fspath)
        needs = "/unit/" not in path
        if needs:
            item.add_marker(pytest.mark.integration)
        if needs and not services:
            if os.environ.get("CI"):
                raise pytest.UsageError("PostgreSQL or RabbitMQ is not reachable on CI")
            item.add_marker(pytest.mark.skip(reason="PostgreSQL/RabbitMQ not reachable"))


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema with the outbox migrations applied; dropped afterwards."""
    name = support.unique("t")
    support.create_schema(name)
    yield name
    support.drop_schema(name)


@pytest.fixture
def settings(schema: str) -> Settings:
    return support.make_settings(schema)


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    """A durable queue bound to the default exchange under its own name; deleted afterwards."""
    name = support.unique("q")
    await support.declare_queue(name)
    yield name
    await support.delete_queues([name])


@pytest.fixture
def roles(schema: str) -> Iterator[dict[str, str]]:
    """The roles of sql/roles.sql, created by psql for the fresh schema; dropped afterwards."""
    tag = support.unique("r")
    names = {"relay_role": f"{tag}_relay", "producer_role": f"{tag}_producer",
             "consumer_role": f"{tag}_consumer"}
    psql = shutil.which("psql")
    if psql is None:
        pytest.fail("psql is needed to run sql/roles.sql (it uses psql variables)")
    cmd = [psql, support.DATABASE_URL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v",
           f"schema={schema}", "-f", str(support.ROOT / "sql" / "roles.sql")]
    for var, value in names.items():
        cmd += ["-v", f"{var}={value}"]
    try:
        for _ in range(2):  # the script can be run again
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        yield names
    finally:
        with psycopg.connect(support.DATABASE_URL, autocommit=True) as conn:
            for role in names.values():
                ident = sql.Identifier(role)
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
                    conn.execute(sql.SQL("DROP ROLE {}").format(ident))
