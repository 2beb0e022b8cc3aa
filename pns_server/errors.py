"""Domain errors carry their HTTP status and stable `code`; one handler renders problem+json."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

PROBLEM_BASE = "https://pns.dev/problems/"


class PnsError(Exception):
    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        commit: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        # True when the work done before the error must persist (e.g. a failed-attempt count).
        self.commit = commit
        self.extra = extra

    def to_problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        for key, value in self.extra.items():
            body[key] = format_time(value) if isinstance(value, datetime) else value
        return body


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a Z, whole seconds dropped of their microseconds only if zero."""
    return value.isoformat().replace("+00:00", "Z")


class InvalidRequest(PnsError):
    status = 422
    code = "invalid_request"
    title = "Invalid request"


class Unauthenticated(PnsError):
    status = 401
    code = "unauthenticated"
    title = "Authentication required"


class Forbidden(PnsError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFound(PnsError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(PnsError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class PayloadTooLarge(PnsError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class UnsupportedMediaType(PnsError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class RateLimited(PnsError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"


class Conflict(PnsError):
    status = 409
    code = "conflict"
    title = "Conflict"


class EditionUnsupported(PnsError):
    status = 403
    code = "edition_unsupported"
    title = "Edition unsupported"


class RegistrationKeyInvalid(PnsError):
    status = 403
    code = "registration_key_invalid"
    title = "Registration key invalid"


class PlatformUnsupported(PnsError):
    status = 422
    code = "platform_unsupported"
    title = "Platform version unsupported"


class PairingInvalid(PnsError):
    status = 404
    code = "pairing_invalid"
    title = "Pairing token invalid"


class PairingExpired(PnsError):
    status = 410
    code = "pairing_expired"
    title = "Pairing expired"


class PairingNotPending(PnsError):
    status = 409
    code = "pairing_not_pending"
    title = "Pairing not pending"


class PairingWrongKind(PnsError):
    status = 409
    code = "pairing_wrong_kind"
    title = "Pairing of another kind"


class OtpInvalid(PnsError):
    status = 401
    code = "otp_invalid"
    title = "One-time password invalid"


class OtpReplayed(PnsError):
    status = 401
    code = "otp_replayed"
    title = "One-time password already used"


class OtpLocked(PnsError):
    status = 429
    code = "otp_locked"
    title = "One-time passwords locked"


class RecoveryCodeInvalid(PnsError):
    status = 401
    code = "recovery_code_invalid"
    title = "Recovery code invalid"


class NoAppDevices(PnsError):
    status = 409
    code = "no_app_devices"
    title = "No app devices"


class PushLocked(PnsError):
    status = 423
    code = "push_locked"
    title = "Push approvals locked"


class PushLimit(PnsError):
    status = 429
    code = "push_limit"
    title = "Too many push approvals"


class PlainPushNotAllowed(PnsError):
    status = 422
    code = "plain_push_not_allowed"
    title = "Plain push not allowed"


class SignatureInvalid(PnsError):
    status = 401
    code = "signature_invalid"
    title = "Signature invalid"


class StaleTimestamp(PnsError):
    status = 401
    code = "stale_timestamp"
    title = "Timestamp out of range"


class AlreadyDecided(PnsError):
    status = 409
    code = "already_decided"
    title = "Already decided"


class IdempotencyConflict(PnsError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class InternalError(PnsError):
    status = 500
    code = "internal_error"
    title = "Internal server error"


class ServiceUnavailable(PnsError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


class WebPushEndpointForbidden(PnsError):
    status = 422
    code = "webpush_endpoint_forbidden"
    title = "Web Push endpoint not allowed"
