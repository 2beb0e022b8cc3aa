"""The outbox's queries: claim due deliveries under a lease together with what a send needs,
and finish each one only while our lease holds (a reclaimed delivery belongs to its new
owner)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Row, and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import Approval, Client, Delivery, Device
from pns_server.states import DeliveryStatus

# What a claimed delivery's send needs: the delivery, its device's push address, the
# approval (still pending? expired? its text) and the client's name.
CLAIMED_COLUMNS = (
    Delivery.id.label("delivery_id"),
    Delivery.attempts,
    Delivery.service,
    Device.id.label("device_id"),
    Device.push_token,
    Device.push_environment,
    Device.push_status,
    Device.push_p256dh,
    Device.push_auth,
    Approval.id.label("approval_id"),
    Approval.status.label("approval_status"),
    Approval.expires_at,
    Approval.username,
    Approval.hostname,
    Approval.action,
    Client.name.label("client_name"),
)
CLAIM_JOIN = (
    Device.id == Delivery.device_id,
    Approval.id == Delivery.approval_id,
    Client.id == Approval.client_id,
)


ClaimedRow = Row[*tuple[Any, ...]]

# Built once, with bind parameters: a statement object built per call costs its cache key
# on every execution, more CPU than the dispatcher's own work for one push.
_DUE = or_(
    and_(Delivery.status == DeliveryStatus.QUEUED, Delivery.next_attempt_at <= bindparam("now")),
    and_(Delivery.status == DeliveryStatus.SENDING, Delivery.lease_until < bindparam("now")),
)
_PICK = select(Delivery.id).where(_DUE).order_by(Delivery.next_attempt_at).limit(bindparam("limit"))
_LEASE = update(Delivery).values(
    status=DeliveryStatus.SENDING,
    lease_until=bindparam("new_lease"),
    attempts=Delivery.attempts + 1,
)
_CLAIM_POSTGRESQL = _LEASE.where(
    Delivery.id.in_(_PICK.with_for_update(skip_locked=True).scalar_subquery()), *CLAIM_JOIN
).returning(*CLAIMED_COLUMNS)
_CLAIM_IDS_SQLITE = _LEASE.where(Delivery.id.in_(_PICK.scalar_subquery())).returning(Delivery.id)
_CLAIMED_SQLITE = select(*CLAIMED_COLUMNS).where(
    Delivery.id.in_(bindparam("ids", expanding=True)), *CLAIM_JOIN
)
_FINISH = (
    update(Delivery)
    .where(
        Delivery.id.in_(bindparam("ids", expanding=True)),
        Delivery.status == DeliveryStatus.SENDING,
        Delivery.lease_until == bindparam("lease"),
    )
    .returning(Delivery.approval_id)
)
# The common outcome, whole: the other outcomes add their own values per call.
_FINISH_SENT = _FINISH.values(
    status=DeliveryStatus.SENT, last_error=None, lease_until=None, sent_at=bindparam("at")
)
_NO_SYNC = {"synchronize_session": False}


class DeliveryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(
        self, now: datetime, lease_until: datetime, limit: int, *, postgresql: bool
    ) -> Sequence[ClaimedRow]:
        """Lease up to `limit` due deliveries (queued and due, or sending with a lapsed
        lease) and return what their sends need (CLAIMED_COLUMNS), as plain rows.

        PostgreSQL: one statement, `UPDATE ... FROM` the device, approval and client rows,
        `RETURNING` them, over a `FOR UPDATE SKIP LOCKED` pick so replicas claim side by
        side. SQLite's RETURNING cannot name the joined tables, so there the claimed ids are
        read in a second statement of the same transaction (SQLite serialises writers)."""
        params = {"now": now, "limit": limit, "new_lease": lease_until}
        if postgresql:
            claimed = await self.session.execute(
                _CLAIM_POSTGRESQL, params, execution_options=_NO_SYNC
            )
            return claimed.all()
        ids = list(
            (
                await self.session.execute(_CLAIM_IDS_SQLITE, params, execution_options=_NO_SYNC)
            ).scalars()
        )
        if not ids:
            return []
        rows = await self.session.execute(_CLAIMED_SQLITE, {"ids": ids})
        return rows.all()

    async def finish_sent(
        self, delivery_ids: Sequence[str], lease_until: datetime, at: datetime
    ) -> set[str]:
        """Mark delivered those still under this lease; returns their approvals' ids."""
        finished = await self.session.execute(
            _FINISH_SENT,
            {"ids": list(delivery_ids), "lease": lease_until, "at": at},
            execution_options=_NO_SYNC,
        )
        return set(finished.scalars())

    async def finish_all(
        self,
        delivery_ids: Sequence[str],
        lease_until: datetime,
        status: DeliveryStatus,
        error: str | None,
        **extra: Any,
    ) -> set[str]:
        """One outcome for many deliveries, those still under this lease, in one UPDATE;
        returns their approvals' ids."""
        finished = await self.session.execute(
            _FINISH.values(status=status, last_error=error, lease_until=None, **extra),
            {"ids": list(delivery_ids), "lease": lease_until},
            execution_options=_NO_SYNC,
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

    async def approval_statuses(self, approval_ids: Iterable[str]) -> dict[str, str]:
        """Each approval's status (a deleted approval is absent)."""
        rows = await self.session.execute(
            select(Approval.id, Approval.status).where(Approval.id.in_(list(approval_ids)))
        )
        return {approval_id: status for approval_id, status in rows}
