"""The device's side without I/O: its calls (enrolment,
push-token updates, pending approvals, the signed answer) and `DeviceBase`, the state and
flows `DeviceClient` and `AsyncDeviceClient` share (its key, its saved state, its TOTP,
pairing with a key proof, answering with a signature). The twins only move them over the
network."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyotp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client_sdk._flows import Flow, send
from client_sdk._keys import (
    context_sha256,
    key_proof,
    public_key_b64,
    sign_approval,
)
from client_sdk._models import DeviceApproval, DeviceDecision, TotpParameters
from client_sdk._wire import (
    USER_AGENT,
    ApiRequest,
    Call,
    Reply,
    bad_field,
    format_time,
    int_field,
    json_body,
    no_content,
    obj_field,
    opt_str_field,
    pairing_secret_of,
    parse_device_approval,
    parse_qr_payload,
    path_id,
    str_field,
)


@dataclass(frozen=True)
class Enrolment:
    device_id: str
    device_token: str
    totp: TotpParameters


def enrol_call(
    *,
    pairing_token: str,
    name: str,
    platform: str,
    os_version: str,
    app_version: str,
    push: Mapping[str, str] | None,
    public_key: str,
    key_proof: str | None = None,
) -> Call[Enrolment]:
    body: dict[str, Any] = {
        "pairing_token": pairing_token,
        "name": name,
        "platform": platform,
        "os_version": os_version,
        "app_version": app_version,
        "public_key": public_key,
    }
    if push is not None:
        body["push"] = dict(push)
    if key_proof is not None:
        body["key_proof"] = key_proof

    def parse(reply: Reply) -> Enrolment:
        data = json_body(reply, 201)
        totp = obj_field(data, "totp")
        if totp is None:
            raise bad_field("totp")
        return Enrolment(
            device_id=str_field(data, "device_id"),
            device_token=str_field(data, "device_token"),
            totp=TotpParameters(
                secret=str_field(totp, "secret"),
                algorithm=opt_str_field(totp, "algorithm") or "SHA1",
                digits=int_field(totp, "digits", 6),
                period=int_field(totp, "period", 30),
            ),
        )

    return Call(ApiRequest("POST", "/v1/devices", json=body), parse)


def device_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def update_push_call(service: str, token: str, environment: str | None) -> Call[None]:
    body = {"service": service, "token": token}
    if environment is not None:
        body["environment"] = environment
    return Call(ApiRequest("PUT", "/v1/device/push", json=body), no_content)


def remove_self_call() -> Call[None]:
    return Call(ApiRequest("DELETE", "/v1/device"), no_content)


def pending_call() -> Call[list[DeviceApproval]]:
    def parse(reply: Reply) -> list[DeviceApproval]:
        items = json_body(reply).get("approvals")
        if not isinstance(items, list):
            raise bad_field("approvals")
        return [parse_device_approval(item) for item in items if isinstance(item, dict)]

    return Call(ApiRequest("GET", "/v1/device/approvals", retry="connect"), parse)


def device_approval_call(approval_id: str) -> Call[DeviceApproval]:
    return Call(
        ApiRequest("GET", f"/v1/device/approvals/{path_id(approval_id)}", retry="connect"),
        lambda reply: parse_device_approval(json_body(reply)),
    )


def respond_call(
    approval_id: str,
    *,
    decision: str,
    match_code: str | None,
    fraud: bool,
    timestamp: str,
    signature: str,
) -> Call[DeviceDecision]:
    body = {
        "decision": decision,
        "match_code": match_code,
        "fraud": fraud,
        "timestamp": timestamp,
        "signature": signature,
    }

    def parse(reply: Reply) -> DeviceDecision:
        data = json_body(reply)
        return DeviceDecision(
            approval_id=str_field(data, "approval_id"), status=str_field(data, "status")
        )

    return Call(
        ApiRequest("POST", f"/v1/device/approvals/{path_id(approval_id)}/response", json=body),
        parse,
    )


# --- the state and flows both device clients share ---------------------------------------

STATE_VERSION = 1
_DIGESTS: dict[str, Callable[..., Any]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("the device state does not hold a P-256 private key")
    return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class DeviceBase:
    def __init__(
        self,
        server_url: str,
        *,
        device_id: str | None = None,
        device_token: str | None = None,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        totp: TotpParameters | None = None,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.device_id = device_id
        self._token = device_token
        self.private_key = private_key if private_key is not None else _new_key()
        self.totp = totp

    def _headers(self) -> dict[str, str]:
        return device_headers(self._token)

    @property
    def public_key(self) -> str:
        """Base64 DER SubjectPublicKeyInfo, as registered with the server."""
        return public_key_b64(self.private_key)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume this device later, JSON-serialisable. It holds the
        private key and the TOTP secret: store it like a password (e.g. the OS keychain).

        Example::

            keychain.save(json.dumps(device.to_state()))
            device = DeviceClient.from_state(json.loads(keychain.load()))
        """
        return {
            "version": STATE_VERSION,
            "server_url": self.server_url,
            "device_id": self.device_id,
            "device_token": self._token,
            "private_key_pem": _pem(self.private_key),
            "totp": self.totp.to_dict() if self.totp is not None else None,
        }

    @staticmethod
    def _state_kwargs(state: Mapping[str, Any]) -> dict[str, Any]:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported device state version {state.get('version')!r}")
        totp = state.get("totp")
        return {
            "server_url": state["server_url"],
            "device_id": state.get("device_id"),
            "device_token": state.get("device_token"),
            "private_key": _load_key(state["private_key_pem"]),
            "totp": TotpParameters(**totp) if isinstance(totp, dict) else None,
        }

    def current_otp(self, at: datetime | None = None) -> str:
        """The one-time password this device shows now (or at `at`).

        Example::

            client.verify_otp(device.current_otp())
        """
        if self.totp is None:
            raise RuntimeError("this device is not paired yet")
        digest = _DIGESTS.get(self.totp.algorithm.upper())
        if digest is None:
            raise ValueError(f"unsupported TOTP algorithm {self.totp.algorithm!r}")
        totp = pyotp.TOTP(
            self.totp.secret, digits=self.totp.digits, digest=digest, interval=self.totp.period
        )
        return str(totp.at(at or datetime.now(UTC)))

    def _enrol(
        self,
        qr_payload: str,
        name: str,
        platform: str,
        os_version: str,
        app_version: str,
        push: Mapping[str, str] | None,
    ) -> Flow[None]:
        """Pair from the QR text, proving this device's key with the QR code's secret."""
        _, pairing_token = parse_qr_payload(qr_payload)
        secret = pairing_secret_of(qr_payload)
        public_key = self.public_key
        call = enrol_call(
            pairing_token=pairing_token,
            name=name,
            platform=platform,
            os_version=os_version,
            app_version=app_version,
            push=push,
            public_key=public_key,
            key_proof=key_proof(secret, public_key) if secret is not None else None,
        )
        enrolment = yield from send(call)
        self.device_id = enrolment.device_id
        self._token = enrolment.device_token
        self.totp = enrolment.totp

    def _answer(
        self,
        approval: str | DeviceApproval,
        decision: str,
        match_code: str | None,
        fraud: bool,
        at: datetime | None,
    ) -> Flow[DeviceDecision]:
        """Fetch the approval unless the caller passes the one it showed, then sign v2 (the
        client's nonce and the context as shown) when it carries a nonce, v1 otherwise."""
        if not isinstance(approval, DeviceApproval):
            approval = yield from send(device_approval_call(approval))
        timestamp = format_time(at or datetime.now(UTC))
        nonce = approval.client_nonce
        signature = sign_approval(
            self.private_key,
            approval.approval_id,
            decision,
            match_code,
            timestamp,
            nonce,
            context_sha256(approval.context) if nonce is not None else None,
        )
        call = respond_call(
            approval.approval_id,
            decision=decision,
            match_code=match_code,
            fraud=fraud,
            timestamp=timestamp,
            signature=signature,
        )
        return (yield from send(call))
