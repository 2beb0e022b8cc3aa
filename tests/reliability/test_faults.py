"""Faults under real relay processes: a relay killed mid-dispatch, PostgreSQL restarted under
a running relay, and push providers that hang or reset."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import server_env
from tests.fakes.apns import HANG, RESET, FakeApns, Reply
from tests.fakes.tls import CertificateAuthority
from tests.pns_server.approvals.helpers import LOGIN, signed_answer
from tests.support.factories import pair_app_device, register_client
from tests.support.postgres import Cluster, postgres_available, start_cluster
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow


def apns_env(apns: FakeApns, tmp_path: Path) -> dict[str, str]:
    return {
        "PNS_APNS_KEY_FILE": str(apns.write_key(tmp_path / "AuthKey.p8")),
        "PNS_APNS_KEY_ID": apns.key_id,
        "PNS_APNS_TEAM_ID": apns.team_id,
        "PNS_APNS_TOPIC": apns.topic,
        "PNS_APNS_URL": apns.url,
        "PNS_APNS_SANDBOX_URL": apns.url,
        "PNS_PUSH_CA_FILE": str(apns.write_ca(tmp_path / "push-ca.pem")),
        # Short, so a dead process's claims are retried quickly; at least twice the timeout.
        "PNS_PUSH_LEASE_SECONDS": "2",
        "PNS_LOG_LEVEL": "warning",
    }


@pytest.fixture
async def apns() -> AsyncIterator[FakeApns]:
    async with FakeApns(ca=CertificateAuthority()) as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(env: dict[str, str], log: Path) -> AsyncIterator[LiveServer]:
    server = LiveServer(env, log)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def delivered(apns: FakeApns, token: str) -> list[int]:
    return [r.status for r in apns.for_token(token) if r.status == 200]


@pytest.mark.postgres_only
async def test_killed_mid_dispatch_the_next_process_delivers_once_per_device(
    database_url: str, tmp_path: Path, apns: FakeApns
) -> None:
    env = server_env(
        database_url, tmp_path, PNS_PUSH_TIMEOUT_SECONDS="1", **apns_env(apns, tmp_path)
    )
    apns.default_reply = HANG
    first = LiveServer(env, tmp_path / "first.log")
    await asyncio.to_thread(first.start)
    try:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
            client = await register_client(http)
            phones = [
                await pair_app_device(
                    http,
                    client,
                    push={
                        "service": "apns",
                        "token": uuid.uuid4().hex * 2,
                        "environment": "production",
                    },
                )
                for _ in range(2)
            ]
            created = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
            approval = created.json()
            await apns.wait_for(lambda got: len(got) >= 2, timeout=30)
    finally:
        first.kill()
    assert first.process is not None and first.process.returncode == -9

    apns.default_reply = Reply()
    second = LiveServer(env, tmp_path / "second.log")
    await asyncio.to_thread(second.start)
    try:
        tokens = [r.token for r in apns.received]
        assert len(set(tokens)) == 2
        await apns.wait_for(
            lambda _got: all(delivered(apns, token) for token in set(tokens)), timeout=60
        )
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
            state = await http.get(
                f"/v1/approvals/{approval['approval_id']}?wait=5", headers=client.headers
            )
            while state.json()["delivery"]["sent"] < 2:
                state = await http.get(
                    f"/v1/approvals/{approval['approval_id']}?wait=5", headers=client.headers
                )
            assert state.json()["status"] == "pending"
            assert state.json()["delivery"]["queued"] == 0
            answered = await http.post(
                f"/v1/device/approvals/{approval['approval_id']}/response",
                json=signed_answer(
                    phones[0], approval["approval_id"], "approve", approval["match_code"]
                ),
                headers=phones[0].headers,
            )
            assert answered.json()["status"] == "approved"
    finally:
        second.stop()
    for token in set(tokens):
        assert len(delivered(apns, token)) == 1
    assert {r.headers["apns-collapse-id"] for r in apns.received} == {approval["approval_id"]}


async def test_hung_and_reset_streams_are_retried_until_delivered(
    database_url: str, tmp_path: Path, apns: FakeApns
) -> None:
    env = server_env(
        database_url, tmp_path, PNS_PUSH_TIMEOUT_SECONDS="1", **apns_env(apns, tmp_path)
    )
    hung, reset = "a1" * 32, "b2" * 32
    apns.answer(hung, HANG)
    apns.answer(reset, RESET)
    async with (
        running(env, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
    ):
        if True:
            client = await register_client(http)
            for token in (hung, reset):
                await pair_app_device(
                    http,
                    client,
                    push={"service": "apns", "token": token, "environment": "production"},
                )
            created = (await http.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
            await apns.wait_for(
                lambda _got: len(apns.for_token(hung)) >= 2 and len(apns.for_token(reset)) >= 2,
                timeout=60,
            )
            apns.answer(hung, Reply())
            apns.answer(reset, Reply())
            await apns.wait_for(
                lambda _got: bool(delivered(apns, hung) and delivered(apns, reset)), timeout=60
            )
            url = f"/v1/approvals/{created['approval_id']}?wait=5"
            state = (await http.get(url, headers=client.headers)).json()
            deadline = time.monotonic() + 30
            while state["delivery"]["sent"] < 2 and time.monotonic() < deadline:
                state = (await http.get(url, headers=client.headers)).json()
            assert state["delivery"]["sent"] == 2 and state["delivery"]["queued"] == 0
            assert state["status"] == "pending"
            metrics = (await http.get("/metrics")).text
            assert re.search(r"^pns_outbox_pending 0\.0$", metrics, re.M), metrics


@pytest.fixture
async def own_cluster() -> AsyncIterator[Cluster]:
    if not postgres_available():
        pytest.skip("PostgreSQL is not installed here")
    cluster = await asyncio.to_thread(start_cluster)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


async def ready_status(http: httpx.AsyncClient) -> int:
    try:
        return (await http.get("/readyz", timeout=10)).status_code
    except httpx.HTTPError:
        return 0


async def until_ready(http: httpx.AsyncClient, status: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while await ready_status(http) != status:
        assert time.monotonic() < deadline, f"/readyz never answered {status}"
        await asyncio.sleep(0.2)


async def waiters(http: httpx.AsyncClient) -> float:
    found = re.search(r"^pns_longpoll_waiters (\S+)$", (await http.get("/metrics")).text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_postgres_restart_under_a_running_relay(
    own_cluster: Cluster, tmp_path: Path, db_kind: str
) -> None:
    if db_kind != "postgres":
        pytest.skip("restarts PostgreSQL")
    conn = await asyncpg.connect(own_cluster.database_url("postgres"))
    await conn.execute('CREATE DATABASE "restart"')
    await conn.close()
    env = server_env(own_cluster.database_url("restart"), tmp_path, PNS_LOG_LEVEL="warning")
    async with (
        running(env, tmp_path / "server.log") as server,
        httpx.AsyncClient(base_url=server.url, timeout=90) as http,
    ):
        if True:
            client = await register_client(http)
            phone = await pair_app_device(http, client, push=None)
            approval = (await http.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
            waiting = asyncio.create_task(
                http.get(f"/v1/approvals/{approval['approval_id']}?wait=60", headers=client.headers)
            )
            deadline = time.monotonic() + 10
            while await waiters(http) < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

            await asyncio.to_thread(own_cluster.stop, "fast")
            await until_ready(http, 503)
            await asyncio.to_thread(own_cluster.start)
            await until_ready(http, 200)

            answered = await http.post(
                f"/v1/device/approvals/{approval['approval_id']}/response",
                json=signed_answer(
                    phone, approval["approval_id"], "approve", approval["match_code"]
                ),
                headers=phone.headers,
            )
            assert answered.status_code == 200, answered.text
            result = await asyncio.wait_for(waiting, 60)
            assert result.status_code == 200, result.text
            assert result.json()["status"] == "approved"
