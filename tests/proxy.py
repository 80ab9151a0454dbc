"""A TCP fault proxy for the fault suite: aiomisc's `TCPProxy`, run in a thread of its own.

    proxy = FaultProxy(5672).start()     # relay -> 127.0.0.1:proxy.port -> 127.0.0.1:5672
    proxy.cut()                          # close every connection (both sides see a reset/EOF)
    proxy.refuse()                       # ... and close new ones at once (a service that is down)
    proxy.stall()                        # stop forwarding without closing (a silent peer)
    proxy.stall("down")                  # only broker -> client: requests arrive, answers don't
    proxy.slow(0.05)                     # delay every chunk by 50 ms
    proxy.restore()                      # forward normally again (stalled connections are cut)
    proxy.close()

The proxy runs its own event loop in a daemon thread, so a test may block (subprocess waits,
synchronous psycopg) without freezing the connections it proxies. Every call waits for the loop
to apply it (with a timeout) before returning.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

from aiomisc.pytest import TCPProxy, TCPProxyClient

Direction = Literal["both", "up", "down"]
"""up: client -> server (aiomisc's "read" side); down: server -> client ("write" side)."""


class _Proxy(TCPProxy):
    """TCPProxy that can refuse new connections and survives a target that is down."""

    refusing = False
    accepted = 0  # connections accepted so far (refused ones included)

    async def _handle_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.transport.abort()
            return
        try:
            await super()._handle_client(reader, writer)
        except OSError:
            # the target is down: behave like it (aiomisc would leave the client hanging)
            writer.transport.abort()
            self.clients = {c for c in self.clients if c.server_writer is not None}


def _quiet(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A reset between proxied peers is what the proxy is for: not worth a traceback."""
    if not isinstance(context.get("exception"), ConnectionError):
        loop.default_exception_handler(context)


class FaultProxy:
    """One TCP proxy in front of ``target_host:target_port``; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._proxy = _Proxy(target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"fault-proxy-{target_port}")
        self._gate: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return int(self._proxy.proxy_port)

    def url(self, url: str) -> str:
        """``url`` with its port replaced by the proxy's (host becomes 127.0.0.1)."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def connections(self) -> int:
        """How many proxied connections are open now."""
        return int(self._call(self._count()))

    @property
    def accepted(self) -> int:
        """How many connections clients opened through the proxy so far (refused ones too)."""
        return int(self._proxy.accepted)

    def upstream_ports(self) -> list[int]:
        """Local ports of the proxy's connections to the target (PostgreSQL's ``client_port``)."""
        return list(self._call(self._upstream_ports()))

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._proxy.start(timeout=10))
        return self

    def close(self) -> None:
        """Close every connection and the listener, and stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._release_and_cut())
            self._call(self._proxy.close(timeout=10))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults ----------------------------------------------------------------------------------

    def cut(self) -> None:
        """Close every open connection now (new ones are accepted unless `refuse` is on)."""
        self._call(self._release_and_cut())

    def refuse(self, on: bool = True) -> None:
        """Cut every connection and close new ones as soon as they are accepted."""
        self._proxy.refusing = on
        if on:
            self.cut()

    def stall(self, direction: Direction = "both") -> None:
        """Stop forwarding without closing: bytes are held, nobody sees an error."""
        self._call(self._stall(direction))

    def slow(self, delay: float) -> None:
        """Delay every forwarded chunk by ``delay`` seconds in both directions."""
        self._call(self._slow(delay))

    def restore(self) -> None:
        """Forward normally again. Stalled connections are cut (their held bytes dropped)."""
        self._proxy.refusing = False
        self._call(self._restore())

    def release(self) -> None:
        """End a stall by delivering the held bytes (the connections stay open)."""
        self._call(self._release())

    # -- in the proxy's loop -----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _count(self) -> int:
        return len(self._proxy.clients)

    async def _upstream_ports(self) -> list[int]:
        ports = []
        for client in self._proxy.clients:
            if client.server_writer is not None:
                sockname = client.server_writer.get_extra_info("sockname")
                if sockname:
                    ports.append(int(sockname[1]))
        return ports

    async def _stall(self, direction: Direction) -> None:
        gate = self._gate = self._gate or asyncio.Event()

        async def hold(chunk: bytes) -> bytes:
            await gate.wait()
            return chunk

        up: Callable[[bytes], Awaitable[bytes]] | None = hold if direction != "down" else None
        down: Callable[[bytes], Awaitable[bytes]] | None = hold if direction != "up" else None
        self._proxy.set_content_processors(up, down)

    async def _slow(self, delay: float) -> None:
        self._proxy.set_delay(delay, delay)

    async def _release(self) -> None:
        self._proxy.set_content_processors(None, None)
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def _restore(self) -> None:
        stalled = self._gate is not None
        self._proxy.set_delay(0, 0)
        if stalled:
            await self._cut()
        await self._release()

    async def _release_and_cut(self) -> None:
        await self._cut()

    async def _cut(self) -> None:
        clients: list[TCPProxyClient] = list(self._proxy.clients)
        for client in clients:
            for writer in (client.client_writer, client.server_writer):
                if writer is not None:
                    writer.transport.abort()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._proxy.disconnect_all()
