from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.db import Executor
from pns_server.models import Client, Device


class ClientRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, client: Client) -> None:
        self.session.add(client)


_DEVICE_COUNTS = select(
    func.count(Device.id), func.count(Device.id).filter(Device.push_status == "ok")
).where(Device.client_id == bindparam("client"))


async def device_counts(executor: Executor, client_id: str) -> tuple[int, int]:
    """(active devices, devices that can receive a push)."""
    row = (await executor.execute(_DEVICE_COUNTS, {"client": client_id})).one()
    return int(row[0]), int(row[1])
