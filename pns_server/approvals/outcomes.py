"""Final states: the record of who won an approval, what follows the winning UPDATE
(outbox, wake-ups, metrics, audit), and expiry, which any reader may persist."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pns_server import audit
from pns_server.approvals.repository import ApprovalRepository
from pns_server.db import publish_after_commit
from pns_server.driver import DriverUnit
from pns_server.errors import (
    AlreadyDecided,
)
from pns_server.metrics import Metrics
from pns_server.rows import ApprovalRow
from pns_server.states import ApprovalStatus
from pns_server.topics import approval_topic, now_utc


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


def audit_row_of(outcome: Outcome) -> dict[str, Any]:
    """The audit row of `outcome` (`on_final` writes it, unless its UPDATE already did)."""
    return audit.audit_row(
        outcome.event or f"approval.{outcome.status}",
        client_id=outcome.client_id,
        actor=outcome.actor,
        actor_id=outcome.actor_id,
        subject_id=outcome.approval_id,
        **outcome.detail,
    )


async def on_final(
    unit: DriverUnit,
    repo: ApprovalRepository,
    metrics: Metrics,
    outcome: Outcome,
    *,
    queued: int | None = None,
    audited: bool = False,
) -> None:
    """Everything that follows the winning UPDATE: outbox, wake-ups, metrics, audit.

    `queued`: how many deliveries the winning UPDATE itself saw still queued, if it
    counted them (None: drop whatever is queued now). At 0, usually, the push went out
    before the answer and there is nothing to drop; a delivery that a dispatcher puts back
    in the queue after that is dropped when claimed (it never sends for a decided
    approval), as one being sent at the decision always was. `audited`: the winning
    statement wrote `audit_row_of(outcome)` itself."""
    if queued is None or queued > 0:
        await repo.drop_queued_deliveries(outcome.approval_id)
    for topic in topics_of(outcome):
        publish_after_commit(unit, topic)
    count_final(metrics, outcome)
    if not audited:
        await unit.execute(audit.INSERT_AUDIT, audit_row_of(outcome))


def topics_of(outcome: Outcome) -> list[str]:
    """Whom a final state wakes: the approval's waiters. Not its client's phones: a phone's
    wait (`PendingWait`) lasts only while none of its client's approvals is pending, and
    an approval leaving the pending list cannot end it (on PostgreSQL, one NOTIFY less per
    decision for every relay to hear)."""
    return [approval_topic(outcome.approval_id)]


def count_final(metrics: Metrics, outcome: Outcome) -> None:
    metrics.approvals_decided.labels(status=outcome.status).inc()
    if outcome.created_at is not None:
        elapsed = now_utc() - outcome.created_at
        metrics.approval_decision_seconds.observe(elapsed.total_seconds())


async def refresh_expiry(
    unit: DriverUnit, repo: ApprovalRepository, metrics: Metrics, approval: ApprovalRow
) -> ApprovalRow:
    """Report expiry the moment it is due, whoever reads first persists it."""
    if is_due(approval):
        expired = await repo.expire_returning(approval.id, approval.client_id, now_utc())
        if expired is not None:
            await on_final(unit, repo, metrics, expiry(approval.id, approval.client_id))
            return expired
        # Someone else decided or expired it first: their row, as they left it.
        fresh = await repo.get(approval.id, approval.client_id)
        assert fresh is not None
        return fresh
    return approval


def is_due(approval: ApprovalRow) -> bool:
    """Pending past its expiry: a reader must persist the expiry before reporting it."""
    return approval.status == ApprovalStatus.PENDING and approval.expires_at <= now_utc()


async def reread(
    unit: DriverUnit, repo: ApprovalRepository, metrics: Metrics, approval: ApprovalRow
) -> ApprovalRow:
    """The row as the winner left it: after a lost UPDATE our loaded copy is stale."""
    fresh = await repo.get(approval.id, approval.client_id)
    return await refresh_expiry(unit, repo, metrics, fresh or approval)


async def expire_due(
    unit: DriverUnit, metrics: Metrics, due: Sequence[tuple[str, str]], now: datetime
) -> int:
    """Expire `due` (id, client id), each by its conditional UPDATE: one decided or expired
    meanwhile by someone else is left as they left it."""
    repo = ApprovalRepository(unit)
    expired = 0
    for approval_id, client_id in due:
        if await repo.expire_if_due(approval_id, now):
            await on_final(unit, repo, metrics, expiry(approval_id, client_id))
            expired += 1
    return expired


def already_decided(approval: ApprovalRow) -> AlreadyDecided:
    """The refusal of a late answer or cancel, given the row as it is now (`reread`,
    `refresh_expiry`). It commits: when that read found the expiry due, it persisted it
    (with its audit row and wake-ups), and the first reader's expiry must stick."""
    return AlreadyDecided(
        f"This approval is already {approval.status}; start a new one if needed.",
        commit=True,
        # `status` in a problem body is the HTTP status (RFC 9457); the approval's goes here.
        approval_status=approval.status,
    )
