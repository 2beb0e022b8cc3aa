from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from pns_server.approvals.expiry import sweep_once
from pns_server.models import Approval, AuditEvent
from pns_server.outbox.dispatcher import Dispatcher
from tests.pns_server.approvals.helpers import answer, request_approval, runtime_of
from tests.support.factories import PairedDevice, RegisteredClient


@pytest.fixture(autouse=True)
def no_background_sweep(app: FastAPI) -> None:
    """The app's own sweep would race the one each test runs."""
    for task in runtime_of(app).tasks:
        if task.get_name() == "pns-expiry":
            task.cancel()


async def backdate(app: FastAPI, approval_id: str) -> None:
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Approval)
            .where(Approval.id == approval_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


async def stored(app: FastAPI, approval_id: str) -> tuple[str, list[str]]:
    async with runtime_of(app).db.session() as session:
        status = await session.scalar(select(Approval.status).where(Approval.id == approval_id))
        events = await session.scalars(
            select(AuditEvent.event).where(AuditEvent.subject_id == approval_id)
        )
        return str(status), list(events)


class TestSweep:
    async def test_expires_what_nobody_watches_with_its_audit_row(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await backdate(app, body["approval_id"])
        runtime = runtime_of(app)
        assert await sweep_once(runtime.db, runtime.metrics) == 1
        status, events = await stored(app, body["approval_id"])
        assert status == "expired" and "approval.expired" in events
        assert await sweep_once(runtime.db, runtime.metrics) == 0

    async def test_leaves_a_live_approval_alone(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        runtime = runtime_of(app)
        assert await sweep_once(runtime.db, runtime.metrics) == 0
        assert (await stored(app, body["approval_id"]))[0] == "pending"

    async def test_the_dispatcher_no_longer_sweeps(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await backdate(app, body["approval_id"])
        await Dispatcher(runtime_of(app)).run_once()
        assert (await stored(app, body["approval_id"]))[0] == "pending"


class TestLateRequests:
    """An answer or a cancel that finds the approval past its expiry (nobody has persisted
    it yet) is refused as already decided, and the expiry it found is persisted with it:
    once, with its audit row, whatever reads it next."""

    async def test_a_late_answer_persists_the_expiry(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await backdate(app, body["approval_id"])
        late = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        assert late.status_code == 409
        assert late.json()["code"] == "already_decided"
        assert late.json()["approval_status"] == "expired"
        status, events = await stored(app, body["approval_id"])
        assert status == "expired" and events.count("approval.expired") == 1
        runtime = runtime_of(app)
        assert await sweep_once(runtime.db, runtime.metrics) == 0

    async def test_the_phones_detail_persists_the_expiry_it_finds_once(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        """The detail is read outside a transaction; a due expiry still gets written (once,
        with its audit row), and a second look finds it stored, not due."""
        body = await request_approval(http, client)
        await backdate(app, body["approval_id"])
        url = f"/v1/device/approvals/{body['approval_id']}"
        for _ in range(2):
            seen = await http.get(url, headers=phone.headers)
            assert seen.status_code == 200 and seen.json()["status"] == "expired"
        status, events = await stored(app, body["approval_id"])
        assert status == "expired" and events.count("approval.expired") == 1

    async def test_a_late_cancel_persists_the_expiry(
        self, http: httpx.AsyncClient, app: FastAPI, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        await backdate(app, body["approval_id"])
        url = f"/v1/approvals/{body['approval_id']}"
        late = await http.delete(url, headers=client.headers)
        assert late.status_code == 409
        assert late.json()["approval_status"] == "expired"
        status, events = await stored(app, body["approval_id"])
        assert status == "expired" and events.count("approval.expired") == 1
        state = (await http.get(url, headers=client.headers)).json()
        assert state["status"] == "expired"
        assert (await stored(app, body["approval_id"]))[1].count("approval.expired") == 1
