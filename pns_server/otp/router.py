from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from pns_server.db import Database
from pns_server.deps import (
    DatabaseDep,
    RuntimeDep,
    UnitClient,
    UnitDep,
    admit_client,
    admit_client_alone,
    bearer_token,
    invalid_token,
    note_seen_in_unit,
)
from pns_server.driver import DriverUnit
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
from pns_server.runtime import Runtime
from pns_server.security import hash_token

router = APIRouter(tags=["otp"], responses=PROBLEM_RESPONSES)


async def verifying_client(
    request: Request, unit: DriverUnit, token_hash: str, *, admitted: bool
) -> VerifyCaller:
    """`UnitClient` for an OTP check: the caller's row read with what the check needs, and
    locked, in the statement that authenticates it (one round trip, not two). `admitted`:
    already counted by `accepted_at_once` (which wrote nothing, so the caller is noted
    seen here when due)."""
    caller = await service.caller_for_verify(unit, token_hash)
    if caller is None:
        raise invalid_token()
    if admitted:
        await note_seen_in_unit(unit, caller.client)
    else:
        await admit_client(request, unit, caller.client)
    return caller


async def accepted_at_once(
    request: Request, db: Database, runtime: Runtime, token_hash: str, code: str
) -> OtpAccepted | None:
    """PostgreSQL: the check tried without a transaction of its own, in two statements
    (`service.accept_at_once`), the caller counted toward its limit; returns what it
    accepted. An accepted code notes the caller seen in its own statement."""
    async with db.unit_alone() as unit:
        caller = await service.caller_for_verify(unit, token_hash, lock=False)
        if caller is None:
            raise invalid_token()
        seen_at = admit_client_alone(request, caller.client)
        return await service.accept_at_once(unit, runtime, caller, code, seen_at)


@router.post("/v1/otp/verify", response_model=OtpAccepted)
async def verify_otp(
    body: OtpVerify, request: Request, db: DatabaseDep, runtime: RuntimeDep
) -> OtpAccepted:
    # The caller is authenticated in the check's own statements (`verifying_client`): on
    # PostgreSQL a current code is accepted outside a transaction (`accepted_at_once`), and
    # everything else, on either database, is decided under the caller's row lock.
    token_hash = hash_token(bearer_token(request))
    admitted = db.dialect == "postgresql"
    if admitted:
        accepted = await accepted_at_once(request, db, runtime, token_hash, body.code)
        if accepted is not None:
            return accepted
    async with db.unit() as unit:
        caller = await verifying_client(request, unit, token_hash, admitted=admitted)
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
