"""Fake APNs/FCM fixtures and message builders shared by the push tests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pns_server.push.base import PushMessage
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm


def push_message(
    token: str = "ab" * 32,
    *,
    service: str = "apns",
    environment: str = "production",
    body: str = "FILESRV01 asks to approve a login as admin",
    approval_id: str = "appr_0123456789abcdef",
    expires_in: float = 120,
) -> PushMessage:
    return PushMessage(
        approval_id=approval_id,
        device_id="dev_0123456789",
        service=service,
        token=token,
        environment=environment,
        title="Approve login?",
        body=body,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


@pytest.fixture
async def fake_apns() -> AsyncIterator[FakeApns]:
    async with FakeApns() as fake:
        yield fake


@pytest.fixture
def fake_fcm(tmp_path: Path) -> Iterator[FakeFcm]:
    with FakeFcm() as fake:
        yield fake


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy from the machine's environment: the test names its own."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@asynccontextmanager
async def connect_proxy_server(
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A forward proxy that tunnels with CONNECT, as Squid does (over TLS itself with
    `tls`: an https proxy): its port, and the head of each tunnel asked for."""
    heads: list[bytes] = []

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1], heads


@pytest.fixture
async def connect_proxy() -> AsyncIterator[tuple[int, list[bytes]]]:
    async with connect_proxy_server() as proxy:
        yield proxy
