"""The outbox's queries: claim due deliveries under a lease together with what a send needs,
and finish each one only while our lease holds (a reclaimed delivery belongs to its new
owner).

They run on a unit on the driver connection (`Database.unit`), so each is a Core statement
on the tables, built once here with bind parameters. A list of ids goes into an IN of fixed
binds: one statement per size class (`ID_SLOTS`), the binds past the list's end left NULL
(`id IN ('a', 'b', NULL, NULL)` matches 'a' and 'b' only), so a batch of any size runs one
of a few statements compiled once per dialect."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    Update,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)

from pns_server.driver import DriverUnit, ValueList
from pns_server.models import Approval, Base, Client, Delivery, Device
from pns_server.realtime.postgres import CHANNEL as NOTIFY_CHANNEL
from pns_server.rows import ClaimedRow
from pns_server.states import DeliveryStatus
from pns_server.topics import PUSH_SENT, approval_topic_around

_deliveries = Base.metadata.tables[Delivery.__tablename__]
_devices = Base.metadata.tables[Device.__tablename__]
_approvals = Base.metadata.tables[Approval.__tablename__]
_clients = Base.metadata.tables[Client.__tablename__]


# What a claim returns: the fields of `rows.ClaimedRow` (and `rows.BornRow`), in order.
CLAIMED_COLUMNS = (
    _deliveries.c.id.label("delivery_id"),
    _deliveries.c.attempts,
    _deliveries.c.service,
    _devices.c.id.label("device_id"),
    _devices.c.push_token,
    _devices.c.push_environment,
    _devices.c.push_status,
    _devices.c.push_p256dh,
    _devices.c.push_auth,
    _approvals.c.id.label("approval_id"),
    _approvals.c.status.label("approval_status"),
    _approvals.c.expires_at,
    _approvals.c.username,
    _approvals.c.hostname,
    _approvals.c.action,
    _clients.c.name.label("client_name"),
)
CLAIM_JOIN = (
    _devices.c.id == _deliveries.c.device_id,
    _approvals.c.id == _deliveries.c.approval_id,
    _clients.c.id == _approvals.c.client_id,
)

# -- lists of ids -----------------------------------------------------------------------
# Few classes: each is a prepared statement per connection, and a NULL bind costs nothing.
ID_SLOTS = (1, 4, 16, 64, 256)
_IDS = ValueList("id", ID_SLOTS)


# -- claim ------------------------------------------------------------------------------
_DUE = or_(
    and_(
        _deliveries.c.status == DeliveryStatus.QUEUED,
        _deliveries.c.next_attempt_at <= bindparam("now"),
    ),
    and_(
        _deliveries.c.status == DeliveryStatus.SENDING,
        _deliveries.c.lease_until < bindparam("now"),
    ),
)
_PICK = (
    select(_deliveries.c.id)
    .where(_DUE)
    .order_by(_deliveries.c.next_attempt_at)
    .limit(bindparam("limit"))
)
_LEASE = update(_deliveries).values(
    status=DeliveryStatus.SENDING,
    lease_until=bindparam("new_lease"),
    attempts=_deliveries.c.attempts + 1,
)
_CLAIM_POSTGRESQL = _LEASE.where(
    _deliveries.c.id.in_(_PICK.with_for_update(skip_locked=True).scalar_subquery()), *CLAIM_JOIN
).returning(*CLAIMED_COLUMNS)
_CLAIM_IDS_SQLITE = _LEASE.where(_deliveries.c.id.in_(_PICK.scalar_subquery())).returning(
    _deliveries.c.id
)
_CLAIMED_SQLITE = _IDS.statements(
    lambda ids: select(*CLAIMED_COLUMNS).where(ids, *CLAIM_JOIN), _deliveries.c.id
)

# -- finish -----------------------------------------------------------------------------
_UNDER_LEASE = (
    _deliveries.c.status == DeliveryStatus.SENDING,
    _deliveries.c.lease_until == bindparam("lease"),
)


def _finish_sent(ids: ColumnElement[bool]) -> Update:
    """The common outcome, whole; the others name their status and error."""
    return (
        update(_deliveries)
        .where(ids, *_UNDER_LEASE)
        .values(
            status=DeliveryStatus.SENT, last_error=None, lease_until=None, sent_at=bindparam("at")
        )
        .returning(_deliveries.c.approval_id)
    )


def _finish_sent_notifying(ids: ColumnElement[bool]) -> Select[Any]:
    """PostgreSQL: `_finish_sent` that also NOTIFYs every process of each approval whose
    push it marks sent (`approval_topic(id, PUSH_SENT)`, built from `topic_before` and
    `topic_after`), delivered by its own commit: a statement that needs no transaction."""
    sent = _finish_sent(ids).cte("sent")
    topic = bindparam("topic_before", type_=String) + sent.c.approval_id
    topic = topic + bindparam("topic_after", type_=String)
    notify = func.pg_notify(bindparam("notify_channel", type_=String), topic)
    return select(sent.c.approval_id, notify.label("notified"))


_FINISH_SENT = _IDS.statements(_finish_sent, _deliveries.c.id)
_FINISH_SENT_NOTIFYING = _IDS.statements(_finish_sent_notifying, _deliveries.c.id)
_FINISH_ALL = _IDS.statements(
    lambda ids: (
        update(_deliveries)
        .where(ids, *_UNDER_LEASE)
        .values(status=bindparam("status"), last_error=bindparam("error"), lease_until=None)
        .returning(_deliveries.c.approval_id)
    ),
    _deliveries.c.id,
)
_FINISH_ONE = (
    update(_deliveries)
    .where(_deliveries.c.id == bindparam("delivery"), *_UNDER_LEASE)
    .values(status=bindparam("status"), last_error=bindparam("error"), lease_until=None)
)
_QUEUE_AGAIN = _FINISH_ONE.values(next_attempt_at=bindparam("next_at"))
_RETIRE_TOKEN = (
    update(_devices)
    .where(_devices.c.id == bindparam("device"), _devices.c.push_token == bindparam("token"))
    .values(push_status="invalid_token")
)
_APPROVAL_STATUSES = _IDS.statements(
    lambda ids: select(_approvals.c.id, _approvals.c.status).where(ids), _approvals.c.id
)


class DeliveryRepository:
    def __init__(self, unit: DriverUnit) -> None:
        self.unit = unit

    async def claim(self, now: datetime, lease_until: datetime, limit: int) -> list[ClaimedRow]:
        """Lease up to `limit` due deliveries (queued and due, or sending with a lapsed
        lease) and return what their sends need (CLAIMED_COLUMNS), as plain rows.

        PostgreSQL: one statement, `UPDATE ... FROM` the device, approval and client rows,
        `RETURNING` them, over a `FOR UPDATE SKIP LOCKED` pick so replicas claim side by
        side. SQLite's RETURNING cannot name the joined tables, so there the claimed ids are
        read in a second statement of the same transaction (SQLite serialises writers)."""
        params = {"now": now, "limit": limit, "new_lease": lease_until}
        if self.unit.postgres:
            return (await self.unit.execute(_CLAIM_POSTGRESQL, params)).all()
        ids = await self.unit.scalars(_CLAIM_IDS_SQLITE, params)
        rows: list[ClaimedRow] = []
        for size, named in _IDS.chunks(ids):
            rows += (await self.unit.execute(_CLAIMED_SQLITE[size], named)).all()
        return rows

    async def finish_sent(
        self, delivery_ids: Sequence[str], lease_until: datetime, at: datetime
    ) -> set[str]:
        """Mark delivered those still under this lease; returns their approvals' ids."""
        finished: set[str] = set()
        for size, named in _IDS.chunks(delivery_ids):
            params = {**named, "lease": lease_until, "at": at}
            finished.update(await self.unit.scalars(_FINISH_SENT[size], params))
        return finished

    async def finish_sent_notifying(
        self, delivery_ids: Sequence[str], lease_until: datetime, at: datetime
    ) -> set[str]:
        """PostgreSQL, each statement alone (`Database.unit_alone`): `finish_sent`, with the
        NOTIFY of the approvals' `PUSH_SENT` topic in the statement itself, so the finish is
        one round trip instead of three (BEGIN, the UPDATE, the NOTIFY with the COMMIT).
        Sent again on a new connection when the first finds its connection dead, it may run
        twice: the second finds nothing under the lease and changes nothing, and the first's
        NOTIFY, if it committed, reached every process, this one included."""
        before, after = approval_topic_around(PUSH_SENT)
        finished: set[str] = set()
        for size, named in _IDS.chunks(delivery_ids):
            params = {
                **named,
                "lease": lease_until,
                "at": at,
                "notify_channel": NOTIFY_CHANNEL,
                "topic_before": before,
                "topic_after": after,
            }
            finished.update(await self.unit.scalars(_FINISH_SENT_NOTIFYING[size], params))
        return finished

    async def finish_all(
        self,
        delivery_ids: Sequence[str],
        lease_until: datetime,
        status: DeliveryStatus,
        error: str | None,
    ) -> set[str]:
        """One outcome for many deliveries, those still under this lease, in one UPDATE;
        returns their approvals' ids."""
        finished: set[str] = set()
        for size, named in _IDS.chunks(delivery_ids):
            params = {**named, "lease": lease_until, "status": status, "error": error}
            finished.update(await self.unit.scalars(_FINISH_ALL[size], params))
        return finished

    async def finish(
        self,
        delivery_id: str,
        lease_until: datetime,
        status: DeliveryStatus,
        error: str | None,
        *,
        next_attempt_at: datetime | None = None,
    ) -> bool:
        """Record an outcome if our lease still holds (with `next_attempt_at`: when to try
        again); False when another owner has it."""
        params: dict[str, Any] = {
            "delivery": delivery_id,
            "lease": lease_until,
            "status": status,
            "error": error,
        }
        if next_attempt_at is None:
            statement = _FINISH_ONE
        else:
            statement, params["next_at"] = _QUEUE_AGAIN, next_attempt_at
        return (await self.unit.execute(statement, params)).rowcount == 1

    async def retire_token(self, device_id: str, token: str) -> None:
        """Only the token we sent to: a token rotated meanwhile stays valid."""
        await self.unit.execute(_RETIRE_TOKEN, {"device": device_id, "token": token})

    async def approval_statuses(self, approval_ids: Iterable[str]) -> dict[str, str]:
        """Each approval's status (a deleted approval is absent)."""
        statuses: dict[str, str] = {}
        for size, named in _IDS.chunks(list(approval_ids)):
            for approval_id, status in await self.unit.execute(_APPROVAL_STATUSES[size], named):
                statuses[approval_id] = status
        return statuses
