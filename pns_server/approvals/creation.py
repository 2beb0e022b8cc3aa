"""Creating an approval: number matching, the push limits and fraud lock, idempotent
replays, one pending approval per client, and the deliveries the outbox sends."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pns_server import audit
from pns_server.approvals.outcomes import Outcome, expiry, on_final
from pns_server.approvals.repository import AppDevice, ApprovalRepository
from pns_server.approvals.schemas import (
    ApprovalCreate,
    ApprovalCreated,
)
from pns_server.config import Settings
from pns_server.db import publish_after_commit, when_unit_ends
from pns_server.driver import DriverUnit
from pns_server.errors import (
    IdempotencyConflict,
    NoAppDevices,
    PlainPushNotAllowed,
    PushLimit,
    PushLocked,
)
from pns_server.metrics import Metrics
from pns_server.rows import ApprovalRow, BornRow, ClientRow
from pns_server.runtime import Runtime
from pns_server.security import new_id
from pns_server.states import ApprovalStatus, DeliveryStatus
from pns_server.topics import OUTBOX_TOPIC, now_utc, pending_topic


def new_match_code(digits: int) -> str:
    return f"{secrets.randbelow(10**digits):0{digits}d}"


def request_fingerprint(data: ApprovalCreate) -> str:
    canonical = json.dumps(data.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Created:
    body: ApprovalCreated
    replayed: bool


def created_body(approval: ApprovalRow) -> ApprovalCreated:
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


def check_not_locked(locked_until: datetime | None, now: datetime) -> None:
    if locked_until is not None and locked_until > now:
        raise PushLocked(
            "A fraud report blocks push approvals for now; sign in with a one-time password.",
            locked_until=locked_until,
        )


def check_push_limit(settings: Settings, pushes_since_success: int) -> None:
    if pushes_since_success >= settings.max_pushes_without_success:
        raise PushLimit(
            f"{pushes_since_success} push approvals since the last successful sign-in; "
            "sign in with a one-time password or recovery code to allow push again.",
            limit=settings.max_pushes_without_success,
        )


async def replay_or_conflict(existing: ApprovalRow, fingerprint: str) -> Created:
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request; use a new key."
        )
    return Created(created_body(existing), replayed=True)


async def supersede_pending(
    unit: DriverUnit,
    repo: ApprovalRepository,
    metrics: Metrics,
    client_id: str,
    pending: Sequence[str],
    now: datetime,
) -> None:
    """One pending approval per client: the older `pending` ones expire or are cancelled,
    one UPDATE each."""
    for approval_id in pending:
        if await repo.expire_if_due(approval_id, now):
            await on_final(unit, repo, metrics, expiry(approval_id, client_id))
        elif await repo.decide(approval_id, now, status=ApprovalStatus.CANCELLED):
            superseded = Outcome(
                approval_id,
                client_id,
                ApprovalStatus.CANCELLED,
                "client",
                actor_id=client_id,
                event="approval.superseded",
            )
            await on_final(unit, repo, metrics, superseded)


def deliveries_for(
    approval_id: str, devices: Sequence[AppDevice], now: datetime
) -> list[dict[str, Any]]:
    """One queued delivery per device with a working push token."""
    return [
        {
            "id": new_id(),
            "approval_id": approval_id,
            "device_id": device.id,
            "service": device.push_service or "log",
            "status": DeliveryStatus.QUEUED,
            "attempts": 0,
            "lease_until": None,
            "next_attempt_at": now,
            "created_at": now,
        }
        for device in devices
        if device.push_status == "ok" and device.push_token
    ]


def lease_at_birth(
    unit: DriverUnit,
    runtime: Runtime,
    client: ClientRow,
    approval: dict[str, Any],
    devices: Sequence[AppDevice],
    deliveries: list[dict[str, Any]],
) -> bool:
    """Lease the new deliveries to this process's dispatcher when it has room for them
    all, and hand them over as the creating transaction commits: a login's push leaves
    without a claim transaction of its own. False (left queued, for the dispatchers to
    claim) when it has no room or is stopping; the caller then wakes them."""
    dispatcher = runtime.dispatcher
    if dispatcher is None or not deliveries:
        return False
    birth = dispatcher.lease_at_birth(len(deliveries), approval["created_at"])
    if birth is None:
        return False
    by_id = {device.id: device for device in devices}
    rows = []
    for delivery in deliveries:
        delivery.update(status=DeliveryStatus.SENDING, attempts=1, lease_until=birth.lease_until)
        rows.append(born_row(client, approval, by_id[delivery["device_id"]], delivery))
    when_unit_ends(unit, lambda committed: birth.send(rows) if committed else birth.release())
    return True


def born_row(
    client: ClientRow, approval: dict[str, Any], device: AppDevice, delivery: dict[str, Any]
) -> BornRow:
    return BornRow(
        delivery_id=delivery["id"],
        attempts=delivery["attempts"],
        service=delivery["service"],
        device_id=device.id,
        push_token=device.push_token,
        push_environment=device.push_environment,
        push_status=device.push_status,
        push_p256dh=device.push_p256dh,
        push_auth=device.push_auth,
        approval_id=approval["id"],
        approval_status=approval["status"],
        expires_at=approval["expires_at"],
        username=approval["username"],
        hostname=approval["hostname"],
        action=approval["action"],
        client_name=client.name,
    )


def new_approval(
    settings: Settings,
    client_id: str,
    data: ApprovalCreate,
    idempotency_key: str | None,
    fingerprint: str,
    devices_notified: int,
    now: datetime,
) -> dict[str, Any]:
    """The columns of a new pending approval."""
    return {
        "id": new_id(),
        "client_id": client_id,
        "status": ApprovalStatus.PENDING,
        "idempotency_key": idempotency_key,
        "request_hash": fingerprint,
        "username": data.username,
        "hostname": data.hostname,
        "ip": data.ip,
        "action": data.action,
        "message": data.message,
        "client_nonce": data.client_nonce,
        "number_matching": data.number_matching,
        "match_code": (
            new_match_code(settings.match_code_digits) if data.number_matching else None
        ),
        "created_at": now,
        "expires_at": now + timedelta(seconds=data.ttl_seconds),
        "fraud": False,
        "devices_notified": devices_notified,
    }


async def create(
    unit: DriverUnit,
    runtime: Runtime,
    client: ClientRow,
    data: ApprovalCreate,
    idempotency_key: str | None,
) -> Created:
    """Plain rows and Core statements throughout, on the driver connection: a login
    creates one of these. `client` is the caller's row as its authenticating read locked
    it (`UnitClientLocked`): creations of one client are serial, and the push limits below
    are read as every process last committed them."""
    settings, metrics = runtime.settings, runtime.metrics
    check_plain_push(settings, data)
    repo = ApprovalRepository(unit)
    now = now_utc()
    fingerprint = request_fingerprint(data)
    if idempotency_key is not None:
        existing = await repo.by_idempotency_key(client.id, idempotency_key)
        if existing is not None:
            return await replay_or_conflict(existing, fingerprint)
    check_not_locked(client.locked_until, now)
    devices, pending = await repo.app_devices_and_pending(client.id)
    if not devices:
        raise NoAppDevices(
            "No authenticator app is paired; pair one (POST /v1/pairings kind=app) or use OTP."
        )
    check_push_limit(settings, client.pushes_since_success)
    await supersede_pending(unit, repo, metrics, client.id, pending, now)

    approval = new_approval(
        settings, client.id, data, idempotency_key, fingerprint, len(devices), now
    )
    deliveries = deliveries_for(approval["id"], devices, now)
    leased = lease_at_birth(unit, runtime, client, approval, devices, deliveries)
    created = audit.audit_row(
        "approval.created",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        subject_id=approval["id"],
        action=data.action,
        username=data.username,
        number_matching=data.number_matching,
        devices=len(devices),
        pushes=len(deliveries),
    )
    await repo.insert_counted_audited(approval, deliveries, created)
    metrics.approvals_created.inc()
    # No approval topic: nobody can wait on an approval before it exists (a long-poll's
    # first read of an unknown id ends it), so only the phones are woken.
    publish_after_commit(unit, pending_topic(client.id))
    if deliveries and not leased:
        publish_after_commit(unit, OUTBOX_TOPIC)
    body = ApprovalCreated(
        approval_id=approval["id"],
        status=approval["status"],
        expires_at=approval["expires_at"],
        match_code=approval["match_code"],
        devices_notified=approval["devices_notified"],
    )
    return Created(body, replayed=False)
