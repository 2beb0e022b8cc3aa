from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.approvals.schemas import DeviceApprovalList
from pns_server.models import AuditEvent
from tests.pns_server.approvals.helpers import (
    answer,
    move_expiry,
    request_approval,
    rfc3339,
    runtime_of,
    signed_answer,
)
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client
from tests.support.statements import statements_where


async def status_of(http: httpx.AsyncClient, client: RegisteredClient, approval_id: str) -> Any:
    return (await http.get(f"/v1/approvals/{approval_id}", headers=client.headers)).json()


class TestPendingList:
    async def test_lists_the_pending_one_without_the_code(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, message="Nightly restore")
        response = await http.get("/v1/device/approvals", headers=phone.headers)
        assert response.status_code == 200
        [item] = response.json()["approvals"]
        assert item == {
            "approval_id": body["approval_id"],
            "status": "pending",
            "created_at": item["created_at"],
            "expires_at": body["expires_at"],
            "client_name": "FILESRV01",
            "context": {
                "username": "admin",
                "hostname": "FILESRV01",
                "ip": "203.0.113.7",
                "action": "login",
                "message": "Nightly restore",
            },
            "number_matching": True,
            "client_nonce": None,
        }
        # The whole item is compared above, so no field carries the code. (Looking for its
        # digits in the raw text would also find them in a timestamp, by chance.)
        assert "match_code" not in item

    async def test_a_wait_wakes_every_phone_with_the_same_list(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        second = await pair_app_device(http, client)
        waiting = [
            asyncio.create_task(http.get("/v1/device/approvals?wait=30", headers=p.headers))
            for p in (phone, second, phone)
        ]
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in waiting)
        body = await request_approval(http, client)
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        for response in answers:
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            listed = DeviceApprovalList.model_validate_json(response.content)
            assert [a.approval_id for a in listed.approvals] == [body["approval_id"]]
        assert answers[0].content == answers[1].content == answers[2].content

    async def test_a_decision_does_not_wake_a_waiting_phone(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        """A phone waits only while nothing is pending, so an approval leaving the list (here
        one past its expiry, recorded as expired by the client's read) cannot end its wait:
        it is not even woken to read again. A new approval still wakes it."""
        stale = await request_approval(http, client)
        await move_expiry(app, stale["approval_id"], -1)
        waiting = asyncio.create_task(
            http.get("/v1/device/approvals?wait=30", headers=phone.headers)
        )
        await asyncio.sleep(0.3)
        assert not waiting.done()
        with statements_where(lambda sql: "ORDER BY approvals.created_at DESC" in sql) as reads:
            state = await http.get(f"/v1/approvals/{stale['approval_id']}", headers=client.headers)
            assert state.json()["status"] == "expired"
            await asyncio.sleep(0.3)
        assert (reads, waiting.done()) == ([], False)
        fresh = await request_approval(http, client)
        listed = (await asyncio.wait_for(waiting, 10)).json()
        assert [a["approval_id"] for a in listed["approvals"]] == [fresh["approval_id"]]

    async def test_skips_decided_expired_and_other_clients(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        other = await register_client(http, name="NAS")
        await pair_app_device(http, other)
        await request_approval(http, other)
        body = await request_approval(http, client)
        await move_expiry(app, body["approval_id"], -1)
        assert (await http.get("/v1/device/approvals", headers=phone.headers)).json() == {
            "approvals": []
        }

    async def test_needs_a_device_token(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        response = await http.get("/v1/device/approvals", headers=client.headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


class TestDetails:
    async def test_never_shows_the_code(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await http.get(
            f"/v1/device/approvals/{body['approval_id']}", headers=phone.headers
        )
        assert response.status_code == 200
        view = response.json()
        assert "match_code" not in view
        assert view["number_matching"] is True
        assert view["client_name"] == "FILESRV01"
        assert view["context"]["action"] == "login"

    async def test_other_clients_approval_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        other = await register_client(http, name="NAS")
        await pair_app_device(http, other)
        foreign = await request_approval(http, other)
        response = await http.get(
            f"/v1/device/approvals/{foreign['approval_id']}", headers=phone.headers
        )
        assert response.status_code == 404
        answered = await answer(http, phone, foreign["approval_id"], "reject")
        assert answered.status_code == 404
        # The device's read joins only its own client's approvals: the other stays pending.
        other_view = await http.get(
            f"/v1/approvals/{foreign['approval_id']}", headers=other.headers
        )
        assert other_view.json()["status"] == "pending"

    async def test_an_unknown_token_is_401_whatever_the_approval(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        for approval_id in (body["approval_id"], "no-such-approval"):
            response = await http.get(
                f"/v1/device/approvals/{approval_id}",
                headers={"Authorization": "Bearer not-a-device-token"},
            )
            assert response.status_code == 401
            assert response.json()["code"] == "unauthenticated"
            assert response.headers["www-authenticate"] == "Bearer"

    async def test_shows_expiry(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await move_expiry(app, body["approval_id"], -1)
        response = await http.get(
            f"/v1/device/approvals/{body['approval_id']}", headers=phone.headers
        )
        assert response.json()["status"] == "expired"


class TestAnswer:
    async def test_approve_with_the_right_code(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert response.status_code == 200
        assert response.json() == {"approval_id": body["approval_id"], "status": "approved"}
        async with runtime_of(app).db.session() as session:
            event = await session.scalar(
                select(AuditEvent).where(AuditEvent.event == "approval.answered")
            )
        assert event is not None
        assert (event.client_id, event.actor, event.actor_id, event.subject_id) == (
            client.client_id,
            "device",
            phone.device_id,
            body["approval_id"],
        )
        metrics = runtime_of(app).metrics.render().decode()
        assert 'pns_approvals_decided_total{status="approved"} 1.0' in metrics
        devices = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        [used] = [d for d in devices if d["device_id"] == phone.device_id]
        assert used["last_used_at"] is not None

    @pytest.mark.parametrize("typed", ["wrong", None, ""])
    async def test_wrong_code_rejects(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        typed: str | None,
    ) -> None:
        body = await request_approval(http, client)
        code = body["match_code"]
        wrong = (
            None if typed is None else ("" if typed == "" else str((int(code) + 1) % 1000).zfill(3))
        )
        response = await answer(http, phone, body["approval_id"], "approve", wrong)
        assert response.status_code == 200
        assert response.json()["status"] == "rejected"
        state = await status_of(http, client, body["approval_id"])
        assert (state["status"], state["reason"]) == ("rejected", "number_mismatch")
        # Guessing again is no use: the request is decided.
        retry = await answer(http, phone, body["approval_id"], "approve", code)
        assert retry.status_code == 409

    async def test_reject(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await answer(http, phone, body["approval_id"], "reject")
        assert response.json()["status"] == "rejected"
        state = await status_of(http, client, body["approval_id"])
        assert state["reason"] == "user_rejected"
        assert state["response"]["decision"] == "reject"

    async def test_second_answer_is_409(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        second_phone = await pair_app_device(
            http, client, name="Pixel", platform="android", os_version="14"
        )
        body = await request_approval(http, client)
        first = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert first.status_code == 200
        second = await answer(http, second_phone, body["approval_id"], "reject")
        assert second.status_code == 409
        assert second.json()["code"] == "already_decided"
        assert second.json()["approval_status"] == "approved"
        assert (await status_of(http, client, body["approval_id"]))["device_id"] == phone.device_id

    async def test_a_losing_answer_leaves_no_trace(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        """What follows a decision (the audit row, the device's last use) is written only by
        the answer that wins it: on PostgreSQL in the deciding statement itself."""
        second_phone = await pair_app_device(
            http, client, name="Pixel", platform="android", os_version="14"
        )
        body = await request_approval(http, client)
        await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        late = await answer(http, second_phone, body["approval_id"], "approve", body["match_code"])
        assert late.status_code == 409
        async with runtime_of(app).db.session() as session:
            answered = await session.scalars(
                select(AuditEvent.actor_id).where(AuditEvent.event == "approval.answered")
            )
            assert list(answered) == [phone.device_id]
        devices = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        used = {d["device_id"]: d["last_used_at"] for d in devices}
        assert used[phone.device_id] is not None and used[second_phone.device_id] is None

    async def test_replayed_signature_on_a_decided_approval(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        signed = signed_answer(phone, body["approval_id"], "approve", body["match_code"])
        url = f"/v1/device/approvals/{body['approval_id']}/response"
        assert (await http.post(url, json=signed, headers=phone.headers)).status_code == 200
        replay = await http.post(url, json=signed, headers=phone.headers)
        assert replay.status_code == 409
        assert replay.json()["code"] == "already_decided"

    async def test_signature_from_another_devices_key(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        thief = await pair_app_device(http, client, name="Other phone")
        body = await request_approval(http, client)
        forged = signed_answer(thief, body["approval_id"], "approve", body["match_code"])
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            json=forged,
            headers=phone.headers,
        )
        assert response.status_code == 401
        assert response.json()["code"] == "signature_invalid"
        assert (await status_of(http, client, body["approval_id"]))["status"] == "pending"

    async def test_signature_over_other_fields(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        signed = signed_answer(phone, body["approval_id"], "reject")
        signed["decision"] = "approve"
        signed["match_code"] = body["match_code"]
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            json=signed,
            headers=phone.headers,
        )
        assert response.status_code == 401
        assert response.json()["code"] == "signature_invalid"

    @pytest.mark.parametrize(
        "signature", ["not base64!!", base64.b64encode(b"\x30\x02garbage").decode(), "AAAA"]
    )
    async def test_bad_signature_bytes(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, signature: str
    ) -> None:
        body = await request_approval(http, client)
        signed = signed_answer(phone, body["approval_id"], "approve", body["match_code"])
        signed["signature"] = signature
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            json=signed,
            headers=phone.headers,
        )
        assert response.status_code == 401
        assert response.json()["code"] == "signature_invalid"
        assert (await status_of(http, client, body["approval_id"]))["status"] == "pending"

    # +130, not +121: a request that takes a second to arrive on a busy machine must still
    # be past the 120 s window when the relay reads its clock.
    @pytest.mark.parametrize("skew", [-121, 130, -3600])
    async def test_stale_timestamp(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, skew: int
    ) -> None:
        body = await request_approval(http, client)
        moment = rfc3339(datetime.now(UTC) + timedelta(seconds=skew))
        response = await answer(
            http, phone, body["approval_id"], "approve", body["match_code"], timestamp=moment
        )
        assert response.status_code == 401
        assert response.json()["code"] == "stale_timestamp"
        assert (await status_of(http, client, body["approval_id"]))["status"] == "pending"

    async def test_small_skew_is_fine(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        moment = (datetime.now(UTC) + timedelta(seconds=90)).isoformat()
        response = await answer(
            http, phone, body["approval_id"], "approve", body["match_code"], timestamp=moment
        )
        assert response.json()["status"] == "approved"

    @pytest.mark.parametrize(
        "change",
        [
            {"decision": "maybe"},
            {"decision": None},
            {"fraud": "yes"},
            {"match_code": 417},
            {"timestamp": "yesterday"},
            {"timestamp": "2026-11-30T09:12:18"},
            {"timestamp": 1764494000},
            {"signature": ""},
            {"signature": 5},
        ],
    )
    async def test_bad_bodies_are_422(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        change: dict[str, Any],
    ) -> None:
        body = await request_approval(http, client)
        signed = {
            **signed_answer(phone, body["approval_id"], "approve", body["match_code"]),
            **change,
        }
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            json=signed,
            headers=phone.headers,
        )
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_request"
        assert (await status_of(http, client, body["approval_id"]))["status"] == "pending"

    async def test_malformed_json(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            content=b'{"decision": "appr',
            headers={**phone.headers, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_client_token_cannot_answer(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        signed = signed_answer(phone, body["approval_id"], "approve", body["match_code"])
        response = await http.post(
            f"/v1/device/approvals/{body['approval_id']}/response",
            json=signed,
            headers=client.headers,
        )
        assert response.status_code == 401
