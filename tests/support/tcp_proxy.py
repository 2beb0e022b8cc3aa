"""A TCP proxy that can go silent, as a NAT or firewall that forgets a flow does: bytes
sent into a black-holed connection vanish, nothing comes back, and nobody is told."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


@dataclass(eq=False)
class _Flow:
    writers: list[asyncio.StreamWriter]
    silent: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flows: set[_Flow] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by this proxy's."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def black_hole(self) -> int:
        """Silence every connection open now (new ones are forwarded); returns how many."""
        for flow in self._flows:
            flow.silent = True
        return len(self._flows)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        flow = _Flow([writer, up_writer])
        self._flows.add(flow)
        flow.tasks = [
            asyncio.create_task(self._pump(flow, reader, up_writer)),
            asyncio.create_task(self._pump(flow, up_reader, writer)),
        ]

    async def _pump(
        self, flow: _Flow, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                if flow.silent:
                    continue  # swallowed: the sender sees a successful write, and no reply
                sink.write(data)
                await sink.drain()
        if not flow.silent:
            for writer in flow.writers:
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for flow in self._flows:
            for task in flow.tasks:
                task.cancel()
            for writer in flow.writers:
                writer.close()
        for flow in self._flows:
            for task in flow.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flows.clear()
