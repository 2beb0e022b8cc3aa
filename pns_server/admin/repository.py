from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import CursorResult, and_, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import AuditEvent, Client, Device


class AdminRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def page_of_clients(
        self, limit: int, after: tuple[datetime, str] | None
    ) -> Sequence[Client]:
        query = select(Client).order_by(Client.created_at, Client.id).limit(limit)
        if after is not None:
            created_at, client_id = after
            query = query.where(
                or_(
                    Client.created_at > created_at,
                    and_(Client.created_at == created_at, Client.id > client_id),
                )
            )
        return (await self.session.scalars(query)).all()

    async def device_counts(self, client_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """client id -> (devices, devices that can receive a push), in one query."""
        if not client_ids:
            return {}
        rows = await self.session.execute(
            select(
                Device.client_id,
                func.count(Device.id),
                func.count(Device.id).filter(Device.push_status == "ok"),
            )
            .where(Device.client_id.in_(client_ids))
            .group_by(Device.client_id)
        )
        return {client_id: (int(total), int(push)) for client_id, total, push in rows.all()}

    async def get_client(self, client_id: str) -> Client | None:
        return await self.session.get(Client, client_id)

    async def get_device(self, device_id: str) -> Device | None:
        return await self.session.get(Device, device_id)

    async def unlock(self, client_id: str) -> bool:
        result = await self.session.execute(
            update(Client)
            .where(Client.id == client_id)
            .values(
                locked_until=None,
                pushes_since_success=0,
                otp_consecutive_failures=0,
                otp_failures_since_success=0,
                otp_lock_count=0,
                otp_locked_until=None,
            )
        )
        return cast(CursorResult[tuple[()]], result).rowcount == 1

    async def delete_client(self, client_id: str) -> bool:
        """The database cascades devices, pairings, approvals, deliveries, recovery codes."""
        result = await self.session.execute(delete(Client).where(Client.id == client_id))
        return cast(CursorResult[tuple[()]], result).rowcount == 1

    async def audit_events(
        self, client_id: str | None, limit: int, before_id: int | None
    ) -> Sequence[AuditEvent]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if client_id is not None:
            query = query.where(AuditEvent.client_id == client_id)
        if before_id is not None:
            query = query.where(AuditEvent.id < before_id)
        return (await self.session.scalars(query)).all()
