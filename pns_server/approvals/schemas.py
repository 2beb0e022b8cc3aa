from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from pns_server.schemas import RequestModel, ResponseModel, Timestamp, Verbatim

ApprovalStatusName = Literal["pending", "approved", "rejected", "expired", "cancelled"]
Reason = Literal["number_mismatch", "fraud", "user_rejected"]
# What ends a client's long-poll on a pending approval besides its decision (and `wait`):
# `change` any change of the delivery counts, `final_or_failed` only every push having
# failed, `final` nothing else.
WaitUntil = Literal["change", "final", "final_or_failed"]


SIGNATURE_V1 = "pns-approval-v1"
SIGNATURE_V2 = "pns-approval-v2"
_BASE64URL = re.compile(r"^[A-Za-z0-9_-]+={0,2}$")
NONCE_MIN_BYTES, NONCE_MAX_BYTES = 16, 64


def decode_base64url(value: str) -> bytes:
    """base64url with or without padding; ValueError for anything else."""
    if not _BASE64URL.match(value):
        raise ValueError("not base64url (A-Z a-z 0-9 - _)")
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def check_utf8(value: str | None) -> str | None:
    # A lone surrogate (JSON "\ud800") has no UTF-8 form, so it could be neither stored nor
    # hashed into the signed context.
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return value


# The login context is stored and returned verbatim: the phone signs its hash (v2).
class ApprovalCreate(RequestModel):
    username: Annotated[str, Verbatim] | None = Field(default=None, max_length=200)
    hostname: Annotated[str, Verbatim] | None = Field(default=None, max_length=255)
    ip: Annotated[str, Verbatim] | None = Field(default=None, max_length=64)
    action: Annotated[str, Verbatim] = Field(default="login", min_length=1, max_length=64)
    message: Annotated[str, Verbatim] | None = Field(default=None, max_length=500)
    ttl_seconds: int = Field(default=60, ge=10, le=300)
    number_matching: bool = True
    # base64url of 16..64 random bytes; with it the phone signs pns-approval-v2.
    client_nonce: Annotated[str, Verbatim] | None = Field(default=None, max_length=100)

    @field_validator("username", "hostname", "ip", "action", "message")
    @classmethod
    def _unicode(cls, value: str | None) -> str | None:
        return check_utf8(value)

    @field_validator("client_nonce")
    @classmethod
    def _nonce(cls, value: str | None) -> str | None:
        if value is None:
            return None
        size = len(decode_base64url(value))
        if not NONCE_MIN_BYTES <= size <= NONCE_MAX_BYTES:
            raise ValueError(
                f"client_nonce must decode to {NONCE_MIN_BYTES}..{NONCE_MAX_BYTES} bytes, "
                f"not {size}"
            )
        return value


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
    # What the signature covers: v2 (nonce and context) for approvals created with a
    # client_nonce, v1 otherwise.
    version: Literal["pns-approval-v1", "pns-approval-v2"]


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
    # The client's nonce (null for an older client): present means sign pns-approval-v2.
    client_nonce: str | None


class DeviceApprovalList(ResponseModel):
    approvals: list[DeviceApproval]


# Every signed field is checked on the exact text received.
class DeviceDecision(RequestModel):
    decision: Literal["approve", "reject"]
    match_code: Annotated[str, Verbatim] | None = Field(default=None, max_length=16)
    fraud: bool = False
    timestamp: Annotated[str, Verbatim] = Field(min_length=1, max_length=64)
    signature: Annotated[str, Verbatim] = Field(min_length=1, max_length=512)


class DecisionResult(ResponseModel):
    approval_id: str
    status: ApprovalStatusName
