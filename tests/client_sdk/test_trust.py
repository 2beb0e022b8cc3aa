"""What the SDK believes: approvals checked against what this client asked for, keys
pinned only through a key proof at a pairing it started, on both twins; against a
scripted relay that bends single answers."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from client_sdk import (
    Approval,
    ApprovalSignatureError,
    AsyncPnsClient,
    KeyProofInvalid,
    KeyProofMissing,
    KeyStore,
    Pairing,
    PairingSecretUnknown,
    PinsNotPersistedWarning,
    PnsClient,
    RelayCompromisedError,
    UnexpectedResponse,
)
from client_sdk._keys import context_sha256, key_proof, public_key_b64, sign_approval
from client_sdk._wire import pairing_secret_of
from tests.client_sdk.mock_relay import URL, client_for
from tests.support.factories import new_key

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
