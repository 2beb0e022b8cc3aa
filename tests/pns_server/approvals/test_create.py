from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import AuditEvent, Delivery
from tests.pns_server.approvals.helpers import LOGIN, answer, request_approval, runtime_of
from tests.support.factories import (
    PairedDevice,
    RegisteredClient,
    bearer,
    pair_app_device,
    pair_totp_device,
    register_client,
)


async def deliveries_of(app: FastAPI, approval_id: str) -> list[Delivery]:
    async with runtime_of(app).db.session() as session:
        rows = await session.scalars(select(Delivery).where(Delivery.approval_id == approval_id))
        return list(rows)


class TestCreate:
    async def test_number_matching_by_default(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        assert body["status"] == "pending"
        assert len(body["approval_id"]) >= 32
        assert body["match_code"] is not None
        assert len(body["match_code"]) == 3 and body["match_code"].isdigit()
        assert body["devices_notified"] == 1
        assert body["expires_at"].endswith("Z")

    @pytest.mark.parametrize("settings_overrides", [{"match_code_digits": 6}])
    async def test_code_length_follows_settings(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        codes = {(await request_approval(http, client))["match_code"] for _ in range(3)}
        assert all(len(code) == 6 and code.isdigit() for code in codes)

    async def test_ttl_sets_expiry(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, ttl_seconds=10)
        state = (
            await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        ).json()
        created = datetime.fromisoformat(state["created_at"].replace("Z", "+00:00"))
        expires = datetime.fromisoformat(state["expires_at"].replace("Z", "+00:00"))
        assert (expires - created).total_seconds() == pytest.approx(10, abs=0.01)

    async def test_one_delivery_per_push_device_but_poll_devices_count(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        await pair_app_device(http, client, name="Pixel", platform="android", os_version="14")
        await pair_app_device(http, client, name="Poll only", push=None)
        await pair_totp_device(http, client)
        body = await request_approval(http, client)
        assert body["devices_notified"] == 3
        deliveries = await deliveries_of(app, body["approval_id"])
        assert sorted(d.service for d in deliveries) == ["apns", "fcm"]

    async def test_no_app_device_is_409(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        await pair_totp_device(http, client)
        response = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert response.status_code == 409
        assert response.json()["code"] == "no_app_devices"

    async def test_poll_only_device_is_enough(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        await pair_app_device(http, client, push=None)
        body = await request_approval(http, client)
        assert body["devices_notified"] == 1
        assert await deliveries_of(app, body["approval_id"]) == []

    async def test_audit_row(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        async with runtime_of(app).db.session() as session:
            event = await session.scalar(
                select(AuditEvent).where(AuditEvent.event == "approval.created")
            )
        assert event is not None
        assert (event.client_id, event.actor, event.subject_id) == (
            client.client_id,
            "client",
            body["approval_id"],
        )
        assert body["match_code"] not in str(event.detail)

    async def test_needs_a_client_token(self, http: httpx.AsyncClient, phone: PairedDevice) -> None:
        for headers in ({}, bearer("pnsc_unknown"), phone.headers):
            response = await http.post("/v1/approvals", json=LOGIN, headers=headers)
            assert response.status_code == 401
            assert response.json()["code"] == "unauthenticated"


class TestBadInput:
    @pytest.mark.parametrize(
        "body",
        [
            {"ttl_seconds": 9},
            {"ttl_seconds": 301},
            {"ttl_seconds": "60"},
            {"ttl_seconds": 60.5},
            {"number_matching": "yes"},
            {"username": 5},
            {"action": ""},
            {"message": "x" * 501},
            {"hostname": ["a"]},
            [],
            "login",
        ],
    )
    async def test_422_invalid_request(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, body: Any
    ) -> None:
        payload = {**LOGIN, **body} if isinstance(body, dict) else body
        response = await http.post("/v1/approvals", json=payload, headers=client.headers)
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        assert response.json()["errors"]

    async def test_malformed_json(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        response = await http.post(
            "/v1/approvals",
            content=b'{"username": ',
            headers={**client.headers, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_empty_body_uses_defaults(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        response = await http.post("/v1/approvals", json={}, headers=client.headers)
        assert response.status_code == 201
        assert response.json()["match_code"] is not None


class TestPlainPush:
    async def test_refused_by_default(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        response = await http.post(
            "/v1/approvals", json={**LOGIN, "number_matching": False}, headers=client.headers
        )
        assert response.status_code == 422
        assert response.json()["code"] == "plain_push_not_allowed"

    @pytest.mark.parametrize("settings_overrides", [{"allow_plain_push": True}])
    async def test_allowed_when_configured(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, number_matching=False)
        assert body["match_code"] is None
        view = await http.get(f"/v1/device/approvals/{body['approval_id']}", headers=phone.headers)
        assert view.json()["number_matching"] is False
        response = await answer(http, phone, body["approval_id"], "approve", None)
        assert response.json()["status"] == "approved"


class TestIdempotency:
    async def test_retry_returns_the_same_approval(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        headers = {**client.headers, "Idempotency-Key": "login-42"}
        first = await http.post("/v1/approvals", json=LOGIN, headers=headers)
        second = await http.post("/v1/approvals", json=LOGIN, headers=headers)
        assert first.status_code == 201 and second.status_code in (200, 201)
        assert second.json() == first.json()
        assert second.headers["idempotent-replayed"] == "true"
        # The retry neither cancelled the first nor queued another push.
        assert len(await deliveries_of(app, first.json()["approval_id"])) == 1
        state = await http.get(f"/v1/approvals/{first.json()['approval_id']}", headers=headers)
        assert state.json()["status"] == "pending"

    async def test_same_key_other_body_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        headers = {**client.headers, "Idempotency-Key": "login-43"}
        assert (await http.post("/v1/approvals", json=LOGIN, headers=headers)).status_code == 201
        other = await http.post(
            "/v1/approvals", json={**LOGIN, "username": "mallory"}, headers=headers
        )
        assert other.status_code == 422
        assert other.json()["code"] == "idempotency_key_reused"

    async def test_keys_are_per_client(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        other = await register_client(http, name="NAS")
        await pair_app_device(http, other)
        a = await http.post(
            "/v1/approvals", json=LOGIN, headers={**client.headers, "Idempotency-Key": "k"}
        )
        b = await http.post(
            "/v1/approvals", json=LOGIN, headers={**other.headers, "Idempotency-Key": "k"}
        )
        assert a.status_code == b.status_code == 201
        assert a.json()["approval_id"] != b.json()["approval_id"]

    async def test_overlong_key_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        response = await http.post(
            "/v1/approvals", json=LOGIN, headers={**client.headers, "Idempotency-Key": "k" * 201}
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"


class TestSupersede:
    async def test_new_request_cancels_the_pending_one(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        old = await request_approval(http, client)
        new = await request_approval(http, client)
        old_state = await http.get(f"/v1/approvals/{old['approval_id']}", headers=client.headers)
        assert old_state.json()["status"] == "cancelled"
        # Its queued pushes are dropped; one the dispatcher already holds may finish sending.
        async with runtime_of(app).db.session() as session:
            statuses = set(
                await session.scalars(
                    select(Delivery.status).where(Delivery.approval_id == old["approval_id"])
                )
            )
        assert statuses and "queued" not in statuses
        assert statuses <= {"dropped", "sending", "sent"}
        pending = (await http.get("/v1/device/approvals", headers=phone.headers)).json()
        assert [a["approval_id"] for a in pending["approvals"]] == [new["approval_id"]]
        late = await answer(http, phone, old["approval_id"], "approve", old["match_code"])
        assert late.status_code == 409
        assert late.json()["code"] == "already_decided"


class TestFraudLock:
    @pytest.mark.parametrize("settings_overrides", [{"fraud_lock_seconds": 600}])
    async def test_fraud_report_locks_push(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        reported = await answer(http, phone, body["approval_id"], "reject", fraud=True)
        assert reported.status_code == 200
        assert reported.json()["status"] == "rejected"
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["reason"] == "fraud"

        info = (await http.get("/v1/client", headers=client.headers)).json()
        assert info["locked_until"] is not None
        locked = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert locked.status_code == 423
        assert locked.json()["code"] == "push_locked"
        assert locked.json()["locked_until"] == info["locked_until"]
        async with runtime_of(app).db.session() as session:
            event = await session.scalar(
                select(AuditEvent).where(AuditEvent.event == "approval.fraud_reported")
            )
        assert event is not None
        assert (event.client_id, event.actor, event.actor_id, event.subject_id) == (
            client.client_id,
            "device",
            phone.device_id,
            body["approval_id"],
        )

    async def test_fraud_needs_reject(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await answer(
            http, phone, body["approval_id"], "approve", body["match_code"], fraud=True
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        info = (await http.get("/v1/client", headers=client.headers)).json()
        assert info["locked_until"] is None


@pytest.mark.parametrize("settings_overrides", [{"max_pushes_without_success": 3}])
class TestPushLimit:
    async def test_cap_then_reset_by_an_approval(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        last = None
        for _ in range(3):
            last = await request_approval(http, client)
        refused = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert refused.status_code == 429
        assert refused.json()["code"] == "push_limit"
        # The pending one can still be approved; success resets the count.
        assert last is not None
        approved = await answer(http, phone, last["approval_id"], "approve", last["match_code"])
        assert approved.json()["status"] == "approved"
        await request_approval(http, client)

    async def test_rejections_do_not_reset(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        for _ in range(3):
            body = await request_approval(http, client)
            await answer(http, phone, body["approval_id"], "reject")
        refused = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
        assert refused.json()["code"] == "push_limit"


@pytest.mark.parametrize(
    "settings_overrides", [{"approval_rate_per_minute": 2, "max_pushes_without_success": 50}]
)
async def test_rate_limit(
    http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    # Five calls span at most two fixed windows, so at least one window overflows.
    responses = [
        await http.post("/v1/approvals", json=LOGIN, headers=client.headers) for _ in range(5)
    ]
    limited = [r for r in responses if r.status_code == 429]
    assert limited
    assert limited[0].json()["code"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1
