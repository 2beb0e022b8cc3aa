"""The backup client's no-I/O core: every request is built and every response parsed here.

`PnsClient` and `AsyncPnsClient` only move the `ApiRequest`s built here over the network
and hand the answers back to `Call.parse` (multi-step operations are flows, in `_flows`),
so the two twins cannot drift apart and everything here is testable without a server.
The wire itself is in `_wire`, what is trusted and why in `_trust`, the device's side in
`_device_core`."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from client_sdk._exceptions import UnexpectedResponse
from client_sdk._keys import PAIRING_SECRET_BYTES, KeyStore, b64url, context_sha256
from client_sdk._models import (
    Approval,
    ApprovalRequested,
    ClientInfo,
    ClientRegistration,
    Device,
    OtpResult,
    Pairing,
    Ping,
    RecoveryCodes,
    RecoveryResult,
    WaitUntil,
)
from client_sdk._trust import Expected, check_approval, complete_pairing
from client_sdk._wire import (
    USER_AGENT,
    ApiRequest,
    Call,
    Reply,
    bad_field,
    int_field,
    json_body,
    no_content,
    obj_field,
    opt_str_field,
    opt_time_field,
    parse_approval,
    parse_device,
    parse_pairing,
    path_id,
    same_pairing,
    str_field,
    time_field,
    wait_param,
)

_REMEMBERED_APPROVALS = 64
CLIENT_NONCE_BYTES = 32
# How far a phone's signed timestamp may sit outside the login's own window (clock skew).
SIGNED_TIME_SLACK = 120.0

logger = logging.getLogger("client_sdk")

# --- the backup client's calls --------------------------------------------------------


def register_call(
    name: str, edition: str, hostname: str | None, registration_key: str | None
) -> Call[ClientRegistration]:
    body: dict[str, Any] = {"name": name, "edition": edition}
    if hostname is not None:
        body["hostname"] = hostname
    if registration_key is not None:
        body["registration_key"] = registration_key

    def parse(reply: Reply) -> ClientRegistration:
        data = json_body(reply, 201)
        return ClientRegistration(
            client_id=str_field(data, "client_id"),
            client_token=str_field(data, "client_token"),
            edition=str_field(data, "edition"),
        )

    return Call(ApiRequest("POST", "/v1/clients", json=body), parse)


def ping_call() -> Call[Ping]:
    def parse(reply: Reply) -> Ping:
        data = json_body(reply)
        server_time = time_field(data, "time")
        midpoint = (reply.sent_at + reply.received_at) / 2
        return Ping(
            server_time=server_time,
            clock_skew=server_time.timestamp() - midpoint,
            round_trip=max(0.0, reply.received_at - reply.sent_at),
            version=str_field(data, "version"),
        )

    return Call(ApiRequest("GET", "/v1/ping", retry="connect"), parse)


def login_context(
    username: str, hostname: str | None, ip: str | None, action: str, message: str | None
) -> dict[str, str | None]:
    return {
        "username": username,
        "hostname": hostname,
        "ip": ip,
        "action": action,
        "message": message,
    }


class ClientCore:
    """Builds the backup client's calls; pins device keys through key proofs at pairings it
    started, and checks approvals against what it asked for."""

    def __init__(self, token: str | None, key_store: KeyStore | None = None) -> None:
        self.token = token
        self.key_store = key_store if key_store is not None else KeyStore()
        self._expected: OrderedDict[str, Expected] = OrderedDict()
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    # -- clients and devices --

    def me(self) -> Call[ClientInfo]:
        def parse(reply: Reply) -> ClientInfo:
            data = json_body(reply)
            return ClientInfo(
                client_id=str_field(data, "client_id"),
                name=str_field(data, "name"),
                edition=str_field(data, "edition"),
                hostname=opt_str_field(data, "hostname"),
                created_at=time_field(data, "created_at"),
                devices=int_field(data, "devices", 0),
                push_devices=int_field(data, "push_devices", 0),
                locked_until=opt_time_field(data, "locked_until"),
            )

        return Call(ApiRequest("GET", "/v1/client", retry="connect"), parse)

    def start_pairing(self, kind: str, label: str | None) -> Call[Pairing]:
        if kind not in ("app", "totp"):
            raise ValueError('kind must be "app" or "totp"')
        body: dict[str, Any] = {"kind": kind}
        if label is not None:
            body["label"] = label

        def parse(reply: Reply) -> Pairing:
            pairing = parse_pairing(json_body(reply, 201))
            if kind != "app":
                return pairing
            payload = pairing.qr_payload
            if not payload or "#" in payload:
                raise UnexpectedResponse(
                    "the server's pairing code is missing or already carries a fragment",
                    status=reply.response.status_code,
                )
            # The secret lives in the QR code's fragment: shown on this machine's screen,
            # read by the phone's camera, never sent to the relay.
            secret = secrets.token_bytes(PAIRING_SECRET_BYTES)
            self.key_store.remember_pairing(pairing.pairing_id, secret, pairing.expires_at)
            link = pairing.qr_link
            if link is not None:
                if not same_pairing(link, payload):
                    raise UnexpectedResponse(
                        "the server's pairing link does not match its pairing code",
                        status=reply.response.status_code,
                    )
                link = f"{link}&k={b64url(secret)}"
            return replace(pairing, qr_payload=f"{payload}#k={b64url(secret)}", qr_link=link)

        return Call(ApiRequest("POST", "/v1/pairings", json=body), parse)

    def get_pairing(self, pairing_id: str, wait: float) -> Call[Pairing]:
        def parse(reply: Reply) -> Pairing:
            pairing = parse_pairing(json_body(reply))
            if pairing.pairing_id != pairing_id:
                raise UnexpectedResponse(
                    f"asked for pairing {pairing_id!r}, the server answered about "
                    f"{pairing.pairing_id!r}",
                    status=reply.response.status_code,
                )
            return self.complete_pairing(pairing)

        request = ApiRequest(
            "GET",
            f"/v1/pairings/{path_id(pairing_id)}",
            params={"wait": wait_param(wait)},
            wait=wait_param(wait),
            retry="connect",
        )
        return Call(request, parse)

    def complete_pairing(self, pairing: Pairing) -> Pairing:
        """Pin a completed app pairing's key when its key proof verifies: see `_trust`."""
        return complete_pairing(self.key_store, pairing)

    def confirm_totp_pairing(self, pairing_id: str, code: str) -> Call[Device]:
        def parse(reply: Reply) -> Device:
            device = obj_field(json_body(reply), "device")
            if device is None:
                raise bad_field("device")
            return parse_device(device)

        return Call(
            ApiRequest("POST", f"/v1/pairings/{path_id(pairing_id)}/confirm", json={"code": code}),
            parse,
        )

    def list_devices(self) -> Call[list[Device]]:
        # Never pins: a device the relay lists is only the relay's word.
        def parse(reply: Reply) -> list[Device]:
            items = json_body(reply).get("devices")
            if not isinstance(items, list):
                raise bad_field("devices")
            return [parse_device(item) for item in items if isinstance(item, dict)]

        return Call(ApiRequest("GET", "/v1/devices", retry="connect"), parse)

    def remove_device(self, device_id: str) -> Call[None]:
        def parse(reply: Reply) -> None:
            no_content(reply)
            self.key_store.forget(device_id)

        return Call(ApiRequest("DELETE", f"/v1/devices/{path_id(device_id)}"), parse)

    # -- codes --

    def verify_otp(self, code: str) -> Call[OtpResult]:
        def parse(reply: Reply) -> OtpResult:
            data = json_body(reply)
            return OtpResult(
                result=str_field(data, "result"), device_id=opt_str_field(data, "device_id")
            )

        return Call(ApiRequest("POST", "/v1/otp/verify", json={"code": code}), parse)

    def create_recovery_codes(self) -> Call[RecoveryCodes]:
        def parse(reply: Reply) -> RecoveryCodes:
            codes = json_body(reply, (200, 201)).get("codes")
            if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
                raise bad_field("codes")
            return RecoveryCodes(codes=tuple(codes))

        return Call(ApiRequest("POST", "/v1/recovery-codes"), parse)

    def verify_recovery_code(self, code: str) -> Call[RecoveryResult]:
        def parse(reply: Reply) -> RecoveryResult:
            data = json_body(reply)
            return RecoveryResult(
                result=str_field(data, "result"), remaining=int_field(data, "remaining")
            )

        return Call(ApiRequest("POST", "/v1/recovery-codes/verify", json={"code": code}), parse)

    # -- approvals --

    def request_approval(
        self,
        *,
        username: str,
        hostname: str | None,
        ip: str | None,
        action: str,
        message: str | None,
        ttl_seconds: int,
        number_matching: bool,
        idempotency_key: str | None,
    ) -> Call[ApprovalRequested]:
        key = idempotency_key or str(uuid.uuid4())
        # Drawn once per call, so a retry (same Idempotency-Key) sends the same nonce.
        nonce = b64url(secrets.token_bytes(CLIENT_NONCE_BYTES))
        context_hash = context_sha256(login_context(username, hostname, ip, action, message))
        body: dict[str, Any] = {
            "username": username,
            "action": action,
            "ttl_seconds": ttl_seconds,
            "number_matching": number_matching,
            "client_nonce": nonce,
        }
        for name, value in (("hostname", hostname), ("ip", ip), ("message", message)):
            if value is not None:
                body[name] = value

        def parse(reply: Reply) -> ApprovalRequested:
            data = json_body(reply, (200, 201))
            requested = ApprovalRequested(
                approval_id=str_field(data, "approval_id"),
                status=str_field(data, "status"),
                expires_at=time_field(data, "expires_at"),
                match_code=opt_str_field(data, "match_code"),
                devices_notified=int_field(data, "devices_notified", 0),
                idempotency_key=key,
                client_nonce=nonce,
            )
            # The window a genuine answer is signed in, by this machine's clock: the relay's
            # expiry, never more than the TTL we asked for.
            expires = min(requested.expires_at.timestamp(), reply.received_at + ttl_seconds)
            self._remember(
                Expected(
                    approval_id=requested.approval_id,
                    client_nonce=nonce,
                    context_hash=context_hash,
                    match_code=requested.match_code,
                    not_before=reply.sent_at - SIGNED_TIME_SLACK,
                    not_after=expires + SIGNED_TIME_SLACK,
                )
            )
            return requested

        request = ApiRequest(
            "POST", "/v1/approvals", json=body, headers={"Idempotency-Key": key}, retry="always"
        )
        return Call(request, parse)

    def _remember(self, expected: Expected) -> None:
        with self._lock:
            # A relay handing back an earlier approval's id overwrites what we knew of it:
            # its old answer then carries the wrong nonce.
            self._expected.pop(expected.approval_id, None)
            self._expected[expected.approval_id] = expected
            while len(self._expected) > _REMEMBERED_APPROVALS:
                self._expected.popitem(last=False)

    def expected(self, approval_id: str) -> Expected | None:
        with self._lock:
            return self._expected.get(approval_id)

    def get_approval(
        self, approval_id: str, wait: float, until: WaitUntil | None = None
    ) -> Call[Approval]:
        params: dict[str, Any] = {"wait": wait_param(wait)}
        if until is not None:
            # A relay older than `until` ignores it and wakes on every change: still right.
            params["until"] = until
        request = ApiRequest(
            "GET",
            f"/v1/approvals/{path_id(approval_id)}",
            params=params,
            wait=wait_param(wait),
            retry="connect",
        )
        return Call(request, lambda reply: parse_approval(json_body(reply)))

    def cancel_approval(self, approval_id: str) -> Call[Approval]:
        def parse(reply: Reply) -> Approval:
            data = json_body(reply)
            if "created_at" in data:
                return parse_approval(data)
            # A server answering only {"approval_id", "status"}: fill what we know.
            now = datetime.now(UTC)
            return Approval(
                approval_id=str_field(data, "approval_id"),
                status=str_field(data, "status"),
                reason=opt_str_field(data, "reason"),
                created_at=now,
                expires_at=now,
                decided_at=opt_time_field(data, "decided_at"),
                device_id=None,
                response=None,
                delivery=None,
            )

        return Call(ApiRequest("DELETE", f"/v1/approvals/{path_id(approval_id)}"), parse)

    # -- checking answers (the rules are in `_trust`) --

    def check_approval(
        self, approval: Approval, approval_id: str, *, match_code: str | None = None
    ) -> Approval:
        """`approval`, marked verified, or `ApprovalSignatureError`: see `_trust`."""
        expected = self.expected(approval_id)
        return check_approval(
            self.key_store, expected, approval, approval_id, match_code=match_code
        )


# --- login helper rules ---------------------------------------------------------------


def fallback_reason(approval: Approval) -> str | None:
    """Why a push login cannot succeed any more, or None while it still can."""
    if approval.status == "approved":
        return None
    if approval.status == "rejected":
        return "rejected"
    if approval.status == "expired":
        return "expired"
    if approval.status == "cancelled":
        return "cancelled"
    if approval.delivery is not None and approval.delivery.all_failed:
        return "delivery_failed"
    return None


_OTP_SHAPE = re.compile(r"^\d{6,8}$")


def is_otp_shaped(code: str) -> bool:
    """OTPs are 6-8 digits; anything else a user types at the prompt is a recovery code."""
    return bool(_OTP_SHAPE.match(code.replace(" ", "")))


def normalise_otp(code: str) -> str:
    return code.replace(" ", "")
