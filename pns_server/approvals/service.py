"""What clients and devices read of an approval, the long-polls that wait on it, and
a client's cancel. The rest of the approval rules sit beside this module, one file
per concern: `creation`, `answers` (a device's signed answer), `signing`, and
`outcomes` (final states and expiry)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial

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
from pns_server.driver import DriverUnit
from pns_server.errors import (
    NotFound,
)
from pns_server.metrics import Metrics
from pns_server.realtime.longpoll import Disconnected, LongPollResponse, Rendered, long_poll
from pns_server.rows import ApprovalRow, ClientRow, DeviceRow
from pns_server.runtime import Runtime
from pns_server.states import ApprovalStatus
from pns_server.topics import approval_topic, now_utc, pending_topic


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


def settles(until: WaitUntil) -> Callable[[ApprovalState], bool]:
    """When a long-poll on a pending approval may return, as its caller asked (`until`)."""
    pending = ApprovalStatus.PENDING.value
    if until == "final":
        return lambda value: value.status != pending
    if until == "final_or_failed":
        return lambda value: value.status != pending or all_failed(value.delivery)
    first: list[DeliverySummary] = []

    def changed(value: ApprovalState) -> bool:
        # A delivery outcome also ends the wait: the client can offer OTP at once.
        if not first:
            first.append(value.delivery)
        return value.status != pending or value.delivery != first[0]

    return changed


def all_failed(delivery: DeliverySummary) -> bool:
    """Every push failed and none is still on its way: the push cannot succeed any more."""
    return delivery.failed > 0 and delivery.queued == 0 and delivery.sent == 0


async def wait_for_state(
    runtime: Runtime,
    client_id: str,
    approval_id: str,
    wait: float,
    disconnected: Disconnected | None = None,
    until: WaitUntil = "change",
) -> Rendered[ApprovalState]:
    """The approval's state; with `wait`, a long-poll that returns once it is decided or,
    as `until` asks, a delivery outcome changes (`change`) or every push failed
    (`final_or_failed`). One short read per look: the wait holds no connection. Waiters
    woken together share the read and its rendered body. Partials of module functions, not
    closures: a wait holds them for up to a minute, thousands at once."""
    with runtime.metrics.longpoll_waiters.track_inprogress():
        return await long_poll(
            runtime.notifier,
            approval_topic(approval_id),
            partial(read_rendered_state, runtime, client_id, approval_id),
            partial(settled_state, settles(until)),
            wait,
            deadline_of=pending_expiry,
            share_key=f"{client_id}:{approval_id}",
            disconnected=disconnected,
        )


async def read_rendered_state(
    runtime: Runtime, client_id: str, approval_id: str
) -> Rendered[ApprovalState]:
    return Rendered(await read_state(runtime, client_id, approval_id))


def settled_state(settled: Callable[[ApprovalState], bool], read: Rendered[ApprovalState]) -> bool:
    return settled(read.value)


def pending_expiry(read: Rendered[ApprovalState]) -> datetime | None:
    """When a pending approval expires by itself: the wait re-reads just after."""
    pending = read.value.status == ApprovalStatus.PENDING.value
    return read.value.expires_at if pending else None


def state_response(
    runtime: Runtime, client: ClientRow, approval_id: str, wait: float, until: WaitUntil = "change"
) -> LongPollResponse:
    """GET /v1/approvals/{id}: `wait_for_state`, run as the response is sent, so a waiting
    request holds neither the handler's frames nor the authenticated client row."""
    return LongPollResponse(partial(state_body, runtime, client.id, approval_id, wait, until))


async def state_body(
    runtime: Runtime,
    client_id: str,
    approval_id: str,
    wait: float,
    until: WaitUntil,
    disconnected: Disconnected,
) -> bytes:
    polled = await wait_for_state(runtime, client_id, approval_id, wait, disconnected, until)
    return polled.body


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


async def wait_for_pending(
    runtime: Runtime, client_id: str, wait: float, disconnected: Disconnected | None = None
) -> Rendered[DeviceApprovalList]:
    """The pending approvals; with `wait`, a long-poll that returns as soon as one is
    pending (at once if one already is). Holds no database connection while it waits."""
    read = partial(read_rendered_pending, runtime, client_id)
    if wait <= 0:
        return await read()
    with runtime.metrics.longpoll_waiters.track_inprogress():
        return await long_poll(
            runtime.notifier,
            pending_topic(client_id),
            read,
            any_pending,
            wait,
            share_key=f"pending:{client_id}",
            disconnected=disconnected,
        )


async def read_rendered_pending(runtime: Runtime, client_id: str) -> Rendered[DeviceApprovalList]:
    # Only live pending approvals are listed: an expired one needs no write to be left
    # out, so this is one read statement outside any transaction.
    async with runtime.db.unit_read() as unit:
        return Rendered(await pending_for(unit, client_id))


def any_pending(read: Rendered[DeviceApprovalList]) -> bool:
    return bool(read.value.approvals)


def pending_response(runtime: Runtime, device: DeviceRow, wait: float) -> LongPollResponse:
    """GET /v1/device/approvals: `wait_for_pending`, run as the response is sent (see
    `state_response`); it also ends when the phone disconnects."""
    return LongPollResponse(partial(pending_body, runtime, device.client_id, wait))


async def pending_body(
    runtime: Runtime, client_id: str, wait: float, disconnected: Disconnected
) -> bytes:
    return (await wait_for_pending(runtime, client_id, wait, disconnected)).body


async def device_view(runtime: Runtime, device: DeviceRow, approval_id: str) -> DeviceApproval:
    """What the phone is shown: one read outside any transaction (on SQLite, no write
    lock for a read); only an approval whose expiry is due takes a unit of work."""
    async with runtime.db.unit_read() as unit:
        found = await ApprovalRepository(unit).with_client_name(approval_id, device.client_id)
    if found is None:
        raise NotFound("No such approval for this client.")
    approval, client_name = found
    if is_due(approval):
        async with runtime.db.unit() as unit:
            repo = ApprovalRepository(unit)
            approval = await refresh_expiry(unit, repo, runtime.metrics, approval)
    return for_device(approval, client_name)
