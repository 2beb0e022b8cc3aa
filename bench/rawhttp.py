"""HTTP/1.1 keep-alive connections to a relay, driven by hand.

A request through httpx's client and pool costs the sender a millisecond or more of CPU;
through one of these, tens of microseconds. The load generator and the simulated phones
share the relay's two cores, so what they spend is taken from the relay: at concurrency 20
httpx was the limit of the OTP phase (the relay served every check in under 25 ms while
the generator saw a p99 of 250 ms), and in a round trip the phones and the generator
together used more CPU than the relay. The phases that measure the relay's own pace send
their requests this way. Imported by the helper processes too: standard library only."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding: *chunked", re.I)
_CLOSE = re.compile(rb"\r\nconnection: *close", re.I)


class RelayError(RuntimeError):
    """The relay answered with an error status."""


class RawHttp:
    """One keep-alive connection, opened at its first request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, bytes]:
        """The answer's status and body."""
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None:
            fields += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{fields}\r\n".encode() + (body or b"")
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if _CHUNKED.search(head):
            content = await self._chunks(self.reader)
        else:
            length = _LENGTH.search(head)
            content = await self.reader.readexactly(int(length.group(1)) if length else 0)
        if _CLOSE.search(head):
            self.close()
        return int(head.split(b" ", 2)[1]), content

    async def post_json(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        """The answer's status; its body is read and dropped."""
        status, _content = await self.send("POST", path, headers, body)
        return status

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers are sent: the empty line
        return b"".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class RawRelay:
    """A relay's JSON API over a pool of `RawHttp` connections: as many as there are
    requests in flight, each reused once its answer is read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._free: list[RawHttp] = []

    async def get_json(self, path: str, headers: dict[str, str]) -> Any:
        return await self._json("GET", path, headers, None)

    async def post_json(self, path: str, payload: Any, headers: dict[str, str]) -> Any:
        return await self._json("POST", path, headers, json.dumps(payload).encode())

    async def _json(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> Any:
        connection = self._free.pop() if self._free else RawHttp(self.port)
        try:
            status, content = await connection.send(method, path, headers, body)
        except BaseException:
            connection.close()
            raise
        self._free.append(connection)
        if status >= 400:
            raise RelayError(f"{method} {path}: {status} {content[:300]!r}")
        return json.loads(content) if content else None

    def close(self) -> None:
        for connection in self._free:
            connection.close()
        self._free.clear()
