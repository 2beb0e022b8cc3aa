from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server.models import AuditEvent, Device, Pairing
from pns_server.runtime import Runtime
from pns_server.security import hash_token
from tests.support.factories import (
    RegisteredClient,
    apns_token,
    new_key,
    pair_app_device,
    pair_totp_device,
    pairing_token_from,
    public_key_b64,
    register_client,
)


def runtime_of(app: FastAPI) -> Runtime:
    runtime: Runtime = app.state.runtime
    return runtime


async def start_pairing(
    http: httpx.AsyncClient, client: RegisteredClient, **body: Any
) -> dict[str, Any]:
    response = await http.post("/v1/pairings", json=body or {"kind": "app"}, headers=client.headers)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


def secret_of(otpauth_uri: str) -> str:
    return parse_qs(urlparse(otpauth_uri).query)["secret"][0]


def wrong_code(secret: str) -> str:
    """A six-digit code that matches none of the accepted time steps."""
    totp, now = pyotp.TOTP(secret), datetime.now(UTC)
    accepted = {totp.at(now + timedelta(seconds=d)) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in accepted)


def phone_body(pairing_token: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pairing_token": pairing_token,
        "name": "Ann's iPhone",
        "platform": "ios",
        "os_version": "17.2",
        "app_version": "4.3.0",
        "push": {"service": "apns", "token": apns_token()},
        "public_key": public_key_b64(new_key()),
    }
    body.update(overrides)
    return body


async def move_expiry(app: FastAPI, pairing_id: str, expires_at: datetime) -> None:
    async with runtime_of(app).db.session() as session:
        pairing = await session.get(Pairing, pairing_id)
        assert pairing is not None
        pairing.expires_at = expires_at


async def until_waiters(app: FastAPI, count: int) -> None:
    """Wait until `count` long-polls are subscribed (a condition, not a fixed delay)."""
    notifier = runtime_of(app).notifier
    async with asyncio.timeout(5):
        while notifier.waiter_count < count:
            await asyncio.sleep(0.005)


async def until_pool_idle(app: FastAPI) -> None:
    """Wait until no connection is checked out; times out if a waiter keeps one."""
    db = runtime_of(app).db
    async with asyncio.timeout(5):
        while db.connections_in_use != 0:
            await asyncio.sleep(0.005)


@pytest.fixture
async def client(http: httpx.AsyncClient) -> RegisteredClient:
    return await register_client(http, name="FILESRV01")


class TestStartPairing:
    async def test_app_pairing_gives_single_use_qr_token(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        before = datetime.now(UTC)
        body = await start_pairing(http, client, kind="app")
        assert body["kind"] == "app" and body["status"] == "pending"
        assert body["otpauth_uri"] is None
        url = urlparse(body["qr_payload"])
        assert (url.scheme, url.netloc) == ("pns", "pair")
        assert body["qr_payload"].startswith(
            "pns://pair?server=" + quote("https://pns.example.test", safe="") + "&token=pnsp_"
        )
        query = parse_qs(url.query)
        assert query["server"] == ["https://pns.example.test"]
        token = query["token"][0]
        expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        assert body["expires_at"].endswith("Z")
        assert timedelta(seconds=599) <= expires - before <= timedelta(seconds=602)
        async with runtime_of(app).db.session() as session:
            row = await session.get(Pairing, body["pairing_id"])
            assert row is not None
            # Stored only as a hash.
            assert row.token_hash == hash_token(token)
            assert token not in (row.totp_secret or "")

    async def test_totp_pairing_gives_key_uri(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        body = await start_pairing(http, client, kind="totp", label="Google Authenticator")
        uri = body["otpauth_uri"]
        assert body["qr_payload"] == uri
        assert uri.startswith("otpauth://totp/PNS:Google%20Authenticator?secret=")
        query = parse_qs(urlparse(uri).query)
        assert query["issuer"] == ["PNS"]
        assert (query["algorithm"], query["digits"], query["period"]) == (["SHA1"], ["6"], ["30"])
        secret = query["secret"][0]
        async with runtime_of(app).db.session() as session:
            row = await session.get(Pairing, body["pairing_id"])
            assert row is not None and row.totp_secret is not None
            # Encrypted at rest.
            assert secret not in row.totp_secret
            assert runtime_of(app).box.open(row.totp_secret, row.secret_site) == secret

    async def test_totp_label_defaults_to_client_name(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        body = await start_pairing(http, client, kind="totp")
        assert urlparse(body["otpauth_uri"]).path == "/PNS:FILESRV01"

    async def test_records_audit_event(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        body = await start_pairing(http, client, kind="app")
        async with runtime_of(app).db.session() as session:
            events = (await session.scalars(select(AuditEvent.event))).all()
            subjects = (await session.scalars(select(AuditEvent.subject_id))).all()
        assert "pairing.started" in events
        assert body["pairing_id"] in subjects

    async def test_bad_bodies_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        for body in [
            {},
            {"kind": "sms"},
            {"kind": 1},
            {"kind": ["app"]},
            {"kind": "totp", "label": ""},
            {"kind": "totp", "label": 7},
            {"kind": "totp", "label": "x" * 201},
            [],
            "app",
        ]:
            response = await http.post("/v1/pairings", json=body, headers=client.headers)
            assert response.status_code == 422, body
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["code"] == "invalid_request"
            assert response.json()["errors"]

    async def test_malformed_json_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        for content in [b'{"kind": ', b"\xff", b""]:
            response = await http.post(
                "/v1/pairings",
                content=content,
                headers={**client.headers, "content-type": "application/json"},
            )
            assert response.status_code == 422
            assert response.json()["code"] == "invalid_request"

    async def test_needs_a_client_token(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/v1/pairings", json={"kind": "app"})
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


class TestConfirm:
    async def test_correct_code_activates_the_totp_device(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="totp", label="Authy")
        secret = secret_of(started["otpauth_uri"])
        now = datetime.now(UTC)
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": pyotp.TOTP(secret).at(now)},
            headers=client.headers,
        )
        assert response.status_code == 200, response.text
        device = response.json()["device"]
        assert device["kind"] == "totp" and device["name"] == "Authy"
        assert device["platform"] is None and device["os_version"] is None
        assert device["push"] is None and device["push_status"] == "none"
        assert device["public_key"] is None and device["last_used_at"] is None
        assert device["created_at"].endswith("Z")
        listed = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert [d["device_id"] for d in listed] == [device["device_id"]]

        status = await http.get(f"/v1/pairings/{started['pairing_id']}", headers=client.headers)
        assert status.json()["status"] == "completed"
        assert status.json()["device"] == device
        async with runtime_of(app).db.session() as session:
            row = await session.get(Device, device["device_id"])
            assert row is not None
            # The confirming code's step is spent, so it cannot log in afterwards.
            assert row.last_otp_step is not None
            assert abs(row.last_otp_step - int(now.timestamp()) // 30) <= 1
            assert runtime_of(app).box.open(row.totp_secret, row.secret_site) == secret
            pairing = await session.get(Pairing, started["pairing_id"])
            assert pairing is not None and pairing.totp_secret is None

    async def test_code_with_a_space_is_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        code = pyotp.TOTP(secret_of(started["otpauth_uri"])).now()
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": f"{code[:3]} {code[3:]}"},
            headers=client.headers,
        )
        assert response.status_code == 200

    async def test_previous_step_is_accepted(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        code = pyotp.TOTP(secret_of(started["otpauth_uri"])).at(
            datetime.now(UTC) - timedelta(seconds=30)
        )
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": code},
            headers=client.headers,
        )
        assert response.status_code == 200

    async def test_factory_pairs_a_totp_device(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        device_id, secret = await pair_totp_device(http, client)
        assert len(device_id) == 32 and len(secret) == 32

    async def test_wrong_code_is_401_and_pairing_stays_pending(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        secret = secret_of(started["otpauth_uri"])
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": wrong_code(secret)},
            headers=client.headers,
        )
        assert response.status_code == 401
        assert response.json()["code"] == "otp_invalid"
        assert response.json()["attempts_left"] == 4
        status = await http.get(f"/v1/pairings/{started['pairing_id']}", headers=client.headers)
        assert status.json()["status"] == "pending"
        assert (await http.get("/v1/devices", headers=client.headers)).json()["devices"] == []

    async def test_malformed_codes_are_wrong_codes(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        for code in ["12345", "1234567", "abcdef", "١٢٣٤٥٦"]:
            response = await http.post(
                f"/v1/pairings/{started['pairing_id']}/confirm",
                json={"code": code},
                headers=client.headers,
            )
            assert response.status_code == 401, code
            assert response.json()["code"] == "otp_invalid"

    @pytest.mark.parametrize("settings_overrides", [{"otp_max_failures": 3}])
    async def test_too_many_wrong_codes_expire_the_pairing(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        secret = secret_of(started["otpauth_uri"])
        url = f"/v1/pairings/{started['pairing_id']}/confirm"
        left = []
        for _ in range(3):
            response = await http.post(
                url, json={"code": wrong_code(secret)}, headers=client.headers
            )
            assert response.status_code == 401
            left.append(response.json()["attempts_left"])
        assert left == [2, 1, 0]
        # Even the right code is refused now: guessing cannot continue.
        response = await http.post(
            url, json={"code": pyotp.TOTP(secret).now()}, headers=client.headers
        )
        assert response.status_code == 410
        assert response.json()["code"] == "pairing_expired"
        status = await http.get(f"/v1/pairings/{started['pairing_id']}", headers=client.headers)
        assert status.json()["status"] == "expired"

    async def test_expired_pairing_is_410(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        await move_expiry(app, started["pairing_id"], datetime.now(UTC) - timedelta(seconds=1))
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": pyotp.TOTP(secret_of(started["otpauth_uri"])).now()},
            headers=client.headers,
        )
        assert response.status_code == 410
        assert response.json()["code"] == "pairing_expired"

    async def test_completed_pairing_is_409(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        code = pyotp.TOTP(secret_of(started["otpauth_uri"])).now()
        url = f"/v1/pairings/{started['pairing_id']}/confirm"
        assert (
            await http.post(url, json={"code": code}, headers=client.headers)
        ).status_code == 200
        again = await http.post(url, json={"code": code}, headers=client.headers)
        assert again.status_code == 409
        assert again.json()["code"] == "pairing_not_pending"
        listed = (await http.get("/v1/devices", headers=client.headers)).json()["devices"]
        assert len(listed) == 1

    async def test_app_pairing_cannot_be_confirmed(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        response = await http.post(
            f"/v1/pairings/{started['pairing_id']}/confirm",
            json={"code": "123456"},
            headers=client.headers,
        )
        assert response.status_code == 409
        assert response.json()["code"] == "pairing_wrong_kind"

    async def test_unknown_pairing_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.post(
            "/v1/pairings/" + "0" * 32 + "/confirm", json={"code": "123456"}, headers=client.headers
        )
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"

    async def test_bad_bodies_are_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="totp")
        url = f"/v1/pairings/{started['pairing_id']}/confirm"
        for body in [{}, {"code": 123456}, {"code": ""}, {"code": None}, {"code": "1" * 17}, []]:
            response = await http.post(url, json=body, headers=client.headers)
            assert response.status_code == 422, body
            assert response.json()["code"] == "invalid_request"
            assert response.json()["errors"][0]["field"] in ("code", "body")
        for content in [b"{code: 1}", b"\xff", b""]:
            response = await http.post(
                url, content=content, headers={**client.headers, "content-type": "application/json"}
            )
            assert response.status_code == 422
            assert response.json()["code"] == "invalid_request"
        # Refused bodies are not wrong codes: the pairing still has every attempt left.
        wrong = await http.post(url, json={"code": "x"}, headers=client.headers)
        assert wrong.json()["attempts_left"] == 4


class TestIsolation:
    async def test_other_client_cannot_see_or_confirm_a_pairing(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        other = await register_client(http, name="INTRUDER")
        started = await start_pairing(http, client, kind="totp")
        code = pyotp.TOTP(secret_of(started["otpauth_uri"])).now()
        url = f"/v1/pairings/{started['pairing_id']}"
        seen = await http.get(url, headers=other.headers)
        assert seen.status_code == 404 and seen.json()["code"] == "not_found"
        confirmed = await http.post(url + "/confirm", json={"code": code}, headers=other.headers)
        assert confirmed.status_code == 404 and confirmed.json()["code"] == "not_found"
        # The owner's pairing is untouched by the attempts.
        owner = await http.post(url + "/confirm", json={"code": code}, headers=client.headers)
        assert owner.status_code == 200


class TestGetPairing:
    async def test_pending_without_wait_returns_at_once(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        response = await http.get(f"/v1/pairings/{started['pairing_id']}", headers=client.headers)
        assert response.status_code == 200
        assert response.json() == {
            "pairing_id": started["pairing_id"],
            "kind": "app",
            "status": "pending",
            "expires_at": started["expires_at"],
            "device": None,
        }

    async def test_reports_the_device_after_the_phone_pairs(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        token = pairing_token_from(started["qr_payload"])
        created = await http.post("/v1/devices", json=phone_body(token))
        assert created.status_code == 201
        body = (
            await http.get(f"/v1/pairings/{started['pairing_id']}?wait=5", headers=client.headers)
        ).json()
        assert body["status"] == "completed"
        assert body["device"]["device_id"] == created.json()["device_id"]
        assert body["device"]["kind"] == "app"

    async def test_long_poll_wakes_when_the_phone_pairs(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        loop = asyncio.get_running_loop()
        finished: list[float] = []
        waiter = asyncio.create_task(
            http.get(f"/v1/pairings/{started['pairing_id']}?wait=30", headers=client.headers)
        )
        waiter.add_done_callback(lambda _t: finished.append(loop.time()))
        await until_waiters(app, 1)
        assert not waiter.done()
        paired_at = loop.time()
        token = pairing_token_from(started["qr_payload"])
        assert (await http.post("/v1/devices", json=phone_body(token))).status_code == 201
        response = await waiter
        assert finished[0] - paired_at < 1.0
        assert response.json()["status"] == "completed"
        assert response.json()["device"] is not None

    @pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 1}])
    async def test_waiting_long_polls_hold_no_database_connection(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        url = f"/v1/pairings/{started['pairing_id']}?wait=30"
        waiters = [asyncio.create_task(http.get(url, headers=client.headers)) for _ in range(5)]
        await until_waiters(app, 5)
        await until_pool_idle(app)
        listed = await asyncio.wait_for(http.get("/v1/devices", headers=client.headers), 5)
        assert listed.status_code == 200
        token = pairing_token_from(started["qr_payload"])
        assert (await http.post("/v1/devices", json=phone_body(token))).status_code == 201
        responses = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert {r.json()["status"] for r in responses} == {"completed"}

    async def test_expired_pairing_reported_at_once(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        await move_expiry(app, started["pairing_id"], datetime.now(UTC) - timedelta(seconds=1))
        response = await asyncio.wait_for(
            http.get(f"/v1/pairings/{started['pairing_id']}?wait=30", headers=client.headers), 5
        )
        assert response.json()["status"] == "expired"
        assert response.json()["device"] is None

    async def test_long_poll_reports_expiry_when_it_passes(
        self, http: httpx.AsyncClient, client: RegisteredClient, app: FastAPI
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        expires_at = datetime.now(UTC) + timedelta(seconds=0.3)
        await move_expiry(app, started["pairing_id"], expires_at)
        loop = asyncio.get_running_loop()
        began = loop.time()
        response = await http.get(
            f"/v1/pairings/{started['pairing_id']}?wait=20", headers=client.headers
        )
        assert response.json()["status"] == "expired"
        assert datetime.now(UTC) >= expires_at
        assert loop.time() - began < 3.0

    async def test_wait_elapses_while_pending(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        response = await http.get(
            f"/v1/pairings/{started['pairing_id']}?wait=0.2", headers=client.headers
        )
        assert response.status_code == 200
        assert response.json()["status"] == "pending"

    async def test_wait_outside_range_is_422(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        started = await start_pairing(http, client, kind="app")
        for wait in ["-1", "61", "abc", "nan", "inf", ""]:
            response = await http.get(
                f"/v1/pairings/{started['pairing_id']}?wait={wait}", headers=client.headers
            )
            assert response.status_code == 422, wait
            assert response.json()["code"] == "invalid_request"
            assert response.json()["errors"][0]["field"].endswith("wait")

    async def test_unknown_pairing_is_404(
        self, http: httpx.AsyncClient, client: RegisteredClient
    ) -> None:
        response = await http.get("/v1/pairings/nope?wait=5", headers=client.headers)
        assert response.status_code == 404
        assert response.json()["code"] == "not_found"

    async def test_needs_a_client_token(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/v1/pairings/whatever")
        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"


async def test_factory_pairs_an_app_device(
    http: httpx.AsyncClient, client: RegisteredClient
) -> None:
    device = await pair_app_device(http, client, platform="android", os_version="14")
    assert device.token.startswith("pnsd_")
    assert device.body["totp"] == {
        "secret": device.totp_secret,
        "algorithm": "SHA1",
        "digits": 6,
        "period": 30,
    }
