"""Approval queries. Every state change is one conditional UPDATE on `status = 'pending'`,
so across any number of processes exactly one caller sees rowcount 1."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Row,
    ScalarSelect,
    String,
    Update,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from pns_server.models import Approval, Base, Client, Delivery, Device
from pns_server.states import OPEN_DELIVERY, ApprovalStatus, DeliveryStatus

# What creating an approval reads of each app device: id, push_status, push_token, service.
AppDevice = Row[str, str, str | None, str | None]


class Summary(NamedTuple):
    """An approval's deliveries: queued or being sent, sent, failed, the latest error."""

    queued: int
    sent: int
    failed: int
    last_error: str | None


def _count(
    approval_id: ColumnElement[str] | InstrumentedAttribute[str], *status: str
) -> ScalarSelect[int]:
    return (
        select(func.count())
        .where(Delivery.approval_id == approval_id, Delivery.status.in_(status))
        .scalar_subquery()
    )


def _summary_columns(
    approval_id: ColumnElement[str] | InstrumentedAttribute[str],
) -> tuple[ScalarSelect[Any], ...]:
    """The delivery summary as scalar subqueries, to ride along in one statement with the
    approval itself (or alone): one round trip instead of one per figure."""
    last_error = (
        select(Delivery.last_error)
        .where(Delivery.approval_id == approval_id, Delivery.last_error.is_not(None))
        .order_by(Delivery.next_attempt_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        _count(approval_id, *OPEN_DELIVERY),
        _count(approval_id, DeliveryStatus.SENT),
        _count(approval_id, DeliveryStatus.FAILED),
        last_error,
    )


def _summary(values: Sequence[Any]) -> Summary:
    queued, sent, failed, last_error = values
    return Summary(int(queued or 0), int(sent or 0), int(failed or 0), last_error)


# The statements every login runs are built once, with named parameters, and reused:
# building a statement and its cache key costs more Python than running it does. (A
# parameter may not share a column's name in an UPDATE, hence `approval`, `client`.)
_APPROVAL_ID = bindparam("approval", type_=String)
_OF_CLIENT = (Approval.id == _APPROVAL_ID, Approval.client_id == bindparam("client"))
_LIVE = (
    Approval.id == _APPROVAL_ID,
    Approval.status == ApprovalStatus.PENDING,
    Approval.expires_at > bindparam("now"),
)
_GET = select(Approval).where(*_OF_CLIENT)
_WITH_SUMMARY = select(Approval, *_summary_columns(Approval.id)).where(*_OF_CLIENT)
_WITH_CLIENT_NAME = (
    select(Approval, Client.name).join(Client, Client.id == Approval.client_id).where(*_OF_CLIENT)
)
_SUMMARY = select(*_summary_columns(_APPROVAL_ID))
_QUEUED = _count(_APPROVAL_ID, DeliveryStatus.QUEUED)
_PENDING_FOR_CLIENT = (
    select(Approval, Client.name)
    .join(Client, Client.id == Approval.client_id)
    .where(
        Approval.client_id == bindparam("client"),
        Approval.status == ApprovalStatus.PENDING,
        Approval.expires_at > bindparam("now"),
    )
    .order_by(Approval.created_at.desc())
)
_RESET_PUSH_COUNT = (
    update(Client).where(Client.id == bindparam("client")).values(pushes_since_success=0)
)
_DROP_QUEUED = (
    update(Delivery)
    .where(Delivery.approval_id == _APPROVAL_ID, Delivery.status == DeliveryStatus.QUEUED)
    .values(status=DeliveryStatus.DROPPED, lease_until=None)
)
# Creating an approval: plain rows and Core statements, no entity for the unit of work.
_LOCK_CLIENT = (
    select(Client.locked_until, Client.pushes_since_success)
    .where(Client.id == bindparam("client"))
    .with_for_update()
)
_APP_DEVICES = (
    select(Device.id, Device.push_status, Device.push_token, Device.push_service)
    .where(Device.client_id == bindparam("client"), Device.kind == "app")
    .order_by(Device.created_at)
)
_PENDING_IDS = select(Approval.id).where(
    Approval.client_id == bindparam("client"), Approval.status == ApprovalStatus.PENDING
)
_COUNT_PUSH = (
    update(Client)
    .where(Client.id == bindparam("client"))
    .values(pushes_since_success=Client.pushes_since_success + 1)
)
_TOUCH_DEVICE = (
    update(Device).where(Device.id == bindparam("device")).values(last_used_at=bindparam("at"))
)
_INSERT_APPROVAL = insert(Base.metadata.tables[Approval.__tablename__])
_INSERT_DELIVERY = insert(Base.metadata.tables[Delivery.__tablename__])
_REFRESH = {"populate_existing": True}
_NO_SYNC = {"synchronize_session": False}
_NO_SYNC_REFRESH = {"synchronize_session": False, "populate_existing": True}


@functools.cache
def _decide(fields: frozenset[str], shape: str) -> Update:
    """The conditional UPDATE that decides a live pending approval, setting `fields` (each
    a parameter named `set_<field>`), one per shape: `rowcount` (returns nothing), `queued`
    (returns how many deliveries are still queued), `row` (this client's approval only;
    returns the row as decided and that count). Built once per shape."""
    where = (*_LIVE, _OF_CLIENT[1]) if shape == "row" else _LIVE
    statement = (
        update(Approval)
        .where(*where)
        .values(decided_at=bindparam("now"), **{f: bindparam(f"set_{f}") for f in fields})
    )
    if shape == "queued":
        return statement.returning(_QUEUED)
    if shape == "row":
        return statement.returning(Approval, _QUEUED)
    return statement


def _decide_params(approval_id: str, now: datetime, values: dict[str, Any]) -> dict[str, Any]:
    params = {f"set_{field}": value for field, value in values.items()}
    params.update(approval=approval_id, now=now)
    return params


class ApprovalRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _rowcount(self, statement: Update) -> int:
        result = await self.session.execute(statement.execution_options(synchronize_session=False))
        return int(cast(CursorResult[Any], result).rowcount)

    # --- clients -------------------------------------------------------------------------

    async def lock_client(self, client_id: str) -> Row[datetime | None, int]:
        """Serialise approval creation per client (SQLite's BEGIN IMMEDIATE already does);
        the row's `locked_until` and `pushes_since_success` as they are under the lock."""
        return (await self.session.execute(_LOCK_CLIENT, {"client": client_id})).one()

    async def count_push(self, client_id: str) -> None:
        await self.session.execute(_COUNT_PUSH, {"client": client_id}, execution_options=_NO_SYNC)

    async def reset_push_count(self, client_id: str) -> None:
        await self.session.execute(
            _RESET_PUSH_COUNT, {"client": client_id}, execution_options=_NO_SYNC
        )

    async def lock_push(self, client_id: str, until: datetime) -> None:
        await self._rowcount(
            update(Client).where(Client.id == client_id).values(locked_until=until)
        )

    # --- devices -------------------------------------------------------------------------

    async def touch_device(self, device_id: str, at: datetime) -> None:
        """The device's `last_used_at`, as one UPDATE (no entity flushed at commit)."""
        await self.session.execute(
            _TOUCH_DEVICE, {"device": device_id, "at": at}, execution_options=_NO_SYNC
        )

    async def app_devices(self, client_id: str) -> Sequence[AppDevice]:
        """App installs that can answer (by push or by polling): id and push fields."""
        return (await self.session.execute(_APP_DEVICES, {"client": client_id})).all()

    # --- approvals -----------------------------------------------------------------------

    async def insert(self, approval: dict[str, Any], deliveries: Sequence[dict[str, Any]]) -> None:
        """The new approval and its deliveries, as INSERTs (one for all the deliveries)."""
        await self.session.execute(_INSERT_APPROVAL, approval)
        if deliveries:
            await self.session.execute(_INSERT_DELIVERY, list(deliveries))

    async def get(self, approval_id: str, client_id: str) -> Approval | None:
        return await self.session.scalar(
            _GET, {"approval": approval_id, "client": client_id}, execution_options=_REFRESH
        )

    async def with_summary(
        self, approval_id: str, client_id: str
    ) -> tuple[Approval, Summary] | None:
        """The approval and its delivery summary in one statement (what a status read or a
        woken long-poll needs), or None when this client has no such approval."""
        params = {"approval": approval_id, "client": client_id}
        row = (
            await self.session.execute(_WITH_SUMMARY, params, execution_options=_REFRESH)
        ).first()
        if row is None:
            return None
        return row[0], _summary(row[1:])

    async def with_client_name(
        self, approval_id: str, client_id: str
    ) -> tuple[Approval, str] | None:
        """The approval and its client's name in one statement (what the phone is shown)."""
        params = {"approval": approval_id, "client": client_id}
        row = (
            await self.session.execute(_WITH_CLIENT_NAME, params, execution_options=_REFRESH)
        ).first()
        return None if row is None else (row[0], row[1] or "")

    async def by_idempotency_key(self, client_id: str, key: str) -> Approval | None:
        return await self.session.scalar(
            select(Approval).where(Approval.client_id == client_id, Approval.idempotency_key == key)
        )

    async def pending_for_client(
        self, client_id: str, now: datetime
    ) -> Sequence[tuple[Approval, str]]:
        """Live pending approvals, newest first, each with its client's name (one join)."""
        rows = await self.session.execute(_PENDING_FOR_CLIENT, {"client": client_id, "now": now})
        return [(row[0], row[1] or "") for row in rows]

    async def pending_ids(self, client_id: str) -> list[str]:
        rows = await self.session.scalars(_PENDING_IDS, {"client": client_id})
        return list(rows)

    async def decide(self, approval_id: str, now: datetime, **values: Any) -> bool:
        """Move a live pending approval to a final state; False if someone else won."""
        result = await self.session.execute(
            _decide(frozenset(values), "rowcount"),
            _decide_params(approval_id, now, values),
            execution_options=_NO_SYNC,
        )
        return int(cast(CursorResult[Any], result).rowcount) == 1

    async def decide_counting_queued(
        self, approval_id: str, now: datetime, **values: Any
    ) -> int | None:
        """`decide` that also returns, from the same statement, how many of the approval's
        deliveries are still queued (usually none: the push went out before the answer),
        so dropping them costs a statement only when there are some. None if someone else
        won."""
        row = (
            await self.session.execute(
                _decide(frozenset(values), "queued"),
                _decide_params(approval_id, now, values),
                execution_options=_NO_SYNC,
            )
        ).first()
        return None if row is None else int(row[0])

    async def decide_returning(
        self, approval_id: str, client_id: str, now: datetime, **values: Any
    ) -> tuple[Approval, int] | None:
        """`decide` for this client's approval, returning the row as decided and how many
        of its deliveries are still queued, in one statement; None if it was not a live
        pending approval of this client (unknown, decided or due to expire)."""
        params = _decide_params(approval_id, now, values)
        params["client"] = client_id
        row = (
            await self.session.execute(
                _decide(frozenset(values), "row"), params, execution_options=_NO_SYNC_REFRESH
            )
        ).first()
        return None if row is None else (row[0], int(row[1]))

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

    async def expire_returning(
        self, approval_id: str, client_id: str, now: datetime
    ) -> Approval | None:
        """`expire_if_due` that returns the expired row (no re-read); None if not due."""
        expired: Approval | None = await self.session.scalar(
            update(Approval)
            .where(
                Approval.id == approval_id,
                Approval.client_id == client_id,
                Approval.status == ApprovalStatus.PENDING,
                Approval.expires_at <= now,
            )
            .values(status=ApprovalStatus.EXPIRED, decided_at=Approval.expires_at)
            .returning(Approval)
            .execution_options(synchronize_session=False, populate_existing=True)
        )
        return expired

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
        await self.session.execute(
            _DROP_QUEUED, {"approval": approval_id}, execution_options=_NO_SYNC
        )

    async def delivery_summary(self, approval_id: str) -> Summary:
        row = (await self.session.execute(_SUMMARY, {"approval": approval_id})).one()
        return _summary(row)
