from __future__ import annotations

import base64
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.audit import record
from pns_server.config import Settings, parse_version
from pns_server.db import Executor, publish_after_commit
from pns_server.devices.repository import DeviceRepository, rows_of_client
from pns_server.devices.schemas import (
    DeviceCreate,
    DeviceCreated,
    DeviceList,
    DeviceOut,
    PushRegistration,
    TotpBlock,
)
from pns_server.errors import (
    InvalidRequest,
    NotFound,
    PairingExpired,
    PairingInvalid,
    PlatformUnsupported,
    WebPushEndpointForbidden,
)
from pns_server.models import Client, Device, Pairing
from pns_server.push.webpush import endpoint_problem
from pns_server.rows import ClientRow, DeviceRow
from pns_server.runtime import Runtime
from pns_server.security import (
    DEVICE_TOKEN_PREFIX,
    hash_token,
    new_id,
    new_token,
    parse_public_key,
)
from pns_server.states import PairingStatus
from pns_server.topics import pairing_topic
from pns_server.totp import TotpParams, new_secret

PUSH_SERVICE_OF_PLATFORM = {"ios": "apns", "android": "fcm", "web": "webpush"}


def device_out(device: DeviceRow) -> DeviceOut:
    public_key = base64.b64encode(device.public_key).decode() if device.public_key else None
    return DeviceOut.model_validate(
        {
            "device_id": device.id,
            "kind": device.kind,
            "name": device.name,
            "platform": device.platform,
            "os_version": device.os_version,
            "push": device.push_service,
            "push_status": device.push_status,
            "public_key": public_key,
            "key_proof": device.key_proof,
            "created_at": device.created_at,
            "last_used_at": device.last_used_at,
        }
    )


def check_platform_version(settings: Settings, platform: str, os_version: str) -> None:
    minimum = settings.min_ios_version if platform == "ios" else settings.min_android_version
    if parse_version(os_version) < parse_version(minimum):
        name = "iOS" if platform == "ios" else "Android"
        raise PlatformUnsupported(
            f"{name} {os_version} is too old for this relay; it needs {name} {minimum} or later.",
            platform=platform,
            min_version=minimum,
        )


def check_push_service(platform: str | None, push: PushRegistration, *, field: str) -> None:
    expected = PUSH_SERVICE_OF_PLATFORM.get(platform or "")
    if push.service != expected:
        needed = f"'{expected}' on {platform}" if expected else "none: this device has no push"
        raise InvalidRequest(
            f"Push service '{push.service}' does not fit the device's platform; use {needed}.",
            errors=[
                {
                    "field": field,
                    "message": f"must be {expected} for platform {platform}",
                    "type": "platform_mismatch",
                }
            ],
        )


def check_webpush_endpoint(settings: Settings, push: PushRegistration, *, field: str) -> None:
    """The relay will POST to this URL: only known push services (an SSRF door otherwise)."""
    if push.service != "webpush":
        return
    problem = endpoint_problem(push.address, settings.webpush_endpoint_hosts)
    if problem is not None:
        raise WebPushEndpointForbidden(
            f"This push subscription cannot be used: {problem}. Subscribe through the "
            "browser's own push service, or ask the operator to allow it.",
            field=field,
        )


def apply_push(device: Device, push: PushRegistration | None) -> None:
    device.push_p256dh = device.push_auth = None
    if push is None:
        device.push_service = device.push_token = device.push_environment = None
        device.push_status = "none"
        return
    device.push_service = push.service
    device.push_token = push.address
    if push.keys is not None:
        device.push_p256dh, device.push_auth = push.keys.p256dh, push.keys.auth
    # Only APNs has separate sandbox and production gateways.
    device.push_environment = (push.environment or "production") if push.service == "apns" else None
    device.push_status = "ok"


async def claim_app_pairing(session: AsyncSession, pairing_token: str) -> Pairing:
    """The pending app pairing this token opens, else 404 (unknown or used) / 410 (expired)."""
    pairing = await DeviceRepository(session).pairing_by_token_hash(hash_token(pairing_token))
    if pairing is None or pairing.kind != "app" or pairing.status == PairingStatus.COMPLETED:
        raise PairingInvalid("This pairing code is unknown or was already used; scan a new one.")
    if pairing.status != PairingStatus.PENDING or pairing.expires_at <= datetime.now(UTC):
        raise PairingExpired("This pairing code has expired; start a new pairing on the client.")
    return pairing


async def enrol_app_device(
    session: AsyncSession, runtime: Runtime, data: DeviceCreate
) -> DeviceCreated:
    settings, box = runtime.settings, runtime.box
    # Every check on the request comes first, so a refused phone does not burn the code.
    if data.platform != "web":
        if data.os_version is None:
            raise InvalidRequest(
                "os_version is required for ios and android (a version number, like 17.2).",
                errors=[{"field": "os_version", "message": "Field required", "type": "missing"}],
            )
        check_platform_version(settings, data.platform, data.os_version)
    if data.push is not None:
        check_push_service(data.platform, data.push, field="push.service")
        check_webpush_endpoint(settings, data.push, field="push.endpoint")
    pairing = await claim_app_pairing(session, data.pairing_token)

    now = datetime.now(UTC)
    token = new_token(DEVICE_TOKEN_PREFIX)
    totp = TotpParams(secret=new_secret())
    device = Device(
        id=new_id(),
        client_id=pairing.client_id,
        kind="app",
        name=data.name,
        platform=data.platform,
        os_version=data.os_version,
        app_version=data.app_version,
        token_hash=hash_token(token),
        public_key=parse_public_key(data.public_key),
        key_proof=data.key_proof,
        totp_algorithm=totp.algorithm,
        totp_digits=totp.digits,
        totp_period=totp.period,
        created_at=now,
    )
    device.totp_secret = box.seal(totp.secret, device.secret_site)
    apply_push(device, data.push)
    DeviceRepository(session).add(device)
    await session.flush()
    if not await DeviceRepository(session).complete_pairing(pairing.id, device.id, now):
        # Lost a race with another phone holding the same code; the rollback drops our device.
        raise PairingInvalid("This pairing code was already used; scan a new one.")
    publish_after_commit(session, pairing_topic(pairing.id))
    record(
        session,
        "device.paired",
        client_id=device.client_id,
        actor="device",
        actor_id=device.id,
        subject_id=device.id,
        kind="app",
        platform=device.platform,
        os_version=device.os_version,
        push=device.push_service,
        pairing_id=pairing.id,
        key_proof=data.key_proof is not None,
    )
    return DeviceCreated(
        device_id=device.id,
        device_token=token,
        totp=TotpBlock(
            secret=totp.secret, algorithm=totp.algorithm, digits=totp.digits, period=totp.period
        ),
    )


async def list_devices(unit: Executor, client: ClientRow) -> DeviceList:
    devices = await rows_of_client(unit, client.id)
    return DeviceList(devices=[device_out(d) for d in devices])


async def remove_for_client(session: AsyncSession, client: Client, device_id: str) -> None:
    if not await DeviceRepository(session).delete(device_id, client_id=client.id):
        raise NotFound("No such device for this client.")
    record(
        session,
        "device.removed",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        subject_id=device_id,
    )


async def update_push(
    session: AsyncSession, runtime: Runtime, device: Device, push: PushRegistration
) -> None:
    check_push_service(device.platform, push, field="service")
    check_webpush_endpoint(runtime.settings, push, field="endpoint")
    apply_push(device, push)
    record(
        session,
        "device.push_updated",
        client_id=device.client_id,
        actor="device",
        actor_id=device.id,
        subject_id=device.id,
        push=push.service,
    )


async def remove_self(session: AsyncSession, device: Device) -> None:
    await DeviceRepository(session).delete(device.id, client_id=device.client_id)
    record(
        session,
        "device.removed",
        client_id=device.client_id,
        actor="device",
        actor_id=device.id,
        subject_id=device.id,
    )
