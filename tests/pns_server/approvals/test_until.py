"""`GET /v1/approvals/{id}?wait=N&until=...`: what ends a long-poll besides the decision.

Delivery outcomes are written here as the dispatcher writes them (the row changes and the
approval's topic is published after commit), on a delivery leased far ahead so that the
running dispatcher leaves it alone."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from pns_server.db import publish_after_commit
from pns_server.models import Delivery
from pns_server.states import DeliveryStatus
from pns_server.topics import PUSH_FAILED, PUSH_RETRY, PUSH_SENT, approval_topic
from tests.pns_server.approvals.helpers import (
    answer,
    move_expiry,
    request_approval,
    runtime_of,
    settle_deliveries,
)
from tests.support.factories import PairedDevice, RegisteredClient
from tests.support.statements import statements_where

# The wake-up the dispatcher publishes with each outcome (a lease it takes publishes none).
KIND_OF_OUTCOME = {
    DeliveryStatus.SENT: PUSH_SENT,
    DeliveryStatus.QUEUED: PUSH_RETRY,
    DeliveryStatus.FAILED: PUSH_FAILED,
}


async def set_delivery(
    app: FastAPI, approval_id: str, status: DeliveryStatus, error: str | None = None
) -> None:
    """Record a push outcome as the dispatcher does, wake-up included."""
    lease = datetime.now(UTC) + timedelta(hours=1)
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Delivery)
            .where(Delivery.approval_id == approval_id)
            .values(status=status, last_error=error, lease_until=lease)
        )
        if status in KIND_OF_OUTCOME:
            publish_after_commit(session, approval_topic(approval_id, KIND_OF_OUTCOME[status]))


def state_reads() -> AbstractContextManager[list[str]]:
    """The approval reads of long-polls meanwhile, whichever task made them: on PostgreSQL
    the wake-up may come from the LISTEN connection, before the committing task's own."""
    return statements_where(lambda sql: "AS delivery_queued" in sql)  # a woken poll's read


async def leased(app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient) -> str:
    """A pending approval whose push is being sent (leased far ahead)."""
    body = await request_approval(http, client)
    await settle_deliveries(http, client, body["approval_id"])
    await set_delivery(app, body["approval_id"], DeliveryStatus.SENDING)
    return str(body["approval_id"])


def poll(
    http: httpx.AsyncClient, client: RegisteredClient, approval_id: str, **params: Any
) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(
        http.get(
            f"/v1/approvals/{approval_id}",
            params={"wait": 20, **params},
            headers=client.headers,
        )
    )


async def still_waiting(task: asyncio.Task[httpx.Response]) -> bool:
    await asyncio.sleep(0.3)
    return not task.done()


class TestUntil:
    async def test_by_default_a_delivery_outcome_ends_the_wait(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        approval_id = await leased(app, http, client)
        for params in ({}, {"until": "change"}):
            waiting = poll(http, client, approval_id, **params)
            assert await still_waiting(waiting)
            await set_delivery(app, approval_id, DeliveryStatus.SENT)
            state = (await asyncio.wait_for(waiting, 10)).json()
            assert (state["status"], state["delivery"]["sent"]) == ("pending", 1)
            await set_delivery(app, approval_id, DeliveryStatus.SENDING)

    async def test_final_sleeps_through_push_outcomes_and_wakes_on_the_decision(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        approval_id = await leased(app, http, client)
        waiting = poll(http, client, approval_id, until="final")
        assert await still_waiting(waiting)
        await set_delivery(app, approval_id, DeliveryStatus.SENT)
        assert await still_waiting(waiting)
        await set_delivery(app, approval_id, DeliveryStatus.FAILED, "410 Unregistered")
        assert await still_waiting(waiting)
        decided_at = time.monotonic()
        await answer(http, phone, approval_id, "reject")
        state = (await asyncio.wait_for(waiting, 10)).json()
        assert time.monotonic() - decided_at < 1.0
        assert (state["status"], state["reason"]) == ("rejected", "user_rejected")

    async def test_final_or_failed_sleeps_through_a_sent_push(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        approval_id = await leased(app, http, client)
        waiting = poll(http, client, approval_id, until="final_or_failed")
        assert await still_waiting(waiting)
        await set_delivery(app, approval_id, DeliveryStatus.SENT)
        assert await still_waiting(waiting)
        await answer(http, phone, approval_id, "reject")
        assert (await asyncio.wait_for(waiting, 10)).json()["status"] == "rejected"

    async def test_final_or_failed_wakes_when_every_push_failed(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        approval_id = await leased(app, http, client)
        waiting = poll(http, client, approval_id, until="final_or_failed")
        assert await still_waiting(waiting)
        await set_delivery(app, approval_id, DeliveryStatus.FAILED, "410 Unregistered")
        state = (await asyncio.wait_for(waiting, 10)).json()
        assert state["status"] == "pending"
        assert state["delivery"] == {
            "queued": 0,
            "sent": 0,
            "failed": 1,
            "last_error": "410 Unregistered",
        }
        # Already hopeless when the wait begins: it answers at once.
        started = time.monotonic()
        again = await http.get(
            f"/v1/approvals/{approval_id}",
            params={"wait": 20, "until": "final_or_failed"},
            headers=client.headers,
        )
        assert again.json()["delivery"]["failed"] == 1
        assert time.monotonic() - started < 5

    @pytest.mark.parametrize(
        ("outcome", "reads"),
        [
            (DeliveryStatus.SENT, {"change": 1, "final_or_failed": 0, "final": 0}),
            (DeliveryStatus.QUEUED, {"change": 1, "final_or_failed": 0, "final": 0}),
            (DeliveryStatus.FAILED, {"change": 1, "final_or_failed": 1, "final": 0}),
        ],
    )
    async def test_a_wait_reads_again_only_for_the_outcomes_that_can_end_it(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        phone: PairedDevice,
        outcome: DeliveryStatus,
        reads: dict[str, int],
    ) -> None:
        """A push's outcome wakes only the long-polls it may end: a woken one reads the
        approval again, the others stay asleep (their read would be wasted). One wait at a
        time: waits woken together would share one read."""
        approval_id = await leased(app, http, client)
        for until, expected in reads.items():
            await set_delivery(app, approval_id, DeliveryStatus.SENDING)
            waiting = poll(http, client, approval_id, until=until)
            assert await still_waiting(waiting)
            with state_reads() as seen:
                await set_delivery(app, approval_id, outcome, "503 ServiceUnavailable")
                await asyncio.sleep(0.3)
            assert (until, len(seen)) == (until, expected)
            if expected:
                assert (await asyncio.wait_for(waiting, 10)).json()["status"] == "pending"
            else:
                assert not waiting.done()
                waiting.cancel()

    async def test_an_expiry_ends_every_kind_of_wait(
        self, app: FastAPI, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        approval_id = await leased(app, http, client)
        await move_expiry(app, approval_id, 1.0)
        waits = [poll(http, client, approval_id, until=u) for u in ("final", "final_or_failed")]
        states = [(await asyncio.wait_for(w, 10)).json() for w in waits]
        assert {s["status"] for s in states} == {"expired"}

    @pytest.mark.parametrize("value", ["decided", "", "FINAL"])
    async def test_an_unknown_value_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, value: str
    ) -> None:
        body = await request_approval(http, client)
        response = await http.get(
            f"/v1/approvals/{body['approval_id']}",
            params={"until": value},
            headers=client.headers,
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        assert [e["field"] for e in response.json()["errors"]] == ["query.until"]
