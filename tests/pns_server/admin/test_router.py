from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import Client, Device, Pairing
from tests.conftest import ADMIN_TOKEN
from tests.support.factories import bearer, pair_app_device, pair_totp_device, register_client

ADMIN = bearer(ADMIN_TOKEN)


class TestAuth:
    @pytest.mark.parametrize("headers", [{}, bearer("wrong-token"), bearer("pnsc_x")])
    async def test_wrong_or_missing_token_is_401(
        self, http: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await http.get("/v1/admin/clients", headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"

    async def test_a_client_token_is_not_an_admin_token(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        response = await http.get("/v1/admin/clients", headers=client.headers)
        assert response.status_code == 401

    @pytest.mark.parametrize("settings_overrides", [{"admin_token": None}])
    async def test_disabled_without_admin_token(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/v1/admin/clients", headers=ADMIN)
        assert response.status_code == 401
        assert "disabled" in response.json()["detail"]


class TestListClients:
    async def test_lists_with_device_counts(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http, name="NAS")
        await pair_app_device(http, client)
        await pair_totp_device(http, client)
        response = await http.get("/v1/admin/clients", headers=ADMIN)
        assert response.status_code == 200
        [row] = response.json()["clients"]
        assert row["client_id"] == client.client_id
        assert (row["devices"], row["push_devices"]) == (2, 1)
        assert response.json()["next_cursor"] is None

    async def test_pages_through_every_client_once(self, http: httpx.AsyncClient) -> None:
        ids = {(await register_client(http, name=f"c{i}")).client_id for i in range(5)}
        seen: list[str] = []
        cursor = None
        for _ in range(5):
            params: dict[str, str | int] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            body = (await http.get("/v1/admin/clients", params=params, headers=ADMIN)).json()
            seen += [c["client_id"] for c in body["clients"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids)

    async def test_bad_cursor_is_422(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/v1/admin/clients?cursor=%%%", headers=ADMIN)
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"


class TestClientDetail:
    async def test_shows_devices_and_recent_events(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        device = await pair_app_device(http, client)
        response = await http.get(f"/v1/admin/clients/{client.client_id}", headers=ADMIN)
        assert response.status_code == 200
        body = response.json()
        assert [d["device_id"] for d in body["device_list"]] == [device.device_id]
        assert "client.registered" in {e["event"] for e in body["recent_events"]}

    async def test_unknown_client_is_404(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/v1/admin/clients/nope", headers=ADMIN)
        assert response.status_code == 404


class TestLastSeen:
    async def admin_view(self, http: httpx.AsyncClient, client_id: str) -> str | None:
        body = (await http.get(f"/v1/admin/clients/{client_id}", headers=ADMIN)).json()
        seen: str | None = body["last_seen_at"]
        return seen

    async def test_an_authenticated_call_is_seen(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        assert await self.admin_view(http, client.client_id) is None
        assert (await http.get("/v1/client", headers=client.headers)).status_code == 200
        assert await self.admin_view(http, client.client_id) is not None

    async def test_written_at_most_once_a_minute(
        self, http: httpx.AsyncClient, app: FastAPI
    ) -> None:
        client = await register_client(http)
        await http.get("/v1/client", headers=client.headers)
        first = await self.admin_view(http, client.client_id)
        await http.get("/v1/client", headers=client.headers)
        assert await self.admin_view(http, client.client_id) == first
        async with app.state.runtime.db.session() as session:
            row = await session.get(Client, client.client_id)
            assert row is not None
            row.last_seen_at = datetime.now(UTC) - timedelta(minutes=2)
        await http.get("/v1/client", headers=client.headers)
        later = await self.admin_view(http, client.client_id)
        assert first is not None and later is not None and later > first


class TestUnlock:
    async def test_clears_push_and_otp_locks(self, http: httpx.AsyncClient, app: FastAPI) -> None:
        client = await register_client(http)
        later = datetime.now(UTC) + timedelta(hours=1)
        async with app.state.runtime.db.session() as session:
            row = await session.get(Client, client.client_id)
            assert row is not None
            row.locked_until = later
            row.otp_locked_until = later
            row.otp_consecutive_failures = 7
            row.otp_lock_count = 2
            row.pushes_since_success = 10
        response = await http.post(f"/v1/admin/clients/{client.client_id}/unlock", headers=ADMIN)
        assert response.status_code == 200
        body = response.json()
        assert body["locked_until"] is None and body["otp_locked_until"] is None
        assert body["otp_consecutive_failures"] == 0 and body["pushes_since_success"] == 0
        async with app.state.runtime.db.session() as session:
            row = await session.get(Client, client.client_id)
            assert row is not None and row.otp_lock_count == 0
        trail = (
            await http.get(f"/v1/admin/audit?client_id={client.client_id}", headers=ADMIN)
        ).json()
        unlocked = [e for e in trail["events"] if e["event"] == "client.unlocked"]
        assert unlocked and unlocked[0]["actor"] == "admin"

    async def test_unknown_client_is_404(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/admin/clients/nope/unlock", headers=ADMIN)
        assert response.status_code == 404


class TestDelete:
    async def test_deletes_the_client_and_all_its_data(
        self, http: httpx.AsyncClient, app: FastAPI
    ) -> None:
        client = await register_client(http)
        await pair_app_device(http, client)
        await pair_totp_device(http, client)
        other = await register_client(http)
        await pair_totp_device(http, other)
        response = await http.delete(f"/v1/admin/clients/{client.client_id}", headers=ADMIN)
        assert response.status_code == 204
        assert (await http.get("/v1/client", headers=client.headers)).status_code == 401
        async with app.state.runtime.db.session() as session:
            assert (await session.scalars(select(Device.client_id))).all() == [other.client_id]
            pairings = (await session.scalars(select(Pairing.client_id))).all()
            assert set(pairings) == {other.client_id}
        trail = (
            await http.get(f"/v1/admin/audit?client_id={client.client_id}", headers=ADMIN)
        ).json()
        assert trail["events"][0]["event"] == "client.deleted"
        again = await http.delete(f"/v1/admin/clients/{client.client_id}", headers=ADMIN)
        assert again.status_code == 404


class TestRevokeDevice:
    async def test_revoked_device_loses_access(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        device = await pair_app_device(http, client)
        response = await http.delete(f"/v1/admin/devices/{device.device_id}", headers=ADMIN)
        assert response.status_code == 204
        listed = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert listed == []
        assert (
            await http.delete(f"/v1/admin/devices/{device.device_id}", headers=ADMIN)
        ).status_code == 404


class TestAudit:
    async def test_filters_by_client_and_pages_newest_first(self, http: httpx.AsyncClient) -> None:
        first = await register_client(http)
        await register_client(http)
        for _ in range(3):
            await http.post(f"/v1/admin/clients/{first.client_id}/unlock", headers=ADMIN)
        page = (
            await http.get(
                "/v1/admin/audit", params={"client_id": first.client_id, "limit": 2}, headers=ADMIN
            )
        ).json()
        assert [e["event"] for e in page["events"]] == ["client.unlocked", "client.unlocked"]
        rest = (
            await http.get(
                "/v1/admin/audit",
                params={"client_id": first.client_id, "cursor": page["next_cursor"]},
                headers=ADMIN,
            )
        ).json()
        assert [e["event"] for e in rest["events"]] == ["client.unlocked", "client.registered"]
        assert rest["next_cursor"] is None
        assert all(e["client_id"] == first.client_id for e in page["events"] + rest["events"])
