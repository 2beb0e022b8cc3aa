from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pyotp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import Approval, AuditEvent, Delivery, Device, Pairing
from pns_server.runtime import Runtime
from pns_server.security import hash_token, new_id
from tests.support.factories import (
    PairedDevice,
    RegisteredClient,
    apns_token,
    bearer,
    new_key,
    pair_app_device,
    pair_totp_device,
    pairing_token_from,
    public_key_b64,
    register_client,
)
from tests.support.server import LiveServer

FCM_TOKEN = "dGhpcyBpcyBub3QgYSByZWFs:APA91b" + "x" * 140


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


async def start_app_pairing(http: httpx.AsyncClient, client: RegisteredClient) -> dict[str, Any]:
    response = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    return body


async def pairing_token(http: httpx.AsyncClient, client: RegisteredClient) -> str:
    return pairing_token_from((await start_app_pairing(http, client))["qr_payload"])


def phone_body(token: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pairing_token": token,
        "name": "Ann's iPhone",
        "platform": "ios",
        "os_version": "17.2",
        "app_version": "4.3.0",
        "push": {"service": "apns", "token": apns_token(), "environment": "production"},
        "public_key": public_key_b64(new_key()),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def devices_of(http: httpx.AsyncClient, client: RegisteredClient) -> list[dict[str, Any]]:
    response = await http.get("/v1/devices", headers=client.headers)
    assert response.status_code == 200
    devices: list[dict[str, Any]] = response.json()["devices"]
    return devices


async def device_row(app: FastAPI, device_id: str) -> Device | None:
    async with runtime_of(app).db.session() as session:
        return await session.get(Device, device_id)


async def audit_events(app: FastAPI, subject_id: str) -> list[str]:
    async with runtime_of(app).db.session() as session:
        rows = await session.scalars(
            select(AuditEvent.event).where(AuditEvent.subject_id == subject_id)
        )
        return list(rows.all())


def assert_invalid(response: httpx.Response, field: str | None = None) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "invalid_request"
    assert problem["errors"]
    if field is not None:
        assert field in {e["field"] for e in problem["errors"]}, problem


@pytest.fixture
async def client(http: httpx.AsyncClient) -> RegisteredClient:
    return await register_client(http, name="FILESRV01")


class TestEnrol:
    async def test_ios_phone_pairs_with_apns(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        key = new_key()
        body = phone_body(await pairing_token(http, client), public_key=public_key_b64(key))
        response = await http.post("/v1/devices", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["device_token"].startswith("pnsd_")
        assert created["totp"]["algorithm"] == "SHA1"
        assert (created["totp"]["digits"], created["totp"]["period"]) == (6, 30)

        [listed] = await devices_of(http, client)
        assert listed["device_id"] == created["device_id"]
        assert listed["kind"] == "app" and listed["name"] == "Ann's iPhone"
        assert (listed["platform"], listed["os_version"]) == ("ios", "17.2")
        assert (listed["push"], listed["push_status"]) == ("apns", "ok")
        assert listed["public_key"] == body["public_key"]
        assert listed["created_at"].endswith("Z") and listed["last_used_at"] is None
        # The pinned key loads as the phone's P-256 key.
        pinned = serialization.load_der_public_key(base64.b64decode(listed["public_key"]))
        assert pinned.public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]

        row = await device_row(app, created["device_id"])
        assert row is not None
        assert row.token_hash == hash_token(created["device_token"])
        assert created["totp"]["secret"] not in row.totp_secret
        assert runtime_of(app).box.decrypt(row.totp_secret) == created["totp"]["secret"]
        assert (row.push_environment, row.app_version) == ("production", "4.3.0")
        assert "device.paired" in await audit_events(app, created["device_id"])

    async def test_android_phone_pairs_with_fcm(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        body = phone_body(
            await pairing_token(http, client),
            platform="android",
            os_version="8.0",
            push={"service": "fcm", "token": FCM_TOKEN},
        )
        assert (await http.post("/v1/devices", json=body)).status_code == 201
        [listed] = await devices_of(http, client)
        assert (listed["platform"], listed["push"], listed["push_status"]) == (
            "android",
            "fcm",
            "ok",
        )

    async def test_without_push_the_phone_polls(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        body = phone_body(await pairing_token(http, client))
        del body["push"]
        assert (await http.post("/v1/devices", json=body)).status_code == 201
        [listed] = await devices_of(http, client)
        assert (listed["push"], listed["push_status"]) == (None, "none")

    async def test_sandbox_environment_is_kept(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        body = phone_body(
            await pairing_token(http, client),
            push={"service": "apns", "token": "AB" * 100, "environment": "sandbox"},
        )
        response = await http.post("/v1/devices", json=body)
        assert response.status_code == 201
        row = await device_row(app, response.json()["device_id"])
        assert row is not None and row.push_environment == "sandbox"

    async def test_totp_block_generates_the_codes_the_server_expects(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        device = await pair_app_device(http, client)
        row = await device_row(app, device.device_id)
        assert row is not None
        server_secret = runtime_of(app).box.decrypt(row.totp_secret)
        assert pyotp.TOTP(server_secret).now() == device.otp()

    async def test_used_token_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        assert (await http.post("/v1/devices", json=phone_body(token))).status_code == 201
        again = await http.post("/v1/devices", json=phone_body(token))
        assert again.status_code == 404
        assert again.json()["code"] == "pairing_invalid"
        assert len(await devices_of(http, client)) == 1

    async def test_unknown_token_is_404(self, http: httpx.AsyncClient) -> None:
        for token in ("pnsp_unknown", "x"):
            response = await http.post("/v1/devices", json=phone_body(token))
            assert response.status_code == 404
            assert response.json()["code"] == "pairing_invalid"

    async def test_expired_token_is_410(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_app_pairing(http, client)
        async with runtime_of(app).db.session() as session:
            pairing = await session.get(Pairing, started["pairing_id"])
            assert pairing is not None
            pairing.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        token = pairing_token_from(started["qr_payload"])
        response = await http.post("/v1/devices", json=phone_body(token))
        assert response.status_code == 410
        assert response.json()["code"] == "pairing_expired"
        assert await devices_of(http, client) == []

    async def test_old_platforms_are_refused_without_burning_the_code(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for platform, os_version in [
            ("ios", "11.4"),
            ("ios", "11.99"),
            ("ios", "9"),
            ("android", "7.1.2"),
            ("android", "7"),
        ]:
            body = phone_body(token, platform=platform, os_version=os_version)
            del body["push"]
            response = await http.post("/v1/devices", json=body)
            assert response.status_code == 422, (platform, os_version)
            assert response.json()["code"] == "platform_unsupported"
        assert (await http.post("/v1/devices", json=phone_body(token))).status_code == 201

    async def test_minimum_and_newer_platforms_are_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        for platform, os_version in [
            ("ios", "12"),
            ("ios", "12.0.0"),
            ("ios", "12.0.1"),
            ("android", "8"),
            ("android", "14"),
        ]:
            body = phone_body(
                await pairing_token(http, client), platform=platform, os_version=os_version
            )
            del body["push"]
            response = await http.post("/v1/devices", json=body)
            assert response.status_code == 201, (platform, os_version)

    @pytest.mark.parametrize("settings_overrides", [{"min_ios_version": "12.10"}])
    async def test_versions_compare_as_numbers(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        older = await http.post("/v1/devices", json=phone_body(token, os_version="12.9"))
        assert older.status_code == 422
        assert older.json()["code"] == "platform_unsupported"
        newer = await http.post("/v1/devices", json=phone_body(token, os_version="12.10"))
        assert newer.status_code == 201

    async def test_junk_versions_are_invalid_requests(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for os_version in ["abc", "12.", "12,1", "v12", "1.2.3.4.5", "", "12.a", "١٢"]:
            body = phone_body(token, os_version=os_version)
            assert_invalid(await http.post("/v1/devices", json=body), "os_version")

    async def test_push_service_must_fit_the_platform(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for platform, os_version, push in [
            ("ios", "17.2", {"service": "fcm", "token": FCM_TOKEN}),
            ("android", "14", {"service": "apns", "token": "ab" * 32}),
        ]:
            body = phone_body(token, platform=platform, os_version=os_version, push=push)
            assert_invalid(await http.post("/v1/devices", json=body), "push.service")

    async def test_bad_apns_push_blocks_are_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for push in [
            {"service": "apns", "token": "ab" * 31},
            {"service": "apns", "token": "ab" * 32 + "a"},
            {"service": "apns", "token": "zz" * 32},
            {"service": "apns", "token": "ab" * 101},
            {"service": "apns", "token": "ab" * 32, "environment": "staging"},
            {"service": "apns", "token": 123},
            {"service": "apns"},
            {"service": "gcm", "token": "ab" * 32},
            "apns",
        ]:
            response = await http.post("/v1/devices", json=phone_body(token, push=push))
            assert_invalid(response)
            assert all(e["field"].startswith("push") for e in response.json()["errors"]), push
            # Never echo a submitted push token.
            assert "abab" not in response.text

    async def test_bad_fcm_tokens_are_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for push_token in ["short:token", "has space " + "x" * 40, "x" * 4097]:
            body = phone_body(
                token,
                platform="android",
                os_version="14",
                push={"service": "fcm", "token": push_token},
            )
            assert_invalid(await http.post("/v1/devices", json=body), "push.token")

    async def test_public_key_must_be_p256(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        p384 = ec.generate_private_key(ec.SECP384R1())
        for public_key in [
            "not base64!",
            base64.b64encode(b"not a DER key").decode(),
            public_key_b64(p384),
            public_key_b64(new_key())[:-8],
            "",
        ]:
            response = await http.post("/v1/devices", json=phone_body(token, public_key=public_key))
            assert_invalid(response, "public_key")

    async def test_wrong_types_and_missing_fields_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        for field, value in [
            ("pairing_token", 5),
            ("name", ""),
            ("name", ["x"]),
            ("platform", "windows"),
            ("os_version", 17.2),
            ("app_version", 4),
            ("push", ["apns"]),
            ("public_key", b"\x01".hex()),
        ]:
            body = phone_body(token)
            body[field] = value
            assert_invalid(await http.post("/v1/devices", json=body), field)
        for field in ("pairing_token", "name", "platform", "os_version", "public_key"):
            body = phone_body(token)
            del body[field]
            assert_invalid(await http.post("/v1/devices", json=body), field)
        # None of these used up the code.
        assert (await http.post("/v1/devices", json=phone_body(token))).status_code == 201

    async def test_malformed_bodies_are_422(self, http: httpx.AsyncClient) -> None:
        for content in [b'{"pairing_token": ', b"[1, 2]", b'"x"', b"\xff\xfe", b""]:
            response = await http.post(
                "/v1/devices", content=content, headers={"content-type": "application/json"}
            )
            assert_invalid(response)

    async def test_concurrent_use_of_one_token_pairs_once(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        token = await pairing_token(http, client)
        responses = await asyncio.gather(
            *(http.post("/v1/devices", json=phone_body(token)) for _ in range(6))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201, 404, 404, 404, 404, 404]
        assert {r.json()["code"] for r in responses if r.status_code == 404} == {"pairing_invalid"}
        assert len(await devices_of(http, client)) == 1


@pytest.mark.slow
async def test_one_token_pairs_once_across_processes(
    http: httpx.AsyncClient, client: RegisteredClient, live_server: LiveServer
) -> None:
    """Two server processes on one database race for the same pairing tokens."""
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as other_process:
        for _ in range(4):
            token = await pairing_token(http, client)
            responses = await asyncio.gather(
                http.post("/v1/devices", json=phone_body(token)),
                other_process.post("/v1/devices", json=phone_body(token)),
                http.post("/v1/devices", json=phone_body(token)),
                other_process.post("/v1/devices", json=phone_body(token)),
            )
            assert sorted(r.status_code for r in responses) == [201, 404, 404, 404]
    assert len(await devices_of(http, client)) == 4


@pytest.mark.slow
@pytest.mark.postgres_only
async def test_long_poll_wakes_when_another_process_pairs(
    http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI, live_server: LiveServer
) -> None:
    """The phone reaches another replica: LISTEN/NOTIFY must still wake this one's waiter."""
    started = await start_app_pairing(http, client)
    loop = asyncio.get_running_loop()
    finished: list[float] = []
    waiter = asyncio.create_task(
        http.get(f"/v1/pairings/{started['pairing_id']}?wait=30", headers=client.headers)
    )
    waiter.add_done_callback(lambda _t: finished.append(loop.time()))
    notifier = runtime_of(app).notifier
    async with asyncio.timeout(5):
        while notifier.waiter_count < 1:
            await asyncio.sleep(0.005)
    paired_at = loop.time()
    token = pairing_token_from(started["qr_payload"])
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as other_process:
        assert (await other_process.post("/v1/devices", json=phone_body(token))).status_code == 201
    response = await waiter
    assert response.json()["status"] == "completed"
    # Far below the waiter's 15 s safety re-read: the notification did the waking.
    assert finished[0] - paired_at < 2.0


class TestListDevices:
    async def test_lists_app_and_totp_devices_in_pairing_order(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        app_device = await pair_app_device(http, client)
        totp_id, _secret = await pair_totp_device(http, client, label="Authy")
        listed = await devices_of(http, client)
        assert [(d["device_id"], d["kind"]) for d in listed] == [
            (app_device.device_id, "app"),
            (totp_id, "totp"),
        ]
        assert set(listed[0]) == {
            "device_id",
            "kind",
            "name",
            "platform",
            "os_version",
            "push",
            "push_status",
            "public_key",
            "key_proof",
            "created_at",
            "last_used_at",
        }

    async def test_shows_only_the_callers_devices(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        other = await register_client(http, name="OTHER")
        await pair_app_device(http, client)
        assert await devices_of(http, other) == []

    async def test_needs_a_client_token(self, http: httpx.AsyncClient) -> None:
        device_token = bearer("pnsd_nope")
        response = await http.get("/v1/devices", headers=device_token)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


async def add_pending_delivery(app: FastAPI, device: PairedDevice, client_id: str) -> str:
    delivery_id = new_id()
    async with runtime_of(app).db.session() as session:
        approval = Approval(
            id=new_id(),
            client_id=client_id,
            status="pending",
            expires_at=datetime.now(UTC) + timedelta(seconds=60),
        )
        session.add(approval)
        await session.flush()
        session.add(
            Delivery(
                id=delivery_id, approval_id=approval.id, device_id=device.device_id, service="apns"
            )
        )
    return delivery_id


class TestRemoveDevice:
    async def test_removes_the_device_and_its_pending_deliveries(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        device = await pair_app_device(http, client)
        delivery_id = await add_pending_delivery(app, device, client.client_id)
        response = await http.delete(f"/v1/devices/{device.device_id}", headers=client.headers)
        assert response.status_code == 204
        assert response.content == b""
        assert await devices_of(http, client) == []
        async with runtime_of(app).db.session() as session:
            assert await session.get(Delivery, delivery_id) is None
        assert "device.removed" in await audit_events(app, device.device_id)
        # Its token stops working at once.
        revoked = await http.delete("/v1/device", headers=device.headers)
        assert revoked.status_code == 401

    async def test_removes_a_totp_device(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device_id, _ = await pair_totp_device(http, client)
        response = await http.delete(f"/v1/devices/{device_id}", headers=client.headers)
        assert response.status_code == 204
        assert await devices_of(http, client) == []

    async def test_another_clients_device_is_404_and_kept(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        other = await register_client(http, name="OTHER")
        device = await pair_app_device(http, client)
        response = await http.delete(f"/v1/devices/{device.device_id}", headers=other.headers)
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
        assert len(await devices_of(http, client)) == 1

    async def test_unknown_device_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.delete("/v1/devices/" + "f" * 32, headers=client.headers)
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"


class TestUpdatePush:
    async def test_rotates_the_token_and_clears_invalid_token(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        device = await pair_app_device(http, client)
        async with runtime_of(app).db.session() as session:
            row = await session.get(Device, device.device_id)
            assert row is not None
            row.push_status = "invalid_token"
        assert (await devices_of(http, client))[0]["push_status"] == "invalid_token"
        new_token = "cd" * 32
        response = await http.put(
            "/v1/device/push",
            json={"service": "apns", "token": new_token, "environment": "sandbox"},
            headers=device.headers,
        )
        assert response.status_code == 204
        assert (await devices_of(http, client))[0]["push_status"] == "ok"
        row = await device_row(app, device.device_id)
        assert row is not None
        assert (row.push_token, row.push_environment) == (new_token, "sandbox")
        assert "device.push_updated" in await audit_events(app, device.device_id)

    async def test_poll_only_phone_can_add_push(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client, platform="android", os_version="13", push=None)
        assert (await devices_of(http, client))[0]["push"] is None
        response = await http.put(
            "/v1/device/push", json={"service": "fcm", "token": FCM_TOKEN}, headers=device.headers
        )
        assert response.status_code == 204
        listed = (await devices_of(http, client))[0]
        assert (listed["push"], listed["push_status"]) == ("fcm", "ok")

    async def test_service_must_fit_the_platform(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        response = await http.put(
            "/v1/device/push", json={"service": "fcm", "token": FCM_TOKEN}, headers=device.headers
        )
        assert_invalid(response, "service")

    async def test_bad_bodies_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        for body in [
            {},
            {"service": "apns"},
            {"service": "apns", "token": "xyz"},
            {"service": "apns", "token": ["ab" * 32]},
            {"service": 1, "token": "ab" * 32},
            {"service": "apns", "token": "ab" * 32, "environment": 1},
            [],
        ]:
            response = await http.put("/v1/device/push", json=body, headers=device.headers)
            assert_invalid(response)
        for content in [b'{"service": "apns", ', b"\xff", b""]:
            response = await http.put(
                "/v1/device/push",
                content=content,
                headers={**device.headers, "content-type": "application/json"},
            )
            assert_invalid(response)
        # Nothing of the refused bodies was applied.
        assert (await devices_of(http, client))[0]["push_status"] == "ok"

    async def test_client_token_is_not_a_device_token(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.put(
            "/v1/device/push",
            json={"service": "apns", "token": "ab" * 32},
            headers=client.headers,
        )
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


class TestRemoveSelf:
    async def test_the_app_removes_itself(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        keep = await pair_app_device(http, client, name="Tablet")
        device = await pair_app_device(http, client)
        response = await http.delete("/v1/device", headers=device.headers)
        assert response.status_code == 204
        assert [d["device_id"] for d in await devices_of(http, client)] == [keep.device_id]
        assert await device_row(app, device.device_id) is None
        assert "device.removed" in await audit_events(app, device.device_id)
        again = await http.delete("/v1/device", headers=device.headers)
        assert again.status_code == 401

    async def test_needs_a_device_token(self, http: httpx.AsyncClient) -> None:
        response = await http.delete("/v1/device")
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"
