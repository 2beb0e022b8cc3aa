from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import CursorResult, case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import Pairing
from pns_server.states import PairingStatus


class PairingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, pairing: Pairing) -> None:
        self.session.add(pairing)

    async def get_for_client(self, pairing_id: str, client_id: str) -> Pairing | None:
        return await self.session.scalar(
            select(Pairing).where(Pairing.id == pairing_id, Pairing.client_id == client_id)
        )

    async def get_by_token_hash(self, token_hash: str) -> Pairing | None:
        return await self.session.scalar(select(Pairing).where(Pairing.token_hash == token_hash))

    async def complete(self, pairing_id: str, device_id: str, at: datetime) -> bool:
        """Move a pending pairing to completed. One conditional UPDATE, so exactly one
        caller wins even when several processes race for the same pairing."""
        result = await self.session.execute(
            update(Pairing)
            .where(Pairing.id == pairing_id, Pairing.status == PairingStatus.PENDING)
            .values(
                status=PairingStatus.COMPLETED,
                device_id=device_id,
                completed_at=at,
                totp_secret=None,
            )
            .execution_options(synchronize_session=False)
        )
        return cast(CursorResult[tuple[()]], result).rowcount == 1

    async def record_failure(self, pairing_id: str, max_failures: int) -> int:
        """Count a wrong confirmation code atomically; the pairing expires at the limit.
        Returns the failures counted so far."""
        failures = Pairing.failed_attempts + 1
        await self.session.execute(
            update(Pairing)
            .where(Pairing.id == pairing_id, Pairing.status == PairingStatus.PENDING)
            .values(
                failed_attempts=failures,
                status=case(
                    (failures >= max_failures, PairingStatus.EXPIRED), else_=Pairing.status
                ),
            )
            .execution_options(synchronize_session=False)
        )
        count = await self.session.scalar(
            select(Pairing.failed_attempts).where(Pairing.id == pairing_id)
        )
        return int(count or 0)
