from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from pns_server import retention
from pns_server.audit import record
from pns_server.models import (
    Approval,
    AuditEvent,
    Client,
    Delivery,
    Device,
    Pairing,
    RateLimitBucket,
    RecoveryCode,
)
from pns_server.security import new_id

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=31)
RECENT = NOW - timedelta(days=29)


async def _seed(app: FastAPI) -> dict[str, str]:
    ids: dict[str, str] = {}
    async with app.state.runtime.db.session() as session:
        client = Client(id=new_id(), token_hash=new_id(), name="c", edition="pro")
        device = Device(
            id=new_id(),
            client_id=client.id,
            kind="app",
            name="d",
            totp_secret="x",
            push_service="apns",
        )
        session.add_all([client, device])
        await session.flush()
        for label, when, status in [
            ("old_decided", OLD, "approved"),
            ("old_pending", OLD, "pending"),
            ("recent", RECENT, "expired"),
        ]:
            approval = Approval(
                id=new_id(), client_id=client.id, status=status, created_at=when, expires_at=when
            )
            session.add(approval)
            await session.flush()
            session.add(
                Delivery(id=new_id(), approval_id=approval.id, device_id=device.id, service="apns")
            )
            ids[label] = approval.id
        session.add_all(
            [
                Pairing(
                    id=new_id(), client_id=client.id, kind="app", status="completed", expires_at=OLD
                ),
                Pairing(
                    id=new_id(), client_id=client.id, kind="app", status="pending", expires_at=OLD
                ),
                Pairing(id=new_id(), client_id=client.id, kind="app", expires_at=RECENT),
                RecoveryCode(id=new_id(), client_id=client.id, code_hash="h", used_at=OLD),
                RecoveryCode(id=new_id(), client_id=client.id, code_hash="h", used_at=None),
                RecoveryCode(id=new_id(), client_id=client.id, code_hash="h", used_at=RECENT),
                RateLimitBucket(key="old", window_start=NOW - timedelta(days=2), count=1),
                RateLimitBucket(key="new", window_start=NOW, count=1),
            ]
        )
        record(session, "old.event", client_id=client.id, actor="system")
        record(session, "new.event", client_id=client.id, actor="system")
        await session.flush()
        events = (await session.scalars(select(AuditEvent).order_by(AuditEvent.id))).all()
        events[0].at = OLD
        events[1].at = RECENT
    return ids


async def _count(app: FastAPI, model: type) -> int:
    async with app.state.runtime.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_purges_only_what_is_older_than_the_retention(app: FastAPI) -> None:
    ids = await _seed(app)
    report = await retention.purge(app.state.runtime.db, retention_days=30, now=NOW)
    assert report.deleted == {
        "approvals": 2,
        "pairings": 2,
        "recovery_codes": 1,
        "audit_events": 1,
        "rate_limits": 1,
    }
    async with app.state.runtime.db.session() as session:
        left = set(await session.scalars(select(Approval.id)))
        assert left == {ids["recent"]}
        assert set(await session.scalars(select(Delivery.approval_id))) == {ids["recent"]}
        assert list(await session.scalars(select(AuditEvent.event))) == ["new.event"]
    assert await _count(app, Pairing) == 1
    assert await _count(app, RecoveryCode) == 2
    assert await _count(app, RateLimitBucket) == 1


async def test_purge_is_idempotent(app: FastAPI) -> None:
    await _seed(app)
    await retention.purge(app.state.runtime.db, retention_days=30, now=NOW)
    again = await retention.purge(app.state.runtime.db, retention_days=30, now=NOW)
    assert again.total == 0


async def test_batches_cover_more_than_one_batch(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH_SIZE", 2)
    async with app.state.runtime.db.session() as session:
        for i in range(5):
            session.add(RateLimitBucket(key=f"k{i}", window_start=OLD, count=1))
    report = await retention.purge(app.state.runtime.db, retention_days=30, now=NOW)
    assert report.deleted["rate_limits"] == 5
    assert await _count(app, RateLimitBucket) == 0


def test_jitter_stays_near_the_interval() -> None:
    delays = [retention.next_delay(3600) for _ in range(100)]
    assert all(3240 <= d <= 3960 for d in delays)
    assert len(set(delays)) > 1
