"""POST /v1/otp/verify: RFC 6238 window, replay guard, devices of both kinds, isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.db import Database
from pns_server.models import AuditEvent, Client, Device
from tests.pns_server.otp.conftest import away_from_step_edge, code, metric, wrong_code
from tests.support.factories import (
    RegisteredClient,
    bearer,
    pair_app_device,
    pair_totp_device,
    register_client,
)

VERIFY = "/v1/otp/verify"


async def verify(http: httpx.AsyncClient, client: RegisteredClient, otp: Any) -> httpx.Response:
    return await http.post(VERIFY, json={"code": otp}, headers=client.headers)


class TestAccept:
    async def test_app_device_code_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        device = await pair_app_device(http, client)
        response = await verify(http, client, device.otp())
        assert response.status_code == 200, response.text
        assert response.json() == {"result": "accepted", "device_id": device.device_id}
        assert metric(app, "accepted") == 1

    async def test_third_party_totp_device_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        await away_from_step_edge()
        device_id, secret = await pair_totp_device(http, client)
        # The confirming code itself is spent; the next step's code is fresh.
        assert (await verify(http, client, code(secret))).json()["code"] == "otp_replayed"
        response = await verify(http, client, code(secret, +1))
        assert response.status_code == 200, response.text
        assert response.json()["device_id"] == device_id

    async def test_each_of_several_devices_works(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        await away_from_step_edge()
        phone = await pair_app_device(http, client)
        totp_id, secret = await pair_totp_device(http, client)
        first = await verify(http, client, code(secret, +1))
        second = await verify(http, client, phone.otp())
        assert first.json()["device_id"] == totp_id
        assert second.json()["device_id"] == phone.device_id

    @pytest.mark.parametrize("steps", [-1, 1])
    async def test_neighbouring_step_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient, steps: int
    ) -> None:
        await away_from_step_edge()
        device = await pair_app_device(http, client)
        response = await verify(http, client, code(device.totp_secret, steps))
        assert response.status_code == 200, response.text

    @pytest.mark.parametrize("steps", [-2, 2])
    async def test_two_steps_away_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient, steps: int
    ) -> None:
        await away_from_step_edge()
        device = await pair_app_device(http, client)
        otp = code(device.totp_secret, steps)
        assert otp not in {code(device.totp_secret, k) for k in (-1, 0, 1)}
        response = await verify(http, client, otp)
        assert response.status_code == 401
        assert response.json()["code"] == "otp_invalid"

    async def test_spaces_inside_the_code_are_ignored(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        otp = device.otp()
        response = await verify(http, client, f"{otp[:3]} {otp[3:]}")
        assert response.status_code == 200

    async def test_success_records_last_use_and_resets_counters(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        async with db.session() as session:
            row = await session.get(Client, client.client_id)
            assert row is not None
            row.pushes_since_success = 7
            row.otp_lock_count = 2
        wrong = await verify(http, client, wrong_code(device.totp_secret))
        assert wrong.json()["attempts_left"] == 4
        assert (await verify(http, client, device.otp())).status_code == 200
        async with db.session() as session:
            row = await session.get(Client, client.client_id)
            stored = await session.get(Device, device.device_id)
            assert row is not None and stored is not None
            assert (row.otp_consecutive_failures, row.otp_failures_since_success) == (0, 0)
            assert (row.otp_lock_count, row.pushes_since_success) == (0, 0)
            assert stored.last_used_at is not None
            events = (
                await session.scalars(select(AuditEvent).where(AuditEvent.event == "otp.accepted"))
            ).all()
        assert [e.subject_id for e in events] == [device.device_id]
        assert device.otp() not in str(events[0].detail)


class TestReplay:
    async def test_same_code_twice(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        device = await pair_app_device(http, client)
        otp = device.otp()
        assert (await verify(http, client, otp)).status_code == 200
        replay = await verify(http, client, otp)
        assert replay.status_code == 401
        assert replay.headers["content-type"] == "application/problem+json"
        assert replay.json()["code"] == "otp_replayed"
        assert otp not in replay.text
        assert metric(app, "replayed") == 1

    async def test_older_step_after_a_newer_one(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        await away_from_step_edge()
        device = await pair_app_device(http, client)
        assert (await verify(http, client, code(device.totp_secret, +1))).status_code == 200
        older = await verify(http, client, code(device.totp_secret, 0))
        assert older.status_code == 401
        assert older.json()["code"] == "otp_replayed"

    async def test_replay_does_not_count_as_a_failure(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        otp = device.otp()
        await verify(http, client, otp)
        await verify(http, client, otp)
        async with db.session() as session:
            row = await session.get(Client, client.client_id)
            assert row is not None and row.otp_consecutive_failures == 0

    async def test_concurrent_double_submission_accepted_once(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        otp = device.otp()
        responses = await asyncio.gather(*(verify(http, client, otp) for _ in range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 401, 401, 401]
        assert {r.json()["code"] for r in responses if r.status_code == 401} == {"otp_replayed"}


class TestIsolation:
    async def test_another_clients_code_does_not_verify(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        other = await register_client(http, name="OTHER")
        mine = await pair_app_device(http, client)
        theirs = await pair_app_device(http, other)
        otp = mine.otp()
        if otp == theirs.otp():
            pytest.skip("two random secrets gave the same code (one in a million)")
        refused = await verify(http, other, otp)
        assert refused.status_code == 401 and refused.json()["code"] == "otp_invalid"
        # ...and the refusal did not spend it for its owner.
        assert (await verify(http, client, otp)).json()["device_id"] == mine.device_id

    async def test_client_without_devices_gets_otp_invalid(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await verify(http, client, "123456")
        assert response.status_code == 401
        assert response.json()["code"] == "otp_invalid"


class TestBadRequests:
    @pytest.mark.parametrize(
        "body",
        [{}, {"code": 123456}, {"code": None}, {"code": ["123456"]}, {"code": ""}, [], "123456"],
    )
    async def test_wrong_types_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, body: Any
    ) -> None:
        response = await http.post(VERIFY, json=body, headers=client.headers)
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        assert response.json()["errors"]

    async def test_malformed_json_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.post(
            VERIFY,
            content=b'{"code": "12',
            headers={**client.headers, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_malformed_bodies_do_not_count_as_failures(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        load_client: Callable[[str], Awaitable[Client]],
    ) -> None:
        await http.post(VERIFY, json={"code": 123456}, headers=client.headers)
        assert (await load_client(client.client_id)).otp_consecutive_failures == 0

    @pytest.mark.parametrize("headers", [{}, bearer("pnsc_unknown")])
    async def test_needs_a_client_token(
        self, http: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await http.post(VERIFY, json={"code": "123456"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"

    async def test_device_token_is_not_a_client_token(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        response = await http.post(VERIFY, json={"code": device.otp()}, headers=device.headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"
