from __future__ import annotations

from typing import Literal

from pydantic import Field

from pns_server.schemas import RequestModel, ResponseModel, Timestamp

ApprovalStatusName = Literal["pending", "approved", "rejected", "expired", "cancelled"]
Reason = Literal["number_mismatch", "fraud", "user_rejected"]


class ApprovalCreate(RequestModel):
    username: str | None = Field(default=None, max_length=200)
    hostname: str | None = Field(default=None, max_length=255)
    ip: str | None = Field(default=None, max_length=64)
    action: str = Field(default="login", min_length=1, max_length=64)
    message: str | None = Field(default=None, max_length=500)
    ttl_seconds: int = Field(default=60, ge=10, le=300)
    number_matching: bool = True


class ApprovalCreated(ResponseModel):
    approval_id: str
    status: ApprovalStatusName
    expires_at: Timestamp
    match_code: str | None
    devices_notified: int


class SignedResponse(ResponseModel):
    decision: Literal["approve", "reject"]
    match_code: str | None
    timestamp: str
    signature: str
    public_key: str


class DeliverySummary(ResponseModel):
    queued: int
    sent: int
    failed: int
    last_error: str | None


class ApprovalState(ResponseModel):
    approval_id: str
    status: ApprovalStatusName
    reason: Reason | None
    created_at: Timestamp
    expires_at: Timestamp
    decided_at: Timestamp | None
    device_id: str | None
    response: SignedResponse | None
    delivery: DeliverySummary


class ApprovalContext(ResponseModel):
    username: str | None
    hostname: str | None
    ip: str | None
    action: str
    message: str | None


class DeviceApproval(ResponseModel):
    """What the phone sees: enough to decide, never the match code."""

    approval_id: str
    status: ApprovalStatusName
    created_at: Timestamp
    expires_at: Timestamp
    client_name: str
    context: ApprovalContext
    number_matching: bool


class DeviceApprovalList(ResponseModel):
    approvals: list[DeviceApproval]


class DeviceDecision(RequestModel):
    decision: Literal["approve", "reject"]
    match_code: str | None = Field(default=None, max_length=16)
    fraud: bool = False
    timestamp: str = Field(min_length=1, max_length=64)
    signature: str = Field(min_length=1, max_length=512)


class DecisionResult(ResponseModel):
    approval_id: str
    status: ApprovalStatusName
