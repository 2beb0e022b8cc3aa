"""Twenty clients at once on two relay processes sharing PostgreSQL: pairing, racing answers,
OTP. Afterwards every approval has one final state and the database's counts add up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import server_env
from tests.pns_server.approvals.helpers import LOGIN, signed_answer
from tests.support.factories import pair_app_device, register_client
from tests.support.server import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres_only]

CLIENTS = 20
RAISED = str(10**9)


@pytest.fixture
async def two_relays(database_url: str, tmp_path: Path) -> AsyncIterator[list[LiveServer]]:
    env = server_env(
        database_url,
        tmp_path,
        PNS_RATE_REGISTER_PER_HOUR=RAISED,
        PNS_RATE_PAIRING_PER_MINUTE=RAISED,
        PNS_LOG_LEVEL="warning",
    )
    servers = [LiveServer(env, tmp_path / f"relay{i}.log") for i in range(2)]
    try:
        for server in servers:
            await asyncio.to_thread(server.start)
        yield servers
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)


async def one_client(a: httpx.AsyncClient, b: httpx.AsyncClient, index: int) -> str:
    client = await register_client(a, f"HOST{index}")
    phone = await pair_app_device(b, client, push=None)
    created = await b.post("/v1/approvals", json=LOGIN, headers=client.headers)
    assert created.status_code == 201, created.text
    approval = created.json()
    url = f"/v1/device/approvals/{approval['approval_id']}/response"
    approve = signed_answer(phone, approval["approval_id"], "approve", approval["match_code"])
    reject = signed_answer(phone, approval["approval_id"], "reject")
    answers = await asyncio.gather(
        a.post(url, json=approve, headers=phone.headers),
        b.post(url, json=reject, headers=phone.headers),
    )
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    verified = await a.post("/v1/otp/verify", json={"code": phone.otp()}, headers=client.headers)
    assert verified.status_code == 200, verified.text
    return str(approval["approval_id"])


async def test_many_clients_on_two_processes_add_up(
    two_relays: list[LiveServer], database_url: str
) -> None:
    async with (
        httpx.AsyncClient(base_url=two_relays[0].url, timeout=60) as a,
        httpx.AsyncClient(base_url=two_relays[1].url, timeout=60) as b,
    ):
        ids = await asyncio.gather(*(one_client(a, b, i) for i in range(CLIENTS)))
    assert len(set(ids)) == CLIENTS

    conn = await asyncpg.connect(database_url)
    try:
        statuses = await conn.fetch("SELECT id, status FROM approvals")
        assert {r["id"] for r in statuses} == set(ids)
        assert {r["status"] for r in statuses} <= {"approved", "rejected"}
        decisions = await conn.fetch(
            "SELECT subject_id, count(*) AS n FROM audit_events"
            " WHERE event = 'approval.answered' GROUP BY subject_id"
        )
        assert {r["subject_id"]: r["n"] for r in decisions} == dict.fromkeys(ids, 1)
        assert await conn.fetchval("SELECT count(*) FROM deliveries") == 0  # poll-only phones
        assert await conn.fetchval("SELECT count(*) FROM clients") == CLIENTS
        assert await conn.fetchval("SELECT count(*) FROM devices") == CLIENTS
        assert (
            await conn.fetchval("SELECT count(*) FROM audit_events WHERE event = 'otp.accepted'")
            == CLIENTS
        )
        assert await conn.fetchval("SELECT count(*) FROM pairings WHERE status = 'pending'") == 0
    finally:
        await conn.close()
