from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from pns_server.config import Settings, async_database_url, parse_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", (12,)),
        ("12.0", (12,)),
        ("12.10", (12, 10)),
        ("8.1.0", (8, 1)),
        ("17.2.1", (17, 2, 1)),
    ],
)
def test_parse_version(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected


def test_versions_compare_as_numbers() -> None:
    assert parse_version("12.10") > parse_version("12.9")
    assert parse_version("12") == parse_version("12.0.0")


@pytest.mark.parametrize("junk", ["", "abc", "12.", ".5", "12..1", "1.2.3.4.5", "١٢", "12 beta"])
def test_parse_version_refuses_junk(junk: str) -> None:
    with pytest.raises(ValueError):
        parse_version(junk)


@pytest.mark.parametrize(
    ("plain", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+asyncpg://u:p@h:5433/db"),
        ("sqlite:///var/pns.db", "sqlite+aiosqlite:///var/pns.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_plain_urls_get_async_drivers(plain: str, driver: str) -> None:
    assert async_database_url(plain) == driver


def test_embedded_default_needs_no_configuration(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.is_embedded and settings.is_sqlite
    assert settings.sqlalchemy_url == f"sqlite+aiosqlite:///{tmp_path.as_posix()}/pns.db"
    assert settings.allowed_editions == ["pro", "lite"]


def test_server_database_requires_secret_key() -> None:
    with pytest.raises(ValidationError, match="PNS_SECRET_KEY"):
        Settings(database_url="postgresql://pns@db/pns")


def test_editions_from_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNS_ALLOWED_EDITIONS", "Pro, lite ,home")
    assert Settings().allowed_editions == ["pro", "lite", "home"]


def test_bad_min_version_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNS_MIN_IOS_VERSION", "twelve")
    with pytest.raises(ValidationError, match="min_ios_version"):
        Settings()


def test_a_lease_shorter_than_twice_the_push_timeout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"PNS_PUSH_LEASE_SECONDS .* at least twice"):
        Settings(data_dir=tmp_path, push_timeout_seconds=20, push_lease_seconds=39)
    assert Settings(data_dir=tmp_path, push_timeout_seconds=20, push_lease_seconds=40)
    defaults = Settings(data_dir=tmp_path)
    assert defaults.push_lease_seconds >= 2 * defaults.push_timeout_seconds


class TestPublicUrl:
    def test_defaults_to_the_listening_port(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PNS_PORT", "18089")
        assert Settings().public_url == "http://127.0.0.1:18089"

    def test_follows_the_listening_host(self) -> None:
        assert Settings(host="10.1.2.3", port=9000).public_url == "http://10.1.2.3:9000"
        assert Settings(host="::1").public_url == "http://[::1]:8080"

    def test_a_wildcard_host_becomes_loopback(self) -> None:
        assert Settings(host="0.0.0.0", port=8443).public_url == "http://127.0.0.1:8443"

    def test_an_explicit_url_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PNS_PORT", "18089")
        monkeypatch.setenv("PNS_PUBLIC_URL", "https://pns.example.com/")
        assert Settings().public_url == "https://pns.example.com"

    @pytest.mark.parametrize(
        ("url", "warns"),
        [
            ("http://pns.example.com", True),
            ("http://10.0.0.5:8080", True),
            ("https://pns.example.com", False),
            ("http://127.0.0.1:8080", False),
            ("http://localhost:8080", False),
            ("http://[::1]:8080", False),
        ],
    )
    def test_plain_http_off_this_machine_is_warned_about(self, url: str, warns: bool) -> None:
        warning = Settings(public_url=url).public_url_warning()
        assert (warning is not None) == warns
        if warns:
            assert "https://" in str(warning) and url in str(warning)


class TestDatabasePassword:
    @pytest.mark.parametrize("password", ["p@ss/w:rd%41", "a b#c?d", "plain"])
    def test_any_password_reaches_the_driver_unchanged(self, password: str) -> None:
        settings = Settings(
            database_url="postgresql://pns@db:5432/pns",
            database_password=password,
            secret_key="k" * 32,
        )
        url = make_url(settings.sqlalchemy_url)
        assert url.password == password
        assert (url.host, url.port, url.username, url.database) == ("db", 5432, "pns", "pns")
        assert url.drivername == "postgresql+asyncpg"

    def test_it_replaces_a_password_in_the_url(self) -> None:
        settings = Settings(
            database_url="postgresql://pns:old@db/pns", database_password="new", secret_key="k" * 32
        )
        assert make_url(settings.sqlalchemy_url).password == "new"


@pytest.mark.parametrize("value", ["10.0.0.0/8, 192.0.2.7", "*", "::1"])
def test_forwarded_allow_ips_accepts_addresses_and_networks(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PNS_FORWARDED_ALLOW_IPS", value)
    assert Settings().forwarded_allow_ips == [v.strip() for v in value.split(",")]


def test_forwarded_allow_ips_refuses_junk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNS_FORWARDED_ALLOW_IPS", "proxy.local")
    with pytest.raises(ValidationError):
        Settings()
