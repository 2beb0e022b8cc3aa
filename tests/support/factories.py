"""Builders for the common set-up steps, done through the public HTTP API."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pyotp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class RegisteredClient:
    client_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


@dataclass
class PairedDevice:
    device_id: str
    token: str
    totp_secret: str
    private_key: ec.EllipticCurvePrivateKey
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    def otp(self, at: datetime | None = None) -> str:
        return pyotp.TOTP(self.totp_secret).at(at or datetime.now(UTC))

    def sign(self, message: str) -> str:
        signature = self.private_key.sign(message.encode(), ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


async def register_client(
    http: httpx.AsyncClient, name: str = "FILESRV01", edition: str = "pro", **extra: Any
) -> RegisteredClient:
    response = await http.post("/v1/clients", json={"name": name, "edition": edition, **extra})
    assert response.status_code == 201, response.text
    body = response.json()
    return RegisteredClient(client_id=body["client_id"], token=body["client_token"])


def pairing_token_from(qr_payload: str) -> str:
    return parse_qs(urlparse(qr_payload).query)["token"][0]


def apns_token() -> str:
    return "ab" * 32


async def pair_app_device(
    http: httpx.AsyncClient,
    client: RegisteredClient,
    *,
    name: str = "Ann's iPhone",
    platform: str = "ios",
    os_version: str = "17.2",
    push: dict[str, Any] | str | None = "default",
) -> PairedDevice:
    """Start an app pairing as the client, then complete it as the phone."""
    started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
    assert started.status_code == 201, started.text
    key = new_key()
    if push == "default":
        push = (
            {"service": "apns", "token": apns_token(), "environment": "production"}
            if platform == "ios"
            else {"service": "fcm", "token": "fcm-token-" + "x" * 140}
        )
    body: dict[str, Any] = {
        "pairing_token": pairing_token_from(started.json()["qr_payload"]),
        "name": name,
        "platform": platform,
        "os_version": os_version,
        "app_version": "4.3.0",
        "public_key": public_key_b64(key),
    }
    if push is not None:
        body["push"] = push
    created = await http.post("/v1/devices", json=body)
    assert created.status_code == 201, created.text
    data = created.json()
    return PairedDevice(
        device_id=data["device_id"],
        token=data["device_token"],
        totp_secret=data["totp"]["secret"],
        private_key=key,
        body=data,
    )


async def pair_totp_device(
    http: httpx.AsyncClient, client: RegisteredClient, label: str = "Google Authenticator"
) -> tuple[str, str]:
    """Pair a third-party TOTP app; returns (device_id, base32 secret)."""
    started = await http.post(
        "/v1/pairings", json={"kind": "totp", "label": label}, headers=client.headers
    )
    assert started.status_code == 201, started.text
    uri = started.json()["otpauth_uri"]
    secret = parse_qs(urlparse(uri).query)["secret"][0]
    confirmed = await http.post(
        f"/v1/pairings/{started.json()['pairing_id']}/confirm",
        json={"code": pyotp.TOTP(secret).now()},
        headers=client.headers,
    )
    assert confirmed.status_code == 200, confirmed.text
    return confirmed.json()["device"]["device_id"], secret
