from __future__ import annotations

from typing import Literal

from pydantic import Field

from pns_server.schemas import RequestModel, ResponseModel


class OtpVerify(RequestModel):
    # A string, never a number: a JSON number would lose leading zeros.
    code: str = Field(min_length=1, max_length=32)


class OtpAccepted(ResponseModel):
    result: Literal["accepted"] = "accepted"
    device_id: str


class RecoveryCodesCreated(ResponseModel):
    codes: list[str]


class RecoveryCodeVerify(RequestModel):
    code: str = Field(min_length=1, max_length=64)


class RecoveryCodeAccepted(ResponseModel):
    result: Literal["accepted"] = "accepted"
    remaining: int
