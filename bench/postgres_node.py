"""A private PostgreSQL cluster with the stock configuration, for the benchmark.

This machine's shared server is set up for CI (its conf.d turns ``autovacuum`` off), which no
production server does: the outbox's bloat and big-backlog figures would then describe the CI
setup, not the relay. So `python -m bench` runs ``initdb`` into a temporary directory, starts the
same PostgreSQL binaries on a free port with nothing changed but the port and socket directory,
and removes it all at the end. Only the process this class started is ever signalled.

    with PostgresNode() as node:   # ~3 s
        node.url                   # postgresql://postgres@127.0.0.1:<port>/postgres

A test that needs a server setting the shared server lacks passes it (``settings=``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg


def binaries() -> Path:
    """The newest installed server's bin directory (Debian: /usr/lib/postgresql/<N>/bin)."""
    override = os.environ.get("OUTBOX_BENCH_PG_BIN")
    if override:
        return Path(override)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no PostgreSQL server binaries found (initdb); set "
                           "OUTBOX_BENCH_PG_BIN, or pass --database-url to use a running server")
    return Path(initdb).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(base: Path) -> dict[str, Any]:
    """The `subprocess` arguments that run a server (or initdb) on ``base``: as the postgres
    user when we are root, since the server refuses to run as root (``base`` is given to it)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    os.chown(base, user.pw_uid, user.pw_gid)
    return {"user": user.pw_uid, "group": user.pw_gid}


def wait_accepting(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float,
                   what: str) -> None:
    """Wait until the server ``proc`` started accepts connections at ``url``; raises
    RuntimeError with the end of its ``log`` if it exits or is not up within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} did not start:\n{tail}") from None
            time.sleep(0.1)


class PostgresNode:
    """One private cluster; see the module docstring."""

    def __init__(self, start_timeout: float = 60.0,
                 settings: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self.base = Path(tempfile.mkdtemp(prefix="outbox-bench-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._as = as_postgres(self.base)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def __enter__(self) -> PostgresNode:
        bindir = binaries()
        data = self.base / "data"
        subprocess.run([bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust",
                        "--no-sync"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.base, **self._as)
        log = open(self.base / "server.log", "ab")
        self.proc = subprocess.Popen(
            [bindir / "postgres", "-D", data, "-p", str(self.port), "-k", self.base,
             "-c", "listen_addresses=127.0.0.1",
             *(f"-c{name}={value}" for name, value in self.settings.items())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
            start_new_session=True, **self._as)
        log.close()
        try:
            wait_accepting(self.url, self.proc, self.base / "server.log", self.start_timeout,
                           "the private PostgreSQL")
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)


def add_database_url(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--database-url``: a server of yours instead of a private one."""
    parser.add_argument(
        "--database-url", default=os.environ.get("OUTBOX_BENCH_DATABASE_URL"),
        help="benchmark against this PostgreSQL (env OUTBOX_BENCH_DATABASE_URL) instead of a "
        "private cluster with the stock configuration started for the run "
        "(bench/postgres_node.py)")


@contextlib.contextmanager
def database(url: str | None, settings: Mapping[str, str] | None = None
             ) -> Iterator[PostgresNode | None]:
    """``url`` when given; else a private `PostgresNode` (with ``settings``) for the block."""
    if url:
        yield None
        return
    with PostgresNode(settings=settings) as node:
        yield node
