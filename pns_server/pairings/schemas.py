from __future__ import annotations

from typing import Literal

from pydantic import Field

from pns_server.devices.schemas import DeviceOut
from pns_server.schemas import RequestModel, ResponseModel, Timestamp

PairingKind = Literal["app", "totp"]
PairingState = Literal["pending", "completed", "expired"]


class PairingCreate(RequestModel):
    kind: PairingKind
    # kind=totp: the account name shown in the authenticator app; default the client's name.
    label: str | None = Field(default=None, min_length=1, max_length=200)


class PairingCreated(ResponseModel):
    pairing_id: str
    kind: PairingKind
    status: PairingState
    expires_at: Timestamp
    qr_payload: str
    otpauth_uri: str | None = None
    # kind=app with the web approver on: an https link carrying the same parameters.
    qr_link: str | None = None


class PairingConfirm(RequestModel):
    code: str = Field(min_length=1, max_length=16)


class PairingConfirmed(ResponseModel):
    device: DeviceOut


class PairingStatus(ResponseModel):
    pairing_id: str
    kind: PairingKind
    status: PairingState
    expires_at: Timestamp
    device: DeviceOut | None
