"""Approval rules: creation limits, number matching, signed answers, one winner per approval."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.approvals.repository import ApprovalRepository
from pns_server.approvals.schemas import (
    SIGNATURE_V1,
    SIGNATURE_V2,
    ApprovalContext,
    ApprovalCreate,
    ApprovalCreated,
    ApprovalState,
    DecisionResult,
    DeliverySummary,
    DeviceApproval,
    DeviceApprovalList,
    DeviceDecision,
    SignedResponse,
)
from pns_server.audit import record
from pns_server.config import Settings
from pns_server.db import publish_after_commit
from pns_server.errors import (
    AlreadyDecided,
    IdempotencyConflict,
    InvalidRequest,
    NoAppDevices,
    NotFound,
    PlainPushNotAllowed,
    PushLimit,
    PushLocked,
    SignatureInvalid,
    StaleTimestamp,
)
from pns_server.metrics import Metrics
from pns_server.models import Approval, Client, Delivery, Device
from pns_server.realtime.longpoll import Disconnected, long_poll
from pns_server.runtime import Runtime
from pns_server.security import constant_time_equals, new_id, verify_signature
from pns_server.states import ApprovalStatus, DeliveryStatus
from pns_server.topics import OUTBOX_TOPIC, approval_topic, now_utc, pending_topic

SIGNATURE_CONTEXT = SIGNATURE_V1
MAX_CLOCK_SKEW = timedelta(seconds=120)


def signed_message(approval_id: str, decision: str, match_code: str | None, timestamp: str) -> str:
    return f"{SIGNATURE_V1}|{approval_id}|{decision}|{match_code or ''}|{timestamp}"


def context_sha256(
    username: str | None,
    hostname: str | None,
    ip: str | None,
    action: str | None,
    message: str | None,
) -> str:
    """Lowercase hex SHA-256 of the login context as canonical JSON (sorted keys, no spaces,
    no ASCII escaping, null for absent): what a v2 signature binds the answer to."""
    canonical = json.dumps(
        {
            "action": action,
            "hostname": hostname,
            "ip": ip,
            "message": message,
            "username": username,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def signed_message_v2(
    approval: Approval, decision: str, match_code: str | None, timestamp: str
) -> str:
    assert approval.client_nonce is not None
    context = context_sha256(
        approval.username, approval.hostname, approval.ip, approval.action, approval.message
    )
    return (
        f"{SIGNATURE_V2}|{approval.id}|{decision}|{match_code or ''}|{timestamp}|"
        f"{approval.client_nonce}|{context}"
    )


def signature_version(approval: Approval) -> str:
    return SIGNATURE_V2 if approval.client_nonce is not None else SIGNATURE_V1


def new_match_code(digits: int) -> str:
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def request_fingerprint(data: ApprovalCreate) -> str:
    canonical = json.dumps(data.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    body: ApprovalCreated
    replayed: bool


# --- creating ---------------------------------------------------------------------------


def created_body(approval: Approval) -> ApprovalCreated:
    return ApprovalCreated(
        approval_id=approval.id,
        status=approval.status,
        expires_at=approval.expires_at,
        match_code=approval.match_code,
        devices_notified=approval.devices_notified,
    )


def check_plain_push(settings: Settings, data: ApprovalCreate) -> None:
    if not data.number_matching and not settings.allow_plain_push:
        raise PlainPushNotAllowed(
            "This relay requires number matching (plain approve/deny invites push-fatigue "
            "attacks); send number_matching: true or ask the operator for PNS_ALLOW_PLAIN_PUSH."
        )


def check_not_locked(client: Client, now: datetime) -> None:
    if client.locked_until is not None and client.locked_until > now:
        raise PushLocked(
            "A fraud report blocks push approvals for now; sign in with a one-time password.",
            locked_until=client.locked_until,
        )


def check_push_limit(settings: Settings, client: Client) -> None:
    if client.pushes_since_success >= settings.max_pushes_without_success:
        raise PushLimit(
            f"{client.pushes_since_success} push approvals since the last successful sign-in; "
            "sign in with a one-time password or recovery code to allow push again.",
            limit=settings.max_pushes_without_success,
        )


async def replay_or_conflict(existing: Approval, fingerprint: str) -> Created:
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request; use a new key."
        )
    return Created(created_body(existing), replayed=True)


async def supersede_pending(
    session: AsyncSession, repo: ApprovalRepository, metrics: Metrics, client_id: str, now: datetime
) -> None:
    """One pending approval per client: older ones expire or are cancelled, one UPDATE each."""
    for approval_id in await repo.pending_ids(client_id):
        if await repo.expire_if_due(approval_id, now):
            await on_final(session, repo, metrics, expiry(approval_id, client_id))
        elif await repo.decide(approval_id, now, status=ApprovalStatus.CANCELLED):
            superseded = Outcome(
                approval_id,
                client_id,
                ApprovalStatus.CANCELLED,
                "client",
                actor_id=client_id,
                event="approval.superseded",
            )
            await on_final(session, repo, metrics, superseded)


def deliveries_for(approval_id: str, devices: Sequence[Device], now: datetime) -> list[Delivery]:
    return [
        Delivery(
            id=new_id(),
            approval_id=approval_id,
            device_id=device.id,
            service=device.push_service or "log",
            status=DeliveryStatus.QUEUED,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        for device in devices
        if device.push_status == "ok" and device.push_token
    ]


async def create(
    session: AsyncSession,
    settings: Settings,
    metrics: Metrics,
    client: Client,
    data: ApprovalCreate,
    idempotency_key: str | None,
) -> Created:
    check_plain_push(settings, data)
    repo = ApprovalRepository(session)
    now = now_utc()
    client = await repo.lock_client(client.id)
    fingerprint = request_fingerprint(data)
    if idempotency_key is not None:
        existing = await repo.by_idempotency_key(client.id, idempotency_key)
        if existing is not None:
            return await replay_or_conflict(existing, fingerprint)
    check_not_locked(client, now)
    devices = await repo.app_devices(client.id)
    if not devices:
        raise NoAppDevices(
            "No authenticator app is paired; pair one (POST /v1/pairings kind=app) or use OTP."
        )
    check_push_limit(settings, client)
    await supersede_pending(session, repo, metrics, client.id, now)

    approval = Approval(
        id=new_id(),
        client_id=client.id,
        status=ApprovalStatus.PENDING,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        username=data.username,
        hostname=data.hostname,
        ip=data.ip,
        action=data.action,
        message=data.message,
        client_nonce=data.client_nonce,
        number_matching=data.number_matching,
        match_code=new_match_code(settings.match_code_digits) if data.number_matching else None,
        created_at=now,
        expires_at=now + timedelta(seconds=data.ttl_seconds),
        fraud=False,
        devices_notified=len(devices),
    )
    deliveries = deliveries_for(approval.id, devices, now)
    repo.add(approval, deliveries)
    await repo.count_push(client.id)
    await session.flush()
    record(
        session,
        "approval.created",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        subject_id=approval.id,
        action=data.action,
        username=data.username,
        number_matching=data.number_matching,
        devices=len(devices),
        pushes=len(deliveries),
    )
    metrics.approvals_created.inc()
    publish_after_commit(session, approval_topic(approval.id))
    publish_after_commit(session, pending_topic(client.id))
    if deliveries:
        publish_after_commit(session, OUTBOX_TOPIC)
    return Created(created_body(approval), replayed=False)


# --- final states -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A final state one UPDATE just won, and whom the audit trail credits with it."""

    approval_id: str
    client_id: str
    status: ApprovalStatus
    actor: str  # "client", "device" or "system"
    actor_id: str | None = None
    event: str | None = None  # the audit event; `approval.<status>` when None
    created_at: datetime | None = None  # set to observe the time to decision
    detail: Mapping[str, object] = field(default_factory=dict)  # extra audit fields


def expiry(approval_id: str, client_id: str) -> Outcome:
    return Outcome(approval_id, client_id, ApprovalStatus.EXPIRED, "system")


async def on_final(
    session: AsyncSession, repo: ApprovalRepository, metrics: Metrics, outcome: Outcome
) -> None:
    """Everything that follows the winning UPDATE: outbox, wake-ups, metrics, audit."""
    await repo.drop_queued_deliveries(outcome.approval_id)
    publish_after_commit(session, approval_topic(outcome.approval_id))
    publish_after_commit(session, pending_topic(outcome.client_id))
    metrics.approvals_decided.labels(status=outcome.status).inc()
    if outcome.created_at is not None:
        elapsed = now_utc() - outcome.created_at
        metrics.approval_decision_seconds.observe(elapsed.total_seconds())
    record(
        session,
        outcome.event or f"approval.{outcome.status}",
        client_id=outcome.client_id,
        actor=outcome.actor,
        actor_id=outcome.actor_id,
        subject_id=outcome.approval_id,
        **outcome.detail,
    )


async def refresh_expiry(
    session: AsyncSession, repo: ApprovalRepository, metrics: Metrics, approval: Approval
) -> Approval:
    """Report expiry the moment it is due, whoever reads first persists it."""
    if approval.status == ApprovalStatus.PENDING and approval.expires_at <= now_utc():
        if await repo.expire_if_due(approval.id, now_utc()):
            await on_final(session, repo, metrics, expiry(approval.id, approval.client_id))
        fresh = await repo.get(approval.id, approval.client_id)
        assert fresh is not None
        return fresh
    return approval


async def reread(
    session: AsyncSession, repo: ApprovalRepository, metrics: Metrics, approval: Approval
) -> Approval:
    """The row as the winner left it: after a lost UPDATE our loaded copy is stale."""
    fresh = await repo.get(approval.id, approval.client_id)
    return await refresh_expiry(session, repo, metrics, fresh or approval)


async def expire_due(session: AsyncSession, metrics: Metrics, limit: int = 100) -> int:
    """Expire what nobody is watching, so the audit trail and outbox stay truthful."""
    repo = ApprovalRepository(session)
    now = now_utc()
    expired = 0
    for approval_id, client_id in await repo.due_for_expiry(now, limit):
        if await repo.expire_if_due(approval_id, now):
            await on_final(session, repo, metrics, expiry(approval_id, client_id))
            expired += 1
    return expired


def already_decided(approval: Approval) -> AlreadyDecided:
    return AlreadyDecided(
        f"This approval is already {approval.status}; start a new one if needed.",
        # `status` in a problem body is the HTTP status (RFC 9457); the approval's goes here.
        approval_status=approval.status,
    )


# --- the client's view ------------------------------------------------------------------


async def load_for_client(
    session: AsyncSession, metrics: Metrics, client_id: str, approval_id: str
) -> Approval:
    repo = ApprovalRepository(session)
    approval = await repo.get(approval_id, client_id)
    if approval is None:
        raise NotFound("No such approval for this client.")
    return await refresh_expiry(session, repo, metrics, approval)


async def describe(session: AsyncSession, approval: Approval) -> ApprovalState:
    queued, sent, failed, last_error = await ApprovalRepository(session).delivery_summary(
        approval.id
    )
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
        delivery=DeliverySummary(queued=queued, sent=sent, failed=failed, last_error=last_error),
    )


async def state(
    session: AsyncSession, metrics: Metrics, client_id: str, approval_id: str
) -> ApprovalState:
    return await describe(session, await load_for_client(session, metrics, client_id, approval_id))


async def wait_for_state(
    runtime: Runtime,
    client: Client,
    approval_id: str,
    wait: float,
    disconnected: Disconnected | None = None,
) -> ApprovalState:
    """The approval's state; with `wait`, a long-poll that returns once it is decided or a
    delivery outcome changes. One short session per read: the wait holds no connection."""

    async def read() -> ApprovalState:
        async with runtime.db.session() as session:
            return await state(session, runtime.metrics, client.id, approval_id)

    first: list[ApprovalState] = []

    def is_settled(value: ApprovalState) -> bool:
        # A delivery outcome also ends the wait: the client can offer OTP at once.
        if not first:
            first.append(value)
        return value.status != ApprovalStatus.PENDING.value or value.delivery != first[0].delivery

    with runtime.metrics.longpoll_waiters.track_inprogress():
        return await long_poll(
            runtime.notifier,
            approval_topic(approval_id),
            read,
            is_settled,
            wait,
            deadline_of=lambda value: (
                value.expires_at if value.status == ApprovalStatus.PENDING.value else None
            ),
            share_key=f"{client.id}:{approval_id}",
            disconnected=disconnected,
        )


async def cancel(
    session: AsyncSession, metrics: Metrics, client: Client, approval_id: str
) -> ApprovalState:
    repo = ApprovalRepository(session)
    approval = await load_for_client(session, metrics, client.id, approval_id)
    if not await repo.decide(approval.id, now_utc(), status=ApprovalStatus.CANCELLED):
        raise already_decided(await reread(session, repo, metrics, approval))
    cancelled = Outcome(
        approval.id,
        client.id,
        ApprovalStatus.CANCELLED,
        "client",
        actor_id=client.id,
        created_at=approval.created_at,
    )
    await on_final(session, repo, metrics, cancelled)
    final = await repo.get(approval.id, client.id)
    assert final is not None
    return await describe(session, final)


# --- the device's view ------------------------------------------------------------------


def for_device(approval: Approval, client_name: str) -> DeviceApproval:
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


async def device_pending(session: AsyncSession, device: Device) -> DeviceApprovalList:
    return await pending_for(session, device.client_id)


async def pending_for(session: AsyncSession, client_id: str) -> DeviceApprovalList:
    repo = ApprovalRepository(session)
    name = await repo.client_name(client_id)
    pending = await repo.pending_for_client(client_id, now_utc())
    return DeviceApprovalList(approvals=[for_device(a, name) for a in pending])


async def wait_for_pending(runtime: Runtime, device: Device, wait: float) -> DeviceApprovalList:
    """The pending approvals; with `wait`, a long-poll that returns as soon as one is
    pending (at once if one already is). Holds no database connection while it waits."""
    client_id = device.client_id

    async def read() -> DeviceApprovalList:
        async with runtime.db.session() as session:
            return await pending_for(session, client_id)

    if wait <= 0:
        return await read()
    with runtime.metrics.longpoll_waiters.track_inprogress():
        return await long_poll(
            runtime.notifier,
            pending_topic(client_id),
            read,
            lambda value: bool(value.approvals),
            wait,
            share_key=f"pending:{client_id}",
        )


async def device_view(
    session: AsyncSession, metrics: Metrics, device: Device, approval_id: str
) -> DeviceApproval:
    approval = await load_for_client(session, metrics, device.client_id, approval_id)
    return for_device(approval, await ApprovalRepository(session).client_name(device.client_id))


def parse_device_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise InvalidRequest(
            "timestamp must be an RFC 3339 time with a zone, e.g. 2026-11-30T09:12:18Z.",
            errors=[{"field": "timestamp", "message": "not an RFC 3339 time", "type": "value"}],
        )
    return parsed


def check_answer_shape(answer: DeviceDecision) -> None:
    if answer.fraud and answer.decision != "reject":
        raise InvalidRequest(
            "fraud: true is only valid with decision: reject.",
            errors=[{"field": "fraud", "message": "only with reject", "type": "value"}],
        )


def check_signature(device: Device, approval: Approval, answer: DeviceDecision) -> None:
    """v2 (nonce and context) for approvals whose client sent a nonce, v1 otherwise: a v1
    signature never answers an approval that asked for v2."""
    if approval.client_nonce is not None:
        message = signed_message_v2(approval, answer.decision, answer.match_code, answer.timestamp)
        shape = (
            "'pns-approval-v2|<approval_id>|<decision>|<match_code or empty>|<timestamp>|"
            "<client_nonce>|<context_sha256>'"
        )
    else:
        message = signed_message(approval.id, answer.decision, answer.match_code, answer.timestamp)
        shape = "'pns-approval-v1|<approval_id>|<decision>|<match_code or empty>|<timestamp>'"
    if device.public_key is None or not verify_signature(
        device.public_key, message.encode("utf-8"), answer.signature
    ):
        raise SignatureInvalid(
            f"The signature does not verify with this device's registered key; sign {shape}.",
            version=signature_version(approval),
        )


def check_fresh(timestamp: datetime, now: datetime) -> None:
    if abs(timestamp - now) > MAX_CLOCK_SKEW:
        raise StaleTimestamp(
            "The timestamp is more than 120 s from server time; set the phone's clock "
            "automatically (GET /v1/ping returns server time).",
            server_time=now,
        )


def outcome_of(approval: Approval, answer: DeviceDecision) -> tuple[ApprovalStatus, str | None]:
    """(status, reason) that this answer leads to."""
    if answer.decision == "reject":
        return ApprovalStatus.REJECTED, "fraud" if answer.fraud else "user_rejected"
    if approval.number_matching:
        expected = approval.match_code or ""
        given = answer.match_code or ""
        if not expected or not constant_time_equals(given, expected):
            return ApprovalStatus.REJECTED, "number_mismatch"
    return ApprovalStatus.APPROVED, None


async def respond(
    session: AsyncSession,
    settings: Settings,
    metrics: Metrics,
    device: Device,
    approval_id: str,
    answer: DeviceDecision,
) -> DecisionResult:
    repo = ApprovalRepository(session)
    approval = await repo.get(approval_id, device.client_id)
    if approval is None:
        raise NotFound("No such approval for this device's client.")
    check_answer_shape(answer)
    timestamp = parse_device_time(answer.timestamp)
    check_signature(device, approval, answer)
    now = now_utc()
    check_fresh(timestamp, now)
    status, reason = outcome_of(approval, answer)
    won = await repo.decide(
        approval.id,
        now,
        status=status,
        reason=reason,
        device_id=device.id,
        response_decision=answer.decision,
        response_match_code=answer.match_code,
        response_timestamp=answer.timestamp,
        response_signature=answer.signature,
        response_public_key=base64.b64encode(device.public_key or b"").decode(),
        fraud=answer.fraud,
    )
    if not won:
        raise already_decided(await reread(session, repo, metrics, approval))
    device.last_used_at = now
    if status is ApprovalStatus.APPROVED:
        await repo.reset_push_count(device.client_id)
    if answer.fraud:
        await report_fraud(session, repo, settings, device, approval.id, now)
    answered = Outcome(
        approval.id,
        device.client_id,
        status,
        "device",
        actor_id=device.id,
        event="approval.answered",
        created_at=approval.created_at,
        detail={"decision": answer.decision, "reason": reason},
    )
    await on_final(session, repo, metrics, answered)
    return DecisionResult(approval_id=approval.id, status=status)


async def report_fraud(
    session: AsyncSession,
    repo: ApprovalRepository,
    settings: Settings,
    device: Device,
    approval_id: str,
    now: datetime,
) -> None:
    until = now + timedelta(seconds=settings.fraud_lock_seconds)
    await repo.lock_push(device.client_id, until)
    record(
        session,
        "approval.fraud_reported",
        client_id=device.client_id,
        actor="device",
        actor_id=device.id,
        subject_id=approval_id,
        locked_until=until.isoformat(),
    )
