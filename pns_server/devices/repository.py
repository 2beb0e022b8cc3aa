from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import CursorResult, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.db import Executor
from pns_server.models import Base, Device, Pairing
from pns_server.rows import DeviceRow
from pns_server.states import PairingStatus

_devices = Base.metadata.tables[Device.__tablename__]
_OF_CLIENT = (
    select(*_devices.c)
    .where(_devices.c.client_id == bindparam("client"))
    .order_by(_devices.c.created_at, _devices.c.id)
)


async def rows_of_client(executor: Executor, client_id: str) -> Sequence[DeviceRow]:
    """The client's devices in pairing order, as rows (either kind of unit)."""
    rows = (await executor.execute(_OF_CLIENT, {"client": client_id})).all()
    return cast(Sequence[DeviceRow], rows)


class DeviceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, device: Device) -> None:
        self.session.add(device)

    async def get(self, device_id: str) -> Device | None:
        return await self.session.get(Device, device_id)

    async def list_for_client(self, client_id: str) -> Sequence[DeviceRow]:
        return await rows_of_client(self.session, client_id)

    async def delete(self, device_id: str, *, client_id: str) -> bool:
        """Delete one of the client's devices; the database cascades its deliveries.

        A bulk DELETE (not `session.delete`) so the database, not the ORM, owns the cascade."""
        result = await self.session.execute(
            delete(Device).where(Device.id == device_id, Device.client_id == client_id)
        )
        return cast(CursorResult[tuple[()]], result).rowcount == 1

    # --- the pairing a device completes (a pairing's other queries: pairings/) ----------

    async def pairing_by_token_hash(self, token_hash: str) -> Pairing | None:
        return await self.session.scalar(select(Pairing).where(Pairing.token_hash == token_hash))

    async def complete_pairing(self, pairing_id: str, device_id: str, at: datetime) -> bool:
        """Link a new device to its pending pairing, which moves to completed. One
        conditional UPDATE, so exactly one caller wins even when several processes race."""
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
