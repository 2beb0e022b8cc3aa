"""Start-up push configuration: what is built, and what refuses to start."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from pns_server.config import Settings
from pns_server.push.factory import PushConfigError, PushReadiness, build_senders
from tests.fakes.apns import FakeApns, Reply
from tests.fakes.fcm import FakeFcm
from tests.pns_server.push.conftest import push_message


def settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'pns.db'}", data_dir=tmp_path, **values)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    fake = FakeApns()
    return fake.write_key(tmp_path / "AuthKey_KEY1234567.p8")


APNS_IDS = {"apns_key_id": "KEY1234567", "apns_team_id": "TEAM123456", "apns_topic": "com.x"}


class TestNoConfiguration:
    def test_only_the_log_sender_and_a_line_saying_so(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, "pns.push")
        readiness = PushReadiness()
        senders = build_senders(settings(tmp_path), readiness)
        assert list(senders) == ["log", "webpush"]
        assert "no APNs or FCM configured" in caplog.text
        checks = readiness()
        assert checks["mode"] == "log only: no APNs or FCM configuration"
        assert checks["webpush"]["status"] == "ok"

    async def test_readyz_says_push_is_log_only(self, http: httpx.AsyncClient) -> None:
        body = (await http.get("/readyz")).json()
        assert body["checks"]["push"]["mode"] == "log only: no APNs or FCM configuration"


class TestRefusals:
    @pytest.mark.parametrize(
        ("values", "variable"),
        [
            ({"apns_key_id": "K"}, "PNS_APNS_KEY_FILE"),
            ({"apns_topic": "com.x", "apns_team_id": "T"}, "PNS_APNS_KEY_FILE"),
            ({"fcm_url": "https://fcm.proxy.example"}, "PNS_FCM_CREDENTIALS_FILE"),
        ],
    )
    def test_half_a_configuration_names_the_missing_variable(
        self, tmp_path: Path, values: dict[str, Any], variable: str
    ) -> None:
        with pytest.raises(PushConfigError, match=f"^{variable}: required"):
            build_senders(settings(tmp_path, **values))

    def test_a_key_without_its_ids_names_them(self, tmp_path: Path, key_file: Path) -> None:
        with pytest.raises(PushConfigError, match=r"^PNS_APNS_KEY_ID: required"):
            build_senders(settings(tmp_path, apns_key_file=key_file, apns_topic="com.x"))

    @pytest.mark.parametrize(
        ("values", "variable"),
        [
            ({"apns_key_file": "missing.p8", **APNS_IDS}, "PNS_APNS_KEY_FILE"),
            ({"apns_cert_file": "missing.pem", "apns_topic": "com.x"}, "PNS_APNS_CERT_FILE"),
            ({"fcm_credentials_file": "missing.json"}, "PNS_FCM_CREDENTIALS_FILE"),
            ({"push_ca_file": "missing-ca.pem"}, "PNS_PUSH_CA_FILE"),
        ],
    )
    def test_a_missing_file_names_the_variable_and_the_path(
        self, tmp_path: Path, values: dict[str, Any], variable: str
    ) -> None:
        values = {k: tmp_path / v if k.endswith("_file") else v for k, v in values.items()}
        with pytest.raises(PushConfigError, match=f"^{variable}: file not found: .*missing"):
            build_senders(settings(tmp_path, **values))

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
    def test_an_unreadable_file_names_the_variable(self, tmp_path: Path, key_file: Path) -> None:
        key_file.chmod(0)
        with pytest.raises(PushConfigError, match=r"^PNS_APNS_KEY_FILE: cannot read"):
            build_senders(settings(tmp_path, apns_key_file=key_file, **APNS_IDS))

    def test_a_directory_instead_of_a_file_names_the_variable(self, tmp_path: Path) -> None:
        with pytest.raises(PushConfigError, match=r"^PNS_FCM_CREDENTIALS_FILE: is a directory"):
            build_senders(settings(tmp_path, fcm_credentials_file=tmp_path))

    def test_garbage_files_name_the_variable(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk"
        junk.write_text("not a key")
        for values, variable in [
            ({"apns_key_file": junk, **APNS_IDS}, "PNS_APNS_KEY_FILE"),
            ({"apns_cert_file": junk, "apns_topic": "com.x"}, "PNS_APNS_CERT_FILE"),
            ({"fcm_credentials_file": junk}, "PNS_FCM_CREDENTIALS_FILE"),
            ({"push_ca_file": junk}, "PNS_PUSH_CA_FILE"),
        ]:
            with pytest.raises(PushConfigError, match=f"^{variable}: not a"):
                build_senders(settings(tmp_path, **values))

    def test_token_and_certificate_auth_together_are_refused(
        self, tmp_path: Path, key_file: Path
    ) -> None:
        with pytest.raises(PushConfigError, match="not both"):
            build_senders(
                settings(tmp_path, apns_key_file=key_file, apns_cert_file=key_file, **APNS_IDS)
            )


class TestConfigured:
    async def test_both_providers_are_built_and_readiness_shows_config_errors(
        self, tmp_path: Path, fake_apns: FakeApns, fake_fcm: FakeFcm
    ) -> None:
        readiness = PushReadiness()
        senders = build_senders(
            settings(
                tmp_path,
                apns_key_file=fake_apns.write_key(tmp_path / "k.p8"),
                apns_key_id=fake_apns.key_id,
                apns_team_id=fake_apns.team_id,
                apns_topic=fake_apns.topic,
                apns_url=fake_apns.url,
                fcm_credentials_file=fake_fcm.write_credentials(tmp_path / "sa.json"),
                fcm_url=fake_fcm.url,
                push_ca_file=fake_apns.write_ca(tmp_path / "ca.pem"),
                push_timeout_seconds=5,
            ),
            readiness,
        )
        try:
            assert sorted(senders) == ["apns", "fcm", "log", "webpush"]
            ok = push_message()
            assert (await senders["apns"].send(ok)).ok
            bad = push_message(token="cd" * 32)
            fake_apns.answer(bad.token, Reply(403, "InvalidProviderToken"))
            await senders["apns"].send(bad)
            state = readiness()
            assert state["apns"]["status"] == "config_error"
            assert state["apns"]["last_config_error"]["reason"] == "InvalidProviderToken"
            assert state["fcm"]["status"] == "ok"
        finally:
            for sender in senders.values():
                await sender.close()

    async def test_a_refused_fcm_service_account_shows_in_readiness(
        self, tmp_path: Path, fake_fcm: FakeFcm
    ) -> None:
        readiness = PushReadiness()
        senders = build_senders(
            settings(
                tmp_path,
                fcm_credentials_file=fake_fcm.write_credentials(tmp_path / "sa.json"),
                fcm_url=fake_fcm.url,
                push_ca_file=fake_fcm.write_ca(tmp_path / "ca.pem"),
                push_timeout_seconds=5,
            ),
            readiness,
        )
        fake_fcm.state.reject_token_requests = True
        try:
            result = await senders["fcm"].send(push_message("fcm-" + "t" * 60, service="fcm"))
        finally:
            for sender in senders.values():
                await sender.close()
        assert result.reason is not None and "invalid_grant" in result.reason
        state = readiness()["fcm"]
        assert state["status"] == "config_error"
        assert state["last_config_error"]["reason"].startswith("OAuth: ")
