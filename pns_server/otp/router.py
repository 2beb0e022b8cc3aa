from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from pns_server.deps import (
    RuntimeDep,
    UnitClient,
    UnitDep,
    admit_client,
    bearer_token,
    invalid_token,
)
from pns_server.otp import service
from pns_server.otp.repository import VerifyCaller
from pns_server.otp.schemas import (
    OtpAccepted,
    OtpVerify,
    RecoveryCodeAccepted,
    RecoveryCodesCreated,
    RecoveryCodeVerify,
)
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.security import hash_token

router = APIRouter(tags=["otp"], responses=PROBLEM_RESPONSES)


async def verifying_client(request: Request, unit: UnitDep) -> VerifyCaller:
    """`UnitClient` for an OTP check: the caller's row read with what the check needs, and
    locked, in the statement that authenticates it (one round trip, not two)."""
    caller = await service.caller_for_verify(unit, hash_token(bearer_token(request)))
    if caller is None:
        raise invalid_token()
    await admit_client(request, unit, caller.client)
    return caller


VerifyingClient = Annotated[VerifyCaller, Depends(verifying_client)]


@router.post("/v1/otp/verify", response_model=OtpAccepted)
async def verify_otp(
    body: OtpVerify, caller: VerifyingClient, unit: UnitDep, runtime: RuntimeDep
) -> OtpAccepted:
    return await service.verify_otp(unit, runtime, caller, body.code)


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
