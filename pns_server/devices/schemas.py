from __future__ import annotations

import base64
import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pns_server.config import parse_version
from pns_server.schemas import RequestModel, ResponseModel, Timestamp, Verbatim
from pns_server.security import parse_public_key

# Plausible shapes only: the push services own the real format and may lengthen it.
_APNS_TOKEN = re.compile(r"^(?:[0-9A-Fa-f]{2}){32,100}$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:\-]{32,4096}$")
# base64url without padding of an HMAC-SHA256: 32 bytes, 43 characters.
_KEY_PROOF = re.compile(r"^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$")


def check_push_token(service: str, token: str) -> str:
    if service == "apns" and not _APNS_TOKEN.match(token):
        raise ValueError("an APNs device token is 64 to 200 hexadecimal characters")
    if service == "fcm" and not _FCM_TOKEN.match(token):
        raise ValueError("an FCM registration token is 32 to 4096 characters of [A-Za-z0-9_:-]")
    return token


class PushRegistration(RequestModel):
    service: Literal["apns", "fcm"]
    token: str = Field(min_length=1, max_length=4096)
    environment: Literal["production", "sandbox"] | None = None

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: str, info: ValidationInfo) -> str:
        service = info.data.get("service")
        return check_push_token(service, value) if service else value


class DeviceCreate(RequestModel):
    pairing_token: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    platform: Literal["ios", "android"]
    os_version: str = Field(min_length=1, max_length=32)
    app_version: str | None = Field(default=None, max_length=32)
    push: PushRegistration | None = None
    # Kept verbatim: key_proof is an HMAC over exactly this text.
    public_key: Annotated[str, Verbatim] = Field(min_length=1, max_length=2000)
    # base64url (no padding) of HMAC-SHA256(k, "pns-pair-v1|" + public_key), k being the
    # secret in the QR code's fragment; optional for apps that predate key proofs.
    key_proof: Annotated[str, Verbatim] | None = Field(default=None, max_length=43)

    @field_validator("os_version")
    @classmethod
    def _version_number(cls, value: str) -> str:
        # `\d` also matches non-ASCII digits, which no OS reports as its version.
        if not value.isascii():
            raise ValueError("not a version number: use digits and dots, like 17.2")
        parse_version(value)
        return value

    @field_validator("public_key")
    @classmethod
    def _p256_key(cls, value: str) -> str:
        parse_public_key(value.strip())
        return value

    @field_validator("key_proof")
    @classmethod
    def _proof_shape(cls, value: str | None) -> str | None:
        if value is not None and not _KEY_PROOF.match(value):
            raise ValueError("key_proof is 43 characters: base64url, no padding, of 32 bytes")
        return value

    @model_validator(mode="after")
    def _proof_needs_canonical_key(self) -> DeviceCreate:
        # The relay returns the key as the standard base64 of its DER bytes; the client checks
        # the proof over that text, so it must be the very text the phone signed.
        if self.key_proof is None:
            # Without a proof nothing is signed over the text: tolerate stray whitespace.
            self.public_key = self.public_key.strip()
        else:
            canonical = base64.b64encode(parse_public_key(self.public_key)).decode("ascii")
            if canonical != self.public_key:
                raise ValueError(
                    "with key_proof, public_key must be the standard base64 (with padding, "
                    "no line breaks) of the DER key"
                )
        return self


class TotpBlock(ResponseModel):
    secret: str
    algorithm: str
    digits: int
    period: int


class DeviceCreated(ResponseModel):
    device_id: str
    device_token: str
    totp: TotpBlock


class DeviceOut(ResponseModel):
    device_id: str
    kind: Literal["app", "totp"]
    name: str
    platform: Literal["ios", "android"] | None
    os_version: str | None
    push: Literal["apns", "fcm"] | None
    push_status: Literal["ok", "invalid_token", "none"]
    public_key: str | None
    # As the phone sent it at pairing; null for TOTP apps and apps without key proofs.
    key_proof: str | None
    created_at: Timestamp
    last_used_at: Timestamp | None


class DeviceList(ResponseModel):
    devices: list[DeviceOut]
