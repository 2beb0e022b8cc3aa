from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.approvals.schemas import ApprovalState
from pns_server.models import AuditEvent, Delivery
from tests.pns_server.approvals.helpers import (
    LOGIN,
    answer,
    move_expiry,
    request_approval,
    runtime_of,
    settle_deliveries,
)
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class TestStatus:
    async def test_pending_shape(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.status_code == 200
        assert state.json() == {
            "approval_id": body["approval_id"],
            "status": "pending",
            "reason": None,
            "created_at": state.json()["created_at"],
            "expires_at": body["expires_at"],
            "decided_at": None,
            "device_id": None,
            "response": None,
            "delivery": state.json()["delivery"],
        }
        assert set(state.json()["delivery"]) == {"queued", "sent", "failed", "last_error"}
        assert sum(state.json()["delivery"][k] for k in ("queued", "sent", "failed")) == 1

    async def test_approved_carries_a_verifiable_response(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        state = (
            await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        ).json()
        assert state["status"] == "approved" and state["reason"] is None
        assert state["device_id"] == phone.device_id
        assert state["decided_at"] is not None
        response = state["response"]
        assert response["decision"] == "approve"
        assert response["match_code"] == body["match_code"]
        # What the SDK does with the key it pinned: the relay cannot forge this.
        key = serialization.load_der_public_key(base64.b64decode(response["public_key"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        message = (
            f"pns-approval-v1|{body['approval_id']}|approve|{body['match_code']}|"
            f"{response['timestamp']}"
        )
        key.verify(
            base64.b64decode(response["signature"]), message.encode(), ec.ECDSA(hashes.SHA256())
        )
        assert (
            response["public_key"]
            == base64.b64encode(
                phone.private_key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).decode()
        )

    async def test_another_clients_approval_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        other = await register_client(http, name="NAS")
        for method in ("GET", "DELETE"):
            response = await http.request(
                method, f"/v1/approvals/{body['approval_id']}", headers=other.headers
            )
            assert response.status_code == 404
            assert response.json()["code"] == "not_found"

    async def test_unknown_id_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.get("/v1/approvals/nope?wait=5", headers=client.headers)
        assert response.status_code == 404

    @pytest.mark.parametrize("wait", ["-1", "61", "soon"])
    async def test_bad_wait_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, wait: str
    ) -> None:
        body = await request_approval(http, client)
        response = await http.get(
            f"/v1/approvals/{body['approval_id']}", params={"wait": wait}, headers=client.headers
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_needs_a_client_token(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        response = await http.get(f"/v1/approvals/{body['approval_id']}", headers=phone.headers)
        assert response.status_code == 401


class TestLongPoll:
    async def test_the_answer_is_the_documented_state(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        waiters = [
            asyncio.create_task(
                http.get(f"/v1/approvals/{body['approval_id']}?wait=30", headers=client.headers)
            )
            for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        for response in await asyncio.wait_for(asyncio.gather(*waiters), 10):
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-request-id"]
            state = ApprovalState.model_validate_json(response.content)
            assert state.status == "approved"
            assert state.response is not None and state.response.decision == "approve"
            # The same fields, in the same form, as the answer without a wait.
            plain = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
            assert response.json() == plain.json()

    async def test_a_woken_wait_is_logged_with_its_answer_and_its_id(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # The wait runs after the router and FastAPI have returned (the long-poll parking):
        # the observer outside it still sees the answer, its status and the whole wait.
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        with caplog.at_level(logging.INFO, logger="pns.access"):
            waiting = asyncio.create_task(
                http.get(
                    f"/v1/approvals/{body['approval_id']}?wait=30",
                    headers={**client.headers, "X-Request-ID": "wait-1"},
                )
            )
            await asyncio.sleep(0.3)
            await answer(http, phone, body["approval_id"], "reject")
            response = await asyncio.wait_for(waiting, 10)
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "wait-1"
        [line] = [r for r in caplog.records if getattr(r, "request_id", None) == "wait-1"]
        assert line.status == 200  # type: ignore[attr-defined]
        assert line.route == "/v1/approvals/{approval_id}"  # type: ignore[attr-defined]
        assert line.duration_ms >= 300  # type: ignore[attr-defined]

    async def test_wakes_on_the_decision(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        waiting = asyncio.create_task(
            http.get(f"/v1/approvals/{body['approval_id']}?wait=30", headers=client.headers)
        )
        await asyncio.sleep(0.2)
        assert not waiting.done()
        decided_at = time.monotonic()
        await answer(http, phone, body["approval_id"], "reject")
        response = await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - decided_at < 1.0
        assert response.json()["status"] == "rejected"
        assert response.json()["reason"] == "user_rejected"

    async def test_returns_at_once_when_final(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await http.delete(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        started = time.monotonic()
        response = await http.get(
            f"/v1/approvals/{body['approval_id']}?wait=30", headers=client.headers
        )
        assert response.json()["status"] == "cancelled"
        assert time.monotonic() - started < 5

    async def test_times_out_pending(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        response = await http.get(
            f"/v1/approvals/{body['approval_id']}?wait=0.5", headers=client.headers
        )
        assert response.json()["status"] == "pending"

    async def test_reports_expiry_without_anyone_touching_the_row(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await settle_deliveries(http, client, body["approval_id"])
        expires_at = await move_expiry(app, body["approval_id"], 1.0)
        response = await http.get(
            f"/v1/approvals/{body['approval_id']}?wait=20", headers=client.headers
        )
        returned = datetime.now(UTC)
        assert response.json()["status"] == "expired"
        assert (returned - expires_at).total_seconds() < 1.0
        assert parse(response.json()["decided_at"]) <= returned
        late = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert late.status_code == 409
        assert late.json()["approval_status"] == "expired"
        async with runtime_of(app).db.session() as session:
            events = await session.scalars(
                select(AuditEvent.event).where(AuditEvent.subject_id == body["approval_id"])
            )
            assert list(events).count("approval.expired") == 1

    @pytest.mark.slow
    @pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 5}])
    async def test_200_waits_hold_no_connections(
        self, app: FastAPI, http: httpx.AsyncClient
    ) -> None:
        # A poll-only phone: no delivery outcome ends the waits early.
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        body = await request_approval(http, client)
        url = f"/v1/approvals/{body['approval_id']}?wait=30"
        runtime = runtime_of(app)
        waits = [asyncio.create_task(http.get(url, headers=client.headers)) for _ in range(200)]
        deadline = time.monotonic() + 30
        while runtime.notifier.waiter_count < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert runtime.notifier.waiter_count >= 200
        # With every wait parked, the pool still serves other requests at once.
        info = await asyncio.wait_for(http.get("/v1/client", headers=client.headers), 5)
        assert info.status_code == 200
        decided = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert decided.status_code == 200
        results = await asyncio.wait_for(asyncio.gather(*waits), 30)
        assert {r.json()["status"] for r in results} == {"approved"}


class TestCancel:
    async def test_cancel_then_409(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        cancelled = await http.delete(
            f"/v1/approvals/{body['approval_id']}", headers=client.headers
        )
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        # Queued pushes are dropped; one the dispatcher already holds may finish sending.
        async with runtime_of(app).db.session() as session:
            statuses = set(
                await session.scalars(
                    select(Delivery.status).where(Delivery.approval_id == body["approval_id"])
                )
            )
        assert statuses and statuses <= {"dropped", "sending", "sent"}
        again = await http.delete(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert again.status_code == 409
        assert again.json()["code"] == "already_decided"
        assert again.json()["approval_status"] == "cancelled"
        late = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert late.status_code == 409
        async with runtime_of(app).db.session() as session:
            event = await session.scalar(
                select(AuditEvent).where(AuditEvent.event == "approval.cancelled")
            )
        assert event is not None
        assert (event.client_id, event.actor, event.subject_id) == (
            client.client_id,
            "client",
            body["approval_id"],
        )

    async def test_cancel_after_approval_is_409(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        response = await http.delete(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert response.status_code == 409
        assert response.json()["approval_status"] == "approved"
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["status"] == "approved"


async def test_new_approval_after_expired_one(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    old = await request_approval(http, client)
    await move_expiry(app, old["approval_id"], -1)
    response = await http.post("/v1/approvals", json=LOGIN, headers=client.headers)
    assert response.status_code == 201
    state = await http.get(f"/v1/approvals/{old['approval_id']}", headers=client.headers)
    assert state.json()["status"] == "expired"


def awaited_modules(task: asyncio.Task[None]) -> list[str]:
    """The modules of the coroutine frames a suspended request holds, outermost first."""
    modules = []
    coro: Any = task.get_coro()
    while getattr(coro, "cr_frame", None) is not None:
        modules.append(coro.cr_frame.f_globals["__name__"])
        coro = coro.cr_await
    return modules


async def test_a_waiting_long_poll_holds_no_frame_of_the_framework(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    """Ten thousand waits are held at once: each keeps only the request's edge (the proxy
    headers, the observer, the parking) and its own wait, not FastAPI's and Starlette's
    layers, and it is still answered, with its request id, when the phone decides."""
    body = await request_approval(http, client)
    approval_id = body["approval_id"]
    disconnect = asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await disconnect.wait()  # as a server's does, until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            disconnect.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/v1/approvals/{approval_id}",
        "raw_path": f"/v1/approvals/{approval_id}".encode(),
        "query_string": b"wait=30&until=final",
        "root_path": "",
        "headers": [(b"host", b"pns.test"), (b"authorization", f"Bearer {client.token}".encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("pns.test", 80),
    }
    runtime = runtime_of(app)
    waiting_before = runtime.notifier.waiter_count
    task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    for _ in range(500):
        if runtime.notifier.waiter_count > waiting_before:
            break
        await asyncio.sleep(0.01)
    held = awaited_modules(task)
    assert "pns_server.realtime.longpoll" in held, sent  # it is waiting
    assert not [m for m in held if m.split(".")[0] in ("fastapi", "starlette")], held
    await answer(http, phone, approval_id, "approve", body["match_code"])
    await asyncio.wait_for(task, 10)
    start, answered = sent
    assert start["status"] == 200
    assert dict(start["headers"])[b"x-request-id"]
    assert json.loads(answered["body"])["status"] == "approved"
