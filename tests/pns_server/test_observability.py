from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import random
import re
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from sqlalchemy import literal_column, select

from pns_server.config import Settings
from pns_server.db import Database
from pns_server.observability import (
    _PATTERNS,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    redact,
    wants_json,
)
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, server_env
from tests.support.factories import (
    bearer,
    pair_app_device,
    pair_totp_device,
    pairing_token_from,
    register_client,
)
from tests.support.server import LiveServer


class TestRedact:
    @pytest.mark.parametrize(
        ("line", "secret"),
        [
            ("client pnsc_AbCdEf0123456789xyz registered", "pnsc_AbCdEf0123456789xyz"),
            ("url pns://pair?token=pnsp_zzzzzzzzzzzz1234", "pnsp_zzzzzzzzzzzz1234"),
            ("Authorization: Bearer some-admin-token", "some-admin-token"),
            ('{"code": "123456"}', "123456"),
            ("otp code=654321 refused", "654321"),
            ("otpauth://totp/PNS:x?secret=JBSWY3DPEHPK3PXP&issuer=PNS", "JBSWY3DPEHPK3PXP"),
            ("{'token': 'abababab', 'service': 'apns'}", "abababab"),
            ('"registration_key": "let-me-in"', "let-me-in"),
        ],
    )
    def test_masks_secret_shaped_values(self, line: str, secret: str) -> None:
        masked = redact(line)
        assert secret not in masked
        assert "[redacted]" in masked

    def test_leaves_ordinary_lines_alone(self) -> None:
        line = "GET /v1/approvals/{approval_id} 200 3.1ms"
        assert redact(line) == line

    def test_skips_a_pattern_only_where_it_could_change_nothing(self) -> None:
        """`redact` runs a pattern only on lines where its words appear: on any line, it must
        answer what running every pattern answers. The non-ASCII letters are those `re` takes
        for i, k and s when it ignores case."""
        fragments = [
            *("token", "TOKEN", "to\u212aen", "\u017fecret", "s\u0131gnature", "S\u0130GNATURE"),
            *("otp", "Code", "codes", "Authorization", "bearer", "BeArEr", "pnsc_", "pnsd_"),
            *("pns", "abcdefgh1234", ":", "=", " ", '"', "'", "/", ",", "{", "}", "\u00e9", "x"),
        ]
        rng = random.Random(11)
        for _ in range(20_000):
            line = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 10)))
            assert redact(line) == every_pattern(line), line

    def test_filter_redacts_arguments_and_exceptions(self) -> None:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RedactingFilter())
        logger = logging.getLogger("pns.test.redaction")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("token for %s is %s", "x", "pnsd_secretsecretsecret")
            try:
                raise ValueError("bad token pnsc_leakedleakedleaked")
            except ValueError:
                logger.exception("failed")
        finally:
            logger.removeHandler(handler)
        output = stream.getvalue()
        assert "secretsecret" not in output and "leakedleaked" not in output
        first = json.loads(output.splitlines()[0])
        assert first["level"] == "warning" and first["logger"] == "pns.test.redaction"


def every_pattern(line: str) -> str:
    for pattern, replacement in _PATTERNS:
        line = pattern.sub(replacement, line)
    return line


def test_format_follows_the_setting_and_the_terminal(tmp_path: Path) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    auto = Settings(data_dir=tmp_path)
    assert wants_json(auto, io.StringIO()) is True
    assert wants_json(auto, Tty()) is False
    assert wants_json(Settings(data_dir=tmp_path, log_format="json"), Tty()) is True
    record = logging.LogRecord("pns", logging.INFO, "", 0, "hello", None, None)
    record.route = "/v1/ping"
    assert TextFormatter().format(record).endswith("hello route=/v1/ping")


class TestRequestId:
    async def test_generated_when_absent(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/healthz")
        assert re.fullmatch(r"[0-9a-f]{16}", response.headers["x-request-id"])

    async def test_valid_incoming_id_is_kept(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/healthz", headers={"X-Request-ID": "lb-1234.abc"})
        assert response.headers["x-request-id"] == "lb-1234.abc"

    async def test_invalid_incoming_id_is_replaced(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
        assert response.headers["x-request-id"] != "bad id\twith spaces"

    async def test_access_line_per_request(
        self, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.INFO, logger="pns.access"):
            await http.get("/v1/pairings/abc123", headers={"X-Request-ID": "req-42"})
        [line] = [r for r in caplog.records if r.name == "pns.access"]
        assert line.route == "/v1/pairings/{pairing_id}"  # type: ignore[attr-defined]
        assert line.status == 401  # type: ignore[attr-defined]
        assert line.request_id == "req-42"  # type: ignore[attr-defined]
        assert line.method == "GET"  # type: ignore[attr-defined]


class TestHttpMetrics:
    async def test_labelled_by_route_template_never_raw_path(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        for approval_id in ("a1", "b2"):
            await http.get(f"/v1/approvals/{approval_id}", headers=client.headers)
        await http.get("/no/such/path")
        text = (await http.get("/metrics")).text
        assert (
            'pns_http_requests_total{method="GET",route="/v1/approvals/{approval_id}",'
            'status="404"} 2.0' in text
        )
        assert 'route="<unmatched>"' in text
        assert "a1" not in text and "b2" not in text
        assert (
            'pns_http_request_seconds_count{method="GET",route="/v1/approvals/{approval_id}"}'
            in text
        )

    async def test_garbage_collection_pauses_by_generation(self, http: httpx.AsyncClient) -> None:
        def full_collections(text: str) -> float:
            found = re.search(r'^pns_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M)
            assert found is not None
            return float(found.group(1))

        before = full_collections((await http.get("/metrics")).text)
        gc.collect()
        gc.collect()
        assert full_collections((await http.get("/metrics")).text) >= before + 2

    async def test_gauges_from_the_database_and_the_notifier(
        self, http: httpx.AsyncClient, app
    ) -> None:
        client = await register_client(http)
        await pair_app_device(http, client)
        await pair_totp_device(http, client)
        text = (await http.get("/metrics")).text  # the scrape itself counts them
        assert 'pns_devices{kind="app",push="apns"} 1.0' in text
        assert 'pns_devices{kind="totp",push="none"} 1.0' in text
        assert "pns_longpoll_waiters 0.0" in text
        assert "pns_outbox_pending" in text


@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 1, "db_pool_timeout_seconds": 10}])
async def test_connections_in_use_and_requests_waiting_for_one(
    app: FastAPI, http: httpx.AsyncClient
) -> None:
    """`pns_db_connections` and `pns_db_waiting` are read without a connection, so a
    scrape tells them while every connection is taken (its own database gauges then give
    up after 2 s)."""

    def gauges(text: str) -> tuple[float, float, float]:
        values = [
            re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            for name in (
                'pns_db_connections{state="in_use"}',
                'pns_db_connections{state="idle"}',
                "pns_db_waiting",
            )
        ]
        assert all(values), text
        return tuple(float(found.group(1)) for found in values if found)  # type: ignore[return-value]

    db: Database = app.state.runtime.db
    every = 2 if db.dialect == "postgresql" else 1  # twice the pool; SQLite's one turn
    async with contextlib.AsyncExitStack() as held:
        for _ in range(every):
            await held.enter_async_context(db.unit())
        waiting = asyncio.create_task(held_unit_read(db))
        await asyncio.sleep(0.05)
        assert gauges((await http.get("/metrics")).text) == (every, 0, 1)
    await waiting
    async with asyncio.timeout(5):  # the dispatcher, which waited too, may still have one
        while (now := gauges((await http.get("/metrics")).text)) != (0, every, 0):
            assert now[2] == 0 and now[0] + now[1] == every
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 1, "db_pool_timeout_seconds": 10}])
async def test_how_long_requests_waited_for_a_connection(
    app: FastAPI, http: httpx.AsyncClient
) -> None:
    """`pns_db_wait_seconds`: a request that waited about 0.3 s for its connection (on
    SQLite, its turn) lands in the bucket above 0.25 s."""

    def waits_over_a_quarter_second(text: str) -> float:
        def bucket(le: str) -> float:
            line = f'pns_db_wait_seconds_bucket{{le="{le}"}}'
            found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
            assert found is not None, text
            return float(found.group(1))

        return bucket("+Inf") - bucket("0.25")

    before = waits_over_a_quarter_second((await http.get("/metrics")).text)
    db: Database = app.state.runtime.db
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2 if db.dialect == "postgresql" else 1):
            await held.enter_async_context(db.unit())
        waiting = asyncio.create_task(held_unit_read(db))
        await asyncio.sleep(0.3)
    await waiting
    assert waits_over_a_quarter_second((await http.get("/metrics")).text) >= before + 1


async def held_unit_read(db: Database) -> None:
    async with db.unit_read() as unit:
        await unit.execute(select(literal_column("1")))


def _appears(secret: str, log: str) -> bool:
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(secret)}(?![0-9A-Za-z])", log) is not None


@pytest.mark.slow
async def test_a_full_flow_leaves_no_secret_in_the_logs(database_url: str, tmp_path: Path) -> None:
    env = server_env(database_url, tmp_path, PNS_LOG_LEVEL="debug", PNS_LOG_FORMAT="json")
    server = LiveServer(env, tmp_path / "server.log").start()
    secrets: list[str] = [SECRET_KEY, ADMIN_TOKEN]
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            client = await register_client(http)
            secrets.append(client.token)
            started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
            secrets.append(pairing_token_from(started.json()["qr_payload"]))
            device = await pair_app_device(http, client)
            secrets += [device.token, device.totp_secret, "ab" * 32]
            _totp_device, totp_secret = await pair_totp_device(http, client)
            secrets += [totp_secret, pyotp.TOTP(totp_secret).now()]

            code = device.otp()
            verified = await http.post(
                "/v1/otp/verify", json={"code": code}, headers=client.headers
            )
            assert verified.status_code == 200, verified.text
            secrets.append(code)
            wrong = "000000" if code != "000000" else "111111"
            await http.post("/v1/otp/verify", json={"code": wrong}, headers=client.headers)
            secrets.append(wrong)

            codes = (await http.post("/v1/recovery-codes", headers=client.headers)).json()["codes"]
            secrets += codes
            used = await http.post(
                "/v1/recovery-codes/verify", json={"code": codes[0]}, headers=client.headers
            )
            assert used.status_code == 200, used.text

            created = await http.post(
                "/v1/approvals", json={"username": "admin"}, headers=client.headers
            )
            assert created.status_code == 201, created.text
            approval = created.json()
            timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            approval_id, match_code = approval["approval_id"], approval["match_code"]
            message = f"pns-approval-v1|{approval_id}|approve|{match_code}|{timestamp}"
            signature = device.sign(message)
            secrets.append(signature)
            answered = await http.post(
                f"/v1/device/approvals/{approval['approval_id']}/response",
                json={
                    "decision": "approve",
                    "match_code": approval["match_code"],
                    "fraud": False,
                    "timestamp": timestamp,
                    "signature": signature,
                },
                headers=device.headers,
            )
            assert answered.status_code == 200, answered.text
            await http.get("/v1/admin/clients", headers=bearer(ADMIN_TOKEN))
            await http.get("/v1/client", headers=bearer("pnsc_made_up_token_never_valid"))
            secrets.append("pnsc_made_up_token_never_valid")
            # Through the trusted (loopback) proxy: the log shows the caller's address.
            await http.get("/v1/ping", headers={"x-forwarded-for": "198.51.100.23"})
    finally:
        server.stop()
    log = server.log()
    access = [json.loads(line) for line in log.splitlines() if '"pns.access"' in line]
    assert len(access) >= 12
    assert {"method", "route", "status", "duration_ms", "request_id"} <= set(access[0])
    leaked = [s for s in secrets if _appears(s, log)]
    assert leaked == []
    # uvicorn's own lines (start-up, shutdown) keep only the plain message.
    assert "Started server process" in log
    assert "color_message" not in log and "\x1b[" not in log and "\\u001b" not in log
    pinged = [a for a in access if a["route"] == "/v1/ping"]
    assert pinged[-1]["client_ip"] == "198.51.100.23"


def test_json_lines_drop_uvicorns_coloured_copy() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "Started", None, None)
    record.color_message = "\x1b[32mStarted\x1b[0m"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "Started" and "color_message" not in entry
