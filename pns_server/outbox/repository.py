"""The outbox's queries: claim due deliveries under a lease, load what a send needs, and
finish each one only while our lease holds (a reclaimed delivery belongs to its new owner)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Row, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import Approval, Client, Delivery, Device
from pns_server.states import DeliveryStatus


class DeliveryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(
        self, now: datetime, lease_until: datetime, limit: int, *, skip_locked: bool
    ) -> list[str]:
        """Lease up to `limit` due deliveries (queued and due, or sending with a lapsed
        lease) in one UPDATE; `skip_locked` (PostgreSQL) lets replicas claim side by side."""
        due = or_(
            and_(Delivery.status == DeliveryStatus.QUEUED, Delivery.next_attempt_at <= now),
            and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < now),
        )
        pick = select(Delivery.id).where(due).order_by(Delivery.next_attempt_at).limit(limit)
        if skip_locked:
            pick = pick.with_for_update(skip_locked=True)
        claimed = await self.session.execute(
            update(Delivery)
            .where(Delivery.id.in_(pick.scalar_subquery()))
            .values(
                status=DeliveryStatus.SENDING,
                lease_until=lease_until,
                attempts=Delivery.attempts + 1,
            )
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
        return list(claimed.scalars())

    async def load(
        self, delivery_ids: Sequence[str]
    ) -> Sequence[Row[Delivery, Device, Approval, str]]:
        """Each claimed delivery with its device, approval and the client's name."""
        rows = await self.session.execute(
            select(Delivery, Device, Approval, Client.name)
            .join(Device, Device.id == Delivery.device_id)
            .join(Approval, Approval.id == Delivery.approval_id)
            .join(Client, Client.id == Approval.client_id)
            .where(Delivery.id.in_(delivery_ids))
        )
        return rows.all()

    async def finish_sent(
        self, delivery_ids: Sequence[str], lease_until: datetime, at: datetime
    ) -> set[str]:
        """Mark delivered those still under this lease; returns their approvals' ids."""
        finished = await self.session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(delivery_ids),
                Delivery.status == DeliveryStatus.SENDING,
                Delivery.lease_until == lease_until,
            )
            .values(status=DeliveryStatus.SENT, last_error=None, lease_until=None, sent_at=at)
            .returning(Delivery.approval_id)
            .execution_options(synchronize_session=False)
        )
        return set(finished.scalars())

    async def finish(
        self,
        delivery_id: str,
        lease_until: datetime,
        status: DeliveryStatus,
        error: str | None,
        **extra: Any,
    ) -> bool:
        """Record an outcome if our lease still holds; False when another owner has it."""
        result = await self.session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.status == DeliveryStatus.SENDING,
                Delivery.lease_until == lease_until,
            )
            .values(status=status, last_error=error, lease_until=None, **extra)
            .execution_options(synchronize_session=False)
        )
        return int(cast(CursorResult[Any], result).rowcount) == 1

    async def retire_token(self, device_id: str, token: str) -> None:
        """Only the token we sent to: a token rotated meanwhile stays valid."""
        await self.session.execute(
            update(Device)
            .where(Device.id == device_id, Device.push_token == token)
            .values(push_status="invalid_token")
            .execution_options(synchronize_session=False)
        )

    async def approval_status(self, approval_id: str) -> str | None:
        status: str | None = await self.session.scalar(
            select(Approval.status).where(Approval.id == approval_id)
        )
        return status
