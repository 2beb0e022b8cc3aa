"""Approval queries. Every state change is one conditional UPDATE on `status = 'pending'`,
so across any number of processes exactly one caller sees rowcount 1.

They run in units on the driver connection (`Database.unit`, `unit_read`): Core statements
on the tables, each built once with named parameters (building a statement and compiling
it cost more Python than running it does). Rows come back as named tuples with the
columns' names, the same attributes an `Approval` entity has (`ApprovalRow`)."""

from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import (
    ColumnElement,
    Insert,
    Integer,
    ScalarSelect,
    Select,
    String,
    Text,
    Update,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from pns_server.audit import AUDIT_FIELDS, AUDIT_TABLE, INSERT_AUDIT, audit_binds, audit_params
from pns_server.driver import DriverUnit
from pns_server.models import Approval, Base, Client, Delivery, Device
from pns_server.realtime.postgres import CHANNEL as NOTIFY_CHANNEL
from pns_server.rows import ApprovalRow, DeviceRow
from pns_server.states import OPEN_DELIVERY, ApprovalStatus, DeliveryStatus

approvals = Base.metadata.tables[Approval.__tablename__]
clients = Base.metadata.tables[Client.__tablename__]
deliveries = Base.metadata.tables[Delivery.__tablename__]
devices = Base.metadata.tables[Device.__tablename__]


class AppDevice(Protocol):
    """What creating an approval reads of each app device."""

    @property
    def id(self) -> str: ...
    @property
    def push_status(self) -> str: ...
    @property
    def push_token(self) -> str | None: ...
    @property
    def push_service(self) -> str | None: ...
    @property
    def push_environment(self) -> str | None: ...
    @property
    def push_p256dh(self) -> str | None: ...
    @property
    def push_auth(self) -> str | None: ...


class Summary(NamedTuple):
    """An approval's deliveries: queued or being sent, sent, failed, the latest error."""

    queued: int
    sent: int
    failed: int
    last_error: str | None


def _count(approval_id: ColumnElement[str], *status: str) -> ScalarSelect[int]:
    """The approval's deliveries in `status`: found by the approval alone, then counted by
    status. With the status in the WHERE clause, SQLite's planner (it keeps no statistics)
    chose the (status, next_attempt_at) index and read every delivery ever sent, slower
    with every login (0.18 ms per read at 4,000 sent, 0.85 at 20,000)."""
    # One bound value per status, not an expanding IN: the statement compiles once.
    in_status = (
        deliveries.c.status == status[0]
        if len(status) == 1
        else deliveries.c.status.in_([bindparam(f"status_{s}", s) for s in status])
    )
    return (
        select(func.count().filter(in_status))
        .where(deliveries.c.approval_id == approval_id)
        .scalar_subquery()
    )


# The summary's columns ride along with the approval's, under these names.
_SUMMARY_KEYS = ("delivery_queued", "delivery_sent", "delivery_failed", "delivery_last_error")


def _summary_columns(approval_id: ColumnElement[str]) -> tuple[ColumnElement[Any], ...]:
    """The delivery summary as scalar subqueries, to ride along in one statement with the
    approval itself (or alone): one round trip instead of one per figure."""
    last_error = (
        select(deliveries.c.last_error)
        .where(deliveries.c.approval_id == approval_id, deliveries.c.last_error.is_not(None))
        .order_by(deliveries.c.next_attempt_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    figures = (
        _count(approval_id, *OPEN_DELIVERY),
        _count(approval_id, DeliveryStatus.SENT),
        _count(approval_id, DeliveryStatus.FAILED),
        last_error,
    )
    return tuple(f.label(k) for f, k in zip(figures, _SUMMARY_KEYS, strict=True))


def _summary(row: Any) -> Summary:
    queued, sent, failed, last_error = (getattr(row, key) for key in _SUMMARY_KEYS)
    return Summary(int(queued or 0), int(sent or 0), int(failed or 0), last_error)


# A parameter may not share a column's name in an UPDATE, hence `approval`, `client`.
_APPROVAL_ID = bindparam("approval", type_=String)
_CLIENT_ID = bindparam("client", type_=String)
_OF_CLIENT = (approvals.c.id == _APPROVAL_ID, approvals.c.client_id == _CLIENT_ID)
_LIVE = (
    approvals.c.id == _APPROVAL_ID,
    approvals.c.status == ApprovalStatus.PENDING,
    approvals.c.expires_at > bindparam("now"),
)
_DUE = (
    approvals.c.id == _APPROVAL_ID,
    approvals.c.status == ApprovalStatus.PENDING,
    approvals.c.expires_at <= bindparam("now"),
)
_EXPIRE = {"status": ApprovalStatus.EXPIRED, "decided_at": approvals.c.expires_at}
_GET = select(*approvals.c).where(*_OF_CLIENT)
_WITH_SUMMARY = select(*approvals.c, *_summary_columns(approvals.c.id)).where(*_OF_CLIENT)
# A device's answer: the answering device by its token's hash, with the approval it answers
# when that approval is its own client's (NULLs otherwise), in one read. The approval's
# columns are labelled (`approval_<name>`): a device has columns of the same names.
_DEVICE_WITH_APPROVAL = (
    select(*devices.c, *(column.label(f"approval_{column.name}") for column in approvals.c))
    .select_from(
        devices.outerjoin(
            approvals,
            (approvals.c.id == _APPROVAL_ID) & (approvals.c.client_id == devices.c.client_id),
        )
    )
    .where(devices.c.token_hash == bindparam("token_hash"))
)
_DEVICE_FIELDS = len(devices.c)
# The same with the client's name, which is what the phone is shown: the detail a phone
# asks for, with the device it authenticates, in one read.
_DEVICE_WITH_NAMED_APPROVAL = _DEVICE_WITH_APPROVAL.add_columns(
    clients.c.name.label("client_name")
).outerjoin(clients, clients.c.id == approvals.c.client_id)


def _row_class(table: Any) -> Any:
    """A named tuple with `table`'s column names (typed by `rows.DeviceRow` and the like)."""
    return namedtuple(f"{table.name}_row", [column.name for column in table.c])


_DeviceRow = _row_class(devices)
_ApprovalRow = _row_class(approvals)


def _device_and_approval(row: Sequence[Any]) -> tuple[DeviceRow, ApprovalRow | None]:
    """A row of the device's columns, then the approval's (NULL: not its client's, or none)."""
    device: DeviceRow = _DeviceRow._make(row[:_DEVICE_FIELDS])
    if row[_DEVICE_FIELDS] is None:  # the approval's id
        return device, None
    approval: ApprovalRow = _ApprovalRow._make(row[_DEVICE_FIELDS:])
    return device, approval


# The approval with its client's name (what the phone is shown).
_NAMED = select(*approvals.c, clients.c.name.label("client_name")).join_from(
    approvals, clients, clients.c.id == approvals.c.client_id
)
_SUMMARY = select(*_summary_columns(_APPROVAL_ID))
_QUEUED = _count(_APPROVAL_ID, DeliveryStatus.QUEUED).label("queued")
_PENDING_FOR_CLIENT = _NAMED.where(
    approvals.c.client_id == _CLIENT_ID,
    approvals.c.status == ApprovalStatus.PENDING,
    approvals.c.expires_at > bindparam("now"),
).order_by(approvals.c.created_at.desc())
_BY_IDEMPOTENCY_KEY = select(*approvals.c).where(
    approvals.c.client_id == _CLIENT_ID, approvals.c.idempotency_key == bindparam("key")
)
_EXPIRE_IF_DUE = update(approvals).where(*_DUE).values(**_EXPIRE)
_EXPIRE_RETURNING = (
    update(approvals)
    .where(*_DUE, approvals.c.client_id == _CLIENT_ID)
    .values(**_EXPIRE)
    .returning(*approvals.c)
)
_DUE_FOR_EXPIRY = (
    select(approvals.c.id, approvals.c.client_id)
    .where(approvals.c.status == ApprovalStatus.PENDING, approvals.c.expires_at <= bindparam("now"))
    .limit(bindparam("limit", type_=Integer))
)
_RESET_PUSH_COUNT = update(clients).where(clients.c.id == _CLIENT_ID).values(pushes_since_success=0)
_LOCK_PUSH = (
    update(clients).where(clients.c.id == _CLIENT_ID).values(locked_until=bindparam("until"))
)
_DROP_QUEUED = (
    update(deliveries)
    .where(deliveries.c.approval_id == _APPROVAL_ID, deliveries.c.status == DeliveryStatus.QUEUED)
    .values(status=DeliveryStatus.DROPPED, lease_until=None)
)
# Creating an approval.
# What a creation reads beside its caller's row, in one statement (one round trip on
# PostgreSQL): the app devices that can answer, in pairing order, and the
# client's pending approvals it supersedes. `row` tells them apart.
_PUSH_FIELDS = (
    devices.c.id,
    devices.c.push_status,
    devices.c.push_token,
    devices.c.push_service,
    devices.c.push_environment,
    devices.c.push_p256dh,
    devices.c.push_auth,
)
_APP_DEVICE_ROWS = select(
    literal("device").label("row"), *_PUSH_FIELDS, devices.c.created_at.label("at")
).where(devices.c.client_id == _CLIENT_ID, devices.c.kind == "app")
_PENDING_ROWS = select(
    literal("pending").label("row"),
    approvals.c.id,
    *(cast(null(), field.type).label(field.name) for field in _PUSH_FIELDS[1:]),
    approvals.c.created_at.label("at"),
).where(approvals.c.client_id == _CLIENT_ID, approvals.c.status == ApprovalStatus.PENDING)
_devices_and_pending = union_all(_APP_DEVICE_ROWS, _PENDING_ROWS)
_APP_DEVICES_AND_PENDING = _devices_and_pending.order_by(_devices_and_pending.selected_columns.at)
_COUNT_PUSH = (
    update(clients)
    .where(clients.c.id == _CLIENT_ID)
    .values(pushes_since_success=clients.c.pushes_since_success + 1)
)
_TOUCH_DEVICE = (
    update(devices).where(devices.c.id == bindparam("device")).values(last_used_at=bindparam("at"))
)
_INSERT_APPROVAL = insert(approvals)
_INSERT_DELIVERY = insert(deliveries)
# What differs between the deliveries of one new approval; the rest is the approval's.
_DELIVERY_ROWS = ("id", "device_id", "service")


@functools.cache
def _decide_answered(fields: frozenset[str], reset: bool, notify: int = 0) -> Select[Any]:
    """PostgreSQL: `_decide(fields, "queued")` for a device's answer and, only where it
    wins, what follows it: the device's `last_used_at`, the client's push count back to 0
    (`reset`, an approval), the audit row and, for a statement run alone (`notify` topics,
    `notify_0`...), the NOTIFY of every process, which its commit delivers; one statement,
    not four round trips. The statement returns the count of queued deliveries, or no row
    when someone else won (then its select list, the NOTIFY included, is never run)."""
    decided = _decide(fields, "queued").cte("decided")
    won = exists(select(decided.c.queued))
    touched = (
        update(devices)
        .where(devices.c.id == bindparam("answering_device"), won)
        .values(last_used_at=bindparam("now"))
        .cte("touched")
    )
    audited = (
        insert(AUDIT_TABLE)
        .from_select(list(AUDIT_FIELDS), select(*audit_binds().values()).where(won))
        .cte("audited")
    )
    ctes = [touched, audited]
    if reset:
        reset_count = (
            update(clients)
            .where(clients.c.id == bindparam("answering_client"), won)
            .values(pushes_since_success=0)
            .cte("reset")
        )
        ctes.append(reset_count)
    notified = (
        func.pg_notify(bindparam("notify_channel"), bindparam(f"notify_{i}")).label(f"notify_{i}")
        for i in range(notify)
    )
    return select(decided.c.queued, *notified).add_cte(*ctes)


@functools.cache
def _create_all(approval_fields: frozenset[str]) -> Insert:
    """PostgreSQL: a new approval with its deliveries, the client's push count and the
    audit row in one statement (four round trips otherwise). Each write is a data-modifying
    CTE, which PostgreSQL runs whether or not the statement reads it; the foreign keys are
    checked at its end, when the approval exists. The deliveries come as arrays of what
    differs between them (`unnest`), so one statement serves any number. Parameters are
    prefixed: one named like a column would be taken for a value to set (see the OTP
    claim). The arrays are `text[]`, not `varchar[]`: asyncpg decodes text[] itself but
    asks the server about any other array type, once per connection (a catalog query of
    10-40 ms under load, on each new connection's first login). Built once per set of
    approval columns."""
    values = {f: bindparam(f"a_{f}", type_=approvals.c[f].type) for f in sorted(approval_fields)}
    new_approval = insert(approvals).values(values).cte("new_approval")
    rows = (
        func.unnest(*(bindparam(f"d_{f}", type_=ARRAY(Text)) for f in _DELIVERY_ROWS))
        .table_valued(*_DELIVERY_ROWS)
        .render_derived("delivery_rows")
    )
    now = bindparam("a_created_at", type_=approvals.c.created_at.type)
    queued = (
        insert(deliveries)
        .from_select(
            [
                *_DELIVERY_ROWS,
                "approval_id",
                "status",
                "attempts",
                "lease_until",
                "next_attempt_at",
                "created_at",
            ],
            select(
                *(rows.c[f] for f in _DELIVERY_ROWS),
                bindparam("a_id", type_=String),
                bindparam("d_status", type_=String),
                bindparam("d_attempts", type_=Integer),
                bindparam("d_lease_until", type_=deliveries.c.lease_until.type),
                now,
                now,
            ),
        )
        .cte("queued")
    )
    counted = (
        update(clients)
        .where(clients.c.id == bindparam("a_client_id", type_=String))
        .values(pushes_since_success=clients.c.pushes_since_success + 1)
        .cte("counted")
    )
    audited = insert(AUDIT_TABLE).values(audit_binds())
    return audited.add_cte(new_approval, queued, counted)


@functools.cache
def _decide(fields: frozenset[str], shape: str) -> Update:
    """The conditional UPDATE that decides a live pending approval, setting `fields` (each
    a parameter named `set_<field>`), one per shape: `rowcount` (returns nothing), `queued`
    (returns how many deliveries are still queued), `row` (this client's approval only;
    returns the row as decided and that count). Built once per shape."""
    where = (*_LIVE, _OF_CLIENT[1]) if shape == "row" else _LIVE
    statement = (
        update(approvals)
        .where(*where)
        .values(decided_at=bindparam("now"), **{f: bindparam(f"set_{f}") for f in fields})
    )
    if shape == "queued":
        return statement.returning(_QUEUED)
    if shape == "row":
        return statement.returning(*approvals.c, _QUEUED)
    return statement


def _decide_params(approval_id: str, now: datetime, values: dict[str, Any]) -> dict[str, Any]:
    params = {f"set_{field}": value for field, value in values.items()}
    params.update(approval=approval_id, now=now)
    return params


class ApprovalRepository:
    def __init__(self, unit: DriverUnit) -> None:
        self.unit = unit

    # --- clients -------------------------------------------------------------------------

    async def count_push(self, client_id: str) -> None:
        await self.unit.execute(_COUNT_PUSH, {"client": client_id})

    async def reset_push_count(self, client_id: str) -> None:
        await self.unit.execute(_RESET_PUSH_COUNT, {"client": client_id})

    async def lock_push(self, client_id: str, until: datetime) -> None:
        await self.unit.execute(_LOCK_PUSH, {"client": client_id, "until": until})

    # --- devices -------------------------------------------------------------------------

    async def touch_device(self, device_id: str, at: datetime) -> None:
        await self.unit.execute(_TOUCH_DEVICE, {"device": device_id, "at": at})

    async def app_devices_and_pending(self, client_id: str) -> tuple[list[AppDevice], list[str]]:
        """App installs that can answer (by push or by polling: id and push fields, in
        pairing order), and the ids of the client's pending approvals, in one statement."""
        rows = (await self.unit.execute(_APP_DEVICES_AND_PENDING, {"client": client_id})).all()
        app_devices: list[AppDevice] = [row for row in rows if row.row == "device"]
        return app_devices, [row.id for row in rows if row.row == "pending"]

    # --- approvals -----------------------------------------------------------------------

    async def insert(self, approval: dict[str, Any], deliveries: Sequence[dict[str, Any]]) -> None:
        """The new approval and its deliveries, as INSERTs (one for all the deliveries)."""
        await self.unit.execute(_INSERT_APPROVAL, approval)
        if deliveries:
            await self.unit.execute(_INSERT_DELIVERY, list(deliveries))

    async def insert_counted_audited(
        self,
        approval: dict[str, Any],
        deliveries: Sequence[dict[str, Any]],
        audit: dict[str, Any],
    ) -> None:
        """`insert`, `count_push` for the approval's client, and the audit row `audit`
        (from `audit_row`): one statement on PostgreSQL, each in turn elsewhere. The
        deliveries are those of `deliveries_for`, due at the approval's creation, all in
        the same state (queued, or leased at birth)."""
        if not self.unit.postgres:
            await self.insert(approval, deliveries)
            await self.count_push(approval["client_id"])
            await self.unit.execute(INSERT_AUDIT, audit)
            return
        params = {f"a_{field}": value for field, value in approval.items()}
        params.update(audit_params(audit))
        for field in _DELIVERY_ROWS:
            params[f"d_{field}"] = [delivery[field] for delivery in deliveries]
        first = deliveries[0] if deliveries else {}
        params.update(
            d_status=first.get("status", DeliveryStatus.QUEUED),
            d_attempts=first.get("attempts", 0),
            d_lease_until=first.get("lease_until"),
        )
        await self.unit.execute(_create_all(frozenset(approval)), params)

    async def device_with_approval(
        self, token_hash: str, approval_id: str
    ) -> tuple[DeviceRow, ApprovalRow | None] | None:
        """The device whose token hashes to `token_hash` (None: no such device) and the
        approval `approval_id` if it is that device's client's (else None), in one read."""
        params = {"token_hash": token_hash, "approval": approval_id}
        row = (await self.unit.execute(_DEVICE_WITH_APPROVAL, params)).first()
        return None if row is None else _device_and_approval(row)

    async def device_with_named_approval(
        self, token_hash: str, approval_id: str
    ) -> tuple[DeviceRow, tuple[ApprovalRow, str] | None] | None:
        """`device_with_approval`, the approval with its client's name (what the phone is
        shown)."""
        params = {"token_hash": token_hash, "approval": approval_id}
        row = (await self.unit.execute(_DEVICE_WITH_NAMED_APPROVAL, params)).first()
        if row is None:
            return None
        device, approval = _device_and_approval(row[:-1])
        return device, None if approval is None else (approval, row.client_name or "")

    async def get(self, approval_id: str, client_id: str) -> ApprovalRow | None:
        row: ApprovalRow | None = (
            await self.unit.execute(_GET, {"approval": approval_id, "client": client_id})
        ).first()
        return row

    async def with_summary(
        self, approval_id: str, client_id: str
    ) -> tuple[ApprovalRow, Summary] | None:
        """The approval and its delivery summary in one statement (what a status read or a
        woken long-poll needs), or None when this client has no such approval."""
        params = {"approval": approval_id, "client": client_id}
        row = (await self.unit.execute(_WITH_SUMMARY, params)).first()
        return None if row is None else (row, _summary(row))

    async def by_idempotency_key(self, client_id: str, key: str) -> ApprovalRow | None:
        row: ApprovalRow | None = (
            await self.unit.execute(_BY_IDEMPOTENCY_KEY, {"client": client_id, "key": key})
        ).first()
        return row

    async def pending_for_client(
        self, client_id: str, now: datetime
    ) -> Sequence[tuple[ApprovalRow, str]]:
        """Live pending approvals, newest first, each with its client's name (one join)."""
        rows = await self.unit.execute(_PENDING_FOR_CLIENT, {"client": client_id, "now": now})
        return [(row, row.client_name or "") for row in rows]

    async def decide(self, approval_id: str, now: datetime, **values: Any) -> bool:
        """Move a live pending approval to a final state; False if someone else won."""
        result = await self.unit.execute(
            _decide(frozenset(values), "rowcount"), _decide_params(approval_id, now, values)
        )
        return result.rowcount == 1

    async def decide_counting_queued(
        self, approval_id: str, now: datetime, **values: Any
    ) -> int | None:
        """`decide` that also returns, from the same statement, how many of the approval's
        deliveries are still queued (usually none: the push went out before the answer),
        so dropping them costs a statement only when there are some. None if someone else
        won."""
        row = (
            await self.unit.execute(
                _decide(frozenset(values), "queued"), _decide_params(approval_id, now, values)
            )
        ).first()
        return None if row is None else int(row.queued)

    async def decide_answer(
        self,
        approval_id: str,
        now: datetime,
        values: dict[str, Any],
        *,
        device_id: str,
        reset_client: str | None,
        audit: dict[str, Any],
        notify: Sequence[str] = (),
    ) -> int | None:
        """`decide_counting_queued` for a device's answer and, when it wins, `touch_device`,
        `reset_push_count` of `reset_client` (if any) and the audit row `audit`: one
        statement on PostgreSQL, each in turn elsewhere. `notify` (PostgreSQL, a statement
        run alone): topics to NOTIFY from that statement where it wins. None if someone
        else won."""
        if not self.unit.postgres:
            queued = await self.decide_counting_queued(approval_id, now, **values)
            if queued is not None:
                await self.touch_device(device_id, now)
                if reset_client is not None:
                    await self.reset_push_count(reset_client)
                await self.unit.execute(INSERT_AUDIT, audit)
            return queued
        params = _decide_params(approval_id, now, values)
        params["answering_device"] = device_id
        params.update(audit_params(audit))
        if reset_client is not None:
            params["answering_client"] = reset_client
        if notify:
            params["notify_channel"] = NOTIFY_CHANNEL
            params.update((f"notify_{i}", topic) for i, topic in enumerate(notify))
        statement = _decide_answered(frozenset(values), reset_client is not None, len(notify))
        row = (await self.unit.execute(statement, params)).first()
        return None if row is None else int(row.queued)

    async def decide_returning(
        self, approval_id: str, client_id: str, now: datetime, **values: Any
    ) -> tuple[ApprovalRow, int] | None:
        """`decide` for this client's approval, returning the row as decided and how many
        of its deliveries are still queued, in one statement; None if it was not a live
        pending approval of this client (unknown, decided or due to expire)."""
        params = _decide_params(approval_id, now, values)
        params["client"] = client_id
        row = (await self.unit.execute(_decide(frozenset(values), "row"), params)).first()
        return None if row is None else (row, int(row.queued))

    async def expire_if_due(self, approval_id: str, now: datetime) -> bool:
        result = await self.unit.execute(_EXPIRE_IF_DUE, {"approval": approval_id, "now": now})
        return result.rowcount == 1

    async def expire_returning(
        self, approval_id: str, client_id: str, now: datetime
    ) -> ApprovalRow | None:
        """`expire_if_due` that returns the expired row (no re-read); None if not due."""
        params = {"approval": approval_id, "client": client_id, "now": now}
        expired: ApprovalRow | None = (await self.unit.execute(_EXPIRE_RETURNING, params)).first()
        return expired

    async def due_for_expiry(self, now: datetime, limit: int) -> Sequence[tuple[str, str]]:
        rows = await self.unit.execute(_DUE_FOR_EXPIRY, {"now": now, "limit": limit})
        return [(row.id, row.client_id) for row in rows]

    # --- deliveries ----------------------------------------------------------------------

    async def drop_queued_deliveries(self, approval_id: str) -> None:
        """A decided approval needs no more pushes; one being sent right now finishes."""
        await self.unit.execute(_DROP_QUEUED, {"approval": approval_id})

    async def delivery_summary(self, approval_id: str) -> Summary:
        row = (await self.unit.execute(_SUMMARY, {"approval": approval_id})).one()
        return _summary(row)
