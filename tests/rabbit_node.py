"""A private RabbitMQ node for tests that kill or restart the broker.

The shared broker on 5672 must never be stopped; a test that needs a broker to die starts its own:

    node = RabbitNode(tmp_path).start()      # ~5 s; node.url is its amqp:// URL
    node.kill()                              # SIGKILL, as a crash
    node.start()                             # same data directory and ports: durable queues survive
    node.restart()                           # kill + start
    node.stop()                              # SIGTERM, graceful (a clean shutdown)

    node = RabbitNode(tmp_path, tls=ServerCert.issue(...))   # also a TLS listener (tests/certs.py)
    node.amqps_url(cafile=...)               # amqps://guest:guest@localhost:<tls_port>/?cafile=…

Every node has its own name, free AMQP and distribution ports, data and log directories under
``tmpdir``, and an empty plugin list so it boots fast. As root (the launcher then runs the node as
the ``rabbitmq`` user) the directories are under a fresh directory of /tmp instead, removed by
`close`: pytest makes its own base directory private (0700) again whenever another pytest session
starts, which would lock a node out of its data mid-run. Only the process group this class started
is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    from tests.certs import ServerCert

SERVER = os.environ.get("RABBITMQ_SERVER", shutil.which("rabbitmq-server") or "rabbitmq-server")
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_script() -> str:
    """The real start script, not the Debian wrapper (which insists on a fixed log file)."""
    path = Path(SERVER).resolve()
    if path.parent.name == "bin" and (path.parent / "rabbitmq-server").exists():
        # /usr/sbin/rabbitmq-server -> wrapper; the script itself is in rabbitmq_server-*/sbin
        candidates = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin/"
                                                                "rabbitmq-server"))
        if candidates:
            return str(candidates[-1])
    return str(path)


class RabbitNode:
    """One private RabbitMQ node; see the module docstring."""

    def __init__(self, tmpdir: str | os.PathLike[str], *, name: str | None = None,
                 port: int | None = None, dist_port: int | None = None,
                 start_timeout: float = 60.0, extra_config: str = "",
                 tls: ServerCert | None = None, verify_peer: bool = False) -> None:
        name = name or f"rabbit-{uuid.uuid4().hex[:8]}"
        self._own_dir: Path | None = None
        if os.geteuid() == 0:
            self._own_dir = Path(tempfile.mkdtemp(prefix=f"outbox-{name}-"))
            self._own_dir.chmod(0o755)
            tmpdir = self._own_dir
        self.base = Path(tmpdir) / name
        self.nodename = f"{self.base.name}@localhost"
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.start_timeout = start_timeout
        self.extra_config = extra_config
        # TLS: a second listener on tls_port with ``tls``'s certificate; with verify_peer the
        # node checks a client certificate against tls.ca when one is offered (none is required)
        self.tls = tls
        self.verify_peer = verify_peer
        self.tls_port = free_port() if tls is not None else 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self.console: IO[bytes] | None = None

    # -- properties ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:<port>/`` (guest may log in over loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def amqps_url(self, host: str = "localhost", **query: str | os.PathLike[str]) -> str:
        """``amqps://guest:guest@<host>:<tls_port>/?<query>`` (cafile=…, certfile=…, …)."""
        assert self.tls is not None, "the node has no TLS listener"
        params = urlencode({k: str(v) for k, v in query.items()})
        return f"amqps://guest:guest@{host}:{self.tls_port}/" + (f"?{params}" if params else "")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_file(self) -> Path:
        return self.base / "log" / f"{self.nodename}.log"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> RabbitNode:
        """Start the node (again, after kill/stop) and wait until it speaks AMQP on its port."""
        if self.running:
            return self
        self._prepare()
        self.console = open(self.base / "console.log", "ab")  # noqa: SIM115 (closed in _reap)
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            kwargs["user"] = "rabbitmq"
            kwargs["group"] = "rabbitmq"
        self.proc = subprocess.Popen(
            [_server_script()], env=self._env(), cwd=self.base, stdin=subprocess.DEVNULL,
            stdout=self.console, stderr=subprocess.STDOUT, start_new_session=True,
            **kwargs,
        )
        self._wait_ready()
        if self.tls is not None:
            self._wait_port(self.tls_port)
        return self

    def kill(self) -> None:
        """SIGKILL the node's process group, as a crash would, and wait until it is gone."""
        self._signal(signal.SIGKILL, timeout=15.0)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: a clean shutdown (falls back to SIGKILL after ``timeout``)."""
        self._signal(signal.SIGTERM, timeout=timeout)

    def restart(self) -> RabbitNode:
        """Kill the node and start it again on the same ports with the same data."""
        self.kill()
        return self.start()

    def close(self) -> None:
        """Kill the node if it runs and remove the directory it made (a fixture's teardown)."""
        self.kill()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- details ---------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            f"{self._tls_config()}"
            f"{self.extra_config}")
        if os.geteuid() == 0:
            user = pwd.getpwnam("rabbitmq")
            for path in [self.base, *self.base.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        self._prepared = True

    def _tls_config(self) -> str:
        """The TLS listener's lines of rabbitmq.conf, with copies of the PEM files in the node's
        directory (chowned with it: the node may run as another user than the test)."""
        if self.tls is None:
            return ""
        tls_dir = self.base / "tls"
        tls_dir.mkdir(exist_ok=True)
        for name, source in (("ca.pem", self.tls.ca), ("cert.pem", self.tls.cert),
                             ("key.pem", self.tls.key)):
            shutil.copyfile(source, tls_dir / name)
        (tls_dir / "key.pem").chmod(0o600)
        return (f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {tls_dir / 'ca.pem'}\n"
                f"ssl_options.certfile = {tls_dir / 'cert.pem'}\n"
                f"ssl_options.keyfile = {tls_dir / 'key.pem'}\n"
                f"ssl_options.verify = {'verify_peer' if self.verify_peer else 'verify_none'}\n"
                "ssl_options.fail_if_no_peer_cert = false\n")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME="/var/lib/rabbitmq" if os.geteuid() == 0 else env.get("HOME", str(self.base)),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_PID_FILE=str(self.base / "node.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def wait_ready(self) -> None:
        """Until the node speaks AMQP (again: after ``rabbitmqctl start_app``)."""
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"rabbitmq node {self.nodename} exited during start "
                                   f"(see {self.base / 'console.log'})")
            if _speaks_amqp(self.port):
                return
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"rabbitmq node {self.nodename} not ready after {self.start_timeout}s "
                           f"(see {self.base / 'console.log'})")

    def _wait_port(self, port: int) -> None:
        """Until ``port`` accepts connections (the TLS listener opens with the AMQP one)."""
        deadline = time.monotonic() + self.start_timeout
        while not _port_open(port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rabbitmq node {self.nodename}: nothing listens on {port}")
            time.sleep(0.1)

    def _signal(self, sig: int, timeout: float) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # children of the group (beam, erl_child_setup) may outlive the script by a moment
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _port_open(self.port):
            time.sleep(0.05)
        self._reap()

    def _reap(self) -> None:
        self.proc = None
        if self.console is not None:
            self.console.close()
            self.console = None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _speaks_amqp(port: int) -> bool:
    """True when the port answers the AMQP protocol header with a method frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(AMQP_HEADER)
            return s.recv(1)[:1] == b"\x01"
    except OSError:
        return False
