"""The SDK's core and transport rules, against scripted servers (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import client_sdk
from client_sdk import (
    AlreadyDecided,
    ApiError,
    ApprovalSignatureError,
    AsyncPnsClient,
    ConnectError,
    InvalidRequest,
    KeyStore,
    NoAppDevices,
    OtpInvalid,
    OtpLocked,
    PnsClient,
    PnsError,
    PushLocked,
    PushUnavailable,
    RateLimited,
    RequestTimeout,
    Unavailable,
    UnexpectedResponse,
    parse_qr_payload,
)
from client_sdk._exceptions import error_class_for
from client_sdk._keys import public_key_b64, sign_approval
from pns_server import errors as server_errors
from tests.support.factories import new_key

URL = "http://pns.test"
Handler = Callable[[httpx.Request], httpx.Response]


def problem(status: int, code: str, **extra: Any) -> httpx.Response:
    body = {"type": "x", "title": "t", "status": status, "detail": "do this", "code": code}
    body.update(extra)
    headers = {"content-type": "application/problem+json"}
    if status == 429:
        headers["retry-after"] = "7"
    return httpx.Response(status, json=body, headers=headers)


def client_for(handler: Handler, **kwargs: Any) -> PnsClient:
    return PnsClient(URL, token="tok", transport=httpx.MockTransport(handler), **kwargs)


def _is_server_error(obj: object) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, server_errors.PnsError)
        and obj is not server_errors.PnsError
    )


class TestErrorMapping:
    @pytest.mark.parametrize(
        ("status", "code", "cls"),
        [
            (401, "unauthenticated", client_sdk.Unauthenticated),
            (403, "edition_unsupported", client_sdk.EditionUnsupported),
            (403, "registration_key_invalid", client_sdk.RegistrationKeyInvalid),
            (422, "platform_unsupported", client_sdk.PlatformUnsupported),
            (404, "pairing_invalid", client_sdk.PairingInvalid),
            (410, "pairing_expired", client_sdk.PairingExpired),
            (409, "pairing_not_pending", client_sdk.PairingNotPending),
            (409, "pairing_wrong_kind", client_sdk.PairingWrongKind),
            (401, "otp_replayed", client_sdk.OtpReplayed),
            (401, "recovery_code_invalid", client_sdk.RecoveryCodeInvalid),
            (409, "no_app_devices", NoAppDevices),
            (429, "push_limit", client_sdk.PushLimit),
            (422, "plain_push_not_allowed", client_sdk.PlainPushNotAllowed),
            (401, "signature_invalid", client_sdk.SignatureInvalid),
            (401, "stale_timestamp", client_sdk.StaleTimestamp),
            (404, "not_found", client_sdk.NotFound),
            (503, "unavailable", Unavailable),
        ],
    )
    def test_each_code_raises_its_class(self, status: int, code: str, cls: type) -> None:
        with client_for(lambda _r: problem(status, code)) as client, pytest.raises(cls) as info:
            client.me()
        assert isinstance(info.value, ApiError)
        assert (info.value.status, info.value.code, info.value.detail) == (status, code, "do this")

    def test_extras_are_typed(self) -> None:
        responses = iter(
            [
                problem(401, "otp_invalid", attempts_left=3),
                problem(429, "otp_locked", locked_until="2026-11-30T09:12:18Z"),
                problem(423, "push_locked", locked_until="2026-11-30T09:12:18.5Z"),
                problem(409, "already_decided", approval_status="approved"),
                problem(422, "invalid_request", errors=[{"field": "code", "message": "m"}]),
                problem(429, "rate_limited"),
            ]
        )
        with client_for(lambda _r: next(responses)) as client:
            with pytest.raises(OtpInvalid) as otp:
                client.verify_otp("1")
            assert otp.value.attempts_left == 3
            with pytest.raises(OtpLocked) as locked:
                client.verify_otp("1")
            assert locked.value.retry_after == 7.0
            assert locked.value.locked_until == datetime(2026, 11, 30, 9, 12, 18, tzinfo=UTC)
            with pytest.raises(PushUnavailable) as push:
                client.me()
            assert isinstance(push.value, PushLocked)
            assert push.value.locked_until is not None
            with pytest.raises(AlreadyDecided) as decided:
                client.cancel_approval("a")
            assert decided.value.approval_status == "approved"
            with pytest.raises(InvalidRequest) as invalid:
                client.verify_otp("")
            assert invalid.value.errors == [{"field": "code", "message": "m"}]
            with pytest.raises(RateLimited) as limited:
                client.me()
            assert limited.value.retry_after == 7.0

    def test_wrong_kind_names_the_pairing_kind(self) -> None:
        with (
            client_for(lambda _r: problem(409, "pairing_wrong_kind", kind="app")) as client,
            pytest.raises(client_sdk.PairingError) as info,
        ):
            client.confirm_totp_pairing("pair1", "123456")
        assert isinstance(info.value, client_sdk.PairingWrongKind)
        assert info.value.kind == "app"

    @pytest.mark.parametrize(
        "server_error",
        [cls for cls in vars(server_errors).values() if _is_server_error(cls)],
        ids=lambda cls: cls.code,
    )
    def test_every_server_code_has_its_own_class(self, server_error: type) -> None:
        sdk_class = error_class_for(server_error.code, server_error.status)
        assert sdk_class is not ApiError, f"no SDK exception for {server_error.code!r}"
        assert sdk_class.__name__ in client_sdk.__all__

    def test_unknown_code_is_plain_api_error(self) -> None:
        with (
            client_for(lambda _r: problem(418, "teapot_v9")) as client,
            pytest.raises(ApiError) as info,
        ):
            client.me()
        assert type(info.value) is ApiError
        assert info.value.code == "teapot_v9"

    def test_proxy_error_page_is_unavailable(self) -> None:
        page = httpx.Response(502, text="<html>Bad gateway</html>")
        with client_for(lambda _r: page) as client, pytest.raises(Unavailable) as info:
            client.me()
        assert info.value.code == ""

    def test_non_json_success_is_unexpected(self) -> None:
        with (
            client_for(lambda _r: httpx.Response(200, text="<html>login portal</html>")) as c,
            pytest.raises(UnexpectedResponse),
        ):
            c.me()

    def test_missing_field_is_unexpected(self) -> None:
        with (
            client_for(lambda _r: httpx.Response(200, json={"time": "x"})) as client,
            pytest.raises(UnexpectedResponse, match="time"),
        ):
            client.ping()


class TestTransport:
    def test_get_is_retried_after_connect_errors(self) -> None:
        calls: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            if len(calls) < 3:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json={"time": "2026-11-30T09:12:18Z", "version": "1"})

        with client_for(handler, retries=2) as client:
            assert client.ping().version == "1"
        assert len(calls) == 3

    def test_retries_are_bounded_and_mapped(self) -> None:
        calls: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            raise httpx.ConnectError("refused", request=request)

        with client_for(handler, retries=1) as client, pytest.raises(ConnectError):
            client.ping()
        assert len(calls) == 2

    def test_post_is_not_retried(self) -> None:
        calls: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            raise httpx.ConnectError("refused", request=request)

        with client_for(handler) as client, pytest.raises(ConnectError):
            client.verify_otp("123456")
        assert len(calls) == 1

    def test_timeouts_have_their_own_class(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        with client_for(handler) as client, pytest.raises(RequestTimeout) as info:
            client.verify_otp("123456")
        assert isinstance(info.value, PnsError)

    def test_approval_request_retried_with_the_same_idempotency_key(self) -> None:
        keys: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            keys.append(request.headers["idempotency-key"])
            if len(keys) == 1:
                raise httpx.ReadTimeout("lost answer", request=request)
            return httpx.Response(
                201,
                json={
                    "approval_id": "a1",
                    "status": "pending",
                    "expires_at": "2026-11-30T09:12:18Z",
                    "match_code": "042",
                    "devices_notified": 1,
                },
            )

        with client_for(handler) as client:
            requested = client.request_approval(username="admin")
        assert requested.match_code == "042"
        assert len(keys) == 2 and keys[0] == keys[1] == requested.idempotency_key

    def test_long_poll_read_timeout_outlasts_the_wait(self) -> None:
        seen: list[dict[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append({"timeout": request.extensions["timeout"], "wait": request.url.params})
            return httpx.Response(
                200,
                json={
                    "pairing_id": "p",
                    "kind": "app",
                    "status": "pending",
                    "expires_at": "2026-11-30T09:12:18Z",
                    "device": None,
                },
            )

        with client_for(handler, timeout=5.0) as client:
            client.get_pairing("p", wait=30)
            client.get_pairing("p")
        assert seen[0]["wait"]["wait"] == "30"
        assert seen[0]["timeout"]["read"] > 30
        assert seen[1]["timeout"]["read"] == 5.0

    def test_ping_reports_clock_skew(self) -> None:
        def handler(_request: httpx.Request) -> httpx.Response:
            ahead = datetime.now(UTC) + timedelta(seconds=120)
            return httpx.Response(200, json={"time": ahead.isoformat(), "version": "0.1.0"})

        with client_for(handler) as client:
            ping = client.ping()
        assert 115 < ping.clock_skew < 125
        assert ping.server_time.tzinfo is not None

    async def test_async_client_maps_the_same_way(self) -> None:
        def handler(_request: httpx.Request) -> httpx.Response:
            return problem(401, "otp_invalid", attempts_left=1)

        transport = httpx.MockTransport(handler)
        async with AsyncPnsClient(URL, token="t", transport=transport) as client:
            with pytest.raises(OtpInvalid) as info:
                await client.verify_otp("123456")
        assert info.value.attempts_left == 1


class TestQrPayload:
    def test_parses_server_and_token(self) -> None:
        payload = "pns://pair?server=https%3A%2F%2Fpns.example.com%2F&token=pnsp_abc"
        assert parse_qr_payload(payload) == ("https://pns.example.com", "pnsp_abc")

    @pytest.mark.parametrize(
        "payload",
        [
            "https://pair?server=https%3A%2F%2Fa&token=t",
            "pns://pair?token=t",
            "pns://pair?server=https%3A%2F%2Fa",
            "pns://pair?server=ftp%3A%2F%2Fa&token=t",
            "otpauth://totp/x?secret=AAAA",
        ],
    )
    def test_refuses_other_text(self, payload: str) -> None:
        with pytest.raises(ValueError):
            parse_qr_payload(payload)


def approval_body(
    key: Any,
    *,
    status: str = "approved",
    decision: str = "approve",
    match_code: str | None = "417",
    device_id: str = "dev1",
    public_key: str | None = None,
    signature: str | None = None,
) -> dict[str, Any]:
    timestamp = "2026-11-30T09:12:18Z"
    return {
        "approval_id": "appr1",
        "status": status,
        "reason": None,
        "created_at": "2026-11-30T09:12:00Z",
        "expires_at": "2026-11-30T09:13:00Z",
        "decided_at": timestamp,
        "device_id": device_id,
        "response": {
            "decision": decision,
            "match_code": match_code,
            "timestamp": timestamp,
            "signature": signature or sign_approval(key, "appr1", decision, match_code, timestamp),
            "public_key": public_key or public_key_b64(key),
        },
        "delivery": {"queued": 0, "sent": 1, "failed": 0, "last_error": None},
    }


def device_body(key: Any, device_id: str = "dev1") -> dict[str, Any]:
    return {
        "device_id": device_id,
        "kind": "app",
        "name": "Ann's iPhone",
        "platform": "ios",
        "os_version": "17.2",
        "push": "apns",
        "push_status": "ok",
        "public_key": public_key_b64(key),
        "created_at": "2026-11-30T09:00:00Z",
        "last_used_at": None,
    }


class TestSignatureVerification:
    """The SDK trusts only the key it pinned, never what the relay echoes."""

    def serve(self, approval: dict[str, Any], devices: list[dict[str, Any]]) -> PnsClient:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/devices":
                return httpx.Response(200, json={"devices": devices})
            return httpx.Response(200, json=approval)

        return client_for(handler)

    def test_good_signature_verifies_after_pinning_from_the_device_list(self) -> None:
        key = new_key()
        with self.serve(approval_body(key), [device_body(key)]) as client:
            approval = client.get_approval("appr1", match_code="417")
        assert approval.approved and approval.verified
        assert "dev1" in client.key_store

    def test_relay_substituting_key_and_signature_is_caught(self) -> None:
        real, forged = new_key(), new_key()
        body = approval_body(forged)  # signed by the attacker's key, which it also echoes
        with self.serve(body, [device_body(real)]) as client, pytest.raises(ApprovalSignatureError):
            client.get_approval("appr1")

    def test_signature_by_pinned_key_over_other_text_is_caught(self) -> None:
        key = new_key()
        wrong = sign_approval(key, "other-approval", "approve", "417", "2026-11-30T09:12:18Z")
        with (
            self.serve(approval_body(key, signature=wrong), [device_body(key)]) as client,
            pytest.raises(ApprovalSignatureError),
        ):
            client.get_approval("appr1")

    def test_approved_without_response_is_caught(self) -> None:
        body = approval_body(new_key())
        body["response"] = None
        with self.serve(body, []) as client, pytest.raises(ApprovalSignatureError):
            client.get_approval("appr1")

    def test_approval_of_a_reject_decision_is_caught(self) -> None:
        key = new_key()
        body = approval_body(key, decision="reject", match_code=None)
        with self.serve(body, [device_body(key)]) as client, pytest.raises(ApprovalSignatureError):
            client.get_approval("appr1")

    def test_wrong_match_code_approved_by_relay_is_caught(self) -> None:
        key = new_key()
        with (
            self.serve(approval_body(key, match_code="999"), [device_body(key)]) as client,
            pytest.raises(ApprovalSignatureError, match="match code"),
        ):
            client.get_approval("appr1", match_code="417")

    def test_device_unknown_to_the_client_is_caught(self) -> None:
        with (
            self.serve(approval_body(new_key()), []) as client,
            pytest.raises(ApprovalSignatureError, match="not one of"),
        ):
            client.get_approval("appr1")

    def test_pending_needs_no_signature(self) -> None:
        body = approval_body(new_key(), status="pending")
        body["response"] = None
        with self.serve(body, []) as client:
            assert client.get_approval("appr1").verified is False


class TestKeyStore:
    def test_persists_and_never_overwrites_a_pin(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.json"
        first, second = public_key_b64(new_key()), public_key_b64(new_key())
        store = KeyStore(path)
        assert store.pin("d1", first)
        assert not store.pin("d1", second)
        reloaded = KeyStore(path)
        assert reloaded.get("d1") == first
        assert json.loads(path.read_text())["devices"] == {"d1": first}
        assert path.stat().st_mode & 0o777 == 0o600
        reloaded.forget("d1")
        assert KeyStore(path).get("d1") is None


def pending_approval(delivery: dict[str, Any]) -> dict[str, Any]:
    return {
        "approval_id": "appr1",
        "status": "pending",
        "reason": None,
        "created_at": "2026-11-30T09:12:00Z",
        "expires_at": "2026-11-30T09:13:00Z",
        "decided_at": None,
        "device_id": None,
        "response": None,
        "delivery": delivery,
    }


class TestLoginRules:
    """Branches a real relay cannot be made to take on demand (a push provider failing)."""

    def test_failed_delivery_cancels_and_falls_back_to_the_code(self) -> None:
        seen: list[str] = []
        states = iter(
            [
                pending_approval({"queued": 1, "sent": 0, "failed": 0, "last_error": None}),
                pending_approval({"queued": 0, "sent": 0, "failed": 1, "last_error": "410"}),
            ]
        )

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            if request.method == "POST" and request.url.path == "/v1/approvals":
                return httpx.Response(
                    201,
                    json={
                        "approval_id": "appr1",
                        "status": "pending",
                        "expires_at": "2026-11-30T09:13:00Z",
                        "match_code": "417",
                        "devices_notified": 1,
                    },
                )
            if request.method == "GET":
                return httpx.Response(200, json=next(states))
            if request.method == "DELETE":
                cancelled = pending_approval({"queued": 0, "sent": 0, "failed": 1})
                return httpx.Response(200, json={**cancelled, "status": "cancelled"})
            return httpx.Response(200, json={"result": "accepted", "device_id": "dev1"})

        progress: list[Any] = []
        with client_for(handler) as client:
            result = client.login(
                username="admin", ask_code=lambda _p: "123 456", on_progress=progress.append
            )
        assert (result.success, result.method, result.fallback_reason) == (
            True,
            "otp",
            "delivery_failed",
        )
        assert [p.delivery.failed for p in progress] == [0, 1]
        assert seen == [
            "POST /v1/approvals",
            "GET /v1/approvals/appr1",
            "GET /v1/approvals/appr1",
            "DELETE /v1/approvals/appr1",
            "POST /v1/otp/verify",
        ]

    def test_wait_for_approval_returns_pending_state_at_its_timeout(self) -> None:
        waits: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            waits.append(request.url.params["wait"])
            return httpx.Response(200, json=pending_approval({"queued": 0, "sent": 1, "failed": 0}))

        with client_for(handler) as client:
            approval = client.wait_for_approval("appr1", timeout=0)
        assert approval.status == "pending" and not approval.is_final
        assert waits == ["0"]
