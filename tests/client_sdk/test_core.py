"""The SDK's core and transport rules, against scripted servers (httpx.MockTransport)."""

from __future__ import annotations

import base64
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import client_sdk
from client_sdk import (
    AlreadyDecided,
    ApiError,
    Approval,
    ApprovalSignatureError,
    AsyncPnsClient,
    ConnectError,
    DeviceClient,
    InvalidRequest,
    KeyProofInvalid,
    KeyProofMissing,
    KeyStore,
    NoAppDevices,
    OtpInvalid,
    OtpLocked,
    Pairing,
    PairingSecretUnknown,
    PinsNotPersistedWarning,
    PnsClient,
    PnsError,
    PushLocked,
    PushUnavailable,
    RateLimited,
    RelayCompromisedError,
    RequestTimeout,
    Unavailable,
    UnexpectedResponse,
    parse_qr_payload,
)
from client_sdk import _keys as keys_module
from client_sdk._device_core import pairing_secret_of
from client_sdk._exceptions import error_class_for
from client_sdk._keys import context_sha256, key_proof, public_key_b64, sign_approval
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


NOW = datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ScriptedRelay:
    """A relay that answers like an honest one; tests then bend single answers."""

    key: Any = field(default_factory=new_key)
    created: dict[str, Any] = field(default_factory=dict)
    approval_id: str = "appr1"
    match_code: str | None = "417"
    answer: Callable[[ScriptedRelay], dict[str, Any]] | None = None

    def signed(
        self,
        *,
        decision: str = "approve",
        match_code: str | None = "417",
        timestamp: datetime | None = None,
        nonce: str | None = "own",
        context: dict[str, Any] | None = None,
        status: str = "approved",
        approval_id: str | None = None,
        key: Any = None,
    ) -> dict[str, Any]:
        """The status body for a phone answer signed as told (default: genuine v2)."""
        stamp = rfc3339(timestamp or datetime.now(UTC))
        signing_key = key or self.key
        signed_id = approval_id or self.approval_id
        if nonce == "own":
            nonce = self.created["client_nonce"]
        login = context or {
            name: self.created.get(name) for name in ("username", "hostname", "ip", "message")
        }
        login.setdefault("action", self.created.get("action"))
        context_hash = context_sha256(login) if nonce is not None else None
        signature = sign_approval(
            signing_key, signed_id, decision, match_code, stamp, nonce, context_hash
        )
        return {
            "approval_id": self.approval_id,
            "status": status,
            "reason": None,
            "created_at": rfc3339(NOW),
            "expires_at": rfc3339(NOW + timedelta(seconds=60)),
            "decided_at": stamp,
            "device_id": "dev1",
            "response": {
                "decision": decision,
                "match_code": match_code,
                "timestamp": stamp,
                "signature": signature,
                "public_key": public_key_b64(signing_key),
                "version": "pns-approval-v2" if nonce else "pns-approval-v1",
            },
            "delivery": {"queued": 0, "sent": 1, "failed": 0, "last_error": None},
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/approvals":
            self.created = json.loads(request.content)
            return httpx.Response(
                201,
                json={
                    "approval_id": self.approval_id,
                    "status": "pending",
                    "expires_at": rfc3339(datetime.now(UTC) + timedelta(seconds=60)),
                    "match_code": self.match_code,
                    "devices_notified": 1,
                },
            )
        body = self.answer(self) if self.answer is not None else self.signed()
        return httpx.Response(200, json=body)

    def client(self, *, pin: bool = True) -> PnsClient:
        client = client_for(self.handler, key_store=KeyStore())
        if pin:
            client.key_store.pin("dev1", public_key_b64(self.key))
        return client


def device_body(key: Any, device_id: str = "dev1", key_proof: str | None = None) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "kind": "app",
        "name": "Ann's iPhone",
        "platform": "ios",
        "os_version": "17.2",
        "push": "apns",
        "push_status": "ok",
        "public_key": public_key_b64(key),
        "key_proof": key_proof,
        "created_at": "2026-11-30T09:00:00Z",
        "last_used_at": None,
    }


@pytest.fixture(autouse=True)
def _quiet_in_memory_pins() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinsNotPersistedWarning)
        yield


class TestApprovalChecks:
    """An "approved" counts only when the pinned key signed this login (v2), in time, with
    the code shown; the checks run on the scripted relay's bent answers."""

    def approve(self, relay: ScriptedRelay, **signed: Any) -> Approval:
        if signed:
            relay.answer = lambda r: r.signed(**signed)
        with relay.client() as client:
            requested = client.request_approval(username="admin", hostname="FILESRV01")
            return client.get_approval(requested.approval_id)

    def refused(self, relay: ScriptedRelay, **signed: Any) -> ApprovalSignatureError:
        with pytest.raises(ApprovalSignatureError) as refused:
            self.approve(relay, **signed)
        assert isinstance(refused.value, RelayCompromisedError)
        return refused.value

    def test_genuine_v2_answer_verifies(self) -> None:
        relay = ScriptedRelay()
        approval = self.approve(relay)
        assert approval.approved and approval.verified
        nonce = relay.created["client_nonce"]
        assert len(base64.urlsafe_b64decode(nonce + "=")) == 32

    def test_v1_signature_where_v2_is_due(self, caplog: pytest.LogCaptureFixture) -> None:
        refused = self.refused(ScriptedRelay(), nonce=None)
        assert refused.check == "signature" and "pns-approval-v1" in str(refused)
        assert "relay may be compromised" in caplog.text

    def test_signature_over_another_nonce(self) -> None:
        other = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
        assert self.refused(ScriptedRelay(), nonce=other).check == "signature"

    def test_signature_over_another_context(self) -> None:
        context = {"username": "root", "hostname": "FILESRV01", "ip": None, "message": None}
        assert self.refused(ScriptedRelay(), context=context).check == "signature"

    def test_signature_by_another_key_echoed_by_the_relay(self) -> None:
        assert self.refused(ScriptedRelay(), key=new_key()).check == "key"

    def test_answer_for_another_approval_id(self) -> None:
        relay = ScriptedRelay()
        relay.answer = lambda r: {**r.signed(approval_id="appr0"), "approval_id": "appr0"}
        assert self.refused(relay).check == "approval_id"

    def test_signature_made_for_another_approval(self) -> None:
        assert self.refused(ScriptedRelay(), approval_id="appr0").check == "signature"

    def test_old_signature(self) -> None:
        old = datetime.now(UTC) - timedelta(hours=1)
        assert self.refused(ScriptedRelay(), timestamp=old).check == "timestamp"

    def test_signature_from_after_expiry(self) -> None:
        late = datetime.now(UTC) + timedelta(seconds=60 + 180)
        assert self.refused(ScriptedRelay(), timestamp=late).check == "timestamp"

    def test_wrong_match_code(self) -> None:
        assert self.refused(ScriptedRelay(), match_code="999").check == "match_code"

    def test_reject_decision_reported_as_approved(self) -> None:
        refused = self.refused(ScriptedRelay(), decision="reject", match_code=None)
        assert refused.check == "decision"

    def test_approved_without_response(self) -> None:
        relay = ScriptedRelay()
        relay.answer = lambda r: {**r.signed(), "response": None}
        assert self.refused(relay).check == "response"

    def test_device_not_pinned_through_a_key_proof(self) -> None:
        relay = ScriptedRelay()
        with relay.client(pin=False) as client, pytest.raises(ApprovalSignatureError) as refused:
            requested = client.request_approval(username="admin")
            client.get_approval(requested.approval_id)
        assert refused.value.check == "device"
        assert len(client.key_store) == 0

    def test_approval_this_client_did_not_request(self) -> None:
        relay = ScriptedRelay(created={"client_nonce": "x" * 43, "action": "login"})
        with relay.client() as client, pytest.raises(ApprovalSignatureError) as refused:
            client.get_approval("appr1")
        assert refused.value.check == "unknown_approval"

    def test_a_rejection_that_does_not_verify_is_returned_unverified(self) -> None:
        relay = ScriptedRelay()
        relay.answer = lambda r: r.signed(status="rejected", decision="reject", nonce=None)
        with relay.client() as client:
            requested = client.request_approval(username="admin")
            approval = client.get_approval(requested.approval_id)
        assert (approval.status, approval.verified) == ("rejected", False)

    def test_pending_needs_no_signature(self) -> None:
        relay = ScriptedRelay(created={"client_nonce": "x" * 43})
        relay.answer = lambda r: {**r.signed(status="pending"), "response": None}
        with relay.client() as client:
            assert client.get_approval("appr1").verified is False


class TestKeyProofAtPairing:
    """Only a pairing this client started, whose proof verifies with its QR secret, pins."""

    def serve(
        self, device: Callable[[bytes | None], dict[str, Any]], store: KeyStore | None = None
    ) -> PnsClient:
        secret: list[bytes] = []

        def handler(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                return httpx.Response(
                    201,
                    json={
                        "pairing_id": "p1",
                        "kind": "app",
                        "status": "pending",
                        "expires_at": rfc3339(datetime.now(UTC) + timedelta(minutes=10)),
                        "qr_payload": "pns://pair?server=http%3A%2F%2Fpns.test&token=pnsp_t",
                    },
                )
            if request.url.path == "/v1/devices":
                return httpx.Response(200, json={"devices": [device(None)]})
            body = {
                "pairing_id": "p1",
                "kind": "app",
                "status": "completed",
                "expires_at": rfc3339(datetime.now(UTC) + timedelta(minutes=10)),
                "device": device(secret[0] if secret else None),
            }
            return httpx.Response(200, json=body)

        client = client_for(handler, key_store=store if store is not None else KeyStore())
        original = client._core.start_pairing

        def start(kind: str, label: str | None) -> Any:
            call = original(kind, label)

            def parse(reply: Any) -> Pairing:
                pairing = call.parse(reply)
                secret.append(pairing_secret_of(pairing.qr_payload or "") or b"")
                return pairing

            return type(call)(call.request, parse)

        client._core.start_pairing = start  # type: ignore[method-assign]
        return client

    def test_proof_that_verifies_pins(self) -> None:
        phone = new_key()
        with self.serve(
            lambda k: device_body(
                phone, key_proof=key_proof(k, public_key_b64(phone)) if k else None
            )
        ) as client:
            started = client.start_pairing("app")
            assert (started.qr_payload or "").count("#k=") == 1
            assert client.key_store.pending_pairings() == ["p1"]
            pairing = client.wait_for_pairing("p1")
        assert pairing.pinned and client.key_store.get("dev1") == public_key_b64(phone)
        assert client.key_store.pending_pairings() == []

    def test_substituted_key_is_refused(self, caplog: pytest.LogCaptureFixture) -> None:
        phone, attacker = new_key(), new_key()
        with self.serve(
            lambda k: device_body(
                attacker, key_proof=key_proof(k, public_key_b64(phone)) if k else None
            )
        ) as client:
            client.start_pairing("app")
            with pytest.raises(KeyProofInvalid) as refused:
                client.wait_for_pairing("p1")
        assert isinstance(refused.value, RelayCompromisedError)
        assert len(client.key_store) == 0
        assert "relay may be compromised" in caplog.text

    def test_missing_proof_is_refused_clearly(self) -> None:
        phone = new_key()
        with self.serve(lambda _k: device_body(phone)) as client:
            client.start_pairing("app")
            with pytest.raises(KeyProofMissing, match="predates key proofs"):
                client.wait_for_pairing("p1")
        assert len(client.key_store) == 0

    def test_pairing_not_started_here_is_refused(self) -> None:
        phone = new_key()
        with (
            self.serve(lambda _k: device_body(phone)) as client,
            pytest.raises(PairingSecretUnknown),
        ):
            client.get_pairing("p1")
        assert len(client.key_store) == 0

    def test_device_list_never_pins(self) -> None:
        phone = new_key()
        with self.serve(lambda _k: device_body(phone, key_proof="A" * 43)) as client:
            assert [d.device_id for d in client.list_devices()] == ["dev1"]
        assert len(client.key_store) == 0

    def test_relay_fragment_in_the_pairing_code_is_refused(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                201,
                json={
                    "pairing_id": "p1",
                    "kind": "app",
                    "status": "pending",
                    "expires_at": rfc3339(datetime.now(UTC) + timedelta(minutes=10)),
                    "qr_payload": "pns://pair?server=http%3A%2F%2Fpns.test&token=t#k=" + "A" * 43,
                },
            )

        with client_for(handler) as client, pytest.raises(UnexpectedResponse):
            client.start_pairing("app")

    def test_secret_kept_on_disk_lets_another_run_finish(self, tmp_path: Path) -> None:
        phone = new_key()
        path = tmp_path / "keys.json"

        def device(k: bytes | None) -> dict[str, Any]:
            secret = KeyStore(path).pairing_secret("p1")
            assert secret is not None
            return device_body(phone, key_proof=key_proof(secret, public_key_b64(phone)))

        with self.serve(device, KeyStore(path)) as first:
            first.start_pairing("app")
        assert path.stat().st_mode & 0o777 == 0o600
        with self.serve(device, KeyStore(path)) as second:
            [finished] = second.finish_pairings()
        assert finished.pinned and KeyStore(path).get("dev1") == public_key_b64(phone)
        assert KeyStore(path).pending_pairings() == []


class TestAsyncTwin:
    async def test_async_client_pins_only_through_the_proof_and_checks_approvals(
        self, tmp_path: Path
    ) -> None:
        phone = new_key()
        path = tmp_path / "keys.json"
        relay = ScriptedRelay(key=phone)

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.startswith("/v1/pairings"):
                if request.method == "POST":
                    return httpx.Response(
                        201,
                        json={
                            "pairing_id": "p1",
                            "kind": "app",
                            "status": "pending",
                            "expires_at": rfc3339(datetime.now(UTC) + timedelta(minutes=5)),
                            "qr_payload": "pns://pair?server=http%3A%2F%2Fpns.test&token=t",
                        },
                    )
                secret = KeyStore(path).pairing_secret("p1")
                assert secret is not None
                proof = key_proof(secret, public_key_b64(phone))
                return httpx.Response(
                    200,
                    json={
                        "pairing_id": "p1",
                        "kind": "app",
                        "status": "completed",
                        "expires_at": rfc3339(datetime.now(UTC) + timedelta(minutes=5)),
                        "device": device_body(phone, key_proof=proof),
                    },
                )
            return relay.handler(request)

        transport = httpx.MockTransport(handler)
        async with AsyncPnsClient(
            URL, token="t", key_store=KeyStore(path), transport=transport
        ) as client:
            await client.start_pairing("app")
            [pairing] = await client.finish_pairings()
            assert pairing.pinned and "dev1" in client.key_store
            requested = await client.request_approval(username="admin")
            assert (await client.get_approval(requested.approval_id)).verified
            relay.answer = lambda r: r.signed(nonce=None)
            with pytest.raises(ApprovalSignatureError):
                await client.get_approval(requested.approval_id)


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

    def test_in_memory_pins_warn_once(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
    ) -> None:
        monkeypatch.setattr(keys_module, "_warned_in_memory", threading.Event())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            KeyStore(tmp_path / "keys.json").pin("d0", public_key_b64(new_key()))
            assert seen == []
            KeyStore().pin("d1", public_key_b64(new_key()))
            KeyStore().pin("d2", public_key_b64(new_key()))
        assert [w.category for w in seen] == [PinsNotPersistedWarning]
        assert "lost when this process exits" in str(seen[0].message)
        assert caplog.text.count("lost when this process exits") == 1

    def test_expired_pairing_secrets_are_dropped(self, tmp_path: Path) -> None:
        store = KeyStore(tmp_path / "keys.json")
        store.remember_pairing("old", bytes(32), datetime.now(UTC) - timedelta(seconds=1))
        store.remember_pairing("new", bytes(32), datetime.now(UTC) + timedelta(minutes=5))
        assert KeyStore(tmp_path / "keys.json").pending_pairings() == ["new"]
        assert store.pairing_secret("new") == bytes(32)


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
