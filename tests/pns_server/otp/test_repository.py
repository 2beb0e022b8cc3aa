"""The otp repository's guards on their own, without the client-row lock the service takes
first: the conditional UPDATEs alone must let exactly one concurrent transaction win."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
from sqlalchemy import select

from pns_server.audit import audit_row
from pns_server.db import Database
from pns_server.models import AuditEvent, Device
from pns_server.otp import recovery_codes
from pns_server.otp.repository import HASHES_PER_STATEMENT, OtpRepository
from tests.support.factories import RegisteredClient, pair_app_device

STEP = 60_000_000


async def test_claim_step_wins_once_across_sessions(
    http: httpx.AsyncClient, client: RegisteredClient, db: Database
) -> None:
    device = await pair_app_device(http, client)

    async def claim(step: int) -> bool:
        async with db.unit() as unit:
            return await OtpRepository(unit).claim_step(device.device_id, step, datetime.now(UTC))

    assert sorted(await asyncio.gather(*(claim(STEP) for _ in range(4)))) == [
        False,
        False,
        False,
        True,
    ]
    assert await claim(STEP - 1) is False
    assert await claim(STEP + 1) is True


async def test_audited_claim_writes_its_row_only_when_it_wins(
    http: httpx.AsyncClient, client: RegisteredClient, db: Database
) -> None:
    device = await pair_app_device(http, client)

    async def claim(step: int) -> bool:
        row = audit_row(
            "otp.accepted",
            client_id=client.client_id,
            actor="client",
            actor_id=client.client_id,
            subject_id=device.device_id,
            kind="app",
        )
        async with db.unit() as unit:
            return await OtpRepository(unit).claim_step_audited(
                device.device_id, step, datetime.now(UTC), row
            )

    wins = await asyncio.gather(*(claim(STEP) for _ in range(4)))
    assert sorted(wins) == [False, False, False, True]
    assert await claim(STEP) is False
    async with db.session() as session:
        events = (
            await session.scalars(
                select(AuditEvent).where(
                    AuditEvent.client_id == client.client_id, AuditEvent.event == "otp.accepted"
                )
            )
        ).all()
        stored = await session.get(Device, device.device_id)
    assert [(e.subject_id, e.actor, e.actor_id, e.detail) for e in events] == [
        (device.device_id, "client", client.client_id, {"kind": "app"})
    ]
    assert stored is not None and stored.last_otp_step == STEP


async def test_failure_counts_are_not_lost_under_concurrency(
    http: httpx.AsyncClient, client: RegisteredClient, db: Database
) -> None:
    async def fail() -> int:
        async with db.unit() as unit:
            return (
                await OtpRepository(unit).record_failure(client.client_id)
            ).failures_since_success

    counts = await asyncio.gather(*(fail() for _ in range(6)))
    assert sorted(counts) == [1, 2, 3, 4, 5, 6]


async def test_recovery_code_used_once_across_sessions(
    client: RegisteredClient, db: Database
) -> None:
    code_hash = recovery_codes.hash_code(client.client_id, "abcd-efgh-jk")
    async with db.unit() as unit:
        await OtpRepository(unit).replace_recovery_codes(
            client.client_id, [code_hash], datetime.now(UTC)
        )

    async def use() -> bool:
        async with db.unit() as unit:
            return await OtpRepository(unit).use_recovery_code(
                client.client_id, [code_hash], datetime.now(UTC)
            )

    assert sorted(await asyncio.gather(use(), use(), use())) == [False, False, True]


async def test_recovery_code_found_among_many_key_candidates(
    client: RegisteredClient, db: Database
) -> None:
    """One hash per configured key: more candidates than one statement's places are tried
    group by group, fewer fill the places with repeats; either way the code is used once."""
    code_hash = recovery_codes.hash_code(client.client_id, "abcd-efgh-jk")
    others = [recovery_codes.hash_code(client.client_id, f"abcd-efgh-{c}m") for c in "23456789"]
    assert len(others) > HASHES_PER_STATEMENT
    async with db.unit() as unit:
        await OtpRepository(unit).replace_recovery_codes(
            client.client_id, [code_hash], datetime.now(UTC)
        )

    async def use(candidates: list[str]) -> bool:
        async with db.unit() as unit:
            return await OtpRepository(unit).use_recovery_code(
                client.client_id, candidates, datetime.now(UTC)
            )

    assert await use(others) is False
    assert await use([]) is False
    assert await use([*others, code_hash]) is True
    assert await use([code_hash]) is False
