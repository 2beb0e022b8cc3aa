from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status

from pns_server.deps import CurrentClient, CurrentClientDetached, RuntimeDep, SessionDep
from pns_server.pairings import service
from pns_server.pairings.schemas import (
    PairingConfirm,
    PairingConfirmed,
    PairingCreate,
    PairingCreated,
    PairingStatus,
)
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.realtime.longpoll import until_disconnected

router = APIRouter(tags=["pairings"], responses=PROBLEM_RESPONSES)

WaitSeconds = Annotated[
    float,
    Query(ge=0, le=60, allow_inf_nan=False, description="seconds to wait while still pending"),
]


@router.post("/v1/pairings", status_code=status.HTTP_201_CREATED, response_model=PairingCreated)
async def start_pairing(
    body: PairingCreate, client: CurrentClient, session: SessionDep, runtime: RuntimeDep
) -> PairingCreated:
    return await service.start(session, runtime, client, body)


@router.post("/v1/pairings/{pairing_id}/confirm", response_model=PairingConfirmed)
async def confirm_pairing(
    pairing_id: str,
    body: PairingConfirm,
    client: CurrentClient,
    session: SessionDep,
    runtime: RuntimeDep,
) -> PairingConfirmed:
    return await service.confirm(session, runtime, client, pairing_id, body.code)


@router.get("/v1/pairings/{pairing_id}", response_model=PairingStatus)
async def get_pairing(
    pairing_id: str,
    request: Request,
    client: CurrentClientDetached,
    runtime: RuntimeDep,
    wait: WaitSeconds = 0,
) -> PairingStatus:
    return await service.wait_for_status(
        runtime, client, pairing_id, wait, until_disconnected(request.receive)
    )
