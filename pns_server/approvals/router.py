from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status

from pns_server.approvals import answers, creation, service
from pns_server.approvals.schemas import (
    ApprovalCreate,
    ApprovalCreated,
    ApprovalState,
    DecisionResult,
    DeviceApproval,
    DeviceApprovalList,
    DeviceDecision,
    WaitUntil,
)
from pns_server.deps import (
    CurrentClientDetached,
    CurrentDeviceDetached,
    DatabaseDep,
    RuntimeDep,
    UnitClient,
    UnitClientLocked,
    UnitDep,
    admit_device,
    bearer_token,
    invalid_token,
)
from pns_server.driver import DriverUnit
from pns_server.problems import PROBLEM_RESPONSES
from pns_server.ratelimit import count_approval
from pns_server.rows import ApprovalRow, DeviceRow
from pns_server.security import hash_token

router = APIRouter(tags=["approvals"], responses=PROBLEM_RESPONSES)

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
]
Wait = Annotated[float, Query(ge=0, le=60, description="seconds to wait while pending")]
Until = Annotated[
    WaitUntil,
    Query(
        description=(
            "what else ends the wait while pending: `change` (default) any change of the "
            "delivery counts; `final_or_failed` only every push having failed; `final` "
            "nothing but the decision (or expiry, or a cancel)"
        )
    ),
]


async def limit_approvals_per_client(request: Request, client: UnitClientLocked) -> None:
    """PNS_APPROVAL_RATE_PER_MINUTE per client, refused attempts included; counted once the
    token is known to be valid (a made-up token counts nothing), in process memory. The
    client is the route's own (`UnitClientLocked` is resolved once per request)."""
    count_approval(request, client.id)


@router.post(
    "/v1/approvals",
    status_code=status.HTTP_201_CREATED,
    response_model=ApprovalCreated,
    dependencies=[Depends(limit_approvals_per_client)],
)
async def create_approval(
    body: ApprovalCreate,
    client: UnitClientLocked,
    unit: UnitDep,
    runtime: RuntimeDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ApprovalCreated:
    created = await creation.create(unit, runtime, client, body, idempotency_key)
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return created.body


@router.get("/v1/approvals/{approval_id}", response_model=ApprovalState)
async def get_approval(
    approval_id: str,
    client: CurrentClientDetached,
    runtime: RuntimeDep,
    wait: Wait = 0,
    until: Until = "change",
) -> Response:
    # The body is an ApprovalState, rendered by the long-poll itself (see state_response).
    return service.state_response(runtime, client, approval_id, wait, until)


@router.delete("/v1/approvals/{approval_id}", response_model=ApprovalState)
async def cancel_approval(
    approval_id: str, client: UnitClient, unit: UnitDep, runtime: RuntimeDep
) -> ApprovalState:
    return await service.cancel(unit, runtime, client, approval_id)


@router.get("/v1/device/approvals", response_model=DeviceApprovalList)
async def list_device_approvals(
    device: CurrentDeviceDetached, runtime: RuntimeDep, wait: Wait = 0
) -> Response:
    """The pending approvals; with `wait`, a long-poll that returns as soon as one is
    pending (at once if one already is). Holds no database connection while it waits."""
    return service.pending_response(runtime, device, wait)


@router.get("/v1/device/approvals/{approval_id}", response_model=DeviceApproval)
async def get_device_approval(
    approval_id: str, request: Request, runtime: RuntimeDep
) -> DeviceApproval:
    # `CurrentDeviceDetached`, with the approval read by the statement that authenticates.
    token_hash = hash_token(bearer_token(request))
    found = await service.device_and_view(runtime.db, token_hash, approval_id)
    if found is None:
        raise invalid_token()
    device, approval = found
    admit_device(request, device)
    return await service.device_view(runtime, approval)


async def answering_device(
    request: Request, unit: DriverUnit, approval_id: str, *, admitted: bool = False
) -> tuple[DeviceRow, ApprovalRow | None]:
    """`UnitDevice` for an answer: the device, and the approval it answers (None if it is
    not the device's client's), read by the statement that authenticates the device.
    `admitted`: already counted toward its limit."""
    token_hash = hash_token(bearer_token(request))
    found = await answers.device_and_approval(unit, token_hash, approval_id)
    if found is None:
        raise invalid_token()
    if not admitted:
        admit_device(request, found[0])
    return found


@router.post("/v1/device/approvals/{approval_id}/response", response_model=DecisionResult)
async def answer_approval(
    approval_id: str,
    body: DeviceDecision,
    request: Request,
    db: DatabaseDep,
    runtime: RuntimeDep,
) -> DecisionResult:
    # On PostgreSQL an answer is first decided outside a transaction, its decision one
    # statement (`answers.respond_at_once`); a fraud report, a decision that lost, and
    # SQLite take the unit, where the answer is decided as if that had not run.
    at_once = db.dialect == "postgresql" and not body.fraud
    if at_once:
        async with db.unit_alone() as unit:
            device, approval = await answering_device(request, unit, approval_id)
            decided = await answers.respond_at_once(unit, runtime, device, approval, body)
        if decided is not None:
            return decided
    async with db.unit() as unit:
        device, approval = await answering_device(request, unit, approval_id, admitted=at_once)
        return await answers.respond(unit, runtime, device, approval, body)
