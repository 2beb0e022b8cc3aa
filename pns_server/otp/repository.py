"""Queries of the otp domain. Every counter change is one SQL expression on the row
(`x = x + 1 ... RETURNING`), so concurrent requests on any number of processes never lose
an update; nothing is read, changed in Python and written back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import Client, Device, RecoveryCode
from pns_server.security import new_id

OTP_DEVICE_KINDS = ("app", "totp")

_THROTTLE_COLUMNS = (
    Client.otp_consecutive_failures,
    Client.otp_failures_since_success,
    Client.otp_lock_count,
    Client.otp_locked_until,
)


@dataclass(frozen=True, slots=True)
class Throttle:
    """The client's OTP/recovery-code throttling counters as stored."""

    consecutive_failures: int
    failures_since_success: int
    lock_count: int
    locked_until: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Throttle:
        return cls(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), row[3])


class OtpRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock_throttle(self, client_id: str) -> Throttle:
        """Read the counters and hold the client row until commit (FOR UPDATE on PostgreSQL;
        SQLite's write transactions are serial already). Every OTP and recovery-code check of
        one client therefore takes the client row first: one lock order, no deadlocks, and
        the lock check sees the latest failures from every process."""
        row = (
            await self.session.execute(
                select(*_THROTTLE_COLUMNS).where(Client.id == client_id).with_for_update()
            )
        ).one()
        return Throttle.from_row(row)

    async def record_failure(self, client_id: str) -> Throttle:
        row = (
            await self.session.execute(
                update(Client)
                .where(Client.id == client_id)
                .values(
                    otp_consecutive_failures=Client.otp_consecutive_failures + 1,
                    otp_failures_since_success=Client.otp_failures_since_success + 1,
                )
                .returning(*_THROTTLE_COLUMNS)
                .execution_options(synchronize_session=False)
            )
        ).one()
        return Throttle.from_row(row)

    async def impose_lock(self, client_id: str, until: datetime) -> Throttle:
        """Lock until `until`; the next round of attempts starts from zero after it."""
        row = (
            await self.session.execute(
                update(Client)
                .where(Client.id == client_id)
                .values(
                    otp_locked_until=until,
                    otp_lock_count=Client.otp_lock_count + 1,
                    otp_consecutive_failures=0,
                )
                .returning(*_THROTTLE_COLUMNS)
                .execution_options(synchronize_session=False)
            )
        ).one()
        return Throttle.from_row(row)

    async def reset_after_success(self, client_id: str) -> None:
        """A successful login clears the OTP throttle and the push-fatigue counter."""
        await self.session.execute(
            update(Client)
            .where(Client.id == client_id)
            .values(
                otp_consecutive_failures=0,
                otp_failures_since_success=0,
                otp_lock_count=0,
                otp_locked_until=None,
                pushes_since_success=0,
            )
            .execution_options(synchronize_session=False)
        )

    async def otp_devices(self, client_id: str) -> Sequence[Device]:
        return (
            await self.session.scalars(
                select(Device)
                .where(Device.client_id == client_id, Device.kind.in_(OTP_DEVICE_KINDS))
                .order_by(Device.created_at, Device.id)
            )
        ).all()

    async def claim_step(self, device_id: str, step: int, now: datetime) -> bool:
        """Accept a time step for a device at most once: the replay guard is this single
        conditional UPDATE, so two processes submitting one code cannot both win."""
        result = await self.session.execute(
            update(Device)
            .where(
                Device.id == device_id,
                (Device.last_otp_step.is_(None)) | (Device.last_otp_step < step),
            )
            .values(last_otp_step=step, last_used_at=now)
            .returning(Device.id)
            .execution_options(synchronize_session=False)
        )
        return result.scalar_one_or_none() is not None

    async def replace_recovery_codes(
        self, client_id: str, code_hashes: Sequence[str], now: datetime
    ) -> None:
        """Delete the old set and insert the new one in the caller's transaction (the caller
        holds the client row, so two regenerations cannot interleave into 20 codes)."""
        await self.session.execute(delete(RecoveryCode).where(RecoveryCode.client_id == client_id))
        await self.session.execute(
            insert(RecoveryCode),
            [
                {"id": new_id(), "client_id": client_id, "code_hash": h, "created_at": now}
                for h in code_hashes
            ],
        )

    async def use_recovery_code(
        self, client_id: str, code_hashes: Sequence[str], now: datetime
    ) -> bool:
        """Mark an unused code used; one conditional UPDATE, so a code works exactly once.
        `code_hashes`: the code's keyed hash under each configured key (at most one row)."""
        result = await self.session.execute(
            update(RecoveryCode)
            .where(
                RecoveryCode.client_id == client_id,
                RecoveryCode.code_hash.in_(code_hashes),
                RecoveryCode.used_at.is_(None),
            )
            .values(used_at=now)
            .returning(RecoveryCode.id)
            .execution_options(synchronize_session=False)
        )
        return result.first() is not None

    async def unused_recovery_codes(self, client_id: str) -> int:
        count = await self.session.scalar(
            select(func.count(RecoveryCode.id)).where(
                RecoveryCode.client_id == client_id, RecoveryCode.used_at.is_(None)
            )
        )
        return int(count or 0)
