"""The otp repository's guards on their own, without the client-row lock the service takes
first: the conditional UPDATEs alone must let exactly one concurrent transaction win."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from pns_server.audit import audit_row
from pns_server.db import Database
from pns_server.models import AuditEvent, Client, Device
from pns_server.otp import recovery_codes
from pns_server.otp.repository import HASHES_PER_STATEMENT, OtpRepository, VerifyCaller
from pns_server.security import hash_token
from tests.pns_server.approvals.helpers import request_approval
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


class TestClaimIfUnchanged:
    """PostgreSQL's check outside a transaction: the claim holds only while the caller's row
    is as the check read it; a failure, a lock or a push meanwhile leaves everything as it
    was, for the check to be decided under the lock."""

    @staticmethod
    async def read(db: Database, client: RegisteredClient) -> VerifyCaller:
        async with db.unit_alone() as unit:
            caller = await OtpRepository(unit).read_caller_for_verify(hash_token(client.token))
        assert caller is not None
        return caller

    @staticmethod
    async def claim(
        db: Database,
        caller: VerifyCaller,
        device_id: str,
        *,
        reset: bool = False,
        seen_at: datetime | None = None,
    ) -> bool:
        row = audit_row(
            "otp.accepted",
            client_id=caller.client.id,
            actor="client",
            actor_id=caller.client.id,
            subject_id=device_id,
            kind="app",
        )
        async with db.unit_alone() as unit:
            return await OtpRepository(unit).claim_step_if_unchanged(
                device_id, STEP, datetime.now(UTC), row, caller, reset, seen_at
            )

    @staticmethod
    async def state(db: Database, client: RegisteredClient, device_id: str) -> tuple[Any, ...]:
        async with db.session() as session:
            stored = await session.get(Client, client.client_id)
            device = await session.get(Device, device_id)
            accepted = await session.scalar(
                select(func.count(AuditEvent.id)).where(
                    AuditEvent.client_id == client.client_id, AuditEvent.event == "otp.accepted"
                )
            )
        assert stored is not None and device is not None
        return (
            stored.otp_consecutive_failures,
            stored.pushes_since_success,
            device.last_otp_step,
            accepted,
        )

    @pytest.mark.postgres_only
    async def test_it_claims_audits_and_resets_when_nothing_changed(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        async with db.unit() as unit:
            await OtpRepository(unit).record_failure(client.client_id)
        caller = await self.read(db, client)
        assert await self.claim(db, caller, device.device_id, reset=True) is True
        assert await self.state(db, client, device.device_id) == (0, 0, STEP, 1)
        assert await self.claim(db, caller, device.device_id) is False  # a replay

    @staticmethod
    async def last_seen(db: Database, client: RegisteredClient) -> datetime | None:
        async with db.session() as session:
            stored = await session.get(Client, client.client_id)
        assert stored is not None
        return stored.last_seen_at

    @pytest.mark.postgres_only
    @pytest.mark.parametrize("reset", [False, True])
    async def test_it_notes_the_caller_seen_with_the_claim(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database, reset: bool
    ) -> None:
        """One UPDATE of the caller's row carries the time seen, with the counters' reset or
        without it: both land."""
        device = await pair_app_device(http, client)
        if reset:
            async with db.unit() as unit:
                await OtpRepository(unit).record_failure(client.client_id)
        caller = await self.read(db, client)
        seen_at = datetime(2031, 5, 4, 3, 2, 1, tzinfo=UTC)
        claimed = await self.claim(db, caller, device.device_id, reset=reset, seen_at=seen_at)
        assert claimed is True
        assert await self.last_seen(db, client) == seen_at
        assert await self.state(db, client, device.device_id) == (0, 0, STEP, 1)

    @pytest.mark.postgres_only
    async def test_a_claim_that_loses_notes_nothing(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        caller = await self.read(db, client)
        before = await self.last_seen(db, client)
        async with db.unit() as unit:
            await OtpRepository(unit).record_failure(client.client_id)
        seen_at = datetime(2031, 5, 4, 3, 2, 1, tzinfo=UTC)
        assert await self.claim(db, caller, device.device_id, seen_at=seen_at) is False
        assert await self.last_seen(db, client) == before

    @pytest.mark.postgres_only
    async def test_a_failure_meanwhile_claims_nothing(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        caller = await self.read(db, client)
        async with db.unit() as unit:
            await OtpRepository(unit).record_failure(client.client_id)
        assert await self.claim(db, caller, device.device_id, reset=True) is False
        assert await self.state(db, client, device.device_id) == (1, 0, None, 0)

    @pytest.mark.postgres_only
    async def test_a_lock_meanwhile_claims_nothing(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        device = await pair_app_device(http, client)
        caller = await self.read(db, client)
        until = datetime.now(UTC) + timedelta(minutes=5)
        async with db.unit() as unit:
            await OtpRepository(unit).impose_lock(client.client_id, until)
        assert await self.claim(db, caller, device.device_id, reset=True) is False
        assert (await self.state(db, client, device.device_id))[2:] == (None, 0)

    @pytest.mark.postgres_only
    async def test_a_push_meanwhile_claims_nothing(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        """The counters a success resets were decided from the read: a push counted since
        would be left standing (a success must reset it)."""
        device = await pair_app_device(http, client)
        caller = await self.read(db, client)
        await request_approval(http, client)
        assert await self.claim(db, caller, device.device_id) is False
        assert await self.state(db, client, device.device_id) == (0, 1, None, 0)

    @pytest.mark.postgres_only
    async def test_a_failure_waiting_on_the_lock_is_seen(
        self, http: httpx.AsyncClient, client: RegisteredClient, db: Database
    ) -> None:
        """A failure whose transaction holds the row when the claim starts: the claim waits
        for it, then sees the row changed (not the snapshot it started with)."""
        device = await pair_app_device(http, client)
        caller = await self.read(db, client)
        async with db.unit() as unit:
            await OtpRepository(unit).record_failure(client.client_id)
            claiming = asyncio.create_task(self.claim(db, caller, device.device_id))
            await asyncio.sleep(0.3)
            assert not claiming.done()  # it waits for this transaction's row lock
        assert await claiming is False
        assert await self.state(db, client, device.device_id) == (1, 0, None, 0)
