from __future__ import annotations

import asyncio
import gc
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from pns_server.config import Settings
from pns_server.shutdown import YOUNG_COLLECTION_EVERY, GracefulServer, server_options
from tests.conftest import server_env
from tests.support.factories import pair_app_device, register_client
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow
WAITERS = re.compile(r"^pns_longpoll_waiters (\d+)", re.MULTILINE)


async def _waiters(http: httpx.AsyncClient) -> int:
    match = WAITERS.search((await http.get("/metrics")).text)
    return int(float(match.group(1))) if match else 0


async def test_sigterm_answers_every_long_poll_and_exits_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    env = server_env(database_url, tmp_path, PNS_SHUTDOWN_TIMEOUT="10")
    server = LiveServer(env, tmp_path / "server.log").start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            client = await register_client(http)
            other = await register_client(http)
            # Poll-only: a push delivery would change the counts and end that wait early.
            await pair_app_device(http, other, push=None)
            pairings = [
                (
                    await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
                ).json()["pairing_id"]
                for _ in range(3)
            ]
            approval = await http.post("/v1/approvals", json={}, headers=other.headers)
            assert approval.status_code == 201, approval.text
            polls = [
                asyncio.create_task(http.get(f"/v1/pairings/{p}?wait=60", headers=client.headers))
                for p in pairings
            ]
            polls.append(
                asyncio.create_task(
                    http.get(
                        f"/v1/approvals/{approval.json()['approval_id']}?wait=60",
                        headers=other.headers,
                    )
                )
            )
            deadline = time.monotonic() + 15
            while await _waiters(http) < len(polls):
                assert time.monotonic() < deadline, "long-polls never started waiting"
                await asyncio.sleep(0.05)

            assert server.process is not None
            stopped_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            responses = await asyncio.gather(*polls)
            answered_in = time.monotonic() - stopped_at
            code = await asyncio.to_thread(server.process.wait, 20)
            exited_in = time.monotonic() - stopped_at
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * len(polls)
    assert [r.json()["status"] for r in responses] == ["pending"] * len(polls)
    # Far below the 60 s the polls asked for: they were released, not timed out.
    assert answered_in < 10
    assert code == 0, server.log()
    assert exited_in < 10 + 5


async def test_the_objects_built_to_start_are_left_out_of_garbage_collection() -> None:
    app = FastAPI()
    server = GracefulServer(uvicorn.Config(app, port=0, log_config=None, lifespan="off"), app)
    gc.unfreeze()
    thresholds = gc.get_threshold()
    try:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        # Frozen objects are no longer tracked by any generation a collection walks.
        assert gc.get_freeze_count() > 10_000
        assert not any(o is app for o in gc.get_objects())
        # Young garbage is collected less often than CPython's every 700 allocations, so
        # fewer request objects reach the old generation and start a full collection.
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *thresholds[1:])
        assert thresholds[0] < YOUNG_COLLECTION_EVERY
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_idle_connections_outlive_the_clients_and_proxies_in_front() -> None:
    # A server that closes an idle connection first races the client's next request on it
    # (httpx keeps one 5 s, nginx an upstream one 60 s): that request fails unanswered.
    options = server_options(Settings(_env_file=None))  # type: ignore[call-arg]
    assert options["timeout_keep_alive"] > 60


async def test_the_keep_alive_setting_reaches_the_server(database_url: str, tmp_path: Path) -> None:
    env = server_env(database_url, tmp_path, PNS_KEEP_ALIVE_SECONDS="1")
    server = LiveServer(env, tmp_path / "server.log").start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"\r\nserver:" not in head.lower()  # uvicorn's own header is not sent
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        started = time.monotonic()
        # uvicorn's own default would keep it for 5 s: closed after about 1 s, it is ours.
        assert await asyncio.wait_for(reader.read(), 4.5) == b""
        assert time.monotonic() - started >= 0.5
        writer.close()
    finally:
        server.stop()
