from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from pns_server import cli
from pns_server.app import create_app
from pns_server.config import Settings
from pns_server.models import Client, Device, Pairing
from pns_server.security import SecretBox
from tests.conftest import SECRET_KEY, make_settings
from tests.support.factories import pair_app_device, pair_totp_device, register_client

NEW_KEY = "the-new-secret-key-fedcba9876543210"


def run(settings: Settings, *argv: str) -> int:
    args = cli.build_parser().parse_args(list(argv))
    _help, func, _arguments = cli.COMMANDS[args.command]
    return func(settings, args)


async def run_async(settings: Settings, *argv: str) -> int:
    # The commands own an event loop (asyncio.run): keep them off the test's loop.
    return await asyncio.to_thread(run, settings, *argv)


def output_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


class TestAdminCommands:
    async def test_clients_and_client(
        self, http: httpx.AsyncClient, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client = await register_client(http, name="NAS")
        device = await pair_app_device(http, client)
        assert await run_async(settings, "admin", "clients", "--json") == 0
        [row] = output_json(capsys)["clients"]
        assert (row["client_id"], row["devices"]) == (client.client_id, 1)
        assert await run_async(settings, "admin", "client", client.client_id, "--json") == 0
        detail = output_json(capsys)
        assert [d["device_id"] for d in detail["device_list"]] == [device.device_id]
        assert await run_async(settings, "admin", "clients") == 0
        assert "NAS" in capsys.readouterr().out

    async def test_unlock_delete_revoke_are_audited_as_admin(
        self,
        http: httpx.AsyncClient,
        app: FastAPI,
        settings: Settings,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        client = await register_client(http)
        device = await pair_app_device(http, client)
        assert await run_async(settings, "admin", "unlock", client.client_id) == 0
        assert await run_async(settings, "admin", "revoke-device", device.device_id) == 0
        assert await run_async(settings, "admin", "delete", client.client_id, "--yes") == 0
        async with app.state.runtime.db.session() as session:
            assert await session.get(Client, client.client_id) is None
        capsys.readouterr()
        assert (
            await run_async(settings, "admin", "audit", "--client-id", client.client_id, "--json")
            == 0
        )
        events = output_json(capsys)["events"]
        assert [(e["event"], e["actor"], e["actor_id"]) for e in events[:3]] == [
            ("client.deleted", "admin", "cli"),
            ("device.removed", "admin", "cli"),
            ("client.unlocked", "admin", "cli"),
        ]

    async def test_delete_without_confirmation_is_refused(
        self, http: httpx.AsyncClient, app: FastAPI, settings: Settings
    ) -> None:
        client = await register_client(http)
        assert await run_async(settings, "admin", "delete", client.client_id) == 1
        async with app.state.runtime.db.session() as session:
            assert await session.get(Client, client.client_id) is not None

    async def test_unknown_ids_fail_with_a_message(
        self, app: FastAPI, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert await run_async(settings, "admin", "unlock", "nope") == 1
        assert "No client nope" in capsys.readouterr().err


def test_admin_on_a_missing_database_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=tmp_path / "empty")
    assert run(settings, "admin", "clients") == 1
    assert "pns-server migrate" in capsys.readouterr().err


def test_old_secret_keys_parse_from_a_comma_list(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, old_secret_keys="key-one-0123456789, key-two-0123456789")
    assert [k.get_secret_value() for k in settings.old_secret_keys] == [
        "key-one-0123456789",
        "key-two-0123456789",
    ]


class TestRotateKey:
    async def test_reencrypts_devices_and_pending_pairings(
        self,
        http: httpx.AsyncClient,
        app: FastAPI,
        database_url: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        client = await register_client(http)
        app_device = await pair_app_device(http, client)
        _totp_id, totp_secret = await pair_totp_device(http, client)
        pending = await http.post(
            "/v1/pairings", json={"kind": "totp", "label": "x"}, headers=client.headers
        )
        assert pending.status_code == 201
        rotated = make_settings(
            database_url, tmp_path, secret_key=NEW_KEY, old_secret_keys=[SECRET_KEY]
        )

        assert await run_async(rotated, "rotate-key") == 0
        out = capsys.readouterr().out
        assert "re-encrypted 2 device and 1 pairing" in out
        assert "PNS_OLD_SECRET_KEYS can now be removed" in out

        new_only = SecretBox([NEW_KEY])
        async with app.state.runtime.db.session() as session:
            rows: list[Device | Pairing] = list(await session.scalars(select(Device)))
            rows += [p for p in await session.scalars(select(Pairing)) if p.totp_secret]
        assert len(rows) == 3
        # Re-sealed for the same place: each still opens only in its own row.
        plain = {new_only.open(r.totp_secret or "", r.secret_site) for r in rows}
        assert {app_device.totp_secret, totp_secret} <= plain

        # A relay that knows only the new key verifies codes from both devices.
        fresh = create_app(make_settings(database_url, tmp_path, secret_key=NEW_KEY))
        async with fresh.router.lifespan_context(fresh):
            transport = httpx.ASGITransport(app=fresh)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as new_http:
                ok = await new_http.post(
                    "/v1/otp/verify", json={"code": app_device.otp()}, headers=client.headers
                )
        assert ok.status_code == 200, ok.text

        # Idempotent: a second run finds nothing left to do.
        assert await run_async(rotated, "rotate-key") == 0
        assert "re-encrypted 0 device and 0 pairing" in capsys.readouterr().out

    async def test_recovery_codes_keep_their_key_and_are_counted(
        self,
        http: httpx.AsyncClient,
        database_url: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        client = await register_client(http)
        codes = (await http.post("/v1/recovery-codes", headers=client.headers)).json()["codes"]
        rotated = make_settings(
            database_url, tmp_path, secret_key=NEW_KEY, old_secret_keys=[SECRET_KEY]
        )
        assert await run_async(rotated, "rotate-key") == 0
        out = capsys.readouterr().out
        assert "10 unused recovery codes are keyed with an old key" in out
        assert "can now be removed" not in out

        async def verify(settings: Settings, code: str) -> int:
            fresh = create_app(settings)
            async with fresh.router.lifespan_context(fresh):
                transport = httpx.ASGITransport(app=fresh)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as h:
                    response = await h.post(
                        "/v1/recovery-codes/verify", json={"code": code}, headers=client.headers
                    )
            return response.status_code

        # With the old key still configured the codes work; without it they are gone.
        assert await verify(rotated, codes[0]) == 200
        new_only = make_settings(database_url, tmp_path, secret_key=NEW_KEY)
        assert await verify(new_only, codes[1]) == 401

    async def test_unknown_old_key_is_reported(
        self,
        http: httpx.AsyncClient,
        database_url: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        client = await register_client(http)
        await pair_totp_device(http, client)
        wrong = make_settings(database_url, tmp_path, secret_key=NEW_KEY)
        assert await run_async(wrong, "rotate-key") == 1
        assert "PNS_OLD_SECRET_KEYS" in capsys.readouterr().err

    async def test_a_secret_moved_to_another_row_stops_the_rotation_and_is_named(
        self,
        http: httpx.AsyncClient,
        app: FastAPI,
        database_url: str,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        owner = await register_client(http, "OWNER")
        other = await register_client(http, "OTHER")
        source, _ = await pair_totp_device(http, owner)
        target, _ = await pair_totp_device(http, other)
        async with app.state.runtime.db.session() as session:
            moved = await session.scalar(select(Device.totp_secret).where(Device.id == source))
            row = await session.get(Device, target)
            assert row is not None and moved is not None
            row.totp_secret = moved
        rotated = make_settings(
            database_url, tmp_path, secret_key=NEW_KEY, old_secret_keys=[SECRET_KEY]
        )
        assert await run_async(rotated, "rotate-key") == 1
        assert f"devices row {target}" in capsys.readouterr().err


class TestCheckPush:
    def test_reports_log_only_without_providers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert run(Settings(data_dir=tmp_path), "check-push") == 0
        assert "none (log sender only)" in capsys.readouterr().out

    def test_broken_configuration_names_the_variable(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        settings = Settings(data_dir=tmp_path, fcm_credentials_file=tmp_path / "missing.json")
        assert run(settings, "check-push") == 2
        assert "PNS_FCM_CREDENTIALS_FILE" in capsys.readouterr().err

    async def test_device_on_an_unconfigured_service_fails(
        self, http: httpx.AsyncClient, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        client = await register_client(http)
        device = await pair_app_device(http, client)
        assert await run_async(settings, "check-push", "--device", device.device_id) == 1
        assert "apns, which is not configured" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("public_url", "warned"), [("http://pns.example.com", True), ("https://pns.example.com", False)]
)
def test_serve_warns_about_a_plain_http_public_url(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    public_url: str,
    warned: bool,
) -> None:
    served: dict[str, Any] = {}
    monkeypatch.setattr(
        "pns_server.shutdown.run_server", lambda app, **config: served.update(config)
    )
    with caplog.at_level("WARNING", logger="pns"):
        assert run(Settings(data_dir=tmp_path, public_url=public_url), "serve") == 0
    assert served["proxy_headers"] is False  # the app applies PNS_FORWARDED_ALLOW_IPS itself
    messages = [r.getMessage() for r in caplog.records if r.name == "pns"]
    assert any("plain http" in m for m in messages) == warned
