"""The expiry sweep: a background task that expires approvals nobody is watching.

Readers already report and persist expiry the moment it is due (`outcomes.refresh_expiry`);
the sweep is for the rest, so the audit trail, the decision metrics and the outbox stay
truthful. Every few seconds is enough: nothing waits on it."""

from __future__ import annotations

import asyncio
import logging

from pns_server.approvals.outcomes import expire_due
from pns_server.approvals.repository import ApprovalRepository
from pns_server.db import Database
from pns_server.metrics import Metrics
from pns_server.topics import now_utc

log = logging.getLogger("pns.approvals")

SWEEP_INTERVAL = 5.0  # seconds between sweeps
SWEEP_BATCH = 100  # approvals expired per sweep at most


async def sweep_once(db: Database, metrics: Metrics, limit: int = SWEEP_BATCH) -> int:
    """Expire what is overdue (a batch); returns how many approvals it expired. Finding it
    is a read outside any transaction: a sweep with nothing to do (the usual case, readers
    persist expiry themselves) takes no write lock on SQLite."""
    now = now_utc()
    async with db.unit_read() as unit:
        due = await ApprovalRepository(unit).due_for_expiry(now, limit)
    if not due:
        return 0
    async with db.unit() as unit:
        return await expire_due(unit, metrics, due, now)


async def sweep_periodically(
    db: Database, metrics: Metrics, interval: float = SWEEP_INTERVAL
) -> None:
    while True:
        try:
            await sweep_once(db, metrics)
        except Exception as exc:
            log.warning("expiry sweep failed (%s); retrying next round", type(exc).__name__)
        await asyncio.sleep(interval)
