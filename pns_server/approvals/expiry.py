"""The expiry sweep: a background task that expires approvals nobody is watching.

Readers already report and persist expiry the moment it is due (`outcomes.refresh_expiry`);
the sweep is for the rest, so the audit trail, the decision metrics and the outbox stay
truthful. Every few seconds is enough: nothing waits on it."""

from __future__ import annotations

import asyncio
import logging

from pns_server.approvals.outcomes import expire_due
from pns_server.db import Database
from pns_server.metrics import Metrics

log = logging.getLogger("pns.approvals")

SWEEP_INTERVAL = 5.0  # seconds between sweeps


async def sweep_once(db: Database, metrics: Metrics) -> int:
    """Expire what is overdue (a batch); returns how many approvals it expired."""
    async with db.unit() as unit:
        return await expire_due(unit, metrics)


async def sweep_periodically(
    db: Database, metrics: Metrics, interval: float = SWEEP_INTERVAL
) -> None:
    while True:
        try:
            await sweep_once(db, metrics)
        except Exception as exc:
            log.warning("expiry sweep failed (%s); retrying next round", type(exc).__name__)
        await asyncio.sleep(interval)
