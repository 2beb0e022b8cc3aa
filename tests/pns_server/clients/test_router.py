from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.factories import bearer, register_client


class TestRegister:
    async def test_returns_token_and_normalised_edition(self, http: httpx.AsyncClient) -> None:
        response = await http.post(
            "/v1/clients", json={"name": "FILESRV01", "edition": "PRO", "hostname": "f.corp"}
        )
        assert response.status_code == 201
        body = response.json()
        assert body["edition"] == "pro"
        assert body["client_token"].startswith("pnsc_")
        assert len(body["client_id"]) == 32

    async def test_home_edition_refused(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/clients", json={"name": "PC", "edition": "home"})
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "edition_unsupported"

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"name": "", "edition": "pro"},
            {"name": 5, "edition": "pro"},
            {"name": "x", "edition": ["pro"]},
            {"name": "x" * 201, "edition": "pro"},
            [],
            "text",
        ],
    )
    async def test_bad_bodies_are_422_invalid_request(
        self, http: httpx.AsyncClient, body: Any
    ) -> None:
        response = await http.post("/v1/clients", json=body)
        assert response.status_code == 422
        problem = response.json()
        assert problem["code"] == "invalid_request"
        assert problem["errors"]

    async def test_malformed_json_is_422(self, http: httpx.AsyncClient) -> None:
        response = await http.post(
            "/v1/clients", content=b'{"name": ', headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_invalid_utf8_is_422(self, http: httpx.AsyncClient) -> None:
        response = await http.post(
            "/v1/clients",
            content=b'{"name": "\xff\xfe"}',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422


@pytest.mark.parametrize("settings_overrides", [{"registration_key": "let-me-in-please"}])
class TestRegistrationKey:
    async def test_missing_key_refused(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/clients", json={"name": "a", "edition": "pro"})
        assert response.status_code == 403
        assert response.json()["code"] == "registration_key_invalid"

    async def test_right_key_accepted(self, http: httpx.AsyncClient) -> None:
        response = await http.post(
            "/v1/clients",
            json={"name": "a", "edition": "pro", "registration_key": "let-me-in-please"},
        )
        assert response.status_code == 201


@pytest.mark.parametrize("settings_overrides", [{"allowed_editions": "pro,home"}])
async def test_operator_can_allow_home(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/clients", json={"name": "a", "edition": "home"})
    assert response.status_code == 201


class TestGetClient:
    async def test_describes_the_caller(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http, name="NAS")
        response = await http.get("/v1/client", headers=client.headers)
        assert response.status_code == 200
        body = response.json()
        assert body["client_id"] == client.client_id
        assert body["name"] == "NAS"
        assert body["devices"] == 0 and body["push_devices"] == 0
        assert body["locked_until"] is None
        assert body["created_at"].endswith("Z")

    @pytest.mark.parametrize("headers", [{}, bearer("pnsc_nope"), {"Authorization": "Basic x"}])
    async def test_bad_tokens_are_401(
        self, http: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await http.get("/v1/client", headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"
