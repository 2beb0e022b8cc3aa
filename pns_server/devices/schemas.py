from __future__ import annotations

import base64
import re
from typing import Annotated, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import Field, ValidationInfo, field_validator, model_validator

from pns_server.config import parse_version
from pns_server.push.webpush import b64url_decode
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


class WebPushKeys(RequestModel):
    """A browser's `PushSubscription.toJSON().keys`."""

    p256dh: str = Field(min_length=1, max_length=200)
    auth: str = Field(min_length=1, max_length=100)

    @field_validator("p256dh")
    @classmethod
    def _p256_point(cls, value: str) -> str:
        try:
            raw = b64url_decode(value)
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        except ValueError:
            raise ValueError("p256dh must be a base64url uncompressed P-256 point") from None
        if len(raw) != 65:
            raise ValueError("p256dh must be a base64url uncompressed P-256 point")
        return value

    @field_validator("auth")
    @classmethod
    def _auth_secret(cls, value: str) -> str:
        try:
            raw = b64url_decode(value)
        except ValueError:
            raw = b""
        if len(raw) != 16:
            raise ValueError("auth must be 16 bytes, base64url")
        return value


class PushRegistration(RequestModel):
    """`{"service": "apns"|"fcm", "token": ...}`, or a browser's push subscription:
    `{"service": "webpush", "endpoint": "https://...", "keys": {"p256dh": ..., "auth": ...}}`."""

    service: Literal["apns", "fcm", "webpush"]
    token: str | None = Field(default=None, min_length=1, max_length=4096)
    environment: Literal["production", "sandbox"] | None = None
    endpoint: str | None = Field(default=None, min_length=1, max_length=2000)
    keys: WebPushKeys | None = None
    # PushSubscription.toJSON() carries it; push services expire subscriptions themselves.
    expirationTime: int | float | None = None

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: str | None, info: ValidationInfo) -> str | None:
        service = info.data.get("service")
        return check_push_token(service, value) if service and value is not None else value

    @model_validator(mode="after")
    def _fields_of_the_service(self) -> PushRegistration:
        if self.service == "webpush":
            if self.endpoint is None or self.keys is None:
                raise ValueError("webpush needs endpoint and keys (PushSubscription.toJSON())")
            if self.token is not None:
                raise ValueError("webpush takes endpoint and keys, not token")
        elif self.token is None:
            raise ValueError(f"{self.service} needs a token")
        return self

    @property
    def address(self) -> str:
        """What the relay sends to: the device token, or the subscription's endpoint."""
        value = self.endpoint if self.service == "webpush" else self.token
        assert value is not None
        return value


class DeviceCreate(RequestModel):
    pairing_token: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    platform: Literal["ios", "android", "web"]
    # Required for ios/android (minimum versions); a web approver has none to report.
    os_version: str | None = Field(default=None, min_length=1, max_length=32)
    app_version: str | None = Field(default=None, max_length=32)
    push: PushRegistration | None = None
    multiline_fields = frozenset({"public_key"})
    # Kept verbatim: key_proof is an HMAC over exactly this text.
    public_key: Annotated[str, Verbatim] = Field(min_length=1, max_length=2000)
    # base64url (no padding) of HMAC-SHA256(k, "pns-pair-v1|" + public_key), k being the
    # secret in the QR code's fragment; optional for apps that predate key proofs.
    key_proof: Annotated[str, Verbatim] | None = Field(default=None, max_length=43)

    @field_validator("os_version")
    @classmethod
    def _version_number(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
    platform: Literal["ios", "android", "web"] | None
    os_version: str | None
    push: Literal["apns", "fcm", "webpush"] | None
    push_status: Literal["ok", "invalid_token", "none"]
    public_key: str | None
    # As the phone sent it at pairing; null for TOTP apps and apps without key proofs.
    key_proof: str | None
    created_at: Timestamp
    last_used_at: Timestamp | None


class DeviceList(ResponseModel):
    devices: list[DeviceOut]
