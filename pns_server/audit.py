"""The audit trail: who created, answered, cancelled, reported fraud, paired, removed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import BindParameter, bindparam, insert
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.models import AuditEvent, Base, utcnow

if TYPE_CHECKING:
    from pns_server.db import Executor

AUDIT_TABLE = Base.metadata.tables[AuditEvent.__tablename__]
INSERT_AUDIT = insert(AUDIT_TABLE)
# The columns `audit_row` fills, in its order.
AUDIT_FIELDS = ("at", "client_id", "actor", "actor_id", "event", "subject_id", "detail")


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


def audit_binds() -> dict[str, BindParameter[Any]]:
    """`audit_row`'s columns as typed binds named `audit_<column>`, in `AUDIT_FIELDS` order,
    for an audit row written by a statement of several writes (on PostgreSQL): there a bind
    named like a column of a table the statement updates would be taken for a value to set
    in it. `audit_params` gives their values."""
    return {
        name: bindparam(f"audit_{name}", type_=AUDIT_TABLE.c[name].type) for name in AUDIT_FIELDS
    }


def audit_params(row: dict[str, Any]) -> dict[str, Any]:
    """`row` (from `audit_row`) as the parameters of `audit_binds`."""
    return {f"audit_{name}": value for name, value in row.items()}


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
