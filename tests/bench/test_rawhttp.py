"""The benchmark's hand-driven HTTP client, against a server that answers as uvicorn can:
a sized body, a chunked one, an error, and a connection it closes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from bench.rawhttp import RawHttp, RawRelay, RelayError


def sized(status: str, body: bytes, *fields: str) -> bytes:
    head = "".join(f"{field}\r\n" for field in (f"Content-Length: {len(body)}", *fields))
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


ANSWERS = {
    b"/sized": sized("200 OK", b'{"a": true}'),
    b"/chunked": (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"b":\r\n4\r\n 12}\r\n0\r\n\r\n'
    ),
    b"/missing": sized("404 Not Found", b'{"code": "nope"}'),
    b"/closing": sized("200 OK", b"{}", "Connection: close"),
}


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[bytes]]]:
    """Its port, and each connection's requests as they came (line and body)."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed it
            line, *fields = head.split(b"\r\n")
            sizes = [f for f in fields if f.lower().startswith(b"content-length:")]
            body = await reader.readexactly(int(sizes[0].split(b":")[1])) if sizes else b""
            seen.append(line + b" " + body)
            path = line.split(b" ")[1]
            writer.write(ANSWERS[path])
            await writer.drain()
            if path == b"/closing":
                writer.close()
                return

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield port, seen


async def test_a_sized_and_a_chunked_answer_are_read_whole_on_one_connection(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server
    connection = RawHttp(port)
    assert await connection.send("GET", "/sized", {}) == (200, b'{"a": true}')
    assert await connection.send("POST", "/chunked", {"X": "1"}, b"[1]") == (200, b'{"b": 12}')
    assert seen == [b"GET /sized HTTP/1.1 ", b"POST /chunked HTTP/1.1 [1]"]
    connection.close()


async def test_an_error_status_is_raised_and_the_connection_still_reused(
    server: tuple[int, list[bytes]],
) -> None:
    port, seen = server
    relay = RawRelay(port)
    with pytest.raises(RelayError, match="404"):
        await relay.get_json("/missing", {})
    assert await relay.post_json("/sized", {"x": 1}, {}) == {"a": True}
    assert seen[-1] == b"POST /sized HTTP/1.1 " + json.dumps({"x": 1}).encode()
    relay.close()


async def test_a_connection_the_server_closes_is_opened_again(
    server: tuple[int, list[bytes]],
) -> None:
    port, _seen = server
    relay = RawRelay(port)
    assert await relay.get_json("/closing", {}) == {}
    assert await relay.get_json("/sized", {}) == {"a": True}
    relay.close()
