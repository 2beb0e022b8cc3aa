"""The push-sender protocol: every provider turns a PushMessage into a PushResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # 429 / 5xx / timeout / connection error: try again later
    INVALID_TOKEN = "invalid_token"  # the token is dead: mark the device, never resend
    CONFIG_ERROR = "config_error"  # our credentials/topic are wrong: loud, counted


@dataclass(frozen=True, slots=True)
class PushMessage:
    """What a provider needs; carries no secrets (the app fetches details over TLS)."""

    approval_id: str
    device_id: str
    service: str  # apns | fcm | webpush | log
    token: str  # webpush: the subscription's endpoint URL
    environment: str  # production | sandbox
    title: str
    body: str
    expires_at: datetime
    data: dict[str, str] = field(default_factory=dict)
    # webpush: the subscription's (p256dh, auth), base64url; they encrypt, they are not sent.
    webpush_keys: tuple[str, str] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PushResult:
    outcome: Outcome
    reason: str | None = None  # the provider's reason, e.g. "Unregistered"
    status_code: int | None = None
    retry_after: float | None = None  # seconds, from the provider's Retry-After

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.DELIVERED


class PushSender(Protocol):
    """One provider. `send` never raises for provider trouble: it classifies it."""

    service: str

    async def send(self, message: PushMessage) -> PushResult: ...

    async def close(self) -> None: ...
