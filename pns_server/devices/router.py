from __future__ import annotations

from fastapi import APIRouter, Response, status

from pns_server.deps import (
    CurrentClient,
    CurrentDevice,
    RuntimeDep,
    SessionDep,
    UnitClient,
    UnitDep,
)
from pns_server.devices import service
from pns_server.devices.schemas import DeviceCreate, DeviceCreated, DeviceList, PushRegistration
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.ratelimit import PairingLimit

router = APIRouter(tags=["devices"], responses=PROBLEM_RESPONSES)


@router.get("/v1/devices", response_model=DeviceList)
async def list_devices(client: UnitClient, unit: UnitDep) -> DeviceList:
    return await service.list_devices(unit, client)


@router.delete("/v1/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_device(device_id: str, client: CurrentClient, session: SessionDep) -> Response:
    await service.remove_for_client(session, client, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/v1/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceCreated,
    dependencies=[PairingLimit],
)
async def enrol_device(
    body: DeviceCreate, session: SessionDep, runtime: RuntimeDep
) -> DeviceCreated:
    return await service.enrol_app_device(session, runtime, body)


@router.put("/v1/device/push", status_code=status.HTTP_204_NO_CONTENT)
async def update_push(
    body: PushRegistration, device: CurrentDevice, session: SessionDep, runtime: RuntimeDep
) -> Response:
    await service.update_push(session, runtime, device, body)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/v1/device", status_code=status.HTTP_204_NO_CONTENT)
async def remove_self(device: CurrentDevice, session: SessionDep) -> Response:
    await service.remove_self(session, device)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
