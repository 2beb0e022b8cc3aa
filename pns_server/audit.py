"""The audit trail: who created, answered, cancelled, reported fraud, paired, removed."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import AuditEvent, utcnow


def record(
    session: AsyncSession,
    event: str,
    *,
    client_id: str | None,
    actor: str,
    actor_id: str | None = None,
    subject_id: str | None = None,
    **detail: Any,
) -> None:
    """Add an audit row to the current unit of work (it commits with the change it records)."""
    session.add(
        AuditEvent(
            at=utcnow(),
            client_id=client_id,
            actor=actor,
            actor_id=actor_id,
            event=event,
            subject_id=subject_id,
            detail=detail or None,
        )
    )
