"""A LISTEN connection that goes silent (a NAT dropping the flow without telling anyone)
delays nothing but wake-ups: requests keep answering, and a long-poll still ends, by a
re-read, once the listener has been replaced."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pns_server.app import create_app
from pns_server.config import Settings
from tests.pns_server.approvals.helpers import LOGIN, runtime_of, signed_answer
from tests.support.factories import pair_app_device, register_client
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]


@pytest.fixture
def settings_overrides(proxy: TcpProxy, database_url: str) -> dict[str, Any]:
    """Only this relay's LISTEN connection goes through the proxy."""
    return {"listen_database_url": proxy.url_for(database_url)}


async def test_a_silent_listen_connection_delays_only_wake_ups(
    http: httpx.AsyncClient, app: FastAPI, settings: Settings, proxy: TcpProxy
) -> None:
    notifier = runtime_of(app).notifier
    assert notifier.connected
    owner = await register_client(http, "OWNER")
    busy = await register_client(http, "BUSY")
    phone = await pair_app_device(http, owner, push=None)
    await pair_app_device(http, busy, push=None)
    created = (await http.post("/v1/approvals", json=LOGIN, headers=owner.headers)).json()

    # A second replica on the same database, listening directly.
    other = create_app(settings.model_copy(update={"listen_database_url": ""}))
    async with other.router.lifespan_context(other):
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as replica:
            waiting = asyncio.create_task(
                http.get(
                    f"/v1/approvals/{created['approval_id']}",
                    params={"wait": 40},
                    headers=owner.headers,
                    timeout=60,
                )
            )
            await asyncio.sleep(0.3)
            reconnects = notifier.reconnects
            assert proxy.black_hole() >= 1

            # State changes that publish keep answering on the cut-off relay. The timeout
            # only catches a hang (a request stuck behind the notification connection).
            async with asyncio.timeout(15):
                for _ in range(5):
                    made = await http.post("/v1/approvals", json=LOGIN, headers=busy.headers)
                    assert made.status_code == 201, made.text
                    assert (await http.get("/v1/client", headers=busy.headers)).status_code == 200

            # The phone answers through the other replica: its NOTIFY never reaches us.
            answer = signed_answer(phone, created["approval_id"], "approve", created["match_code"])
            decided = await replica.post(
                f"/v1/device/approvals/{created['approval_id']}/response",
                json=answer,
                headers=phone.headers,
            )
            assert decided.json()["status"] == "approved", decided.text
            started = time.monotonic()
            response = await waiting

    # Ended by the re-read after the listener was replaced (the periodic re-check is 45 s,
    # the wait 40 s): a wait that had run out would still say pending.
    assert response.json()["status"] == "approved", response.text
    assert notifier.reconnects > reconnects
    assert time.monotonic() - started < 40
