"""The device's calls, without I/O: reading the pairing code, enrolment, push-token
updates, pending approvals and the signed answer. `DeviceClient` and `AsyncDeviceClient`
only move them over the network."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

from client_sdk._keys import PAIRING_SECRET_BYTES, b64url_decode
from client_sdk._models import DeviceApproval, DeviceDecision, TotpParameters
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
    parse_device_approval,
    path_id,
    str_field,
)


def parse_qr_payload(qr_payload: str) -> tuple[str, str]:
    """`pns://pair?server=<url>&token=<token>[#k=<secret>]` -> (server URL, pairing token).
    `pairing_secret_of` reads the fragment's secret."""
    parsed = urlparse(qr_payload.strip())
    if parsed.scheme != "pns" or parsed.netloc != "pair":
        raise ValueError("not a PNS pairing code (expected pns://pair?...)")
    query = parse_qs(parsed.query)
    servers, tokens = query.get("server", []), query.get("token", [])
    if len(servers) != 1 or len(tokens) != 1 or not tokens[0]:
        raise ValueError("the pairing code must carry exactly one server and one token")
    server = servers[0]
    if urlparse(server).scheme not in ("http", "https"):
        raise ValueError("the pairing code's server is not an http(s) URL")
    return server.rstrip("/"), tokens[0]


def pairing_secret_of(qr_payload: str) -> bytes | None:
    """The 32-byte secret in a pairing code's `#k=` fragment; None when it has no fragment
    (a client that predates key proofs). A malformed fragment is a ValueError: the code was
    damaged or tampered with, and guessing would only make the proof fail later."""
    fragment = urlparse(qr_payload.strip()).fragment
    if not fragment:
        return None
    values = parse_qs(fragment, keep_blank_values=True).get("k", [])
    if len(values) != 1 or fragment != f"k={values[0]}":
        raise ValueError("the pairing code's fragment must be exactly #k=<secret>")
    secret = b64url_decode(values[0])
    if len(secret) != PAIRING_SECRET_BYTES:
        raise ValueError(f"the pairing code's secret must be {PAIRING_SECRET_BYTES} bytes")
    return secret


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
