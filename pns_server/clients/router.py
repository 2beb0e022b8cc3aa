from __future__ import annotations

from fastapi import APIRouter, status

from pns_server.clients import service
from pns_server.clients.schemas import ClientCreate, ClientCreated, ClientInfo
from pns_server.deps import RuntimeDep, SessionDep, UnitClient, UnitDep
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.ratelimit import RegisterLimit

router = APIRouter(tags=["clients"], responses=PROBLEM_RESPONSES)


@router.post(
    "/v1/clients",
    status_code=status.HTTP_201_CREATED,
    response_model=ClientCreated,
    dependencies=[RegisterLimit],
)
async def register_client(
    body: ClientCreate, session: SessionDep, runtime: RuntimeDep
) -> ClientCreated:
    return await service.register(session, runtime, body)


@router.get("/v1/client", response_model=ClientInfo)
async def get_client(client: UnitClient, unit: UnitDep) -> ClientInfo:
    return await service.describe(unit, client)
