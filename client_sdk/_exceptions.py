"""Every exception the SDK raises. Catch `PnsError` to catch them all.

    PnsError
    ├── TransportError                 the request did not get an answer
    │   ├── ConnectError               DNS, refused, TLS, firewall: nothing was sent
    │   └── RequestTimeout             connect, write, read or pool timeout
    ├── UnexpectedResponse             an answer that does not follow the API (e.g. a proxy page)
    ├── RelayCompromisedError          an answer only a compromised relay, database or proxy gives
    │   ├── ApprovalSignatureError     an "approved" the paired phone did not sign for this login
    │   └── KeyProofInvalid            a paired key that does not match the QR secret's proof
    ├── KeyProofError                  a completed pairing whose key cannot be pinned
    │   ├── KeyProofInvalid            (also a RelayCompromisedError)
    │   ├── KeyProofMissing            the phone sent no key proof (an app that predates them)
    │   └── PairingSecretUnknown       no QR secret here for that pairing (not started here)
    └── ApiError                       the server answered with a problem+json (`status`, `code`)
        ├── InvalidRequest             invalid_request (`errors`)
        ├── Unauthenticated            unauthenticated
        ├── Forbidden                  forbidden
        ├── NotFound                   not_found
        ├── MethodNotAllowed           method_not_allowed
        ├── PayloadTooLarge            payload_too_large
        ├── UnsupportedMediaType       unsupported_media_type
        ├── Conflict                   conflict
        ├── IdempotencyKeyReused       idempotency_key_reused
        ├── RateLimited                rate_limited (`retry_after`)
        ├── Unavailable                unavailable, or a 502/503/504 without a problem body
        ├── ServerError                internal_error (a bug on the relay; report its request id)
        ├── RegistrationRefused
        │   ├── EditionUnsupported     edition_unsupported
        │   └── RegistrationKeyInvalid registration_key_invalid
        ├── PlatformUnsupported        platform_unsupported
        ├── WebPushEndpointForbidden   webpush_endpoint_forbidden
        ├── PairingError
        │   ├── PairingInvalid         pairing_invalid
        │   ├── PairingExpired         pairing_expired
        │   ├── PairingNotPending      pairing_not_pending
        │   └── PairingWrongKind       pairing_wrong_kind (`kind`)
        ├── CodeRefused                a one-time password or recovery code was not accepted
        │   ├── OtpInvalid             otp_invalid (`attempts_left`)
        │   ├── OtpReplayed            otp_replayed
        │   ├── OtpLocked              otp_locked (`retry_after`, `locked_until`)
        │   └── RecoveryCodeInvalid    recovery_code_invalid (`attempts_left`)
        ├── PushUnavailable            push cannot be used now: fall back to a one-time password
        │   ├── NoAppDevices           no_app_devices
        │   ├── PushLocked             push_locked (`locked_until`)
        │   └── PushLimit              push_limit
        ├── PlainPushNotAllowed        plain_push_not_allowed
        ├── SignatureInvalid           signature_invalid
        ├── StaleTimestamp             stale_timestamp
        └── AlreadyDecided             already_decided (`approval_status`)

A `code` this SDK does not know yet raises plain `ApiError`, so newer servers never break
older clients. (The module is long only because it is one small class per server error
code, so that callers can catch exactly what they handle.) Example:

    try:
        client.verify_otp(code)
    except OtpInvalid as exc:
        print(f"wrong code, {exc.attempts_left} attempts left")
    except OtpLocked as exc:
        print(f"locked, retry in {exc.retry_after} s")
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

__all__ = [
    "AlreadyDecided",
    "ApiError",
    "ApprovalSignatureError",
    "CodeRefused",
    "Conflict",
    "ConnectError",
    "EditionUnsupported",
    "Forbidden",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "KeyProofError",
    "KeyProofInvalid",
    "KeyProofMissing",
    "MethodNotAllowed",
    "NoAppDevices",
    "NotFound",
    "OtpInvalid",
    "OtpLocked",
    "OtpReplayed",
    "PairingError",
    "PairingExpired",
    "PairingInvalid",
    "PairingNotPending",
    "PairingSecretUnknown",
    "PairingWrongKind",
    "PayloadTooLarge",
    "PlainPushNotAllowed",
    "PlatformUnsupported",
    "PnsError",
    "PushLimit",
    "PushLocked",
    "PushUnavailable",
    "RateLimited",
    "RecoveryCodeInvalid",
    "RegistrationKeyInvalid",
    "RegistrationRefused",
    "RelayCompromisedError",
    "RequestTimeout",
    "ServerError",
    "SignatureInvalid",
    "StaleTimestamp",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "WebPushEndpointForbidden",
    "error_class_for",
]


class PnsError(Exception):
    """Base of every exception raised by the SDK."""


class TransportError(PnsError):
    """The request got no answer from the server."""


class ConnectError(TransportError):
    """The connection could not be opened: nothing reached the server."""


class RequestTimeout(TransportError):
    """A connect, write, read or pool timeout elapsed."""


class UnexpectedResponse(PnsError):
    """The server (or something in front of it) answered outside the API contract."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RelayCompromisedError(PnsError):
    """The relay (or its database, or something between us) answered what an honest relay
    never does: a forged approval, a substituted device key. The SDK logs a warning that
    the relay may be compromised; never let the user in on this error, and alert someone."""


class ApprovalSignatureError(RelayCompromisedError):
    """An "approved" that does not prove the paired phone approved *this* login.

    `check` names the check that failed: "approval_id" (an answer for another approval),
    "unknown_approval" (not one this client created), "response" (no signed answer),
    "device" (no key pinned for the signing device through a key proof), "key" (the relay
    reports another key than the pinned one), "signature" (not a pns-approval-v2 signature
    over this login's nonce and context by the pinned key; `detail` says if it is a v1 one),
    "decision", "timestamp" (signed outside the login's time window) or "match_code"."""

    def __init__(
        self,
        message: str,
        *,
        approval_id: str,
        device_id: str | None,
        check: str = "signature",
    ) -> None:
        super().__init__(message)
        self.approval_id = approval_id
        self.device_id = device_id
        self.check = check


class KeyProofError(PnsError):
    """A pairing completed, but the SDK cannot pin the new device's key: approvals signed
    by it will be refused. `pairing_id` and `device_id` say which."""

    def __init__(self, message: str, *, pairing_id: str, device_id: str | None) -> None:
        super().__init__(message)
        self.pairing_id = pairing_id
        self.device_id = device_id


class KeyProofInvalid(KeyProofError, RelayCompromisedError):
    """The key the relay reports is not the one the phone that scanned our QR code proved:
    someone substituted it. Remove the device and pair again over a relay you trust."""


class KeyProofMissing(KeyProofError):
    """The phone sent no key proof (an app that predates them): update the app, remove the
    device and pair again."""


class PairingSecretUnknown(KeyProofError):
    """This client holds no QR secret for the pairing: it did not start it, or its
    `KeyStore` (memory only by default) lost it. Start a new pairing."""


class ApiError(PnsError):
    """The server refused the request with an RFC 9457 problem.

    `status` is the HTTP status, `code` the stable machine-readable value (empty if the
    answer carried none), `detail` a sentence saying what to do next, `problem` the whole
    body, `retry_after` the Retry-After header in seconds (if any)."""

    codes: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        problem: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code or 'error'}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}
        self.retry_after = retry_after

    def _int(self, name: str) -> int | None:
        value = self.problem.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _time(self, name: str) -> datetime | None:
        value = self.problem.get(name)
        if not isinstance(value, str):
            return None
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None


class InvalidRequest(ApiError):
    codes = ("invalid_request",)

    @property
    def errors(self) -> list[dict[str, Any]]:
        """One entry per bad field: `{"field", "message", "type"}`."""
        value = self.problem.get("errors")
        return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


class Unauthenticated(ApiError):
    codes = ("unauthenticated",)


class Forbidden(ApiError):
    codes = ("forbidden",)


class NotFound(ApiError):
    codes = ("not_found",)


class MethodNotAllowed(ApiError):
    codes = ("method_not_allowed",)


class PayloadTooLarge(ApiError):
    codes = ("payload_too_large",)


class UnsupportedMediaType(ApiError):
    codes = ("unsupported_media_type",)


class Conflict(ApiError):
    codes = ("conflict",)


class IdempotencyKeyReused(ApiError):
    codes = ("idempotency_key_reused",)


class RateLimited(ApiError):
    codes = ("rate_limited",)


class Unavailable(ApiError):
    codes = ("unavailable",)


class ServerError(ApiError):
    codes = ("internal_error",)


class RegistrationRefused(ApiError):
    """The server does not accept this installation."""


class EditionUnsupported(RegistrationRefused):
    codes = ("edition_unsupported",)


class RegistrationKeyInvalid(RegistrationRefused):
    codes = ("registration_key_invalid",)


class PlatformUnsupported(ApiError):
    codes = ("platform_unsupported",)


class WebPushEndpointForbidden(ApiError):
    """A Web Push subscription whose endpoint is not on the relay's push-service allow-list."""

    codes = ("webpush_endpoint_forbidden",)


class PairingError(ApiError):
    """The pairing cannot go on; start a new one."""


class PairingInvalid(PairingError):
    codes = ("pairing_invalid",)


class PairingExpired(PairingError):
    codes = ("pairing_expired",)


class PairingNotPending(PairingError):
    codes = ("pairing_not_pending",)


class PairingWrongKind(PairingError):
    """The pairing is of another kind: only a TOTP pairing is confirmed with a code."""

    codes = ("pairing_wrong_kind",)

    @property
    def kind(self) -> str | None:
        """The pairing's actual kind, e.g. "app"."""
        value = self.problem.get("kind")
        return value if isinstance(value, str) else None


class CodeRefused(ApiError):
    """A one-time password or recovery code was not accepted."""


class OtpInvalid(CodeRefused):
    codes = ("otp_invalid",)

    @property
    def attempts_left(self) -> int | None:
        """Failures still allowed before the lock."""
        return self._int("attempts_left")


class OtpReplayed(CodeRefused):
    codes = ("otp_replayed",)


class OtpLocked(CodeRefused):
    codes = ("otp_locked",)

    @property
    def locked_until(self) -> datetime | None:
        return self._time("locked_until")


class RecoveryCodeInvalid(CodeRefused):
    codes = ("recovery_code_invalid",)

    @property
    def attempts_left(self) -> int | None:
        return self._int("attempts_left")


class PushUnavailable(ApiError):
    """Push approval cannot be used right now; ask for a one-time password instead."""


class NoAppDevices(PushUnavailable):
    # API.md's general example names `no_push_devices`; accept both spellings.
    codes = ("no_app_devices", "no_push_devices")


class PushLocked(PushUnavailable):
    codes = ("push_locked",)

    @property
    def locked_until(self) -> datetime | None:
        """End of the fraud lock."""
        return self._time("locked_until")


class PushLimit(PushUnavailable):
    codes = ("push_limit",)


class PlainPushNotAllowed(ApiError):
    codes = ("plain_push_not_allowed",)


class SignatureInvalid(ApiError):
    codes = ("signature_invalid",)


class StaleTimestamp(ApiError):
    codes = ("stale_timestamp",)


class AlreadyDecided(ApiError):
    codes = ("already_decided",)

    @property
    def approval_status(self) -> str | None:
        """The decision that won: approved, rejected, expired or cancelled."""
        value = self.problem.get("approval_status")
        return value if isinstance(value, str) else None


def _all_subclasses(cls: type[ApiError]) -> list[type[ApiError]]:
    found: list[type[ApiError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_BY_CODE: dict[str, type[ApiError]] = {
    code: cls for cls in _all_subclasses(ApiError) for code in cls.codes
}


def error_class_for(code: str, status: int) -> type[ApiError]:
    """The exception class for a problem `code`; `ApiError` for codes we do not know."""
    known = _BY_CODE.get(code)
    if known is not None:
        return known
    if not code and status in (502, 503, 504):
        return Unavailable
    return ApiError
