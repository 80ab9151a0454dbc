"""Fixtures of the fault suite. The machinery itself (relay processes, proxies, the reconnecting
consumer, the ledger, producers) is in `tests.faults.harness`, which the chaos run
(`python -m tests.chaos`) uses too; the tests import it from there.

Every fault test ends with ``await ledger.account()``: over all rows it committed, delivered
(distinct message ids a consumer saw) + dead must equal committed, lost must be 0, and the
duplicates are printed (and summarised at the end of the run).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox.settings import Settings
from tests.faults.harness import (
    AMQP_PORT,
    PG_PORT,
    TALLIES,
    Ledger,
    RelayProcess,
)
from tests.proxy import FaultProxy


@pytest.fixture
def relays(request: pytest.FixtureRequest) -> Iterator[Callable[..., RelayProcess]]:
    """Start relay processes (``relays(settings, *args, **env)``); all killed afterwards (and
    their last log lines printed when the test failed)."""
    started: list[RelayProcess] = []

    def start(settings: Settings, *args: str, **env: str) -> RelayProcess:
        r = RelayProcess(settings, *args, **env)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
        if getattr(request.node, "_fault_failed", False):
            path = Path(tempfile.gettempdir()) / f"outbox-relay-{r.pid}.log"
            path.write_text("\n".join(r.lines) + "\n")
            print(f"\n--- relay {r.pid} (exit {r.proc.returncode}): whole log in {path}; "
                  f"last lines ---\n{r.log_tail(25)}")


# -- proxies and private nodes --

@pytest.fixture
def db_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the shared PostgreSQL (the relay's only way to the database)."""
    with FaultProxy(PG_PORT) as proxy:
        yield proxy


@pytest.fixture
def amqp_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the shared RabbitMQ."""
    with FaultProxy(AMQP_PORT) as proxy:
        yield proxy


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    led = Ledger(request.node.name)
    yield led
    if led.tally is None and not getattr(request.node, "_fault_failed", False):
        pytest.fail("the test did not account for its rows (await ledger.account())")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        item._fault_failed = True  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLIES:
        return
    terminalreporter.section("fault suite: rows accounted")
    for name, t in TALLIES:
        terminalreporter.write_line(f"{name}: {t.line()}")


def node_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    return tmp_path_factory.mktemp(name)
