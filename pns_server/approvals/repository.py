"""Approval queries. Every state change is one conditional UPDATE on `status = 'pending'`,
so across any number of processes exactly one caller sees rowcount 1."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Update, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import Approval, Client, Delivery, Device
from pns_server.states import OPEN_DELIVERY, ApprovalStatus, DeliveryStatus


class ApprovalRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _rowcount(self, statement: Update) -> int:
        result = await self.session.execute(statement.execution_options(synchronize_session=False))
        return int(cast(CursorResult[Any], result).rowcount)

    # --- clients -------------------------------------------------------------------------

    async def lock_client(self, client_id: str) -> Client:
        """Serialise approval creation per client (SQLite's BEGIN IMMEDIATE already does)."""
        client = await self.session.scalar(
            select(Client)
            .where(Client.id == client_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        assert client is not None
        return client

    async def client_name(self, client_id: str) -> str:
        name = await self.session.scalar(select(Client.name).where(Client.id == client_id))
        return name or ""

    async def count_push(self, client_id: str) -> None:
        await self._rowcount(
            update(Client)
            .where(Client.id == client_id)
            .values(pushes_since_success=Client.pushes_since_success + 1)
        )

    async def reset_push_count(self, client_id: str) -> None:
        await self._rowcount(
            update(Client).where(Client.id == client_id).values(pushes_since_success=0)
        )

    async def lock_push(self, client_id: str, until: datetime) -> None:
        await self._rowcount(
            update(Client).where(Client.id == client_id).values(locked_until=until)
        )

    # --- devices -------------------------------------------------------------------------

    async def app_devices(self, client_id: str) -> Sequence[Device]:
        """App installs that can answer: by push or by polling."""
        return (
            await self.session.scalars(
                select(Device)
                .where(Device.client_id == client_id, Device.kind == "app")
                .order_by(Device.created_at)
            )
        ).all()

    # --- approvals -----------------------------------------------------------------------

    def add(self, approval: Approval, deliveries: Sequence[Delivery]) -> None:
        self.session.add(approval)
        self.session.add_all(deliveries)

    async def get(self, approval_id: str, client_id: str) -> Approval | None:
        return await self.session.scalar(
            select(Approval)
            .where(Approval.id == approval_id, Approval.client_id == client_id)
            .execution_options(populate_existing=True)
        )

    async def by_idempotency_key(self, client_id: str, key: str) -> Approval | None:
        return await self.session.scalar(
            select(Approval).where(Approval.client_id == client_id, Approval.idempotency_key == key)
        )

    async def pending_for_client(self, client_id: str, now: datetime) -> Sequence[Approval]:
        return (
            await self.session.scalars(
                select(Approval)
                .where(
                    Approval.client_id == client_id,
                    Approval.status == ApprovalStatus.PENDING,
                    Approval.expires_at > now,
                )
                .order_by(Approval.created_at.desc())
            )
        ).all()

    async def pending_ids(self, client_id: str) -> list[str]:
        rows = await self.session.scalars(
            select(Approval.id).where(
                Approval.client_id == client_id, Approval.status == ApprovalStatus.PENDING
            )
        )
        return list(rows)

    async def decide(self, approval_id: str, now: datetime, **values: Any) -> bool:
        """Move a live pending approval to a final state; False if someone else won."""
        changed = await self._rowcount(
            update(Approval)
            .where(
                Approval.id == approval_id,
                Approval.status == ApprovalStatus.PENDING,
                Approval.expires_at > now,
            )
            .values(decided_at=now, **values)
        )
        return changed == 1

    async def expire_if_due(self, approval_id: str, now: datetime) -> bool:
        changed = await self._rowcount(
            update(Approval)
            .where(
                Approval.id == approval_id,
                Approval.status == ApprovalStatus.PENDING,
                Approval.expires_at <= now,
            )
            .values(status=ApprovalStatus.EXPIRED, decided_at=Approval.expires_at)
        )
        return changed == 1

    async def due_for_expiry(self, now: datetime, limit: int) -> Sequence[tuple[str, str]]:
        rows = await self.session.execute(
            select(Approval.id, Approval.client_id)
            .where(Approval.status == ApprovalStatus.PENDING, Approval.expires_at <= now)
            .limit(limit)
        )
        return [(row[0], row[1]) for row in rows]

    # --- deliveries ----------------------------------------------------------------------

    async def drop_queued_deliveries(self, approval_id: str) -> None:
        """A decided approval needs no more pushes; one being sent right now finishes."""
        await self._rowcount(
            update(Delivery)
            .where(Delivery.approval_id == approval_id, Delivery.status == DeliveryStatus.QUEUED)
            .values(status=DeliveryStatus.DROPPED, lease_until=None)
        )

    async def delivery_summary(self, approval_id: str) -> tuple[int, int, int, str | None]:
        """(queued or being sent, sent, failed, the latest error)."""
        row = (
            await self.session.execute(
                select(
                    func.count(case((Delivery.status.in_(OPEN_DELIVERY), 1))),
                    func.count(case((Delivery.status == DeliveryStatus.SENT, 1))),
                    func.count(case((Delivery.status == DeliveryStatus.FAILED, 1))),
                ).where(Delivery.approval_id == approval_id)
            )
        ).one()
        last_error = await self.session.scalar(
            select(Delivery.last_error)
            .where(Delivery.approval_id == approval_id, Delivery.last_error.is_not(None))
            .order_by(Delivery.next_attempt_at.desc())
            .limit(1)
        )
        return int(row[0]), int(row[1]), int(row[2]), last_error
