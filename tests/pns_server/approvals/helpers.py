"""Steps the approval tests share: ask for an approval, answer it as the phone."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import update

from pns_server.models import Approval
from pns_server.runtime import Runtime
from tests.support.factories import PairedDevice, RegisteredClient

LOGIN = {"username": "admin", "hostname": "FILESRV01", "ip": "203.0.113.7", "action": "login"}


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


def rfc3339(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def signed_answer(
    device: PairedDevice,
    approval_id: str,
    decision: str = "approve",
    match_code: str | None = None,
    *,
    fraud: bool = False,
    timestamp: str | None = None,
) -> dict[str, Any]:
    timestamp = timestamp or rfc3339()
    message = f"pns-approval-v1|{approval_id}|{decision}|{match_code or ''}|{timestamp}"
    return {
        "decision": decision,
        "match_code": match_code,
        "fraud": fraud,
        "timestamp": timestamp,
        "signature": device.sign(message),
    }


async def request_approval(
    http: httpx.AsyncClient, client: RegisteredClient, **fields: Any
) -> dict[str, Any]:
    response = await http.post("/v1/approvals", json={**LOGIN, **fields}, headers=client.headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def answer(
    http: httpx.AsyncClient,
    device: PairedDevice,
    approval_id: str,
    decision: str = "approve",
    match_code: str | None = None,
    **options: Any,
) -> httpx.Response:
    return await http.post(
        f"/v1/device/approvals/{approval_id}/response",
        json=signed_answer(device, approval_id, decision, match_code, **options),
        headers=device.headers,
    )


async def move_expiry(app: FastAPI, approval_id: str, seconds_from_now: float) -> datetime:
    """Shorten an approval's life without waiting out the 10 s minimum TTL."""
    expires_at = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Approval).where(Approval.id == approval_id).values(expires_at=expires_at)
        )
    return expires_at


async def settle_deliveries(
    http: httpx.AsyncClient, client: RegisteredClient, approval_id: str
) -> dict[str, Any]:
    """Wait until no push is queued: a push outcome also ends a long-poll early."""
    url = f"/v1/approvals/{approval_id}"
    state: dict[str, Any] = (await http.get(url, headers=client.headers)).json()
    while state["status"] == "pending" and state["delivery"]["queued"]:
        state = (await http.get(url, params={"wait": 1}, headers=client.headers)).json()
    return state


def context_sha256(context: dict[str, Any]) -> str:
    """Written out here rather than imported, so a change in the relay's canonical form shows."""
    fields = {
        name: context.get(name) for name in ("action", "hostname", "ip", "message", "username")
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def signed_answer_v2(
    device: PairedDevice,
    approval: dict[str, Any],
    decision: str = "approve",
    match_code: str | None = None,
    *,
    timestamp: str | None = None,
    context: dict[str, Any] | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """`approval` is the device's view (GET /v1/device/approvals/{id})."""
    timestamp = timestamp or rfc3339()
    message = "|".join(
        (
            "pns-approval-v2",
            approval["approval_id"],
            decision,
            match_code or "",
            timestamp,
            nonce or approval["client_nonce"],
            context_sha256(context or approval["context"]),
        )
    )
    return {
        "decision": decision,
        "match_code": match_code,
        "fraud": False,
        "timestamp": timestamp,
        "signature": device.sign(message),
    }
