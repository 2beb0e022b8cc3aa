"""A phone's answer on PostgreSQL is decided outside a transaction, in one statement that
also carries the NOTIFY of every other process: what that changes, tried as it could go
wrong (a losing answer, a fraud report, an answer that finds its approval due to expire)."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from pns_server.models import AuditEvent, Client
from pns_server.realtime.postgres import CHANNEL
from pns_server.topics import approval_topic
from tests.pns_server.approvals.helpers import (
    answer,
    move_expiry,
    request_approval,
    runtime_of,
    settle_deliveries,
)
from tests.pns_server.approvals.test_statements import statements_run
from tests.support.factories import PairedDevice, RegisteredClient

pytestmark = pytest.mark.postgres_only


class Heard:
    """What a LISTEN connection of its own hears on the relay's channel (another
    process's view)."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    def on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.topics.append(payload)

    async def at_least(self, count: int) -> list[str]:
        for _ in range(100):
            if len(self.topics) >= count:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and anything sent after them
        return sorted(self.topics)


async def test_only_the_winning_answer_notifies_the_other_processes(
    http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, database_url: str
) -> None:
    body = await request_approval(http, client)
    await settle_deliveries(http, client, body["approval_id"])
    heard = Heard()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(CHANNEL, heard.on_notify)
        won = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
        lost = await answer(http, phone, body["approval_id"], "reject")
        topics = await heard.at_least(1)
    finally:
        await listener.close()
    assert won.status_code == 200 and lost.status_code == 409
    # The approval's waiters only: a decision cannot end a phone's wait for a pending one.
    assert topics == [approval_topic(body["approval_id"])]


async def test_a_losing_answer_writes_nothing(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    body = await request_approval(http, client)
    await settle_deliveries(http, client, body["approval_id"])
    assert (await answer(http, phone, body["approval_id"], "reject")).status_code == 200
    before = await audit_count(app, client)
    lost = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
    assert lost.status_code == 409
    assert lost.json()["approval_status"] == "rejected"
    assert await audit_count(app, client) == before


async def test_a_fraud_report_is_decided_in_a_transaction_with_its_push_lock(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    body = await request_approval(http, client)
    await settle_deliveries(http, client, body["approval_id"])
    with statements_run() as seen:
        reported = await answer(http, phone, body["approval_id"], "reject", fraud=True)
    assert reported.status_code == 200
    # The unit's NOTIFY goes with its COMMIT, as a statement of its own.
    assert [s for s in seen if s.startswith("SELECT pg_notify(")]
    async with runtime_of(app).db.session() as session:
        stored = await session.get(Client, client.client_id)
    assert stored is not None and stored.locked_until is not None


async def test_an_answer_that_finds_its_approval_due_to_expire_persists_the_expiry(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    body = await request_approval(http, client)
    await settle_deliveries(http, client, body["approval_id"])
    await move_expiry(app, body["approval_id"], -1)
    late = await answer(http, phone, body["approval_id"], "approve", body["match_code"])
    assert late.status_code == 409
    assert late.json()["approval_status"] == "expired"
    state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
    assert state.json()["status"] == "expired"


async def audit_count(app: FastAPI, client: RegisteredClient) -> int:
    async with runtime_of(app).db.session() as session:
        count = await session.scalar(
            select(func.count(AuditEvent.id)).where(AuditEvent.client_id == client.client_id)
        )
    return int(count or 0)
