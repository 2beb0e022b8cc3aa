"""`/v1/admin`: operator endpoints, behind PNS_ADMIN_TOKEN (disabled while it is unset)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from pns_server.admin import service
from pns_server.admin.schemas import AdminClient, AdminClientDetail, AdminClientPage, AuditPage
from pns_server.deps import AdminDep, SessionDep, SettingsDep
from pns_server.errors import Unauthenticated
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.ratelimit import AdminLimit


async def admin_api_enabled(settings: SettingsDep) -> None:
    """Without PNS_ADMIN_TOKEN no token can be right: say so instead of a bare 401."""
    if settings.admin_token is None:
        raise Unauthenticated(
            "The admin API is disabled on this relay; set PNS_ADMIN_TOKEN to enable it, "
            "or use the `pns-server admin` commands on the server.",
            headers={"WWW-Authenticate": "Bearer"},
        )


router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    # Per IP, every call counted (right token or not): a token search is slowed, not free.
    dependencies=[Depends(admin_api_enabled), AdminLimit],
    responses=PROBLEM_RESPONSES,
)

Limit = Annotated[int, Query(ge=1, le=500)]
VIA = "api"


@router.get("/clients", response_model=AdminClientPage)
async def list_clients(
    _admin: AdminDep, session: SessionDep, limit: Limit = 100, cursor: str | None = None
) -> AdminClientPage:
    return await service.list_clients(session, limit, cursor)


@router.get("/clients/{client_id}", response_model=AdminClientDetail)
async def get_client(client_id: str, _admin: AdminDep, session: SessionDep) -> AdminClientDetail:
    return await service.describe_client(session, client_id)


@router.post("/clients/{client_id}/unlock", response_model=AdminClient)
async def unlock_client(client_id: str, _admin: AdminDep, session: SessionDep) -> AdminClient:
    return await service.unlock_client(session, client_id, via=VIA)


@router.delete("/clients/{client_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_client(client_id: str, _admin: AdminDep, session: SessionDep) -> Response:
    await service.delete_client(session, client_id, via=VIA)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_device(device_id: str, _admin: AdminDep, session: SessionDep) -> Response:
    await service.revoke_device(session, device_id, via=VIA)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/audit", response_model=AuditPage)
async def audit(
    _admin: AdminDep,
    session: SessionDep,
    client_id: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,  # BIGINT range
) -> AuditPage:
    return await service.audit_trail(session, client_id, limit, cursor)
