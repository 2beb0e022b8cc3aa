"""A device's answer: its shape, signature and clock are checked, then one UPDATE
decides (the first answer wins; a fraud report locks push for the client)."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any

from pns_server import audit
from pns_server.approvals.outcomes import (
    Outcome,
    already_decided,
    audit_row_of,
    count_final,
    on_final,
    reread,
    topics_of,
)
from pns_server.approvals.repository import ApprovalRepository
from pns_server.approvals.schemas import (
    DecisionResult,
    DeviceDecision,
)
from pns_server.approvals.signing import check_signature
from pns_server.config import Settings
from pns_server.db import publish_after_commit
from pns_server.driver import DriverUnit
from pns_server.errors import (
    InvalidRequest,
    NotFound,
    StaleTimestamp,
)
from pns_server.rows import ApprovalRow, DeviceRow
from pns_server.runtime import Runtime
from pns_server.security import constant_time_equals
from pns_server.states import ApprovalStatus
from pns_server.topics import now_utc

MAX_CLOCK_SKEW = timedelta(seconds=120)


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


def check_fresh(timestamp: datetime, now: datetime) -> None:
    if abs(timestamp - now) > MAX_CLOCK_SKEW:
        raise StaleTimestamp(
            "The timestamp is more than 120 s from server time; set the phone's clock "
            "automatically (GET /v1/ping returns server time).",
            server_time=now,
        )


def outcome_of(approval: ApprovalRow, answer: DeviceDecision) -> tuple[ApprovalStatus, str | None]:
    """(status, reason) that this answer leads to."""
    if answer.decision == "reject":
        return ApprovalStatus.REJECTED, "fraud" if answer.fraud else "user_rejected"
    if approval.number_matching:
        expected = approval.match_code or ""
        given = answer.match_code or ""
        if not expected or not constant_time_equals(given, expected):
            return ApprovalStatus.REJECTED, "number_mismatch"
    return ApprovalStatus.APPROVED, None


async def device_and_approval(
    unit: DriverUnit, token_hash: str, approval_id: str
) -> tuple[DeviceRow, ApprovalRow | None] | None:
    """The answering device (None: unknown token) and the approval it answers, if that is
    its client's: `respond` needs both, and they are read in one statement."""
    return await ApprovalRepository(unit).device_with_approval(token_hash, approval_id)


async def respond(
    unit: DriverUnit,
    runtime: Runtime,
    device: DeviceRow,
    approval: ApprovalRow | None,
    answer: DeviceDecision,
) -> DecisionResult:
    """`approval`: the one answered, as `device_and_approval` read it with the device."""
    settings, metrics = runtime.settings, runtime.metrics
    repo = ApprovalRepository(unit)
    answered, decision, now = checked_answer(device, approval, answer)
    assert approval is not None  # checked
    # The decision, the device's last use, an approval's push-count reset and the audit
    # row: one statement on PostgreSQL.
    queued = await repo.decide_answer(approval.id, now, decision, **answer_writes(device, answered))
    if queued is None:
        raise already_decided(await reread(unit, repo, metrics, approval))
    if answer.fraud:
        await report_fraud(unit, repo, settings, device, approval.id, now)
    await on_final(unit, repo, metrics, answered, queued=queued, audited=True)
    return DecisionResult(approval_id=approval.id, status=answered.status)


async def respond_at_once(
    unit: DriverUnit,
    runtime: Runtime,
    device: DeviceRow,
    approval: ApprovalRow | None,
    answer: DeviceDecision,
) -> DecisionResult | None:
    """PostgreSQL, without a transaction of its own (`Database.unit_alone`): `respond` for
    an answer that reports no fraud (a fraud report's push lock must commit with its
    decision). The decision's one statement also NOTIFYs the other processes, so its
    commit wakes them as a unit's would; this process's waiters are woken as the block
    ends. None when the decision lost (decided or expired meanwhile, or due to expire):
    nothing was written, and `respond` in a unit answers as if this had not run."""
    assert not answer.fraud
    repo = ApprovalRepository(unit)
    answered, decision, now = checked_answer(device, approval, answer)
    topics = topics_of(answered)
    queued = await repo.decide_answer(
        answered.approval_id, now, decision, **answer_writes(device, answered), notify=topics
    )
    if queued is None:
        return None
    for topic in topics:
        publish_after_commit(unit, topic)
    if queued > 0:
        # Apart from the decision: a delivery left queued is dropped when claimed anyway.
        await repo.drop_queued_deliveries(answered.approval_id)
    count_final(runtime.metrics, answered)
    return DecisionResult(approval_id=answered.approval_id, status=answered.status)


def checked_answer(
    device: DeviceRow, approval: ApprovalRow | None, answer: DeviceDecision
) -> tuple[Outcome, dict[str, Any], datetime]:
    """The answer checked (its approval, shape, signature and clock): the outcome it
    leads to, the decision's columns and the time of the decision."""
    if approval is None:
        raise NotFound("No such approval for this device's client.")
    check_answer_shape(answer)
    timestamp = parse_device_time(answer.timestamp)
    check_signature(device, approval, answer)
    now = now_utc()
    check_fresh(timestamp, now)
    status, reason = outcome_of(approval, answer)
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
    decision = {
        "status": status,
        "reason": reason,
        "device_id": device.id,
        "response_decision": answer.decision,
        "response_match_code": answer.match_code,
        "response_timestamp": answer.timestamp,
        "response_signature": answer.signature,
        "response_public_key": base64.b64encode(device.public_key or b"").decode(),
        "fraud": answer.fraud,
    }
    return answered, decision, now


def answer_writes(device: DeviceRow, answered: Outcome) -> dict[str, Any]:
    """What a winning answer writes beside the decision (`decide_answer`'s keywords)."""
    approved = answered.status is ApprovalStatus.APPROVED
    return {
        "device_id": device.id,
        "reset_client": device.client_id if approved else None,
        "audit": audit_row_of(answered),
    }


async def report_fraud(
    unit: DriverUnit,
    repo: ApprovalRepository,
    settings: Settings,
    device: DeviceRow,
    approval_id: str,
    now: datetime,
) -> None:
    until = now + timedelta(seconds=settings.fraud_lock_seconds)
    await repo.lock_push(device.client_id, until)
    await audit.write(
        unit,
        "approval.fraud_reported",
        client_id=device.client_id,
        actor="device",
        actor_id=device.id,
        subject_id=approval_id,
        locked_until=until.isoformat(),
    )
