"""Typed, immutable results. Times are timezone-aware UTC datetimes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "Approval",
    "ApprovalRequested",
    "ApprovalResponse",
    "ClientInfo",
    "ClientRegistration",
    "CodePrompt",
    "Delivery",
    "Device",
    "DeviceApproval",
    "DeviceDecision",
    "LoginResult",
    "OtpResult",
    "Pairing",
    "Ping",
    "RecoveryCodes",
    "RecoveryResult",
    "TotpParameters",
]

PairingKind = Literal["app", "totp"]
# What else ends a long-poll on a pending approval: `change` (the relay's default) any
# change of its delivery counts, `final_or_failed` only every push having failed, `final`
# nothing but the decision.
WaitUntil = Literal["change", "final", "final_or_failed"]
FINAL_APPROVAL_STATUSES = frozenset({"approved", "rejected", "expired", "cancelled"})


@dataclass(frozen=True)
class ClientRegistration:
    """The credentials of a newly registered backup-client installation. Store the token
    as a secret: it is shown once."""

    client_id: str
    client_token: str = field(repr=False)
    edition: str


@dataclass(frozen=True)
class Ping:
    """`clock_skew` is server time minus local time in seconds (positive: our clock is
    behind), measured at the middle of the round trip."""

    server_time: datetime
    clock_skew: float
    round_trip: float
    version: str


@dataclass(frozen=True)
class ClientInfo:
    client_id: str
    name: str
    edition: str
    hostname: str | None
    created_at: datetime
    devices: int
    push_devices: int
    locked_until: datetime | None


@dataclass(frozen=True)
class Device:
    device_id: str
    kind: str
    name: str
    platform: str | None
    os_version: str | None
    push: str | None
    push_status: str
    public_key: str | None
    created_at: datetime
    last_used_at: datetime | None
    # HMAC by the pairing's QR secret over `public_key`, as the phone sent it (None for TOTP
    # apps and older apps); the SDK checks it once, when the pairing it started completes.
    key_proof: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Pairing:
    """A pairing started by the client. `qr_payload` and `otpauth_uri` are only known from
    `start_pairing` (the status endpoint does not repeat them). For an app pairing,
    `qr_payload` ends with `#k=<secret>`: the QR secret the relay never sees, which the
    phone uses to prove its key. The SDK keeps it in its `KeyStore` until the pairing
    completes; `pinned` is True once the new device's key is pinned."""

    pairing_id: str
    kind: str
    status: str
    expires_at: datetime
    device: Device | None = None
    qr_payload: str | None = field(default=None, repr=False)
    otpauth_uri: str | None = field(default=None, repr=False)
    pinned: bool = False
    # App pairings on a relay with the web approver: the same parameters (and the same
    # secret) as an https link, `<relay>/app/pair#server=...&token=...&k=...`.
    qr_link: str | None = field(default=None, repr=False)

    @property
    def is_pending(self) -> bool:
        return self.status == "pending"

    @property
    def qr(self) -> str | None:
        """What to draw as the QR code: the https link when the relay offers one (a phone's
        camera opens it in the web approver, or in a native app that claims the link),
        else `qr_payload`."""
        return self.qr_link or self.qr_payload


@dataclass(frozen=True)
class OtpResult:
    result: str
    device_id: str | None


@dataclass(frozen=True)
class RecoveryCodes:
    """Show these once to the user; the server keeps only their hashes."""

    codes: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class RecoveryResult:
    result: str
    remaining: int


@dataclass(frozen=True)
class ApprovalRequested:
    """A new push approval. Show `match_code` on the login screen: the user types it on the
    phone."""

    approval_id: str
    status: str
    expires_at: datetime
    match_code: str | None
    devices_notified: int
    idempotency_key: str
    # The random nonce this client sent; the phone's v2 signature must cover it.
    client_nonce: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Delivery:
    queued: int
    sent: int
    failed: int
    last_error: str | None

    @property
    def all_failed(self) -> bool:
        """Every push failed and none is still on its way: offer the OTP at once."""
        return self.failed > 0 and self.queued == 0 and self.sent == 0


@dataclass(frozen=True)
class ApprovalResponse:
    """The device's signed answer. `timestamp` is kept verbatim: the signature covers it."""

    decision: str
    match_code: str | None
    timestamp: str
    signature: str
    public_key: str | None
    # "pns-approval-v2" or "pns-approval-v1", as the relay says (the SDK checks for itself).
    version: str | None = None

    @property
    def signed_at(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.timestamp)
        except ValueError:
            return None


@dataclass(frozen=True)
class Approval:
    """An approval's state. `verified` is True once the SDK checked `response`: signed by
    the key pinned (through a key proof) for `device_id`, over this client's nonce and login
    context, in time, with the match code it showed. An `approved` approval that fails
    those checks never reaches the caller: `ApprovalSignatureError` is raised instead."""

    approval_id: str
    status: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    device_id: str | None
    response: ApprovalResponse | None
    delivery: Delivery | None
    verified: bool = False

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_APPROVAL_STATUSES

    @property
    def approved(self) -> bool:
        return self.status == "approved"


@dataclass(frozen=True)
class LoginResult:
    """How a `login()` ended. `method` is "push", "otp" or "recovery_code" on success and
    None when the user gave up. `fallback_reason` says why push was not used, if it wasn't."""

    success: bool
    method: str | None
    approval: Approval | None = None
    device_id: str | None = None
    fallback_reason: str | None = None
    recovery_codes_remaining: int | None = None


@dataclass(frozen=True)
class CodePrompt:
    """What `login()` tells the code prompt: why push was not used (`reason`: rejected,
    expired, cancelled, user_choice, delivery_failed, push_unavailable, timeout), which
    try this is, and the previous try's error (with `attempts_left` when known)."""

    reason: str
    attempt: int
    error: Exception | None = None

    @property
    def attempts_left(self) -> int | None:
        value = getattr(self.error, "attempts_left", None)
        return value if isinstance(value, int) else None


@dataclass(frozen=True)
class TotpParameters:
    secret: str = field(repr=False)
    algorithm: str = "SHA1"
    digits: int = 6
    period: int = 30

    def to_dict(self) -> dict[str, Any]:
        return {
            "secret": self.secret,
            "algorithm": self.algorithm,
            "digits": self.digits,
            "period": self.period,
        }


@dataclass(frozen=True)
class DeviceApproval:
    """An approval as the phone sees it: never the match code itself."""

    approval_id: str
    status: str
    created_at: datetime
    expires_at: datetime
    client_name: str | None
    context: dict[str, Any]
    number_matching: bool
    # Present: sign pns-approval-v2 over it and the context's hash; None: sign v1.
    client_nonce: str | None = None


@dataclass(frozen=True)
class DeviceDecision:
    approval_id: str
    status: str
