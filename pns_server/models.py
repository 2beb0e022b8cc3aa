"""The schema: typed SQLAlchemy 2 ORM classes on one metadata (alembic reads it)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pns_server.security import SealedAt
from pns_server.states import ApprovalStatus, DeliveryStatus, PairingStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Client(Base):
    """A backup-client installation."""

    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    edition: Mapped[str] = mapped_column(String(50))
    hostname: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Push approvals are refused until then (fraud report).
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Push-fatigue cap: approvals created since the last successful authentication.
    pushes_since_success: Mapped[int] = mapped_column(Integer, default=0)
    # OTP / recovery-code throttling (NIST SP 800-63B).
    otp_consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    otp_failures_since_success: Mapped[int] = mapped_column(Integer, default=0)
    otp_lock_count: Mapped[int] = mapped_column(Integer, default=0)
    otp_locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Device(Base):
    """An authenticator: the vendor's app (push + OTP) or a third-party TOTP app."""

    __tablename__ = "devices"
    __table_args__ = (Index("ix_devices_client_id", "client_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))  # app | totp
    name: Mapped[str] = mapped_column(String(200))
    platform: Mapped[str | None] = mapped_column(String(10))  # ios | android | web
    os_version: Mapped[str | None] = mapped_column(String(32))
    app_version: Mapped[str | None] = mapped_column(String(32))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    public_key: Mapped[bytes | None] = mapped_column(LargeBinary)  # DER SubjectPublicKeyInfo
    # HMAC-SHA256 by the pairing's QR secret over the key, as the phone sent it: the relay
    # cannot check it (it never sees the secret); the client that started the pairing does.
    key_proof: Mapped[str | None] = mapped_column(String(64))
    push_service: Mapped[str | None] = mapped_column(String(10))  # apns | fcm | webpush
    push_token: Mapped[str | None] = mapped_column(Text)  # webpush: the endpoint URL
    # webpush: the subscription's keys (base64url); they encrypt payloads, never leave here.
    push_p256dh: Mapped[str | None] = mapped_column(String(200))
    push_auth: Mapped[str | None] = mapped_column(String(100))
    push_environment: Mapped[str | None] = mapped_column(String(16))  # production | sandbox
    push_status: Mapped[str] = mapped_column(String(16), default="none")
    totp_secret: Mapped[str] = mapped_column(Text)  # encrypted at rest
    totp_algorithm: Mapped[str] = mapped_column(String(10), default="SHA1")
    totp_digits: Mapped[int] = mapped_column(Integer, default=6)
    totp_period: Mapped[int] = mapped_column(Integer, default=30)
    # Replay guard: codes for this time step or earlier are refused.
    last_otp_step: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def secret_site(self) -> SealedAt:
        """What `totp_secret` is sealed to: moved to another row or client, it won't open."""
        return SealedAt(self.__tablename__, self.id, self.client_id)


class Pairing(Base):
    """A QR-code enrolment in progress."""

    __tablename__ = "pairings"
    __table_args__ = (Index("ix_pairings_client_id", "client_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(16), default=PairingStatus.PENDING)
    label: Mapped[str | None] = mapped_column(String(200))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # kind=app
    totp_secret: Mapped[str | None] = mapped_column(Text)  # kind=totp, encrypted
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Wrong confirmation codes so far (kind=totp); the pairing expires at the limit.
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def secret_site(self) -> SealedAt:
        return SealedAt(self.__tablename__, self.id, self.client_id)


class RecoveryCode(Base):
    __tablename__ = "recovery_codes"
    __table_args__ = (Index("ix_recovery_codes_client_id", "client_id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    # Keyed hash (`h2.`, see otp/recovery_codes.py): the database alone cannot plant a code.
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Approval(Base):
    """A push login request; every state change is one conditional UPDATE on status."""

    __tablename__ = "approvals"
    __table_args__ = (
        Index("ix_approvals_client_status", "client_id", "status"),
        Index("ix_approvals_status_expires", "status", "expires_at"),
        UniqueConstraint("client_id", "idempotency_key", name="uq_approvals_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default=ApprovalStatus.PENDING)
    reason: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    username: Mapped[str | None] = mapped_column(String(200))
    hostname: Mapped[str | None] = mapped_column(String(255))
    ip: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), default="login")
    message: Mapped[str | None] = mapped_column(String(500))
    number_matching: Mapped[bool] = mapped_column(Boolean, default=True)
    match_code: Mapped[str | None] = mapped_column(String(16))
    # The client's random nonce; with it the phone signs pns-approval-v2 (nonce + context).
    client_nonce: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id", ondelete="SET NULL"))
    response_decision: Mapped[str | None] = mapped_column(String(10))
    response_match_code: Mapped[str | None] = mapped_column(String(16))
    response_timestamp: Mapped[str | None] = mapped_column(String(64))
    response_signature: Mapped[str | None] = mapped_column(Text)
    response_public_key: Mapped[str | None] = mapped_column(Text)
    fraud: Mapped[bool] = mapped_column(Boolean, default=False)
    # App devices (push + poll) at creation; an idempotent retry reports the same number.
    devices_notified: Mapped[int] = mapped_column(Integer, default=0)


class Delivery(Base):
    """Transactional outbox: one row per push-capable device of an approval."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_deliveries_approval_id", "approval_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    approval_id: Mapped[str] = mapped_column(ForeignKey("approvals.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    service: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.QUEUED)  # DeliveryStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who did what; kept after the objects it names are gone."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_client_at", "client_id", "at"),
        Index("ix_audit_events_at", "at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    client_id: Mapped[str | None] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(16))  # client | device | admin | system
    actor_id: Mapped[str | None] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(64))
    subject_id: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RateLimitBucket(Base):
    """Fixed-window counters shared by every replica through the database."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    count: Mapped[int] = mapped_column(Integer, default=0)
