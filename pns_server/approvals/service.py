"""What clients and devices read of an approval, the long-polls that wait on it, and
a client's cancel. The rest of the approval rules sit beside this module, one file
per concern: `creation`, `answers` (a device's signed answer), `signing`, and
`outcomes` (final states and expiry)."""

from __future__ import annotations

from datetime import datetime

from pns_server.approvals.outcomes import (
    Outcome,
    already_decided,
    is_due,
    on_final,
    refresh_expiry,
)
from pns_server.approvals.repository import ApprovalRepository, Summary
from pns_server.approvals.schemas import (
    ApprovalContext,
    ApprovalState,
    DeliverySummary,
    DeviceApproval,
    DeviceApprovalList,
    SignedResponse,
    WaitUntil,
)
from pns_server.approvals.signing import signature_version
from pns_server.db import Database
from pns_server.driver import DriverUnit
from pns_server.errors import (
    NotFound,
)
from pns_server.metrics import Metrics
from pns_server.realtime.longpoll import Counted, LongPollResponse, Poll, Rendered
from pns_server.rows import ApprovalRow, ClientRow, DeviceRow
from pns_server.runtime import Runtime
from pns_server.states import ApprovalStatus
from pns_server.topics import PUSH_FAILED, approval_topic, now_utc, pending_topic


async def load_for_client(
    unit: DriverUnit, metrics: Metrics, client_id: str, approval_id: str
) -> ApprovalRow:
    repo = ApprovalRepository(unit)
    approval = await repo.get(approval_id, client_id)
    if approval is None:
        raise NotFound("No such approval for this client.")
    return await refresh_expiry(unit, repo, metrics, approval)


def describe(approval: ApprovalRow, summary: Summary) -> ApprovalState:
    response = None
    if approval.response_decision is not None:
        response = SignedResponse(
            decision=approval.response_decision,
            match_code=approval.response_match_code,
            timestamp=approval.response_timestamp or "",
            signature=approval.response_signature or "",
            public_key=approval.response_public_key or "",
            version=signature_version(approval),
        )
    return ApprovalState(
        approval_id=approval.id,
        status=approval.status,
        reason=approval.reason,
        created_at=approval.created_at,
        expires_at=approval.expires_at,
        decided_at=approval.decided_at,
        device_id=approval.device_id,
        response=response,
        delivery=DeliverySummary(
            queued=summary.queued,
            sent=summary.sent,
            failed=summary.failed,
            last_error=summary.last_error,
        ),
    )


async def state(
    unit: DriverUnit, metrics: Metrics, client_id: str, approval_id: str
) -> ApprovalState:
    """The approval and its deliveries, read in one statement; an expiry that is due is
    persisted first (it drops queued deliveries, so the summary is read again then)."""
    repo = ApprovalRepository(unit)
    found = await repo.with_summary(approval_id, client_id)
    if found is None:
        raise NotFound("No such approval for this client.")
    approval, summary = found
    if is_due(approval):
        approval = await refresh_expiry(unit, repo, metrics, approval)
        summary = await repo.delivery_summary(approval.id)
    return describe(approval, summary)


async def read_state(runtime: Runtime, client_id: str, approval_id: str) -> ApprovalState:
    """`state` for a long-poll: one read statement, outside any transaction; only an
    approval whose expiry is due takes a unit of work (which reads it again, locked)."""
    async with runtime.db.unit_read() as unit:
        found = await ApprovalRepository(unit).with_summary(approval_id, client_id)
    if found is None:
        raise NotFound("No such approval for this client.")
    if not is_due(found[0]):
        return describe(*found)
    async with runtime.db.unit() as unit:
        return await state(unit, runtime.metrics, client_id, approval_id)


def all_failed(delivery: DeliverySummary) -> bool:
    """Every push failed and none is still on its way: the push cannot succeed any more."""
    return delivery.failed > 0 and delivery.queued == 0 and delivery.sent == 0


class StateWait(Poll[Rendered[ApprovalState]]):
    """GET /v1/approvals/{id}: the approval's state; with `wait`, a long-poll that returns
    once it is decided or, as `until` asks, a delivery outcome changes (`change`) or every
    push failed (`final_or_failed`). One short read per look: the wait holds no
    connection, and waiters woken together share the read and its rendered body.

    It runs after the handler has returned (`LongPollResponse`), so a waiting request
    holds neither the handler's frames nor the authenticated client row: this one small
    object, a `Poll`, is all it keeps of the request; ten thousand are held at once."""

    __slots__ = ("approval_id", "client_id", "first_delivery", "runtime", "until")

    def __init__(
        self, runtime: Runtime, client_id: str, approval_id: str, wait: float, until: WaitUntil
    ) -> None:
        super().__init__(runtime.notifier, approval_topic(approval_id), wait)
        self.runtime = runtime
        self.client_id = client_id
        self.approval_id = approval_id
        self.until = until
        # `change`: the delivery outcome of the first read, which a later one must differ from
        # (its fields, not the model: held for the whole wait).
        self.first_delivery: tuple[int, int, int, str | None] | None = None

    def gauge(self) -> Counted:
        return self.runtime.metrics.longpoll_waiters

    def share_key(self) -> str:
        return f"{self.client_id}:{self.approval_id}"

    async def read(self) -> Rendered[ApprovalState]:
        return Rendered(await read_state(self.runtime, self.client_id, self.approval_id))

    def wants(self, kind: str) -> bool:
        """The push outcomes that can end this wait, as `settled` judges them: `final` none,
        `final_or_failed` a push given up (a sent push or a retry leaves it possible)."""
        if self.until == "change":
            return True
        return self.until == "final_or_failed" and kind == PUSH_FAILED

    def settled(self, read: Rendered[ApprovalState]) -> bool:
        """Whether the wait may return, as its caller asked (`until`)."""
        state = read.value
        if state.status != ApprovalStatus.PENDING.value:
            return True
        if self.until == "final":
            return False
        if self.until == "final_or_failed":
            return all_failed(state.delivery)
        # A delivery outcome also ends the wait: the client can offer OTP at once.
        delivery = state.delivery
        outcome = (delivery.queued, delivery.sent, delivery.failed, delivery.last_error)
        if self.first_delivery is None:
            self.first_delivery = outcome
            return False
        return outcome != self.first_delivery

    def deadline(self, read: Rendered[ApprovalState]) -> datetime | None:
        """When a pending approval expires by itself: the wait re-reads just after."""
        pending = read.value.status == ApprovalStatus.PENDING.value
        return read.value.expires_at if pending else None


def state_response(
    runtime: Runtime, client: ClientRow, approval_id: str, wait: float, until: WaitUntil = "change"
) -> LongPollResponse:
    """GET /v1/approvals/{id}: a `StateWait`, run as the response is sent."""
    return LongPollResponse(StateWait(runtime, client.id, approval_id, wait, until))


async def cancel(
    unit: DriverUnit, runtime: Runtime, client: ClientRow, approval_id: str
) -> ApprovalState:
    """The UPDATE comes first and returns the row it cancelled: a cancel that wins needs
    no read before it; one that does not finds out why (404, decided, expired) after."""
    metrics = runtime.metrics
    repo = ApprovalRepository(unit)
    won = await repo.decide_returning(
        approval_id, client.id, now_utc(), status=ApprovalStatus.CANCELLED
    )
    if won is None:
        raise already_decided(await load_for_client(unit, metrics, client.id, approval_id))
    approval, queued = won
    cancelled = Outcome(
        approval.id,
        client.id,
        ApprovalStatus.CANCELLED,
        "client",
        actor_id=client.id,
        created_at=approval.created_at,
    )
    await on_final(unit, repo, metrics, cancelled, queued=queued)
    return describe(approval, await repo.delivery_summary(approval.id))


def for_device(approval: ApprovalRow, client_name: str) -> DeviceApproval:
    return DeviceApproval(
        approval_id=approval.id,
        status=approval.status,
        created_at=approval.created_at,
        expires_at=approval.expires_at,
        client_name=client_name,
        context=ApprovalContext(
            username=approval.username,
            hostname=approval.hostname,
            ip=approval.ip,
            action=approval.action,
            message=approval.message,
        ),
        number_matching=approval.number_matching,
        client_nonce=approval.client_nonce,
    )


async def pending_for(unit: DriverUnit, client_id: str) -> DeviceApprovalList:
    pending = await ApprovalRepository(unit).pending_for_client(client_id, now_utc())
    return DeviceApprovalList(approvals=[for_device(a, name) for a, name in pending])


class PendingWait(Poll[Rendered[DeviceApprovalList]]):
    """GET /v1/device/approvals: the pending approvals; with `wait`, a long-poll that returns
    as soon as one is pending (at once if one already is), or when the phone disconnects.
    Holds no database connection while it waits, and, like `StateWait`, keeps one small
    object of the request."""

    __slots__ = ("client_id", "runtime")

    def __init__(self, runtime: Runtime, client_id: str, wait: float) -> None:
        super().__init__(runtime.notifier, pending_topic(client_id), wait)
        self.runtime = runtime
        self.client_id = client_id

    def gauge(self) -> Counted:
        return self.runtime.metrics.longpoll_waiters

    def share_key(self) -> str:
        return f"pending:{self.client_id}"

    async def read(self) -> Rendered[DeviceApprovalList]:
        # Only live pending approvals are listed: an expired one needs no write to be left
        # out, so this is one read statement outside any transaction.
        async with self.runtime.db.unit_read() as unit:
            return Rendered(await pending_for(unit, self.client_id))

    def settled(self, read: Rendered[DeviceApprovalList]) -> bool:
        return bool(read.value.approvals)


def pending_response(runtime: Runtime, device: DeviceRow, wait: float) -> LongPollResponse:
    """GET /v1/device/approvals: a `PendingWait`, run as the response is sent."""
    return LongPollResponse(PendingWait(runtime, device.client_id, wait))


async def device_and_view(
    db: Database, token_hash: str, approval_id: str
) -> tuple[DeviceRow, tuple[ApprovalRow, str] | None] | None:
    """The device whose token hashes to `token_hash` (None: unknown) and the approval it
    asks about with its client's name (None: not its client's): one read outside any
    transaction (on SQLite, no write lock for a read)."""
    async with db.unit_read() as unit:
        return await ApprovalRepository(unit).device_with_named_approval(token_hash, approval_id)


async def device_view(runtime: Runtime, found: tuple[ApprovalRow, str] | None) -> DeviceApproval:
    """What the phone is shown of the approval `device_and_view` found; only one whose
    expiry is due takes a unit of work."""
    if found is None:
        raise NotFound("No such approval for this client.")
    approval, client_name = found
    if is_due(approval):
        async with runtime.db.unit() as unit:
            repo = ApprovalRepository(unit)
            approval = await refresh_expiry(unit, repo, runtime.metrics, approval)
    return for_device(approval, client_name)
