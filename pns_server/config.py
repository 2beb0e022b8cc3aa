"""All configuration, from `PNS_*` environment variables, validated once at start-up."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

DEFAULT_DATA_DIR = Path("var")
MIN_ADMIN_TOKEN_LENGTH = 32
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_WEBPUSH_HOSTS = (
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "web.push.apple.com",
    "*.notify.windows.com",
)
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    listen_database_url: str = Field(
        default="",
        description="PostgreSQL only: where the LISTEN connection for long-poll wake-ups "
        "goes; empty = PNS_DATABASE_URL. Set it when that URL is a transaction pooler",
    )
    # Set apart from the URL so any password works unescaped (`@`, `/`, `%`, `:` included).
    database_password: SecretStr | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    # Unset = the address the relay listens on (see _default_public_url).
    public_url: str = ""
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
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed: the TLS proxy only.
    forwarded_allow_ips: Annotated[list[str], NoDecode] = ["127.0.0.1", "::1"]
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

    # The web approver (/app/) and Web Push.
    web_approver: bool = True
    # Hosts the relay may POST Web Push messages to: `host`, `*.domain` or `host:port`.
    # The endpoint of a browser's push subscription is chosen by the phone: an SSRF door.
    webpush_endpoint_hosts: Annotated[list[str], NoDecode] = list(DEFAULT_WEBPUSH_HOSTS)
    # VAPID signing key (PEM, P-256); empty = generated once under PNS_DATA_DIR.
    webpush_vapid_key_file: Path | None = None
    # The VAPID `sub` claim: a mailto: or https: contact for push services; empty =
    # https://<public host> when the public URL is https, else mailto:admin@<public host>.
    webpush_subject: str | None = None

    shutdown_timeout: float = Field(default=10.0, ge=0)
    # How long an idle keep-alive connection stays open. Longer than the idle timeout of
    # the clients and proxies in front (httpx 5 s; nginx's upstream connections and cloud
    # load balancers 60 s): a server that closes first races the client's next request on
    # that connection, which then fails without an answer.
    keep_alive_seconds: float = Field(default=90.0, gt=0)
    retention_days: int = Field(default=30, ge=1)
    retention_interval_seconds: int = Field(default=3600, ge=10)

    # Abuse limits (fixed windows, counted in the database so they hold across replicas).
    rate_register_per_hour: int = Field(default=30, ge=1)
    rate_pairing_per_minute: int = Field(default=20, ge=1)
    rate_client_per_minute: int = Field(default=600, ge=1)
    rate_admin_per_minute: int = Field(default=60, ge=1)

    @field_validator("admin_token", "registration_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `PNS_ADMIN_TOKEN=` in an env file means "off", not "the empty token".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("admin_token")
    @classmethod
    def _long_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_TOKEN_LENGTH:
            raise ValueError(
                f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters (it opens every "
                "client's data); generate one with: python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'"
            )
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Settings:
        # A send may take up to twice the push timeout (the dispatcher's guard); a shorter
        # lease lets another relay re-claim a push still in flight and send it twice.
        if self.push_lease_seconds < 2 * self.push_timeout_seconds:
            raise ValueError(
                f"PNS_PUSH_LEASE_SECONDS ({self.push_lease_seconds}) must be at least twice "
                f"PNS_PUSH_TIMEOUT_SECONDS ({self.push_timeout_seconds:g}), so no other relay "
                "re-claims a push while it is still being sent"
            )
        return self

    @field_validator("allowed_editions", mode="before")
    @classmethod
    def _split_editions(cls, value: object) -> object:
        if isinstance(value, str):
            return [e.strip().lower() for e in value.split(",") if e.strip()]
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_forwarded(cls, value: object) -> object:
        if isinstance(value, str):
            return [a.strip() for a in value.split(",") if a.strip()]
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_forwarded(cls, value: list[str]) -> list[str]:
        for item in value:
            if item != "*":
                ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("old_secret_keys", mode="before")
    @classmethod
    def _split_old_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("webpush_endpoint_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("webpush_subject")
    @classmethod
    def _check_subject(cls, value: str | None) -> str | None:
        if value and not value.startswith(("mailto:", "https://")):
            raise ValueError("must be a mailto: or https:// contact address")
        return value or None

    @field_validator("min_ios_version", "min_android_version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        parse_version(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_public_url(cls, data: object) -> object:
        """No PNS_PUBLIC_URL: phones are sent to the host and port the relay listens on, so
        PNS_PORT=18089 alone gives QR codes with :18089 (a wildcard host becomes loopback)."""
        if not isinstance(data, dict) or data.get("public_url"):
            return data
        host = str(data.get("host") or cls.model_fields["host"].default)
        port = data.get("port") or cls.model_fields["port"].default
        if host in WILDCARD_HOSTS:
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        return {**data, "public_url": f"http://{host}:{port}"}

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

    def public_url_warning(self) -> str | None:
        """Phones must reach the relay over TLS; plain http is only fine on this machine."""
        parts = urlsplit(self.public_url)
        if parts.scheme != "http" or is_loopback(parts.hostname or ""):
            return None
        return (
            f"PNS_PUBLIC_URL is {self.public_url}: phones will send device tokens and "
            "approvals over plain http; put the relay behind a TLS proxy and set an "
            "https:// PNS_PUBLIC_URL"
        )

    @property
    def is_embedded(self) -> bool:
        return not self.database_url

    @property
    def sqlalchemy_url(self) -> str:
        if self.is_embedded:
            return f"sqlite+aiosqlite:///{(self.data_dir / 'pns.db').as_posix()}"
        url = async_database_url(self.database_url)
        if self.database_password is None:
            return url
        # SQLAlchemy's URL escapes the password; asyncpg and alembic unescape it.
        with_password = make_url(url).set(password=self.database_password.get_secret_value())
        return with_password.render_as_string(hide_password=False)

    @property
    def listen_sqlalchemy_url(self) -> str | None:
        return async_database_url(self.listen_database_url) if self.listen_database_url else None

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        path = self.sqlalchemy_url.split(":///", 1)[1] if ":///" in self.sqlalchemy_url else ""
        return Path(path) if path and path != ":memory:" else None


def load_settings() -> Settings:
    """Settings from the environment; a bad value exits with a message naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = ["PNS configuration is invalid:"]
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            var = "PNS_" + loc[0].upper() if loc else "configuration"
            lines.append(f"  {var}: {err['msg']}")
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2) from None
