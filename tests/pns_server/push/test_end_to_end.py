"""A real server process delivering through the fake APNs and the fake FCM to two phones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import server_env
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm
from tests.fakes.tls import CertificateAuthority
from tests.pns_server.approvals.helpers import LOGIN, signed_answer
from tests.support.factories import PairedDevice, pair_app_device, register_client
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow


@pytest.fixture
async def relay(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[LiveServer, FakeApns, FakeFcm]]:
    ca = CertificateAuthority()
    async with FakeApns(ca=ca) as apns:
        with FakeFcm(ca=ca) as fcm:
            env = server_env(
                database_url,
                tmp_path,
                PNS_APNS_KEY_FILE=str(apns.write_key(tmp_path / "AuthKey.p8")),
                PNS_APNS_KEY_ID=apns.key_id,
                PNS_APNS_TEAM_ID=apns.team_id,
                PNS_APNS_TOPIC=apns.topic,
                PNS_APNS_URL=apns.url,
                PNS_APNS_SANDBOX_URL=apns.url,
                PNS_FCM_CREDENTIALS_FILE=str(fcm.write_credentials(tmp_path / "sa.json")),
                PNS_FCM_URL=fcm.url,
                PNS_PUSH_CA_FILE=str(ca.write_ca(tmp_path / "push-ca.pem")),
                PNS_PUSH_TIMEOUT_SECONDS="5",
            )
            server = LiveServer(env, tmp_path / "server.log")
            await asyncio.to_thread(server.start)
            try:
                yield server, apns, fcm
            finally:
                await asyncio.to_thread(server.stop)


async def answer_from_push(
    http: httpx.AsyncClient, phone: PairedDevice, approval_id: str, match_code: str | None
) -> None:
    """What the app does when the push arrives: fetch the details, then sign an answer."""
    details = await http.get(f"/v1/device/approvals/{approval_id}", headers=phone.headers)
    assert details.status_code == 200, details.text
    answered = await http.post(
        f"/v1/device/approvals/{approval_id}/response",
        json=signed_answer(phone, approval_id, "approve", match_code),
        headers=phone.headers,
    )
    assert answered.status_code == 200, answered.text


async def test_both_phones_get_the_push_and_one_answer_approves(
    relay: tuple[LiveServer, FakeApns, FakeFcm],
) -> None:
    server, apns, fcm = relay
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        client = await register_client(http)
        iphone = await pair_app_device(http, client, name="iPhone", platform="ios")
        android = await pair_app_device(
            http, client, name="Pixel", platform="android", os_version="14"
        )
        created = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert created.status_code == 201, created.text
        approval = created.json()

        [apns_push] = await apns.wait_for(lambda got: len(got) >= 1, timeout=30)
        [fcm_push] = await asyncio.to_thread(fcm.wait_for, 1, 30)
        assert apns_push.status == 200 and fcm_push.status == 200
        assert apns_push.headers["apns-collapse-id"] == approval["approval_id"]
        assert fcm_push.message["android"]["priority"] == "high"
        pushed_id = apns_push.payload["approval_id"]
        assert fcm_push.message["data"]["approval_id"] == pushed_id == approval["approval_id"]

        waiting = asyncio.create_task(
            http.get(f"/v1/approvals/{pushed_id}?wait=30", headers=client.headers)
        )
        await answer_from_push(http, iphone, pushed_id, approval.get("match_code"))
        state = (await asyncio.wait_for(waiting, 40)).json()
        while state["status"] == "pending":  # a delivery update may end the first wait
            state = (
                await http.get(f"/v1/approvals/{pushed_id}?wait=30", headers=client.headers)
            ).json()
        assert state["status"] == "approved"
        assert android.device_id != iphone.device_id

        metrics = (await http.get("/metrics")).text
        assert 'pns_push_sends_total{outcome="delivered",service="apns"} 1.0' in metrics
        assert 'pns_push_sends_total{outcome="delivered",service="fcm"} 1.0' in metrics
        ready = (await http.get("/readyz")).json()["checks"]["push"]
        assert ready["apns"]["status"] == "ok" and ready["apns"]["last_delivered_at"]
        assert ready["fcm"]["status"] == "ok" and ready["fcm"]["last_delivered_at"]
    assert "push: APNs topic" in server.log()
