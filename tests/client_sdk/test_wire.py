"""The wire rules: problem+json to exceptions, answers that break the API, and the
transport's retries and timeouts, against scripted servers (httpx.MockTransport); and
reading the pairing code (server, token and the `#k=` secret)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

import client_sdk
from client_sdk import (
    AlreadyDecided,
    ApiError,
    AsyncPnsClient,
    ConnectError,
    DeviceClient,
    InvalidRequest,
    NoAppDevices,
    OtpInvalid,
    OtpLocked,
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
from client_sdk._wire import pairing_secret_of
from pns_server import errors as server_errors
from tests.client_sdk.mock_relay import URL, client_for, problem


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

    def test_reads_the_pairing_secret_from_the_fragment(self) -> None:
        base = "pns://pair?server=https%3A%2F%2Fpns.example.com&token=pnsp_abc"
        secret = bytes(range(32))
        with_secret = f"{base}#k={base64.urlsafe_b64encode(secret).rstrip(b'=').decode()}"
        assert parse_qr_payload(with_secret) == ("https://pns.example.com", "pnsp_abc")
        assert pairing_secret_of(with_secret) == secret
        assert pairing_secret_of(base) is None

    @pytest.mark.parametrize(
        "fragment",
        [
            "k=" + "A" * 42,  # 31.5 bytes
            "k=" + "A" * 44,
            "k=" + "A" * 42 + "B",  # spare bits set: not canonical
            "k=" + "A" * 42 + "A=",
            "k=" + "+" * 43,
            "k=" + "A" * 43 + "&k=" + "A" * 43,
            "x=" + "A" * 43,
            "k=" + "A" * 43 + "&v=2",
        ],
    )
    def test_refuses_a_damaged_secret(self, fragment: str) -> None:
        payload = f"pns://pair?server=https%3A%2F%2Fa&token=t#{fragment}"
        with pytest.raises(ValueError):
            pairing_secret_of(payload)
        with pytest.raises(ValueError):
            DeviceClient.pair(payload, name="x", platform="ios", os_version="17", app_version="1")

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
