"""The relay's one HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz``.

A few lines of asyncio instead of a web framework: three GET routes, answered off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox import metrics
from outbox.metrics import REGISTRY

log = logging.getLogger("outbox.http")


class HealthServer:
    """Serves the three endpoints; ``health()`` returns (ready, details)."""

    def __init__(self, port: int, health: Callable[[], tuple[bool, dict[str, object]]],
                 host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self.health = health
        self._server: asyncio.Server | None = None
        self._reported = ""  # the last unexpected error, logged once

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("http listening", extra={"fields": {"port": self.port}})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, ctype, body = self._route(parts[0] if parts else "", path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception as exc:
            # a bug behind one request must not go unseen (asyncio would keep it until the
            # handler is collected): logged once per kind, counted; the server goes on
            metrics.TASK_ERRORS.labels("http").inc()
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._reported:
                log.exception("error while answering an HTTP request")
            self._reported = problem
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            ready, details = self.health()
            body = orjson.dumps({"ready": ready, **details}) + b"\n"
            return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"not found\n"
