"""Data retention: purge what is older than PNS_RETENTION_DAYS, in bounded batches.

Every replica runs this task. That is safe without coordination: each batch is a plain
`DELETE ... WHERE <old>` in its own short transaction, idempotent, and two replicas
deleting the same rows just find fewer. Deliveries go with their approvals (FK cascade)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import InstrumentedAttribute

from pns_server.db import Database
from pns_server.models import Approval, AuditEvent, Pairing, RateLimitBucket, RecoveryCode

log = logging.getLogger(__name__)

BATCH_SIZE = 1000
# Rate-limit windows are an hour at most; a day-old bucket can never count again.
RATE_LIMIT_KEEP = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    key: InstrumentedAttribute[Any]
    is_old: Callable[[datetime, datetime], ColumnElement[bool]]


def _rules() -> list[Rule]:
    # An approval lives minutes, a pairing at most a day: anything whose expiry is older than
    # the cutoff is final, whatever its status. That also sweeps rows left `pending` forever.
    return [
        Rule("approvals", Approval.id, lambda cutoff, _now: Approval.expires_at < cutoff),
        Rule("pairings", Pairing.id, lambda cutoff, _now: Pairing.expires_at < cutoff),
        Rule(
            "recovery_codes",
            RecoveryCode.id,
            lambda cutoff, _now: RecoveryCode.used_at < cutoff,
        ),
        Rule("audit_events", AuditEvent.id, lambda cutoff, _now: AuditEvent.at < cutoff),
        Rule(
            "rate_limits",
            RateLimitBucket.key,
            lambda _cutoff, now: RateLimitBucket.window_start < now - RATE_LIMIT_KEEP,
        ),
    ]


@dataclass
class PurgeReport:
    deleted: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


async def _delete_batch(db: Database, rule: Rule, cutoff: datetime, now: datetime) -> int:
    # DELETE ... LIMIT is not portable; a keyed sub-select bounds the batch on both databases.
    batch = select(rule.key).where(rule.is_old(cutoff, now)).limit(BATCH_SIZE)
    async with db.session() as session:
        result = await session.execute(
            delete(rule.key.class_).where(rule.key.in_(batch)),
            execution_options={"synchronize_session": False},
        )
    return int(getattr(result, "rowcount", 0) or 0)


async def purge(db: Database, retention_days: int, now: datetime | None = None) -> PurgeReport:
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=retention_days)
    report = PurgeReport()
    for rule in _rules():
        total = 0
        while True:
            deleted = await _delete_batch(db, rule, cutoff, now)
            total += deleted
            if deleted < BATCH_SIZE:
                break
        report.deleted[rule.name] = total
    return report


def next_delay(interval: float) -> float:
    """Jittered so replicas started together do not purge in lockstep."""
    return interval * random.uniform(0.9, 1.1)


async def run_periodically(db: Database, retention_days: int, interval: float) -> None:
    await asyncio.sleep(random.uniform(0, min(interval, 300)))
    while True:
        try:
            report = await purge(db, retention_days)
            if report.total:
                log.info("retention purge removed %s rows", report.total, extra=report.deleted)
        except Exception as exc:
            log.warning("retention purge failed (%s); retrying next round", type(exc).__name__)
        await asyncio.sleep(next_delay(interval))
