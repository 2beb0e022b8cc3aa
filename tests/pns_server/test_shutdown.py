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

from pns_server.shutdown import GracefulServer
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
    try:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        # Frozen objects are no longer tracked by any generation a collection walks.
        assert gc.get_freeze_count() > 10_000
        assert not any(o is app for o in gc.get_objects())
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
    finally:
        gc.unfreeze()
