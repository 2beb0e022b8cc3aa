"""The outbox's queries on a unit of the driver connection: a list of ids of any length
goes through a few statements of fixed binds (the binds it leaves over match nothing), and
a finish holds only under the lease it names."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import Delivery
from pns_server.outbox.repository import ID_SLOTS, DeliveryRepository
from pns_server.states import DeliveryStatus
from tests.pns_server.approvals.helpers import request_approval, runtime_of
from tests.support.factories import pair_app_device, register_client


@pytest.fixture
async def claimed(app: FastAPI, http: httpx.AsyncClient) -> tuple[str, list[str], datetime]:
    """An approval for two phones whose deliveries we hold under a lease: (approval id,
    delivery ids, lease)."""
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    client = await register_client(http)
    for name in ("iPhone", "iPad"):
        await pair_app_device(http, client, name=name)
    approval_id = (await request_approval(http, client))["approval_id"]
    now = datetime.now(UTC)
    lease = now + timedelta(seconds=30)
    async with runtime.db.unit() as unit:
        rows = await DeliveryRepository(unit).claim(now, lease, 10)
    assert {row.approval_id for row in rows} == {approval_id}
    assert all(row.client_name and row.push_status == "ok" for row in rows)
    return approval_id, [row.delivery_id for row in rows], lease


async def statuses(app: FastAPI, approval_id: str) -> list[str]:
    async with runtime_of(app).db.session() as session:
        found = await session.scalars(
            select(Delivery.status).where(Delivery.approval_id == approval_id)
        )
        return list(found)


def strangers(count: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(count)]


async def test_lists_longer_than_the_largest_statement_are_split_and_padding_matches_nothing(
    app: FastAPI, claimed: tuple[str, list[str], datetime]
) -> None:
    approval_id, [first, second], lease = claimed
    others = strangers(ID_SLOTS[-1] + 3)
    async with runtime_of(app).db.unit() as unit:
        deliveries = DeliveryRepository(unit)
        # The one known approval in the second chunk, the other ids unknown.
        found = await deliveries.approval_statuses([*others, approval_id])
        # One delivery in each chunk.
        finished = await deliveries.finish_all(
            [first, *others, second], lease, DeliveryStatus.DROPPED, None
        )
    assert found == {approval_id: "pending"}
    assert finished == {approval_id}
    assert await statuses(app, approval_id) == ["dropped"] * 2


async def test_a_finish_under_another_lease_changes_nothing(
    app: FastAPI, claimed: tuple[str, list[str], datetime]
) -> None:
    approval_id, ids, lease = claimed
    stale = lease - timedelta(microseconds=1)
    async with runtime_of(app).db.unit() as unit:
        deliveries = DeliveryRepository(unit)
        assert await deliveries.finish_sent(ids, stale, datetime.now(UTC)) == set()
        assert await deliveries.finish_all(ids, stale, DeliveryStatus.FAILED, "x") == set()
        assert not await deliveries.finish(ids[0], stale, DeliveryStatus.FAILED, "x")
    assert await statuses(app, approval_id) == ["sending"] * 2
    async with runtime_of(app).db.unit() as unit:
        deliveries = DeliveryRepository(unit)
        assert await deliveries.finish_sent(ids[:1], lease, datetime.now(UTC)) == {approval_id}
        assert await deliveries.finish(ids[1], lease, DeliveryStatus.FAILED, "gone")
    assert sorted(await statuses(app, approval_id)) == ["failed", "sent"]
