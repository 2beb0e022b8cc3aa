"""Builds the push senders from Settings, refusing to start on a broken push configuration.

Every problem names the variable to fix: an operator reading a crash loop at night should not
have to guess which of a dozen settings is wrong."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pns_server.config import Settings
from pns_server.push.apns import ApnsConfig, ApnsSender, ProviderToken, load_signing_key
from pns_server.push.base import Outcome, PushMessage, PushResult, PushSender
from pns_server.push.log import LogPushSender
from pns_server.push.transport import ProxyConfigError
from pns_server.push.webpush import (
    VapidException,
    WebPushConfig,
    WebPushSender,
    load_or_create_vapid_key,
)

log = logging.getLogger("pns.push")


class PushConfigError(ValueError):
    """Start-up refusal; the message starts with the variable to fix."""


def _check_file(variable: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PushConfigError(f"{variable}: file not found: {path}") from None
    except IsADirectoryError:
        raise PushConfigError(f"{variable}: is a directory, not a file: {path}") from None
    except PermissionError:
        raise PushConfigError(f"{variable}: cannot read {path}: permission denied") from None
    except OSError as exc:
        raise PushConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def _check_ca_file(settings: Settings) -> Path | None:
    path = settings.push_ca_file
    if path is None:
        return None
    _check_file("PNS_PUSH_CA_FILE", path)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise PushConfigError(f"PNS_PUSH_CA_FILE: not a PEM CA bundle: {path} ({exc})") from None
    return path


def _apns_settings_given(settings: Settings) -> dict[str, object]:
    names = ("apns_key_file", "apns_key_id", "apns_team_id", "apns_topic", "apns_cert_file")
    return {name: getattr(settings, name) for name in names if getattr(settings, name)}


def _require(settings: Settings, needed: tuple[str, ...], because: str) -> None:
    for name in needed:
        if not getattr(settings, name):
            raise PushConfigError(f"PNS_{name.upper()}: required when {because}")


def build_apns(settings: Settings, ca_file: Path | None) -> ApnsSender | None:
    given = _apns_settings_given(settings)
    if not given:
        return None
    token: ProviderToken | None = None
    if settings.apns_key_file and settings.apns_cert_file:
        raise PushConfigError(
            "PNS_APNS_CERT_FILE: set either PNS_APNS_KEY_FILE (token auth) or "
            "PNS_APNS_CERT_FILE (certificate auth), not both"
        )
    if settings.apns_cert_file:
        _require(settings, ("apns_topic",), "PNS_APNS_CERT_FILE is set")
        _check_file("PNS_APNS_CERT_FILE", settings.apns_cert_file)
        try:
            ssl.create_default_context().load_cert_chain(str(settings.apns_cert_file))
        except (ssl.SSLError, ValueError) as exc:
            raise PushConfigError(
                f"PNS_APNS_CERT_FILE: not a PEM certificate with its unencrypted private key: "
                f"{settings.apns_cert_file} ({exc})"
            ) from None
    else:
        because = "any of " + ", ".join(f"PNS_{name.upper()}" for name in given) + " is set"
        _require(settings, ("apns_key_file", "apns_key_id", "apns_team_id", "apns_topic"), because)
        assert settings.apns_key_file and settings.apns_key_id and settings.apns_team_id
        _check_file("PNS_APNS_KEY_FILE", settings.apns_key_file)
        try:
            key = load_signing_key(settings.apns_key_file)
        except (ValueError, TypeError) as exc:
            raise PushConfigError(
                f"PNS_APNS_KEY_FILE: not an APNs .p8 auth key: {settings.apns_key_file} ({exc})"
            ) from None
        token = ProviderToken(key, settings.apns_key_id, settings.apns_team_id)
    assert settings.apns_topic
    config = ApnsConfig(
        topic=settings.apns_topic,
        production_url=settings.apns_url,
        sandbox_url=settings.apns_sandbox_url,
        timeout=settings.push_timeout_seconds,
        ca_file=ca_file,
        cert_file=settings.apns_cert_file,
    )
    try:
        return ApnsSender(config, token)
    except ProxyConfigError as exc:
        raise PushConfigError(str(exc)) from None


def build_fcm(settings: Settings, ca_file: Path | None) -> PushSender | None:
    path = settings.fcm_credentials_file
    if path is None:
        if settings.fcm_url:
            raise PushConfigError("PNS_FCM_CREDENTIALS_FILE: required when PNS_FCM_URL is set")
        return None
    raw = _check_file("PNS_FCM_CREDENTIALS_FILE", path)
    from pns_server.push.fcm import FcmSender  # google-auth: imported only when FCM is used

    try:
        return FcmSender(
            path,
            timeout=settings.push_timeout_seconds,
            fcm_url=settings.fcm_url,
            ca_file=ca_file,
        )
    except ProxyConfigError as exc:
        raise PushConfigError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        hint = "" if raw.strip().startswith(b"{") else " (expected a JSON file)"
        raise PushConfigError(
            f"PNS_FCM_CREDENTIALS_FILE: not a Firebase service-account key: {path}{hint} ({exc})"
        ) from None


def webpush_subject(settings: Settings) -> str:
    if settings.webpush_subject:
        return settings.webpush_subject
    host = urlsplit(settings.public_url).hostname or "localhost"
    if settings.public_url.startswith("https://"):
        return f"https://{host}"  # push services want the origin's name, no port or path
    return f"mailto:admin@{host}"


def build_webpush(settings: Settings, ca_file: Path | None) -> WebPushSender:
    """Always available (it costs nothing until a browser subscribes); the VAPID key is
    configured or generated once under PNS_DATA_DIR, like the embedded secret key."""
    configured = settings.webpush_vapid_key_file
    path = configured or settings.data_dir / "vapid.pem"
    if configured is not None:
        _check_file("PNS_WEBPUSH_VAPID_KEY_FILE", configured)
    try:
        key = load_or_create_vapid_key(path, create=configured is None)
    except (ValueError, TypeError) as exc:
        raise PushConfigError(
            f"PNS_WEBPUSH_VAPID_KEY_FILE: not a PEM ECDSA P-256 private key: {path} ({exc})"
        ) from None
    except OSError as exc:
        raise PushConfigError(
            f"PNS_WEBPUSH_VAPID_KEY_FILE: cannot create or read {path}: {exc.strerror}"
        ) from None
    config = WebPushConfig(
        subject=webpush_subject(settings),
        allowed_hosts=tuple(settings.webpush_endpoint_hosts),
        timeout=settings.push_timeout_seconds,
        ca_file=ca_file,
    )
    sender = WebPushSender(key, config)
    try:
        # Signs once now, so a contact the push services would refuse stops the start.
        sender.authorization("https://fcm.googleapis.com/")
    except VapidException as exc:
        raise PushConfigError(
            f"PNS_WEBPUSH_SUBJECT: not a usable VAPID contact: {config.subject!r} ({exc}); "
            "use mailto:you@example.com or https://your.host"
        ) from None
    return sender


@dataclass
class ProviderStatus:
    """What /readyz shows per provider: the last configuration error and the last success."""

    service: str
    detail: str
    last_delivered_at: str | None = None
    last_config_error: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        state = "ok"
        if self.last_config_error is not None and (
            self.last_delivered_at is None or self.last_config_error["at"] > self.last_delivered_at
        ):
            state = "config_error"
        return {
            "status": state,
            "provider": self.detail,
            "last_delivered_at": self.last_delivered_at,
            "last_config_error": self.last_config_error,
        }


class TrackedSender:
    """Records outcomes for /readyz; counting and logging stay with the dispatcher."""

    def __init__(self, sender: PushSender, status: ProviderStatus) -> None:
        self.inner = sender
        self.service = sender.service
        self.status = status

    async def send(self, message: PushMessage) -> PushResult:
        result = await self.inner.send(message)
        now = datetime.now(UTC).isoformat()
        if result.outcome is Outcome.DELIVERED:
            self.status.last_delivered_at = now
        elif result.outcome is Outcome.CONFIG_ERROR:
            self.status.last_config_error = {
                "at": now,
                "reason": result.reason,
                "status_code": result.status_code,
            }
        return result

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class PushReadiness:
    statuses: list[ProviderStatus] = field(default_factory=list)

    def __call__(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        if not any(status.service in ("apns", "fcm") for status in self.statuses):
            checks["mode"] = "log only: no APNs or FCM configuration"
        checks.update({status.service: status.as_dict() for status in self.statuses})
        return checks


def build_senders(
    settings: Settings, readiness: PushReadiness | None = None
) -> dict[str, PushSender]:
    """Always includes "log"; APNs and FCM only when configured (and then fully valid)."""
    ca_file = _check_ca_file(settings)
    senders: dict[str, PushSender] = {"log": LogPushSender()}
    readiness = readiness if readiness is not None else PushReadiness()
    apns = build_apns(settings, ca_file)
    if apns is not None:
        auth = "certificate" if settings.apns_cert_file else f"key {settings.apns_key_id}"
        detail = f"APNs topic {settings.apns_topic}, {auth}, {settings.apns_url}"
        status = ProviderStatus("apns", detail)
        senders["apns"] = TrackedSender(apns, status)
        readiness.statuses.append(status)
    fcm = build_fcm(settings, ca_file)
    if fcm is not None:
        project = getattr(fcm, "project_id", "?")
        status = ProviderStatus("fcm", f"FCM project {project}, {settings.fcm_url or 'Google'}")
        senders["fcm"] = TrackedSender(fcm, status)
        readiness.statuses.append(status)
    webpush = build_webpush(settings, ca_file)
    status = ProviderStatus("webpush", f"Web Push, VAPID key {webpush.public_key[:12]}...")
    senders["webpush"] = TrackedSender(webpush, status)
    readiness.statuses.append(status)
    if len(readiness.statuses) > 1:
        log.info("push: %s", "; ".join(s.detail for s in readiness.statuses))
    else:
        log.warning(
            "push: no APNs or FCM configured (PNS_APNS_*, PNS_FCM_CREDENTIALS_FILE): "
            "pushes to native apps are only written to this log (Web Push is on)"
        )
    return senders
