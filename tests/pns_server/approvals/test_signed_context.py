"""pns-approval-v2: a client nonce and the login context in the phone's signed answer."""

from __future__ import annotations

import base64
import os
from typing import Any

import httpx
import pytest

from tests.pns_server.approvals.helpers import (
    LOGIN,
    request_approval,
    signed_answer,
    signed_answer_v2,
)
from tests.support.factories import PairedDevice, RegisteredClient


def nonce(size: int = 32) -> str:
    return base64.urlsafe_b64encode(os.urandom(size)).rstrip(b"=").decode()


async def device_view(http: httpx.AsyncClient, phone: PairedDevice, approval_id: str) -> Any:
    response = await http.get(f"/v1/device/approvals/{approval_id}", headers=phone.headers)
    assert response.status_code == 200
    return response.json()


async def respond(
    http: httpx.AsyncClient, phone: PairedDevice, approval_id: str, body: dict[str, Any]
) -> httpx.Response:
    return await http.post(
        f"/v1/device/approvals/{approval_id}/response", json=body, headers=phone.headers
    )


class TestClientNonce:
    @pytest.mark.parametrize(
        "value",
        [nonce(15), nonce(65), "a+b/" * 8, "", "é" * 30, 42],
        # Named, not shown: random values would give each collection different test ids.
        ids=["15-bytes", "65-bytes", "not-base64url", "empty", "non-ascii", "a-number"],
    )
    async def test_malformed_nonce_is_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, value: Any
    ) -> None:
        response = await http.post(
            "/v1/approvals", json={**LOGIN, "client_nonce": value}, headers=client.headers
        )
        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "invalid_request"
        assert any("client_nonce" in str(error.get("field")) for error in body["errors"])

    @pytest.mark.parametrize("size", [16, 64])
    async def test_nonce_and_context_reach_the_phone_verbatim(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice, size: int
    ) -> None:
        sent = nonce(size)
        context = {
            "username": "  ann ",
            "hostname": "Fïlesrv\u00a001 ",
            "ip": " 203.0.113.7",
            "action": "restore ",
            "message": "\u65e5\u672c ok\u2028 ",
        }
        body = await request_approval(http, client, **context, client_nonce=sent)
        view = await device_view(http, phone, body["approval_id"])
        assert view["client_nonce"] == sent
        assert view["context"] == context
        listed = (await http.get("/v1/device/approvals", headers=phone.headers)).json()
        assert listed["approvals"][0]["client_nonce"] == sent
        assert listed["approvals"][0]["context"] == context


class TestV2Signature:
    async def test_v2_answer_approves_and_status_names_the_version(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, message=" note ", client_nonce=nonce())
        view = await device_view(http, phone, body["approval_id"])
        answer = signed_answer_v2(phone, view, match_code=body["match_code"])
        response = await respond(http, phone, body["approval_id"], answer)
        assert response.json()["status"] == "approved", response.text
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["response"]["version"] == "pns-approval-v2"

    async def test_v1_signature_where_v2_is_due_is_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, client_nonce=nonce())
        answer = signed_answer(phone, body["approval_id"], match_code=body["match_code"])
        response = await respond(http, phone, body["approval_id"], answer)
        assert response.status_code == 401
        assert response.json()["code"] == "signature_invalid"
        assert response.json()["version"] == "pns-approval-v2"
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["status"] == "pending"

    async def test_signature_over_another_context_or_nonce_is_refused(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client, client_nonce=nonce())
        view = await device_view(http, phone, body["approval_id"])
        other_context = {**view["context"], "username": "root"}
        for answer in (
            signed_answer_v2(phone, view, match_code=body["match_code"], context=other_context),
            signed_answer_v2(phone, view, match_code=body["match_code"], nonce=nonce()),
        ):
            response = await respond(http, phone, body["approval_id"], answer)
            assert response.status_code == 401
            assert response.json()["code"] == "signature_invalid"

    async def test_v1_stays_for_approvals_without_a_nonce(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        body = await request_approval(http, client)
        answer = signed_answer(phone, body["approval_id"], match_code=body["match_code"])
        assert (await respond(http, phone, body["approval_id"], answer)).json()["status"] == (
            "approved"
        )
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["response"]["version"] == "pns-approval-v1"

    async def test_signed_fields_are_checked_on_the_exact_bytes(
        self, http: httpx.AsyncClient, client: RegisteredClient, phone: PairedDevice
    ) -> None:
        # The padded code is what the phone signed: the signature verifies on those bytes,
        # and the code itself then does not match the screen.
        body = await request_approval(http, client, client_nonce=nonce())
        view = await device_view(http, phone, body["approval_id"])
        padded = f" {body['match_code']} "
        response = await respond(
            http, phone, body["approval_id"], signed_answer_v2(phone, view, match_code=padded)
        )
        assert response.json()["status"] == "rejected", response.text
        state = await http.get(f"/v1/approvals/{body['approval_id']}", headers=client.headers)
        assert state.json()["reason"] == "number_mismatch"
        assert state.json()["response"]["match_code"] == padded
