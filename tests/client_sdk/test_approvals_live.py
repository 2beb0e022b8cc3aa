"""Push approvals end to end: SDK client and SDK device against a real server process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from client_sdk import (
    AlreadyDecided,
    Approval,
    ApprovalRequested,
    ApprovalSignatureError,
    AsyncDeviceClient,
    AsyncPnsClient,
    CodePrompt,
    DeviceClient,
    KeyStore,
    OtpInvalid,
    PlainPushNotAllowed,
    PnsClient,
    PushLocked,
    PushUnavailable,
    StaleTimestamp,
)
from tests.client_sdk.test_live import APNS, IPHONE, wrong_code
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow


@pytest.fixture
def paired(live_server: LiveServer) -> Iterator[tuple[PnsClient, DeviceClient]]:
    registration = PnsClient.register(live_server.url, name="FILESRV01", edition="pro")
    with PnsClient(live_server.url, registration.client_token, long_poll_seconds=20) as client:
        pairing = client.start_pairing("app")
        with DeviceClient.pair(pairing.qr_payload or "", push=APNS, **IPHONE) as device:
            client.wait_for_pairing(pairing.pairing_id, timeout=10)
            yield client, device


def approve_in_thread(device: DeviceClient, approval_id: str, code: str | None) -> threading.Thread:
    thread = threading.Thread(target=device.approve, args=(approval_id, code))
    thread.start()
    return thread


class TestApprovalFlow:
    def test_approve_reject_and_refusals(
        self, paired: tuple[PnsClient, DeviceClient], live_server: LiveServer
    ) -> None:
        client, device = paired
        requested = client.request_approval(
            username="admin", hostname="FILESRV01", ip="203.0.113.7", message="nightly restore"
        )
        assert requested.status == "pending"
        assert requested.match_code is not None and len(requested.match_code) == 3
        assert requested.devices_notified == 1

        pending = device.pending()
        assert [a.approval_id for a in pending] == [requested.approval_id]
        details = device.approval(requested.approval_id)
        assert details.context["username"] == "admin"
        assert details.number_matching is True
        # Its texts, not its ids and times, whose digits may contain the code by chance.
        texts = [details.client_name or ""]
        texts += [str(details.context.get(key) or "") for key in ("username", "action", "message")]
        assert all(requested.match_code not in text for text in texts)

        # The phone answers while the client long-polls; progress reaches the callback.
        progress: list[Approval] = []
        approver = approve_in_thread(device, requested.approval_id, requested.match_code)
        result = client.wait_for_approval(requested.approval_id, 30, progress.append)
        approver.join(10)
        assert result.status == "approved" and result.verified
        assert result.device_id == device.device_id
        assert result.response is not None and result.response.match_code == requested.match_code
        assert progress and progress[-1] == result

        # Another installation object, which neither paired the phone nor asked for this
        # approval, has nothing to check the answer against: it refuses it and pins nothing.
        with PnsClient(live_server.url, client._core.token, key_store=KeyStore()) as fresh:
            with pytest.raises(ApprovalSignatureError) as refused:
                fresh.get_approval(requested.approval_id)
            assert refused.value.check == "unknown_approval"
            assert len(fresh.key_store) == 0 and fresh.list_devices()[0].key_proof

        with pytest.raises(AlreadyDecided) as decided:
            client.cancel_approval(requested.approval_id)
        assert decided.value.approval_status == "approved"
        with pytest.raises(AlreadyDecided):
            device.reject(requested.approval_id)
        with pytest.raises(PlainPushNotAllowed):
            client.request_approval(username="admin", number_matching=False)

        # A stale device clock is refused and changes nothing; a wrong code rejects.
        second = client.request_approval(username="admin")
        with pytest.raises(StaleTimestamp):
            device.approve(
                second.approval_id,
                second.match_code,
                at=datetime.now(UTC) - timedelta(minutes=10),
            )
        assert client.get_approval(second.approval_id).status == "pending"
        typed = "999" if second.match_code != "999" else "998"
        assert device.approve(second.approval_id, typed).status == "rejected"
        mismatch = client.wait_for_approval(second.approval_id, 10)
        assert (mismatch.status, mismatch.reason, mismatch.verified) == (
            "rejected",
            "number_mismatch",
            True,
        )

        third = client.request_approval(username="admin")
        assert client.cancel_approval(third.approval_id).status == "cancelled"
        assert device.pending() == []


class TestLoginHelper:
    def test_push_then_each_fallback(self, paired: tuple[PnsClient, DeviceClient]) -> None:
        client, device = paired

        # 1. The phone approves with the displayed code.
        approvers: list[threading.Thread] = []

        def approve_shown(requested: ApprovalRequested) -> None:
            approvers.append(approve_in_thread(device, requested.approval_id, requested.match_code))

        def no_code(_prompt: CodePrompt) -> str | None:
            raise AssertionError("no code should be asked for")

        result = client.login(username="admin", show_match_code=approve_shown, ask_code=no_code)
        approvers[0].join(10)
        assert (result.success, result.method) == (True, "push")
        assert result.approval is not None and result.approval.verified

        # 2. The phone rejects: the user types the app's one-time password instead.
        prompts: list[CodePrompt] = []

        def reject_shown(requested: ApprovalRequested) -> None:
            device.reject(requested.approval_id)

        def otp_from_app(prompt: CodePrompt) -> str:
            prompts.append(prompt)
            return device.current_otp()

        result = client.login(username="admin", show_match_code=reject_shown, ask_code=otp_from_app)
        assert (result.success, result.method, result.fallback_reason) == (True, "otp", "rejected")
        assert result.device_id == device.device_id
        assert [p.reason for p in prompts] == ["rejected"]

        # 3. The user clicks "use a code": a wrong OTP first, then a recovery code.
        codes = client.create_recovery_codes().codes
        use_code = threading.Event()
        answers = iter([wrong_code(device.totp.secret), codes[0]])  # type: ignore[union-attr]
        prompts.clear()

        def type_codes(prompt: CodePrompt) -> str:
            prompts.append(prompt)
            return next(answers)

        result = client.login(
            username="admin",
            show_match_code=lambda _r: use_code.set(),
            ask_code=type_codes,
            use_code=use_code,
        )
        assert (result.success, result.method, result.fallback_reason) == (
            True,
            "recovery_code",
            "user_choice",
        )
        assert result.recovery_codes_remaining == 9
        assert result.approval is not None and result.approval.status == "cancelled"
        assert isinstance(prompts[1].error, OtpInvalid)
        assert isinstance(prompts[1].attempts_left, int)

        # 4. A fraud report locks push: the next login goes straight to the code prompt.
        def report_fraud(requested: ApprovalRequested) -> None:
            device.reject(requested.approval_id, fraud=True)

        result = client.login(
            username="admin", show_match_code=report_fraud, ask_code=lambda _p: ""
        )
        assert (result.success, result.method, result.fallback_reason) == (False, None, "rejected")
        assert result.approval is not None and result.approval.reason == "fraud"
        with pytest.raises(PushLocked) as locked:
            client.request_approval(username="admin")
        assert isinstance(locked.value, PushUnavailable) and locked.value.locked_until
        prompts.clear()
        result = client.login(username="admin", ask_code=lambda p: prompts.append(p) or "")
        assert result.fallback_reason == "push_unavailable" and not result.success
        assert [p.reason for p in prompts] == ["push_unavailable"]


class RecordingTransport(httpx.HTTPTransport):
    """The real transport, keeping each request's URL."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[httpx.URL] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(request.url)
        return super().handle_request(request)


def test_a_login_without_progress_is_one_long_poll(live_server: LiveServer) -> None:
    """The push goes out while the client waits; the relay holds the wait through it, so
    the client asks for the approval's state once."""
    registration = PnsClient.register(live_server.url, name="FILESRV01", edition="pro")
    recorder = RecordingTransport()
    with PnsClient(
        live_server.url, registration.client_token, long_poll_seconds=20, transport=recorder
    ) as client:
        pairing = client.start_pairing("app")
        with DeviceClient.pair(pairing.qr_payload or "", push=APNS, **IPHONE) as device:
            client.wait_for_pairing(pairing.pairing_id, timeout=10)
            approvers: list[threading.Thread] = []

            def approve_after_the_push(requested: ApprovalRequested) -> None:
                def later() -> None:
                    time.sleep(0.5)  # the relay's log sender sends at once
                    device.approve(requested.approval_id, requested.match_code)

                approvers.append(threading.Thread(target=later))
                approvers[0].start()

            recorder.urls.clear()
            result = client.login(
                username="admin", show_match_code=approve_after_the_push, ask_code=lambda _p: ""
            )
            approvers[0].join(10)
    assert (result.success, result.method) == (True, "push")
    assert result.approval is not None and result.approval.delivery is not None
    assert result.approval.delivery.sent == 1  # the push went out before the answer
    polls = [u for u in recorder.urls if u.path.startswith("/v1/approvals/")]
    assert len(polls) == 1
    assert polls[0].params["until"] == "final_or_failed"


class TestAsync:
    async def test_async_approval_and_login(self, live_server: LiveServer) -> None:
        registration = await AsyncPnsClient.register(live_server.url, name="NAS", edition="pro")
        async with AsyncPnsClient(
            live_server.url, registration.client_token, long_poll_seconds=20
        ) as client:
            # Without a device, push is unavailable and login asks for a code at once.
            result = await client.login(username="admin", ask_code=lambda _p: None)
            assert (result.success, result.fallback_reason) == (False, "push_unavailable")

            pairing = await client.start_pairing("app")
            async with await AsyncDeviceClient.pair(
                pairing.qr_payload or "", push=APNS, **IPHONE
            ) as device:
                await client.wait_for_pairing(pairing.pairing_id, 10)
                requested = await client.request_approval(username="admin")
                waiter = asyncio.create_task(client.wait_for_approval(requested.approval_id, 30))
                await device.approve(requested.approval_id, requested.match_code)
                approved = await asyncio.wait_for(waiter, 35)
                assert approved.approved and approved.verified

                use_code = asyncio.Event()

                async def ask(prompt: CodePrompt) -> str:
                    assert prompt.reason == "user_choice"
                    return device.current_otp()

                result = await client.login(
                    username="admin",
                    show_match_code=lambda _r: use_code.set(),
                    ask_code=ask,
                    use_code=use_code,
                )
                assert (result.success, result.method) == (True, "otp")
                assert await device.pending() == []
