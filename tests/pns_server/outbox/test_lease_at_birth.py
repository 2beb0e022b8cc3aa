"""A login's pushes leased at birth: the creating transaction leases them to its own
process's dispatcher, which sends them as the transaction commits, without a claim; and
everything a claim guarantees still holds (the lease, the room among the sends in flight,
a rolled-back creation sending nothing, another dispatcher reclaiming a lapsed lease)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from pns_server.db import when_unit_ends
from pns_server.outbox.dispatcher import Dispatcher
from pns_server.outbox.repository import CLAIMED_COLUMNS
from pns_server.push.base import Outcome, PushResult
from pns_server.rows import BornRow
from tests.pns_server.approvals.helpers import request_approval, runtime_of
from tests.pns_server.outbox.test_dispatcher import (
    GateSender,
    ScriptedSender,
    deliveries,
    wait_for_statuses,
)
from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client
from tests.support.statements import statements_where


def claims_run() -> AbstractContextManager[list[str]]:
    """The claim statements any dispatcher runs meanwhile."""
    return statements_where(
        lambda sql: (
            sql.startswith("UPDATE deliveries SET status=")
            and "attempts=(deliveries.attempts" in sql
        )
    )


@pytest.fixture
async def gate(app: FastAPI) -> AsyncIterator[GateSender]:
    """The app's dispatcher replaced by one whose pushes wait at a gate (room for 3)."""
    runtime = runtime_of(app)
    assert runtime.dispatcher is not None
    await runtime.dispatcher.stop()
    sender = GateSender()
    runtime.senders["apns"] = sender
    dispatcher = Dispatcher(runtime, concurrency=3, poll_interval=30)
    dispatcher.start()
    runtime.dispatcher = dispatcher
    await asyncio.sleep(0)  # its pipeline starts
    try:
        yield sender
    finally:
        sender.gate.set()
        await dispatcher.stop()


def test_a_born_row_has_the_fields_a_claim_returns() -> None:
    assert BornRow._fields == tuple(column.name for column in CLAIMED_COLUMNS)


async def test_a_login_push_is_sent_without_a_claim(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    sender = ScriptedSender(PushResult(Outcome.DELIVERED))
    runtime_of(app).senders["apns"] = sender
    with claims_run() as claims:
        body = await request_approval(http, client)
        await wait_for_statuses(app, body["approval_id"], ["sent"])
    assert claims == []
    [message] = sender.sent
    assert (message.approval_id, message.device_id) == (body["approval_id"], phone.device_id)
    assert "FILESRV01" in message.title and message.token
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.attempts, delivery.lease_until, delivery.last_error) == (1, None, None)


async def test_the_delivery_commits_leased_to_this_process_before_it_is_sent(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    gate: GateSender,
) -> None:
    sender = gate
    before = datetime.now(UTC)
    body = await request_approval(http, client)
    async with asyncio.timeout(10):
        while sender.waiting < 1:
            await asyncio.sleep(0.01)
    [delivery] = await deliveries(app, body["approval_id"])
    lease = timedelta(seconds=runtime_of(app).settings.push_lease_seconds)
    assert (delivery.status, delivery.attempts) == ("sending", 1)
    assert delivery.lease_until is not None
    assert before + lease <= delivery.lease_until <= datetime.now(UTC) + lease
    # While its lease holds, no other dispatcher takes it.
    other = Dispatcher(runtime_of(app))
    assert await other.run_once() == 0
    sender.gate.set()
    await wait_for_statuses(app, body["approval_id"], ["sent"])
    assert len(sender.sent) == 1


async def test_a_lease_at_birth_that_lapses_is_claimed_by_another_dispatcher(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    gate: GateSender,
) -> None:
    """Its process hung (or died) before the send: the lease expires, the push goes out."""
    body = await request_approval(http, client)
    [delivery] = await deliveries(app, body["approval_id"])
    assert delivery.lease_until is not None
    runtime = runtime_of(app)
    other = Dispatcher(runtime)
    runtime.senders["apns"] = ScriptedSender(PushResult(Outcome.DELIVERED))
    assert await other.run_once(now=delivery.lease_until + timedelta(seconds=0.01)) == 1
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.status, delivery.attempts) == ("sent", 2)


async def test_without_room_for_all_of_them_the_pushes_are_queued_for_a_claim(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    gate: GateSender,
) -> None:
    sender = gate
    for index in range(3):
        await pair_app_device(http, client, name=f"phone {index}")
    with claims_run() as claims:
        body = await request_approval(http, client)
        async with asyncio.timeout(10):
            while sender.waiting < 3:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # room for a wrong fourth send to show
        assert sender.waiting == 3
        statuses = sorted(d.status for d in await deliveries(app, body["approval_id"]))
        assert statuses == ["queued"] + ["sending"] * 3
        sender.gate.set()
        await wait_for_statuses(app, body["approval_id"], ["sent"] * 4)
    assert claims != []
    assert sender.most_waiting == 3 and len(sender.sent) == 4


async def test_leased_pushes_count_against_the_room_of_later_claims(
    app: FastAPI,
    http: httpx.AsyncClient,
    client: RegisteredClient,
    phone: PairedDevice,
    gate: GateSender,
) -> None:
    """Two sends leased at birth leave room for one claimed push, not three."""
    sender = gate
    await pair_app_device(http, client, name="tablet")
    first = await request_approval(http, client)
    other_client = await register_client(http, name="FILESRV02")
    for index in range(2):
        await pair_app_device(http, other_client, name=f"phone {index}")
    second = await request_approval(http, other_client)
    async with asyncio.timeout(10):
        while sender.waiting < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert sender.waiting == 3
    assert sorted(d.status for d in await deliveries(app, first["approval_id"])) == [
        "sending",
        "sending",
    ]
    assert sorted(d.status for d in await deliveries(app, second["approval_id"])) == [
        "queued",
        "sending",
    ]
    sender.gate.set()
    await wait_for_statuses(app, second["approval_id"], ["sent"] * 2)


async def test_a_creation_that_rolls_back_gives_its_room_back_and_sends_nothing(
    app: FastAPI, gate: GateSender
) -> None:
    runtime = runtime_of(app)
    dispatcher = runtime.dispatcher
    assert dispatcher is not None
    with pytest.raises(RuntimeError, match="the creation failed"):
        async with runtime.db.unit() as unit:
            birth = dispatcher.lease_at_birth(3, datetime.now(UTC))
            assert birth is not None
            assert dispatcher.lease_at_birth(1, datetime.now(UTC)) is None  # no room left
            when_unit_ends(unit, lambda committed: birth.send([]) if committed else birth.release())
            raise RuntimeError("the creation failed")
    assert dispatcher.lease_at_birth(3, datetime.now(UTC)) is not None
    assert gate.sent == []


async def test_a_stopped_dispatcher_takes_nothing_at_birth(
    app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
) -> None:
    runtime = runtime_of(app)
    dispatcher = runtime.dispatcher
    assert dispatcher is not None
    assert dispatcher.lease_at_birth(1, datetime.now(UTC)) is not None
    await dispatcher.stop()
    assert dispatcher.lease_at_birth(1, datetime.now(UTC)) is None
    body = await request_approval(http, client)
    [delivery] = await deliveries(app, body["approval_id"])
    assert (delivery.status, delivery.attempts, delivery.lease_until) == ("queued", 0, None)
