"""Recovery codes: POST /v1/recovery-codes and /v1/recovery-codes/verify."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.db import Database
from pns_server.models import AuditEvent, Client, RecoveryCode
from pns_server.otp import recovery_codes
from tests.pns_server.otp.conftest import ClientEditor, metric, wrong_code
from tests.support.factories import RegisteredClient, bearer, pair_app_device, register_client

CREATE = "/v1/recovery-codes"
VERIFY = "/v1/recovery-codes/verify"
FORMAT = re.compile(r"^[2-9a-km-np-z]{4}-[2-9a-km-np-z]{4}-[2-9a-km-np-z]{2}$")


async def create_codes(http: httpx.AsyncClient, client: RegisteredClient) -> list[str]:
    response = await http.post(CREATE, headers=client.headers)
    assert response.status_code == 201, response.text
    codes: list[str] = response.json()["codes"]
    return codes


async def use(http: httpx.AsyncClient, client: RegisteredClient, code: Any) -> httpx.Response:
    return await http.post(VERIFY, json={"code": code}, headers=client.headers)


class TestCreate:
    async def test_ten_unambiguous_codes_stored_hashed(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        response = await http.post(CREATE, headers=client.headers)
        assert response.status_code == 201
        assert response.headers["cache-control"] == "no-store"
        codes = response.json()["codes"]
        assert len(codes) == 10 and len(set(codes)) == 10
        assert all(FORMAT.match(c) for c in codes), codes
        async with db.session() as session:
            stored = (
                await session.scalars(
                    select(RecoveryCode.code_hash).where(RecoveryCode.client_id == client.client_id)
                )
            ).all()
        assert len(stored) == 10
        assert not set(stored) & set(codes)
        assert not any(c.replace("-", "") in h for c in codes for h in stored)

    async def test_regeneration_invalidates_the_old_set(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        old = await create_codes(http, client)
        new = await create_codes(http, client)
        refused = await use(http, client, old[0])
        assert refused.status_code == 401
        assert refused.json()["code"] == "recovery_code_invalid"
        assert (await use(http, client, new[0])).json() == {"result": "accepted", "remaining": 9}

    async def test_concurrent_regenerations_leave_one_set(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        await asyncio.gather(*(create_codes(http, client) for _ in range(3)))
        async with db.session() as session:
            rows = (
                await session.scalars(
                    select(RecoveryCode).where(RecoveryCode.client_id == client.client_id)
                )
            ).all()
        assert len(rows) == 10

    async def test_audited_without_the_codes(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        audit_events: Callable[[str], Awaitable[list[AuditEvent]]],
    ) -> None:
        codes = await create_codes(http, client)
        await use(http, client, codes[3])
        events = {e.event: e for e in await audit_events(client.client_id)}
        assert events["recovery.generated"].detail == {"count": 10}
        assert events["recovery.used"].detail == {"remaining": 9}
        assert not any(c in str(e.detail) for e in events.values() for c in codes)

    async def test_needs_a_client_token(self, http: httpx.AsyncClient) -> None:
        response = await http.post(CREATE, headers=bearer("pnsc_nope"))
        assert response.status_code == 401


class TestVerify:
    async def test_each_code_works_once(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        codes = await create_codes(http, client)
        assert (await use(http, client, codes[0])).json() == {"result": "accepted", "remaining": 9}
        assert (await use(http, client, codes[1])).json()["remaining"] == 8
        again = await use(http, client, codes[0])
        assert again.status_code == 401
        assert again.json()["code"] == "recovery_code_invalid"
        assert codes[0] not in again.text
        assert metric(app, "accepted") == 2 and metric(app, "invalid") == 1

    @pytest.mark.parametrize(
        "typed",
        [
            lambda c: c.upper(),
            lambda c: c.replace("-", ""),
            lambda c: " ".join(c.replace("-", "")),
            lambda c: f"  {c.upper().replace('-', ' ')} ",
        ],
    )
    async def test_typing_variants_are_normalised(
        self, http: httpx.AsyncClient, client: RegisteredClient, typed: Callable[[str], str]
    ) -> None:
        codes = await create_codes(http, client)
        response = await use(http, client, typed(codes[5]))
        assert response.status_code == 200, response.text

    async def test_codes_are_bound_to_their_client(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        other = await register_client(http, name="OTHER")
        await create_codes(http, other)
        mine = await create_codes(http, client)
        refused = await use(http, other, mine[0])
        assert refused.status_code == 401
        assert (await use(http, client, mine[0])).status_code == 200

    async def test_concurrent_use_of_one_code_accepted_once(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        codes = await create_codes(http, client)
        answers = await asyncio.gather(*(use(http, client, codes[2]) for _ in range(3)))
        assert sorted(a.status_code for a in answers) == [200, 401, 401]

    async def test_failures_count_toward_the_otp_lock(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device = await pair_app_device(http, client)
        codes = await create_codes(http, client)
        answers = [await use(http, client, "zzzz-zzzz-zz") for _ in range(4)]
        assert [a.json()["attempts_left"] for a in answers] == [4, 3, 2, 1]
        otp_wrong = await http.post(
            "/v1/otp/verify", json={"code": wrong_code(device.totp_secret)}, headers=client.headers
        )
        assert otp_wrong.json()["attempts_left"] == 0
        locked = await use(http, client, codes[0])
        assert locked.status_code == 429
        assert locked.json()["code"] == "otp_locked"
        assert (
            await http.post("/v1/otp/verify", json={"code": device.otp()}, headers=client.headers)
        ).status_code == 429

    async def test_success_resets_the_counters(
        self,
        http: httpx.AsyncClient,
        client: RegisteredClient,
        edit_client: ClientEditor,
        load_client: Callable[[str], Awaitable[Client]],
    ) -> None:
        codes = await create_codes(http, client)
        await edit_client(client.client_id, otp_failures_since_success=50, pushes_since_success=9)
        await use(http, client, "not a code")
        assert (await use(http, client, codes[0])).status_code == 200
        row = await load_client(client.client_id)
        assert (row.otp_consecutive_failures, row.otp_failures_since_success) == (0, 0)
        assert row.pushes_since_success == 0

    async def test_no_codes_yet(self, http: httpx.AsyncClient, client: RegisteredClient) -> None:
        response = await use(http, client, "abcd-efgh-jk")
        assert response.status_code == 401
        assert response.json()["code"] == "recovery_code_invalid"

    @pytest.mark.parametrize("body", [{}, {"code": 1234}, {"code": ""}, {"code": "x" * 65}, []])
    async def test_wrong_types_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient, body: Any
    ) -> None:
        response = await http.post(VERIFY, json=body, headers=client.headers)
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_malformed_json_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.post(
            VERIFY,
            content=b"{code:",
            headers={**client.headers, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"


class TestFormat:
    """The pure functions behind the endpoints (no database)."""

    def test_alphabet_has_no_look_alikes(self) -> None:
        assert len(recovery_codes.ALPHABET) == 32 == len(set(recovery_codes.ALPHABET))
        assert not set("01lo") & set(recovery_codes.ALPHABET)

    def test_normalise(self) -> None:
        assert recovery_codes.normalise(" ABCD EFGH JK ") == "abcd-efgh-jk"
        assert recovery_codes.normalise("abcd--efgh-jk") == "abcd-efgh-jk"
        assert recovery_codes.normalise("abcd-efgh-j") is None
        assert recovery_codes.normalise("abcd-efgh-j0") is None

    def test_hash_depends_on_the_client(self) -> None:
        one = recovery_codes.hash_code("a" * 32, "abcd-efgh-jk")
        assert len(one) == 64
        assert one == recovery_codes.hash_code("a" * 32, "abcd-efgh-jk")
        assert one != recovery_codes.hash_code("b" * 32, "abcd-efgh-jk")


def test_the_migration_peppers_codes_as_the_relay_does() -> None:
    """Revision 0003 keeps its own copy of the keyed input; it must not drift."""
    from importlib import util

    from pns_server.migrate import migrations_dir

    spec = util.spec_from_file_location(
        "rev0003", migrations_dir() / "versions" / "0003_bind_secrets.py"
    )
    assert spec is not None and spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.pepper_input("c" * 32, "ab" * 32) == recovery_codes.pepper_input(
        "c" * 32, "ab" * 32
    )
