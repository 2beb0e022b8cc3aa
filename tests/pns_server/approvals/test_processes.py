"""Real server processes: end to end over HTTP, and two replicas sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import server_env
from tests.pns_server.approvals.helpers import LOGIN, settle_deliveries, signed_answer
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow


async def http_to(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=100))


async def test_end_to_end_against_a_real_server(live_server: LiveServer) -> None:
    async with await http_to(live_server.url) as http:
        client = await register_client(http)
        phone = await pair_app_device(http, client)
        created = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert created.status_code == 201
        approval = created.json()

        # The phone's poll fallback finds the request; it shows no code.
        pending = (await http.get("/v1/device/approvals", headers=phone.headers)).json()
        assert [a["approval_id"] for a in pending["approvals"]] == [approval["approval_id"]]

        waiting = asyncio.create_task(
            http.get(f"/v1/approvals/{approval['approval_id']}?wait=30", headers=client.headers)
        )
        answered = await http.post(
            f"/v1/device/approvals/{approval['approval_id']}/response",
            json=signed_answer(phone, approval["approval_id"], "approve", approval["match_code"]),
            headers=phone.headers,
        )
        assert answered.json()["status"] == "approved"
        state = (await asyncio.wait_for(waiting, 30)).json()
        while state["status"] == "pending":  # a delivery update may end the first wait
            state = (
                await http.get(
                    f"/v1/approvals/{approval['approval_id']}?wait=30", headers=client.headers
                )
            ).json()
        assert state["status"] == "approved"
        response = state["response"]
        key = serialization.load_der_public_key(base64.b64decode(response["public_key"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        signed = (
            f"pns-approval-v1|{approval['approval_id']}|approve|{approval['match_code']}|"
            f"{response['timestamp']}"
        )
        key.verify(
            base64.b64decode(response["signature"]), signed.encode(), ec.ECDSA(hashes.SHA256())
        )
    pushes = [line for line in live_server.log().splitlines() if "push (log sender)" in line]
    assert any(approval["approval_id"] in line for line in pushes)


@pytest.fixture
def two_servers(database_url: str, tmp_path: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    servers = []
    try:
        for name in ("a", "b"):
            data = tmp_path / name
            data.mkdir()
            env = server_env(database_url, data, PNS_MAX_PUSHES_WITHOUT_SUCCESS="1000")
            servers.append(LiveServer(env, tmp_path / f"{name}.log").start())
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
async def replicas(
    two_servers: tuple[LiveServer, LiveServer],
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    a, b = two_servers
    async with await http_to(a.url) as http_a, await http_to(b.url) as http_b:
        yield http_a, http_b


async def contenders(
    http_a: httpx.AsyncClient,
    http_b: httpx.AsyncClient,
    client: RegisteredClient,
    phones: list[PairedDevice],
    approval: dict[str, str],
    per_kind: int,
) -> list[httpx.Response]:
    approval_id = approval["approval_id"]
    calls = []
    for index in range(per_kind * 3):
        http = (http_a, http_b)[index % 2]
        phone = phones[index % len(phones)]
        kind = index % 3
        if kind == 0:
            body = signed_answer(phone, approval_id, "approve", approval["match_code"])
        elif kind == 1:
            body = signed_answer(phone, approval_id, "reject")
        if kind == 2:
            calls.append(http.delete(f"/v1/approvals/{approval_id}", headers=client.headers))
        else:
            calls.append(
                http.post(
                    f"/v1/device/approvals/{approval_id}/response", json=body, headers=phone.headers
                )
            )
    random.shuffle(calls)
    return list(await asyncio.gather(*calls))


@pytest.mark.postgres_only
async def test_two_processes_share_decisions_and_wake_ups(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    http_a, http_b = replicas
    client = await register_client(http_a)
    phones = [
        await pair_app_device(http_a, client, name="iPhone"),
        await pair_app_device(http_b, client, name="Pixel", platform="android", os_version="14"),
    ]
    for round_number in range(6):
        creator = (http_a, http_b)[round_number % 2]
        approval = (await creator.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
        results = await contenders(http_a, http_b, client, phones, approval, per_kind=8)
        winners = [r for r in results if r.status_code == 200]
        losers = [r for r in results if r.status_code != 200]
        assert len(winners) == 1, [r.text for r in results]
        assert {r.status_code for r in losers} == {409}
        assert {r.json()["code"] for r in losers} == {"already_decided"}
        final = (
            await http_b.get(f"/v1/approvals/{approval['approval_id']}", headers=client.headers)
        ).json()
        assert final["status"] == winners[0].json()["status"]
        assert {r.json()["approval_status"] for r in losers} == {final["status"]}

    await long_poll_on_one_process_wakes_on_answer_at_the_other(http_a, http_b, client, phones[0])


async def long_poll_on_one_process_wakes_on_answer_at_the_other(
    http_a: httpx.AsyncClient,
    http_b: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
) -> None:
    approval = (await http_a.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
    url = f"/v1/approvals/{approval['approval_id']}?wait=40"
    await settle_deliveries(http_a, client, approval["approval_id"])
    waiting = asyncio.create_task(http_a.get(url, headers=client.headers))
    await asyncio.sleep(0.5)  # the wait is parked on A (a lost wake-up would cost 15 s)
    assert not waiting.done()
    answered_at = time.monotonic()
    answered = await http_b.post(
        f"/v1/device/approvals/{approval['approval_id']}/response",
        json=signed_answer(phone, approval["approval_id"], "reject"),
        headers=phone.headers,
    )
    assert answered.status_code == 200
    state = (await asyncio.wait_for(waiting, 40)).json()
    assert state["status"] == "rejected"
    assert time.monotonic() - answered_at < 5
