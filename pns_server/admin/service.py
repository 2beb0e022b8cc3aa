"""Operator actions, shared by `/v1/admin` and `pns-server admin`; every change is audited."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.admin.repository import AdminRepository
from pns_server.admin.schemas import (
    AdminClient,
    AdminClientDetail,
    AdminClientPage,
    AuditEventOut,
    AuditPage,
)
from pns_server.audit import record
from pns_server.devices.repository import DeviceRepository
from pns_server.devices.service import device_out
from pns_server.errors import InvalidRequest, NotFound
from pns_server.models import AuditEvent, Client

RECENT_EVENTS = 50
ADMIN = "admin"


def encode_cursor(client: Client) -> str:
    raw = f"{client.created_at.isoformat()}|{client.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, client_id = raw.split("|", 1)
        return datetime.fromisoformat(created_at).astimezone(UTC), client_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(
            "The cursor is not one this server returned; start again without it.",
            errors=[{"field": "cursor", "message": "invalid cursor", "type": "value_error"}],
        ) from exc


def _active(until: datetime | None) -> datetime | None:
    return until if until is not None and until > datetime.now(UTC) else None


def _summary(client: Client, counts: tuple[int, int]) -> AdminClient:
    return AdminClient(
        client_id=client.id,
        name=client.name,
        edition=client.edition,
        hostname=client.hostname,
        created_at=client.created_at,
        last_seen_at=client.last_seen_at,
        devices=counts[0],
        push_devices=counts[1],
        locked_until=_active(client.locked_until),
        otp_locked_until=_active(client.otp_locked_until),
        otp_consecutive_failures=client.otp_consecutive_failures,
        pushes_since_success=client.pushes_since_success,
    )


def _event_out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut.model_validate(event)


async def list_clients(session: AsyncSession, limit: int, cursor: str | None) -> AdminClientPage:
    repo = AdminRepository(session)
    after = decode_cursor(cursor) if cursor else None
    clients = await repo.page_of_clients(limit + 1, after)
    has_more = len(clients) > limit
    clients = clients[:limit]
    counts = await repo.device_counts([c.id for c in clients])
    return AdminClientPage(
        clients=[_summary(c, counts.get(c.id, (0, 0))) for c in clients],
        next_cursor=encode_cursor(clients[-1]) if has_more else None,
    )


async def _client_or_404(repo: AdminRepository, client_id: str) -> Client:
    client = await repo.get_client(client_id)
    if client is None:
        raise NotFound(f"No client {client_id}.")
    return client


async def describe_client(session: AsyncSession, client_id: str) -> AdminClientDetail:
    repo = AdminRepository(session)
    client = await _client_or_404(repo, client_id)
    devices = await DeviceRepository(session).list_for_client(client.id)
    counts = (len(devices), sum(1 for d in devices if d.push_status == "ok"))
    events = await repo.audit_events(client.id, RECENT_EVENTS, None)
    return AdminClientDetail(
        **_summary(client, counts).model_dump(),
        device_list=[device_out(d) for d in devices],
        recent_events=[_event_out(e) for e in events],
    )


async def unlock_client(session: AsyncSession, client_id: str, *, via: str) -> AdminClient:
    repo = AdminRepository(session)
    if not await repo.unlock(client_id):
        raise NotFound(f"No client {client_id}.")
    record(session, "client.unlocked", client_id=client_id, actor=ADMIN, actor_id=via)
    client = await _client_or_404(repo, client_id)
    await session.refresh(client)
    counts = await repo.device_counts([client_id])
    return _summary(client, counts.get(client_id, (0, 0)))


async def delete_client(session: AsyncSession, client_id: str, *, via: str) -> None:
    if not await AdminRepository(session).delete_client(client_id):
        raise NotFound(f"No client {client_id}.")
    # Audit rows have no foreign key: the trail outlives the client it names.
    record(session, "client.deleted", client_id=client_id, actor=ADMIN, actor_id=via)


async def revoke_device(session: AsyncSession, device_id: str, *, via: str) -> None:
    device = await AdminRepository(session).get_device(device_id)
    if device is None or not await DeviceRepository(session).delete(
        device_id, client_id=device.client_id
    ):
        raise NotFound(f"No device {device_id}.")
    record(
        session,
        "device.removed",
        client_id=device.client_id,
        actor=ADMIN,
        actor_id=via,
        subject_id=device_id,
    )


async def audit_trail(
    session: AsyncSession, client_id: str | None, limit: int, cursor: int | None
) -> AuditPage:
    events = await AdminRepository(session).audit_events(client_id, limit + 1, cursor)
    has_more = len(events) > limit
    events = events[:limit]
    return AuditPage(
        events=[_event_out(e) for e in events],
        next_cursor=str(events[-1].id) if has_more else None,
    )
