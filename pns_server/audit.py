"""The audit trail: who created, answered, cancelled, reported fraud, paired, removed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import AuditEvent, Base, utcnow

if TYPE_CHECKING:
    from pns_server.db import Executor

INSERT_AUDIT = insert(Base.metadata.tables[AuditEvent.__tablename__])


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
    row = audit_row(
        event, client_id=client_id, actor=actor, actor_id=actor_id, subject_id=subject_id, **detail
    )
    session.add(AuditEvent(**row))


def audit_row(
    event: str,
    *,
    client_id: str | None,
    actor: str,
    actor_id: str | None = None,
    subject_id: str | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """The columns of an audit row, as `record` fills them."""
    return {
        "at": utcnow(),
        "client_id": client_id,
        "actor": actor,
        "actor_id": actor_id,
        "event": event,
        "subject_id": subject_id,
        "detail": detail or None,
    }


async def write(
    session: Executor,
    event: str,
    *,
    client_id: str | None,
    actor: str,
    actor_id: str | None = None,
    subject_id: str | None = None,
    **detail: Any,
) -> None:
    """The row `record` would add, written now as one INSERT: on a hot path this skips the
    unit of work's flush (building an entity, then working out its INSERT at commit)."""
    row = audit_row(
        event, client_id=client_id, actor=actor, actor_id=actor_id, subject_id=subject_id, **detail
    )
    await session.execute(INSERT_AUDIT, row)
