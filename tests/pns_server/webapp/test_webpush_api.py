"""Web Push through the API: registration (allow-listed), the VAPID key endpoint, delivery by
the outbox dispatcher to a fake push service, dead subscriptions, and the device long-poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import Device
from tests.fakes.webpush import FakeWebPush, Reply
from tests.pns_server.approvals.helpers import LOGIN
from tests.support.factories import (
    PairedDevice,
    RegisteredClient,
    new_key,
    pair_app_device,
    pairing_token_from,
    public_key_b64,
    register_client,
)

FAKE = FakeWebPush()


@pytest.fixture(scope="module", autouse=True)
def fake_push() -> Iterator[FakeWebPush]:
    with FAKE:
        yield FAKE


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"webpush_endpoint_hosts": [FAKE.host, "fcm.googleapis.com"]}


async def vapid_key(http: httpx.AsyncClient) -> str:
    response = await http.get("/v1/webpush")
    assert response.status_code == 200, response.text
    key: str = response.json()["public_key"]
    return key


async def pair_browser(
    http: httpx.AsyncClient, client: RegisteredClient, push: dict[str, Any] | None
) -> httpx.Response:
    started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
    body: dict[str, Any] = {
        "pairing_token": pairing_token_from(started.json()["qr_payload"]),
        "name": "Web approver (Android phone)",
        "platform": "web",
        "app_version": "web-1",
        "public_key": public_key_b64(new_key()),
    }
    if push is not None:
        body["push"] = push
    return await http.post("/v1/devices", json=body)


class TestRegistration:
    async def test_a_browser_pairs_with_its_push_subscription(
        self, http: httpx.AsyncClient, app: FastAPI
    ) -> None:
        client = await register_client(http)
        subscription = FAKE.subscribe(await vapid_key(http))
        created = await pair_browser(http, client, {"service": "webpush", **subscription.to_json()})
        assert created.status_code == 201, created.text
        [device] = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert (device["platform"], device["push"], device["push_status"]) == (
            "web",
            "webpush",
            "ok",
        )
        assert device["os_version"] is None

    @pytest.mark.parametrize(
        "endpoint",
        [
            "https://attacker.example/collect",
            "http://169.254.169.254/latest/meta-data/",
            "https://fcm.googleapis.com.attacker.example/x",
            "http://fcm.googleapis.com/fcm/send/x",
            "http://127.0.0.1:5432/",
        ],
    )
    async def test_an_endpoint_outside_the_allow_list_is_422_with_its_own_code(
        self, http: httpx.AsyncClient, endpoint: str
    ) -> None:
        client = await register_client(http)
        subscription = FAKE.subscribe().to_json()
        subscription["endpoint"] = endpoint
        refused = await pair_browser(http, client, {"service": "webpush", **subscription})
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "webpush_endpoint_forbidden"
        # The code was not burnt, and nothing was stored.
        listed = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert listed == []

    @pytest.mark.parametrize(
        "push",
        [
            {"service": "webpush", "endpoint": "https://fcm.googleapis.com/fcm/send/x"},
            {
                "service": "webpush",
                "endpoint": "https://fcm.googleapis.com/fcm/send/x",
                "keys": {"p256dh": "AAAA", "auth": "AAAAAAAAAAAAAAAAAAAAAA"},
            },
            {
                "service": "webpush",
                "endpoint": "https://fcm.googleapis.com/fcm/send/x",
                "keys": {"p256dh": "BAAA" * 21 + "A", "auth": "short"},
            },
            {"service": "apns", "token": "ab" * 32},  # a web approver has no APNs token
        ],
    )
    async def test_malformed_or_mismatched_registrations_are_422(
        self, http: httpx.AsyncClient, push: dict[str, Any]
    ) -> None:
        client = await register_client(http)
        refused = await pair_browser(http, client, push)
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "invalid_request"

    async def test_phones_still_need_an_os_version(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
        refused = await http.post(
            "/v1/devices",
            json={
                "pairing_token": pairing_token_from(started.json()["qr_payload"]),
                "name": "iPhone",
                "platform": "ios",
                "public_key": public_key_b64(new_key()),
            },
        )
        assert refused.status_code == 422
        assert "os_version" in {e["field"] for e in refused.json()["errors"]}

    async def test_put_push_renews_a_subscription_and_refuses_a_forbidden_one(
        self, http: httpx.AsyncClient, app: FastAPI
    ) -> None:
        client = await register_client(http)
        created = await pair_browser(http, client, None)
        headers = {"Authorization": f"Bearer {created.json()['device_token']}"}
        subscription = FAKE.subscribe()
        ok = await http.put(
            "/v1/device/push",
            json={"service": "webpush", **subscription.to_json()},
            headers=headers,
        )
        assert ok.status_code == 204, ok.text
        bad = subscription.to_json() | {"endpoint": "https://attacker.example/x"}
        refused = await http.put(
            "/v1/device/push", json={"service": "webpush", **bad}, headers=headers
        )
        assert refused.status_code == 422
        assert refused.json()["code"] == "webpush_endpoint_forbidden"
        async with app.state.runtime.db.session() as session:
            device = await session.scalar(select(Device))
            assert device is not None
            assert device.push_token == subscription.endpoint
            assert device.push_auth == subscription.to_json()["keys"]["auth"]

    async def test_the_vapid_key_is_a_p256_point_and_needs_no_token(
        self, http: httpx.AsyncClient
    ) -> None:
        from tests.fakes.webpush import unb64url

        raw = unb64url(await vapid_key(http))
        assert len(raw) == 65 and raw[0] == 4


class TestDelivery:
    async def create(self, http: httpx.AsyncClient, client: RegisteredClient) -> dict[str, Any]:
        created = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert created.status_code == 201, created.text
        body: dict[str, Any] = created.json()
        return body

    async def wait_delivery(
        self, http: httpx.AsyncClient, client: RegisteredClient, approval_id: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state = (
                await http.get(f"/v1/approvals/{approval_id}?wait=5", headers=client.headers)
            ).json()
            if state["delivery"]["queued"] == 0:
                return dict(state["delivery"])
        raise AssertionError("the push was not sent")

    async def test_the_dispatcher_delivers_an_encrypted_push_without_secrets(
        self, http: httpx.AsyncClient
    ) -> None:
        client = await register_client(http)
        subscription = FAKE.subscribe(await vapid_key(http))
        await pair_browser(http, client, {"service": "webpush", **subscription.to_json()})
        approval = await self.create(http, client)
        delivery = await self.wait_delivery(http, client, approval["approval_id"])
        assert delivery["sent"] == 1, delivery
        [got] = [r for r in FAKE.received if r.subscription_id == subscription.id]
        assert got.payload["approval_id"] == approval["approval_id"]
        assert set(got.payload) == {"type", "approval_id", "title", "body"}
        # The texts, not the id: a random hex id may happen to contain the code's digits.
        texts = " ".join(str(got.payload[key]) for key in ("type", "title", "body"))
        assert approval["match_code"] not in texts

    async def test_a_gone_subscription_retires_the_device_push(
        self, http: httpx.AsyncClient
    ) -> None:
        client = await register_client(http)
        subscription = FAKE.subscribe(await vapid_key(http))
        FAKE.answer(subscription, Reply(410, "unsubscribed"))
        await pair_browser(http, client, {"service": "webpush", **subscription.to_json()})
        approval = await self.create(http, client)
        delivery = await self.wait_delivery(http, client, approval["approval_id"])
        assert delivery["failed"] == 1, delivery
        [device] = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert device["push_status"] == "invalid_token"

    async def test_a_refused_vapid_key_shows_in_readyz(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        subscription = FAKE.subscribe(await vapid_key(http))
        FAKE.answer(subscription, Reply(403, "VAPID credentials do not match"))
        await pair_browser(http, client, {"service": "webpush", **subscription.to_json()})
        approval = await self.create(http, client)
        await self.wait_delivery(http, client, approval["approval_id"])
        ready = (await http.get("/readyz")).json()["checks"]["push"]["webpush"]
        assert ready["status"] == "config_error"
        assert ready["last_config_error"]["status_code"] == 403


class TestDeviceLongPoll:
    async def test_returns_when_an_approval_arrives(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        phone: PairedDevice = await pair_app_device(http, client, push=None)

        async def later() -> None:
            await asyncio.sleep(0.5)
            await http.post("/v1/approvals", json=LOGIN, headers=client.headers)

        started = time.monotonic()
        task = asyncio.create_task(later())
        listed = await http.get("/v1/device/approvals?wait=20", headers=phone.headers)
        await task
        assert listed.status_code == 200
        assert len(listed.json()["approvals"]) == 1
        assert 0.4 < time.monotonic() - started < 10

    async def test_returns_at_once_when_one_is_pending_and_after_wait_when_none(
        self, http: httpx.AsyncClient
    ) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        started = time.monotonic()
        empty = await http.get("/v1/device/approvals?wait=1", headers=phone.headers)
        assert empty.json() == {"approvals": []}
        assert time.monotonic() - started >= 0.9
        await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        started = time.monotonic()
        pending = await http.get("/v1/device/approvals?wait=30", headers=phone.headers)
        assert len(pending.json()["approvals"]) == 1
        assert time.monotonic() - started < 5

    async def test_holds_no_database_connection_while_waiting(
        self, http: httpx.AsyncClient, app: FastAPI
    ) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        db = app.state.runtime.db
        waits = [
            asyncio.create_task(http.get("/v1/device/approvals?wait=3", headers=phone.headers))
            for _ in range(15)
        ]
        await asyncio.sleep(1.0)
        assert db.connections_in_use == 0
        for response in await asyncio.gather(*waits):
            assert response.status_code == 200

    @pytest.mark.parametrize("wait", ["-1", "61", "soon"])
    async def test_a_bad_wait_is_422(self, http: httpx.AsyncClient, wait: str) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        response = await http.get(f"/v1/device/approvals?wait={wait}", headers=phone.headers)
        assert response.status_code == 422
