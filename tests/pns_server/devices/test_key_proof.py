"""Key proofs at pairing: the relay stores the phone's proof verbatim and hands it back; it
cannot check it (the secret never reaches it), so it only refuses malformed ones."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Any

import httpx
import pytest

from tests.pns_server.devices.test_router import phone_body, start_app_pairing
from tests.support.factories import (
    RegisteredClient,
    new_key,
    pairing_token_from,
    public_key_b64,
    register_client,
)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def proof_for(secret: bytes, public_key: str) -> str:
    return b64url(hmac.new(secret, f"pns-pair-v1|{public_key}".encode(), hashlib.sha256).digest())


@pytest.fixture
async def client(http: httpx.AsyncClient) -> RegisteredClient:
    return await register_client(http, name="FILESRV01")


async def enrol(http: httpx.AsyncClient, client: RegisteredClient, **overrides: Any) -> Any:
    pairing = await start_app_pairing(http, client)
    body = phone_body(pairing_token_from(pairing["qr_payload"]), **overrides)
    return pairing, await http.post("/v1/devices", json=body)


class TestKeyProof:
    async def test_stored_and_returned_in_pairing_status_and_device_list(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        key = public_key_b64(new_key())
        proof = proof_for(os.urandom(32), key)
        pairing, created = await enrol(http, client, public_key=key, key_proof=proof)
        assert created.status_code == 201, created.text
        status = await http.get(f"/v1/pairings/{pairing['pairing_id']}", headers=client.headers)
        device = status.json()["device"]
        assert (device["public_key"], device["key_proof"]) == (key, proof)
        [listed] = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert (listed["public_key"], listed["key_proof"]) == (key, proof)

    async def test_optional_for_older_apps(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        # Without a proof, stray whitespace around the key is tolerated as it always was.
        _, created = await enrol(http, client, public_key=f" {public_key_b64(new_key())}\n")
        assert created.status_code == 201, created.text
        [listed] = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert listed["key_proof"] is None

    async def test_malformed_proof_is_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        for bad in ("short", b64url(os.urandom(32)) + "=", "+" * 43, b64url(os.urandom(33))):
            _, created = await enrol(http, client, key_proof=bad)
            assert created.status_code == 422, bad
            assert created.json()["code"] == "invalid_request"

    async def test_proof_needs_the_key_in_canonical_base64(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        key = public_key_b64(new_key())
        wrapped = key[:64] + "\n" + key[64:]
        for text in (wrapped, key + "\n", " " + key):
            _, created = await enrol(
                http, client, public_key=text, key_proof=proof_for(os.urandom(32), text)
            )
            assert created.status_code == 422, repr(text)
            assert created.json()["code"] == "invalid_request"
