from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

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
