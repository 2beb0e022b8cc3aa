from __future__ import annotations

from typing import Any

from pns_server.devices.schemas import DeviceOut
from pns_server.schemas import ResponseModel, Timestamp


class AdminClient(ResponseModel):
    client_id: str
    name: str
    edition: str
    hostname: str | None
    created_at: Timestamp
    last_seen_at: Timestamp | None
    devices: int
    push_devices: int
    locked_until: Timestamp | None
    otp_locked_until: Timestamp | None
    otp_consecutive_failures: int
    pushes_since_success: int


class AdminClientPage(ResponseModel):
    clients: list[AdminClient]
    next_cursor: str | None


class AuditEventOut(ResponseModel):
    id: int
    at: Timestamp
    client_id: str | None
    actor: str
    actor_id: str | None
    event: str
    subject_id: str | None
    detail: dict[str, Any] | None


class AuditPage(ResponseModel):
    events: list[AuditEventOut]
    next_cursor: str | None


class AdminClientDetail(AdminClient):
    device_list: list[DeviceOut]
    recent_events: list[AuditEventOut]
