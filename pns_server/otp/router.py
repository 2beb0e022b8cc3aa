from __future__ import annotations

from fastapi import APIRouter, Response, status

from pns_server.deps import RuntimeDep, UnitClient, UnitDep
from pns_server.otp import service
from pns_server.otp.schemas import (
    OtpAccepted,
    OtpVerify,
    RecoveryCodeAccepted,
    RecoveryCodesCreated,
    RecoveryCodeVerify,
)
from pns_server.problems import PROBLEM_RESPONSES

router = APIRouter(tags=["otp"], responses=PROBLEM_RESPONSES)


@router.post("/v1/otp/verify", response_model=OtpAccepted)
async def verify_otp(
    body: OtpVerify, client: UnitClient, unit: UnitDep, runtime: RuntimeDep
) -> OtpAccepted:
    return await service.verify_otp(unit, runtime, client, body.code)


@router.post(
    "/v1/recovery-codes",
    status_code=status.HTTP_201_CREATED,
    response_model=RecoveryCodesCreated,
)
async def create_recovery_codes(
    client: UnitClient, unit: UnitDep, runtime: RuntimeDep, response: Response
) -> RecoveryCodesCreated:
    # Shown once: no cache along the way may keep a copy.
    response.headers["Cache-Control"] = "no-store"
    return await service.create_recovery_codes(unit, runtime, client)


@router.post("/v1/recovery-codes/verify", response_model=RecoveryCodeAccepted)
async def verify_recovery_code(
    body: RecoveryCodeVerify, client: UnitClient, unit: UnitDep, runtime: RuntimeDep
) -> RecoveryCodeAccepted:
    return await service.verify_recovery_code(unit, runtime, client, body.code)
