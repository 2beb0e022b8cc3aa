"""A compromised relay against the real SDK: each forgery ends without a successful login.

The relay here is a real `pns-server` process; what makes it hostile is an httpx transport
in front of it, on the backup client's side, that rewrites requests and answers the way
someone who owns the relay (or its database, or a proxy with its TLS key) could. The phone
is the SDK's `DeviceClient`, speaking the real protocol: it pairs with the key proof from
the QR code and signs pns-approval-v2 over whatever the relay shows it.

Every attack must end in `RelayCompromisedError` (the SDK's dedicated exception), a log line
saying the relay may be compromised, and no `LoginResult(success=True)`."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_sdk import (
    ApprovalRequested,
    ApprovalSignatureError,
    CodePrompt,
    DeviceApproval,
    DeviceClient,
    KeyProofInvalid,
    KeyStore,
    LoginResult,
    PnsClient,
    RelayCompromisedError,
)
from client_sdk._keys import context_sha256, public_key_b64, sign_approval
from client_sdk._wire import format_time
from tests.conftest import server_env
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow

PHONE = {"name": "Ann's iPhone", "platform": "ios", "os_version": "17.2", "app_version": "5.0"}
LOGIN = {"username": "admin", "hostname": "FILESRV01", "ip": "203.0.113.7"}
COMPROMISED = "relay may be compromised"

Rewrite = Callable[[httpx.Request, Any], Any]


@pytest.fixture(scope="module")
def relay(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One relay for the module: the attacks live in the client's transport, not in the
    relay's database, and each test registers its own installation."""
    data_dir = tmp_path_factory.mktemp("relay")
    database = data_dir / "pns.db"
    shutil.copyfile(sqlite_template, database)
    env = server_env(
        f"sqlite:///{database}",
        data_dir,
        PNS_RATE_REGISTER_PER_HOUR="1000",
        PNS_RATE_PAIRING_PER_MINUTE="1000",
    )
    with LiveServer(env, data_dir / "server.log") as server:
        yield server


@dataclass
class HostileRelay(httpx.BaseTransport):
    """Forwards to the real relay, letting the attack rewrite any JSON request or answer.

    `on_request(method, path)` may return a function that edits the request body;
    `on_response(method, path)` one that edits the answer body. Both see parsed JSON."""

    inner: httpx.BaseTransport = field(default_factory=httpx.HTTPTransport)
    requests: dict[str, Rewrite] = field(default_factory=dict)
    responses: dict[str, Rewrite] = field(default_factory=dict)
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    last_request_body: dict[str, Any] = field(default_factory=dict)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        route = f"{request.method} {request.url.path}"
        edit = self._match(self.requests, route)
        if edit is not None and request.content:
            body = edit(request, json.loads(request.content))
            request = httpx.Request(
                request.method,
                request.url,
                headers={k: v for k, v in request.headers.items() if k != "content-length"},
                json=body,
            )
        if request.content:
            self.last_request_body[route] = json.loads(request.content)
        response = self.inner.handle_request(request)
        response.read()
        data = response.json() if response.content else None
        self.seen.append((request.method, request.url.path, data))
        edit = self._match(self.responses, route)
        if edit is None or data is None:
            return httpx.Response(
                response.status_code, headers=response.headers, content=response.content
            )
        forged = edit(request, data)
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length",)}
        return httpx.Response(response.status_code, headers=headers, json=forged)

    @staticmethod
    def _match(rules: dict[str, Rewrite], route: str) -> Rewrite | None:
        for pattern, edit in rules.items():
            method, _, prefix = pattern.partition(" ")
            if route.startswith(f"{method} {prefix}"):
                return edit
        return None

    def close(self) -> None:
        self.inner.close()


@dataclass
class Scene:
    relay: LiveServer
    hostile: HostileRelay
    client: PnsClient
    phone: DeviceClient
    token: str

    def login(self, phone_acts: Callable[[ApprovalRequested], Any], **context: Any) -> LoginResult:
        """A login where the phone does `phone_acts` once the match code is on screen; any
        code prompt gives up (a forged push must not turn into a fallback success either)."""
        threads: list[threading.Thread] = []
        prompts: list[CodePrompt] = []

        def shown(requested: ApprovalRequested) -> None:
            thread = threading.Thread(target=phone_acts, args=(requested,), daemon=True)
            threads.append(thread)
            thread.start()

        def give_up(prompt: CodePrompt) -> str:
            prompts.append(prompt)
            return ""

        try:
            return self.client.login(
                **{**LOGIN, **context}, show_match_code=shown, ask_code=give_up, ttl_seconds=30
            )
        finally:
            for thread in threads:
                thread.join(15)

    def approve(self, requested: ApprovalRequested) -> None:
        """What the owner does: read the request on the phone, type the code shown."""
        details = self.wait_for_request()
        self.phone.approve(details, requested.match_code)

    def wait_for_request(self) -> DeviceApproval:
        for _ in range(100):
            pending = self.phone.pending()
            if pending:
                return pending[0]
            threading.Event().wait(0.05)
        raise AssertionError("the phone never saw the request")


def pair(client: PnsClient) -> DeviceClient:
    pairing = client.start_pairing("app")
    phone = DeviceClient.pair(pairing.qr_payload or "", **PHONE)
    client.wait_for_pairing(pairing.pairing_id, timeout=10)
    return phone


@pytest.fixture
def scene(relay: LiveServer) -> Iterator[Scene]:
    """An installation whose phone was paired honestly, talking through the hostile relay."""
    token = PnsClient.register(relay.url, name="FILESRV01", edition="pro").client_token
    hostile = HostileRelay()
    with PnsClient(
        relay.url, token, key_store=KeyStore(), transport=hostile, long_poll_seconds=2
    ) as client:
        phone = pair(client)
        with phone:
            yield Scene(relay, hostile, client, phone, token)


def refused(scene: Scene, caplog: pytest.LogCaptureFixture, act: Callable[[], Any]) -> Exception:
    with (
        caplog.at_level(logging.ERROR, logger="client_sdk"),
        pytest.raises(RelayCompromisedError) as error,
    ):
        result = act()
        assert not getattr(result, "success", False), "a forged login succeeded"
    assert COMPROMISED in caplog.text
    return error.value


def last_answer(scene: Scene, approval_id: str) -> dict[str, Any]:
    """The relay's last genuine status body for `approval_id` (the attacker keeps them)."""
    for method, path, data in reversed(scene.hostile.seen):
        if method == "GET" and path == f"/v1/approvals/{approval_id}" and data:
            return dict(data)
    raise AssertionError(f"no status of {approval_id} went through the relay")


# --- the honest path ------------------------------------------------------------------


def test_honest_relay_login_succeeds(scene: Scene) -> None:
    result = scene.login(scene.approve)
    assert (result.success, result.method) == (True, "push")
    assert result.approval is not None and result.approval.verified
    assert result.approval.response is not None
    assert result.approval.response.version == "pns-approval-v2"


# --- forgeries ------------------------------------------------------------------------


def test_injected_device_cannot_approve(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """The relay's owner enrols a phone of its own on this installation (it can: it holds
    the database) and approves with it: a valid v2 signature, by a key never proven."""
    start = httpx.post(
        f"{scene.relay.url}/v1/pairings",
        json={"kind": "app"},
        headers={"Authorization": f"Bearer {scene.token}"},
    )
    evil = DeviceClient.pair(start.json()["qr_payload"], **{**PHONE, "name": "evil"})
    assert scene.client.list_devices()  # the relay lists it; listing must pin nothing
    assert evil.device_id not in scene.client.key_store

    def evil_approves(requested: ApprovalRequested) -> None:
        for item in evil.pending():
            evil.approve(item, requested.match_code)  # the relay knows the code

    with evil:
        error = refused(scene, caplog, lambda: scene.login(evil_approves))
    assert isinstance(error, ApprovalSignatureError) and error.check == "device"
    assert error.device_id == evil.device_id


def test_substituted_key_at_pairing_is_not_pinned(
    relay: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay reports its own key for the phone that just paired, then approves with it."""
    attacker = DeviceClient(relay.url)
    hostile = HostileRelay()

    def swap_key(_request: httpx.Request, body: Any) -> Any:
        if body.get("device"):
            body["device"]["public_key"] = attacker.public_key  # the proof stays the phone's
        return body

    hostile.responses["GET /v1/pairings/"] = swap_key
    token = PnsClient.register(relay.url, name="NAS", edition="pro").client_token
    with PnsClient(
        relay.url, token, key_store=KeyStore(), transport=hostile, long_poll_seconds=2
    ) as client:
        pairing = client.start_pairing("app")
        phone = DeviceClient.pair(pairing.qr_payload or "", **PHONE)
        with caplog.at_level(logging.ERROR, logger="client_sdk"), pytest.raises(KeyProofInvalid):
            client.wait_for_pairing(pairing.pairing_id, timeout=10)
        assert COMPROMISED in caplog.text
        assert len(client.key_store) == 0

        # The relay then answers a login with the attacker's signature for that device.
        def forge(_request: httpx.Request, body: Any) -> Any:
            if body["status"] != "pending":
                return body
            return approved_by(attacker.private_key, phone.device_id or "", body, hostile)

        hostile.responses["GET /v1/approvals/"] = forge
        with phone, pytest.raises(ApprovalSignatureError) as error:
            client.login(**LOGIN, ask_code=lambda _p: "", ttl_seconds=30)
        assert error.value.check == "device"


def test_replayed_earlier_approval(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """Last login's approval, genuinely signed, handed back as the answer to a new login:
    its id and code at creation, then its real status with the old signature."""
    earlier = scene.login(scene.approve)
    assert earlier.success and earlier.approval is not None
    old_id = earlier.approval.approval_id
    old_code = earlier.approval.response.match_code if earlier.approval.response else None

    def hand_back_old(_request: httpx.Request, body: Any) -> Any:
        return {**body, "approval_id": old_id, "match_code": old_code}

    scene.hostile.responses["POST /v1/approvals"] = hand_back_old
    error = refused(scene, caplog, lambda: scene.login(lambda _r: None))
    assert isinstance(error, ApprovalSignatureError) and error.check == "signature"
    assert error.approval_id == old_id


def test_answer_for_another_approval_id(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """The status of the new login answered with an earlier approved one, id included."""
    earlier = scene.login(scene.approve)
    assert earlier.success and earlier.approval is not None
    old_body = last_answer(scene, earlier.approval.approval_id)
    scene.hostile.responses["GET /v1/approvals/"] = lambda _r, _b: old_body
    error = refused(scene, caplog, lambda: scene.login(lambda _r: None))
    assert isinstance(error, ApprovalSignatureError) and error.check == "approval_id"


def test_genuine_signature_over_another_login_context(
    scene: Scene, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay shows the owner a harmless request (their own user, their office) while
    the login really is someone else's: the owner approves what they saw, genuinely."""

    def reassure(_request: httpx.Request, body: Any) -> Any:
        return {**body, "username": "ann", "ip": "192.0.2.10", "message": "your usual login"}

    scene.hostile.requests["POST /v1/approvals"] = reassure
    error = refused(
        scene, caplog, lambda: scene.login(scene.approve, username="intruder", ip="198.51.100.66")
    )
    assert isinstance(error, ApprovalSignatureError) and error.check == "signature"


def test_genuine_signature_an_hour_old(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """The phone's own key signed this very login (nonce, context, code), but with a time an
    hour ago; an honest relay refuses that, this one reports it as approved."""
    signed: dict[str, Any] = {}

    def sign_an_hour_ago(requested: ApprovalRequested) -> None:
        details = scene.wait_for_request()
        at = datetime.now(UTC) - timedelta(hours=1)
        signed["answer"] = phone_answer(scene.phone, details, requested.match_code, at)

    def report_it(_request: httpx.Request, body: Any) -> Any:
        if "answer" not in signed or body["status"] != "pending":
            return body
        return {**decided(body), "device_id": scene.phone.device_id, "response": signed["answer"]}

    scene.hostile.responses["GET /v1/approvals/"] = report_it
    error = refused(scene, caplog, lambda: scene.login(sign_an_hour_ago))
    assert isinstance(error, ApprovalSignatureError) and error.check == "timestamp"


def test_v1_signature_where_v2_is_due(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """The relay drops the client's nonce, so the phone (seeing none) signs the old v1
    message, which says nothing about which login it approves."""

    def drop_nonce(_request: httpx.Request, body: Any) -> Any:
        return {k: v for k, v in body.items() if k != "client_nonce"}

    scene.hostile.requests["POST /v1/approvals"] = drop_nonce
    error = refused(scene, caplog, lambda: scene.login(scene.approve))
    assert isinstance(error, ApprovalSignatureError) and error.check == "signature"
    assert "pns-approval-v1" in str(error)


def test_wrong_match_code(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """A tired owner types a wrong number; the relay turns the mismatch into an approval."""

    def mistype(requested: ApprovalRequested) -> None:
        code = requested.match_code or "000"
        wrong = str((int(code) + 1) % 10 ** len(code)).zfill(len(code))
        scene.phone.approve(scene.wait_for_request(), wrong)

    def call_it_approved(_request: httpx.Request, body: Any) -> Any:
        if body["status"] == "rejected":
            return {**body, "status": "approved", "reason": None}
        return body

    scene.hostile.responses["GET /v1/approvals/"] = call_it_approved
    error = refused(scene, caplog, lambda: scene.login(mistype))
    assert isinstance(error, ApprovalSignatureError) and error.check == "match_code"


# --- helpers for forged answers -------------------------------------------------------


def decided(body: dict[str, Any]) -> dict[str, Any]:
    return {
        **body,
        "status": "approved",
        "reason": None,
        "decided_at": format_time(datetime.now(UTC)),
    }


def phone_answer(
    phone: DeviceClient, details: DeviceApproval, match_code: str | None, at: datetime
) -> dict[str, Any]:
    """A response signed by the phone's own key, as the phone's app would sign it at `at`."""
    stamp = format_time(at)
    nonce = details.client_nonce
    assert nonce is not None
    signature = sign_approval(
        phone.private_key,
        details.approval_id,
        "approve",
        match_code,
        stamp,
        nonce,
        context_sha256(details.context),
    )
    return {
        "decision": "approve",
        "match_code": match_code,
        "timestamp": stamp,
        "signature": signature,
        "public_key": phone.public_key,
        "version": "pns-approval-v2",
    }


def approved_by(key: Any, device_id: str, body: dict[str, Any], hostile: HostileRelay) -> Any:
    """An approval signed v2 by `key` over what the client sent (the relay sees it all)."""
    created = next(
        data
        for method, path, data in reversed(hostile.seen)
        if method == "POST" and path == "/v1/approvals"
    )
    sent = hostile_sent_body(hostile)
    stamp = format_time(datetime.now(UTC))
    context = {name: sent.get(name) for name in ("username", "hostname", "ip", "action", "message")}
    signature = sign_approval(
        key,
        body["approval_id"],
        "approve",
        created["match_code"],
        stamp,
        sent["client_nonce"],
        context_sha256(context),
    )
    return {
        **decided(body),
        "device_id": device_id,
        "response": {
            "decision": "approve",
            "match_code": created["match_code"],
            "timestamp": stamp,
            "signature": signature,
            "public_key": public_key_b64(key),
            "version": "pns-approval-v2",
        },
    }


def hostile_sent_body(hostile: HostileRelay) -> dict[str, Any]:
    body = hostile.last_request_body.get("POST /v1/approvals")
    assert body is not None
    return body
