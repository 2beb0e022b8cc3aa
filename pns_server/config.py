"""All configuration, from `PNS_*` environment variables, validated once at start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATA_DIR = Path("var")
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,3}$")  # ASCII only: int() reads "١٢" too


def parse_version(value: str) -> tuple[int, ...]:
    """'12.10' -> (12, 10); raises ValueError on anything that is not dotted digits."""
    value = value.strip()
    if not _VERSION_RE.match(value):
        raise ValueError(f"not a version number: {value!r}")
    parts = tuple(int(p) for p in value.split("."))
    # Trailing zeros do not change a version: 12 == 12.0 == 12.0.0.
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def async_database_url(url: str) -> str:
    """Accept the plain URLs operators write and pick the async driver ourselves."""
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("postgresql+psycopg2://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://") and not url.startswith("sqlite+"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNS_", extra="ignore", frozen=True)

    database_url: str = Field(
        default="",
        description="postgresql://user:pass@host/db or sqlite:///path/pns.db; "
        "empty = the embedded default, a SQLite file under PNS_DATA_DIR",
    )
    data_dir: Path = DEFAULT_DATA_DIR
    public_url: str = "http://127.0.0.1:8080"
    secret_key: SecretStr | None = None
    # Keys still accepted for decryption while `pns-server rotate-key` re-encrypts under the new.
    old_secret_keys: Annotated[list[SecretStr], NoDecode] = []
    registration_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    allowed_editions: Annotated[list[str], NoDecode] = ["pro", "lite"]
    min_ios_version: str = "12.0"
    min_android_version: str = "8.0"

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"
    migrate_on_start: bool = True
    # Relay processes behind one port (`serve --workers N`); more than one needs PostgreSQL.
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=65536, ge=1024)
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_timeout_seconds: float = Field(default=30.0, gt=0)

    pairing_ttl_seconds: int = Field(default=600, ge=30, le=86400)
    otp_max_failures: int = Field(default=5, ge=1, le=100)
    otp_lock_seconds: int = Field(default=30, ge=1)
    otp_issuer: str = "PNS"

    match_code_digits: int = Field(default=3, ge=2, le=8)
    allow_plain_push: bool = False
    fraud_lock_seconds: int = Field(default=900, ge=0)
    max_pushes_without_success: int = Field(default=10, ge=1)
    approval_rate_per_minute: int = Field(default=30, ge=1)

    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_cert_file: Path | None = None
    apns_url: str = "https://api.push.apple.com"
    apns_sandbox_url: str = "https://api.sandbox.push.apple.com"
    fcm_credentials_file: Path | None = None
    fcm_url: str | None = None
    push_ca_file: Path | None = None
    push_timeout_seconds: float = Field(default=10.0, gt=0)
    push_lease_seconds: int = Field(default=30, ge=1)

    shutdown_timeout: float = Field(default=10.0, ge=0)
    retention_days: int = Field(default=30, ge=1)
    retention_interval_seconds: int = Field(default=3600, ge=10)

    # Abuse limits (fixed windows, counted in the database so they hold across replicas).
    rate_register_per_hour: int = Field(default=30, ge=1)
    rate_pairing_per_minute: int = Field(default=20, ge=1)
    rate_client_per_minute: int = Field(default=600, ge=1)

    @field_validator("allowed_editions", mode="before")
    @classmethod
    def _split_editions(cls, value: object) -> object:
        if isinstance(value, str):
            return [e.strip().lower() for e in value.split(",") if e.strip()]
        return value

    @field_validator("old_secret_keys", mode="before")
    @classmethod
    def _split_old_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("min_ios_version", "min_android_version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        parse_version(value)
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _require_secret_outside_embedded(self) -> Settings:
        if not self.is_sqlite and self.secret_key is None:
            raise ValueError(
                "PNS_SECRET_KEY is required when PNS_DATABASE_URL points at a server database; "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) < 16:
            raise ValueError("PNS_SECRET_KEY must be at least 16 characters")
        return self

    @property
    def is_embedded(self) -> bool:
        return not self.database_url

    @property
    def sqlalchemy_url(self) -> str:
        if self.is_embedded:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'pns.db').as_posix()}"
        return async_database_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        path = self.sqlalchemy_url.split(":///", 1)[1] if ":///" in self.sqlalchemy_url else ""
        return Path(path) if path and path != ":memory:" else None
