from __future__ import annotations

from sqlalchemy import case, select, update
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
