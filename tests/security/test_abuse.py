"""Bad input and abuse: control characters, log forging, leaked SQL parameters, a weak admin
token, admin-token guessing, made-up tokens filling the rate-limit table, and long-polls
left behind by callers who went away."""

from __future__ import annotations

import io
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from pns_server.config import Settings
from pns_server.models import RateLimitBucket
from pns_server.observability import configure_logging
from tests.conftest import ADMIN_TOKEN
from tests.pns_server.approvals.helpers import LOGIN, runtime_of
from tests.support.factories import (
    bearer,
    new_key,
    pair_app_device,
    public_key_b64,
    register_client,
)
from tests.support.server import LiveServer

HOSTILE = ["nul\x00here", "line\nbreak", "carriage\rreturn", "esc\x1b[2J", "del\x7fdel", "c1\x85c1"]


def problem_field(response: httpx.Response) -> set[str]:
    assert response.status_code == 422, (response.status_code, response.text)
    body = response.json()
    assert body["code"] == "invalid_request"
    return {e["field"] for e in body["errors"]}


# Every case below is one request; the abuse limits are not what is tested here.
ROOMY_LIMITS = {
    "rate_register_per_hour": 1000,
    "rate_pairing_per_minute": 1000,
    "approval_rate_per_minute": 1000,
}


@pytest.mark.parametrize("settings_overrides", [ROOMY_LIMITS])
class TestControlCharacters:
    async def test_every_text_field_refuses_them(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        approval = (await http.post("/v1/approvals", json=LOGIN, headers=client.headers)).json()
        totp = await http.post("/v1/pairings", json={"kind": "totp"}, headers=client.headers)
        app_pairing = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
        pairing_token = app_pairing.json()["qr_payload"].split("token=")[1]
        device_body = {
            "pairing_token": pairing_token,
            "name": "Phone",
            "platform": "android",
            "os_version": "14",
            "app_version": "4.3.0",
            "public_key": public_key_b64(new_key()),
            "push": {"service": "fcm", "token": "f" * 150},
        }
        answer = {"decision": "approve", "match_code": "123", "timestamp": "t", "signature": "s"}
        # (method, path, headers, body, field): one row per text field of every request body.
        cases: list[tuple[str, str, dict[str, str], dict[str, Any], str]] = [
            ("POST", "/v1/clients", {}, {"name": "N", "edition": "pro"}, "name"),
            ("POST", "/v1/clients", {}, {"name": "N", "edition": "pro"}, "edition"),
            ("POST", "/v1/clients", {}, {"name": "N", "edition": "pro"}, "hostname"),
            ("POST", "/v1/clients", {}, {"name": "N", "edition": "pro"}, "registration_key"),
            ("POST", "/v1/pairings", client.headers, {"kind": "totp"}, "label"),
            (
                "POST",
                f"/v1/pairings/{totp.json()['pairing_id']}/confirm",
                client.headers,
                {"code": "123456"},
                "code",
            ),
            *[
                ("POST", "/v1/devices", {}, device_body, name)
                for name in ("pairing_token", "name", "os_version", "app_version", "public_key")
            ],
            ("POST", "/v1/devices", {}, device_body, "push.token"),
            ("PUT", "/v1/device/push", phone.headers, {"service": "fcm", "token": "x"}, "token"),
            *[
                ("POST", "/v1/approvals", client.headers, dict(LOGIN), name)
                for name in ("username", "hostname", "ip", "action", "message")
            ],
            *[
                (
                    "POST",
                    f"/v1/device/approvals/{approval['approval_id']}/response",
                    phone.headers,
                    answer,
                    name,
                )
                for name in ("match_code", "timestamp", "signature")
            ],
            ("POST", "/v1/otp/verify", client.headers, {"code": "123456"}, "code"),
            ("POST", "/v1/recovery-codes/verify", client.headers, {"code": "x"}, "code"),
        ]
        for method, path, headers, body, field in cases:
            for bad in HOSTILE:
                sent = _with(body, field, bad)
                response = await http.request(method, path, json=sent, headers=headers)
                assert problem_field(response) == {field}, (path, field, repr(bad))
        # Nothing of it reached the database: the approval is still pending, no new client.
        state = await http.get(f"/v1/approvals/{approval['approval_id']}", headers=client.headers)
        assert state.json()["status"] == "pending"

    async def test_in_a_path_or_query_string(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        admin = bearer(ADMIN_TOKEN)
        for method, path, params, headers, field in [
            ("GET", "/v1/approvals/ab%00cd", {}, client.headers, "path"),
            ("DELETE", "/v1/devices/x%0Ay", {}, client.headers, "path"),
            ("GET", "/v1/admin/clients", {"cursor": "a\x00b"}, admin, "query.cursor"),
        ]:
            response = await http.request(method, path, params=params, headers=headers)
            assert problem_field(response) == {field}, path

    async def test_ordinary_unicode_is_kept(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http, "Büro-Server 東京")
        await pair_app_device(http, client, push=None)
        body = {**LOGIN, "username": "Zoë O'Brien", "message": "Anmeldung \u00fcber VPN"}
        created = await http.post("/v1/approvals", json=body, headers=client.headers)
        assert created.status_code == 201, created.text


def _with(body: dict[str, Any], field: str, value: str) -> dict[str, Any]:
    copy = {k: (dict(v) if isinstance(v, dict) else v) for k, v in body.items()}
    head, _, rest = field.partition(".")
    if rest:
        copy[head][rest] = value
    else:
        copy[head] = value
    return copy


async def test_database_errors_carry_no_statement_parameters(app: FastAPI) -> None:
    secret = "match-code-417-never-logged"
    db = runtime_of(app).db
    statement = text("INSERT INTO rate_limits (key, window_start, count) VALUES (:k, :w, 1)")
    params = {"k": secret, "w": datetime(2026, 11, 30, 9, 0)}
    async with db.session() as session:
        await session.execute(statement, params)
    with pytest.raises(IntegrityError) as caught:
        async with db.session() as session:
            await session.execute(statement, params)
    assert secret not in str(caught.value)
    assert "hidden" in str(caught.value)


def test_text_logs_escape_line_breaks_so_no_line_can_be_forged() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(Settings(log_format="text"), stream)
        forged = "ann\n09:12:18 INFO    pns.access POST /v1/admin/clients 200\r"
        logging.getLogger("pns.test").warning("login by %s", forged, extra={"who": forged})
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    output = stream.getvalue()
    assert output.count("\n") == 1 and "\r" not in output, output
    assert "ann\\n09:12:18 INFO" in output


class TestAdminToken:
    @pytest.mark.parametrize("token", ["short", "x" * 31])
    def test_shorter_than_32_characters_is_refused(self, token: str) -> None:
        with pytest.raises(ValidationError, match="at least 32 characters"):
            Settings(admin_token=token)

    def test_an_empty_one_means_off(self) -> None:
        assert Settings(admin_token="").admin_token is None

    def test_the_server_refuses_to_start_with_a_clear_error(self, tmp_path: Any) -> None:
        env = {**os.environ, "PNS_DATA_DIR": str(tmp_path), "PNS_ADMIN_TOKEN": "letmein"}
        done = subprocess.run(
            [sys.executable, "-m", "pns_server.cli", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "PNS_ADMIN_TOKEN" in done.stderr and "at least 32" in done.stderr
        assert "letmein" not in done.stderr


@pytest.mark.parametrize("settings_overrides", [{"rate_admin_per_minute": 3}])
async def test_admin_calls_are_limited_per_ip(app: FastAPI) -> None:
    def client_from(ip: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(ip, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://pns.test")

    async with client_from("198.51.100.7") as guesser, client_from("198.51.100.8") as operator:
        for attempt in range(3):
            wrong = await guesser.get("/v1/admin/clients", headers=bearer(f"guess-{attempt}"))
            assert wrong.status_code == 401
        # The right token does not help once the address is over its limit...
        limited = await guesser.get("/v1/admin/clients", headers=bearer(ADMIN_TOKEN))
        assert limited.status_code == 429
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # ...and another address is not affected.
        ok = await operator.get("/v1/admin/clients", headers=bearer(ADMIN_TOKEN))
        assert ok.status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"approval_rate_per_minute": 2}])
async def test_made_up_tokens_count_toward_no_limit(http: httpx.AsyncClient, app: FastAPI) -> None:
    async def approval_buckets() -> int:
        async with runtime_of(app).db.session() as session:
            count = await session.scalar(
                select(func.count()).where(RateLimitBucket.key.like("approvals:%"))
            )
        return int(count or 0)

    for n in range(5):
        forged = await http.post("/v1/approvals", json=LOGIN, headers=bearer(f"pnsc_made-up-{n}"))
        assert forged.status_code == 401
    assert await approval_buckets() == 0

    # A real client is still counted, per client, and limited.
    client = await register_client(http)
    await pair_app_device(http, client, push=None)
    statuses = [
        (await http.post("/v1/approvals", json=LOGIN, headers=client.headers)).status_code
        for _ in range(3)
    ]
    assert statuses == [201, 201, 429]
    # Counted in memory: no request, forged or real, writes a row for this limit.
    assert await approval_buckets() == 0
    # Another client has its own count.
    other = await register_client(http)
    await pair_app_device(http, other, push=None)
    again = await http.post("/v1/approvals", json=LOGIN, headers=other.headers)
    assert again.status_code == 201


def _waiters(server: LiveServer) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    line = next(x for x in metrics.splitlines() if x.startswith("pns_longpoll_waiters "))
    return float(line.split()[1])


@pytest.mark.slow
def test_a_long_poll_ends_when_its_caller_disconnects(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        token = http.post("/v1/clients", json={"name": "N", "edition": "pro"}).json()
        started = http.post(
            "/v1/pairings", json={"kind": "app"}, headers=bearer(token["client_token"])
        ).json()
    request = (
        f"GET /v1/pairings/{started['pairing_id']}?wait=60 HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nAuthorization: Bearer {token['client_token']}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", live_server.port)) as sock:
        sock.sendall(request)
        _until(lambda: _waiters(live_server) == 1, "the long-poll never started waiting")
    # The caller is gone; the wait (60 s) must not outlive it.
    _until(lambda: _waiters(live_server) == 0, "the long-poll kept waiting for nobody")


def _until(condition: Any, message: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)
