"""A private PostgreSQL primary and streaming standby, for failover tests.

    with PostgresPair() as pair:          # initdb, start, pg_basebackup -R, start the standby
        pair.url                          # postgresql://…@h:p1,h:p2/postgres?target_session_attrs=read-write
        pair.primary.url, pair.standby.url
        pair.primary.kill()               # SIGKILL to the server's process group: a crash
        pair.promote()                    # the standby becomes the primary

    with PostgresPair(tls=ServerCert.issue(...), standby=False) as pair:   # one TLS primary
        pair.primary.tls_url(sslrootcert=…)   # postgresql://postgres@localhost:p/postgres?sslmode=verify-full&…
        pair.primary.use_tls(other_cert)      # serve another certificate (reloads, no restart)

The primary runs with ``synchronous_standby_names='*'`` (on its command line, so the standby does
not inherit it through the base backup and hang every commit once promoted): a commit that waits
(``synchronous_commit=on``, the producers' default) is on the standby when it returns, and a
commit with ``synchronous_commit=off`` (the relay's) is not waited for. The server binaries are
the benchmark's (`bench.postgres_node.binaries`). Only processes this class started are signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import psycopg

from bench.postgres_node import as_postgres, binaries, free_port, wait_accepting

if TYPE_CHECKING:
    from tests.certs import ServerCert


class PgServer:
    """One server process on a data directory (started, killed, promoted)."""

    def __init__(self, base: Path, name: str, as_user: dict[str, Any],
                 options: tuple[str, ...] = (), tls: ServerCert | None = None) -> None:
        self.data = base / name
        self.base = base
        self.name = name
        self.port = free_port()
        self.options = options
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self._as = as_user

    def tls_url(self, host: str = "localhost", **query: str | os.PathLike[str]) -> str:
        """A ``sslmode=verify-full`` URL to this server by ``host`` (``sslrootcert=…`` etc.)."""
        params = urlencode({"sslmode": "verify-full", **{k: str(v) for k, v in query.items()}})
        return f"postgresql://postgres@{host}:{self.port}/postgres?{params}"

    def use_tls(self, tls: ServerCert) -> None:
        """Serve ``tls``'s certificate from now on: PostgreSQL reloads its TLS files on SIGHUP,
        and new connections get the new certificate."""
        self.tls = tls
        self._install_tls()
        if self.running:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("SELECT pg_reload_conf()")
            # pg_reload_conf() only signals the server: wait until it serves the new one
            pem = tls.cert.read_text()
            want = ssl.PEM_cert_to_DER_cert(pem[:pem.index("-----END CERTIFICATE-----") + 25])
            deadline = time.monotonic() + 10
            while self.served_cert() != want:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} still serves its old certificate after 10 s")
                time.sleep(0.05)

    def served_cert(self) -> bytes:
        """The certificate (DER) a new TLS connection gets now: the protocol's SSLRequest, then
        a handshake that verifies nothing."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            if sock.recv(1) != b"S":
                return b""
            with context.wrap_socket(sock) as tls:
                return tls.getpeercert(binary_form=True) or b""

    def _install_tls(self) -> list[str]:
        """Copy the certificate and key where the server's user owns them (it refuses a key
        that others may read, or that is not its own) and return the settings naming them."""
        if self.tls is None:
            return []
        tls_dir = self.base / f"{self.name}-tls"
        tls_dir.mkdir(exist_ok=True)
        for name, source in (("cert.pem", self.tls.cert), ("key.pem", self.tls.key),
                             ("ca.pem", self.tls.ca)):
            # a new file each time: a reload must not read a half-written one
            tmp = tls_dir / f".{name}"
            shutil.copyfile(source, tmp)
            tmp.chmod(0o600)
            if self._as:
                os.chown(tmp, self._as["user"], self._as["group"])
            tmp.replace(tls_dir / name)
        if self._as:
            os.chown(tls_dir, self._as["user"], self._as["group"])
        return ["ssl=on", f"ssl_cert_file={tls_dir / 'cert.pem'}",
                f"ssl_key_file={tls_dir / 'key.pem'}", f"ssl_ca_file={tls_dir / 'ca.pem'}"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> PgServer:
        log = open(self.base / f"{self.name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        opts = [a for o in ("listen_addresses=127.0.0.1", "fsync=off", *self.options,
                            *self._install_tls())
                for a in ("-c", o)]
        self.proc = subprocess.Popen(
            [binaries() / "postgres", "-D", self.data, "-p", str(self.port), "-k", self.base,
             *opts],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
            start_new_session=True, **self._as)
        log.close()
        wait_accepting(self.url, self.proc, self.base / f"{self.name}.log", timeout,
                       f"PostgreSQL {self.name}")
        return self

    def kill(self) -> None:
        """SIGKILL to the server's whole process group (postmaster and backends): a crash."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()


class PostgresPair:
    """A primary and its streaming standby; see the module docstring."""

    def __init__(self, *, tls: ServerCert | None = None, standby: bool = True) -> None:
        """``tls``: both servers also accept TLS with that certificate (and check client
        certificates against its CA when offered); ``standby=False``: the primary alone."""
        self.base = Path(tempfile.mkdtemp(prefix="outbox-pg-pair-"))
        self.with_standby = standby
        self._as = as_postgres(self.base)
        self.primary = PgServer(self.base, "primary", self._as,
                                ("synchronous_standby_names=*",) if standby else (), tls)
        self.standby = PgServer(self.base, "standby", self._as, tls=tls)

    @property
    def url(self) -> str:
        """A libpq multi-host URL that finds whichever of the two accepts writes."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},"
                f"127.0.0.1:{self.standby.port}/postgres?target_session_attrs=read-write")

    def start(self) -> PostgresPair:
        subprocess.run([binaries() / "initdb", "-D", self.primary.data, "-U", "postgres",
                        "-A", "trust", "--no-sync"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.base, **self._as)
        self.primary.start()
        if not self.with_standby:
            return self
        subprocess.run([binaries() / "pg_basebackup", "-D", self.standby.data, "-R",
                        "-X", "stream", "-c", "fast", "-h", "127.0.0.1",
                        "-p", str(self.primary.port), "-U", "postgres"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.base, **self._as)
        self.standby.start()
        self.wait_streaming()
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until the primary sees the standby streaming (synchronously)."""
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.primary.url, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FROM pg_stat_replication "
                                   "WHERE state = 'streaming' AND sync_state = 'sync'").fetchone()
                if row and row[0]:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError("the standby is not streaming")
                time.sleep(0.1)

    def promote(self) -> None:
        """The standby becomes the primary (waits until it accepts writes)."""
        with psycopg.connect(self.standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_promote(wait => true, wait_seconds => 30)")

    def close(self) -> None:
        self.primary.stop()
        self.standby.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)

    def __enter__(self) -> PostgresPair:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
