from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import NoReturn
from urllib.parse import quote, urlencode

from sqlalchemy.ext.asyncio import AsyncSession

from pns_server import states
from pns_server.audit import record
from pns_server.config import Settings
from pns_server.db import Database, publish_after_commit
from pns_server.devices.repository import DeviceRepository
from pns_server.devices.service import device_out
from pns_server.errors import (
    NotFound,
    OtpInvalid,
    PairingExpired,
    PairingNotPending,
    PairingWrongKind,
)
from pns_server.models import Client, Device, Pairing
from pns_server.pairings.repository import PairingRepository
from pns_server.pairings.schemas import (
    PairingConfirmed,
    PairingCreate,
    PairingCreated,
    PairingStatus,
)
from pns_server.realtime.longpoll import Disconnected, long_poll
from pns_server.rows import ClientRow
from pns_server.runtime import Runtime
from pns_server.security import PAIRING_TOKEN_PREFIX, SecretBox, hash_token, new_id, new_token
from pns_server.topics import pairing_topic
from pns_server.totp import TotpParams, matching_step, new_secret, otpauth_uri

log = logging.getLogger(__name__)


def pairing_query(public_url: str, pairing_token: str) -> str:
    return urlencode({"server": public_url, "token": pairing_token}, quote_via=quote, safe="")


def app_qr_payload(public_url: str, pairing_token: str) -> str:
    return f"pns://pair?{pairing_query(public_url, pairing_token)}"


def app_qr_link(public_url: str, pairing_token: str) -> str:
    """The same parameters as an https link to the web approver, all in the fragment (never
    sent to a server); native apps may claim /app/pair as a universal/app link. The SDK
    appends `&k=` before showing it."""
    return f"{public_url}/app/pair#{pairing_query(public_url, pairing_token)}"


def effective_status(pairing: Pairing, now: datetime) -> states.PairingStatus:
    """A pending pairing past its expiry is expired, whether or not a row says so yet."""
    if pairing.status == states.PairingStatus.PENDING and pairing.expires_at <= now:
        return states.PairingStatus.EXPIRED
    return states.PairingStatus(pairing.status)


def not_found() -> NotFound:
    return NotFound("No such pairing for this client.")


async def start(
    session: AsyncSession, runtime: Runtime, client: Client, data: PairingCreate
) -> PairingCreated:
    settings, box = runtime.settings, runtime.box
    now = datetime.now(UTC)
    pairing = Pairing(
        id=new_id(),
        client_id=client.id,
        kind=data.kind,
        status=states.PairingStatus.PENDING,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.pairing_ttl_seconds),
        failed_attempts=0,
    )
    uri: str | None = None
    link: str | None = None
    if data.kind == "app":
        token = new_token(PAIRING_TOKEN_PREFIX)
        pairing.token_hash = hash_token(token)
        qr_payload = app_qr_payload(settings.public_url, token)
        if settings.web_approver:
            link = app_qr_link(settings.public_url, token)
    else:
        label = data.label or client.name
        params = TotpParams(secret=new_secret())
        pairing.label = label
        pairing.totp_secret = box.seal(params.secret, pairing.secret_site)
        uri = qr_payload = otpauth_uri(params, settings.otp_issuer, label)
    PairingRepository(session).add(pairing)
    await session.flush()
    record(
        session,
        "pairing.started",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        subject_id=pairing.id,
        kind=pairing.kind,
    )
    return PairingCreated(
        pairing_id=pairing.id,
        kind=data.kind,
        status=states.PairingStatus.PENDING,
        expires_at=pairing.expires_at,
        qr_payload=qr_payload,
        otpauth_uri=uri,
        qr_link=link,
    )


def check_confirmable(pairing: Pairing, now: datetime) -> None:
    if pairing.kind != "totp":
        raise PairingWrongKind(
            "Only TOTP pairings are confirmed with a code; an app pairing completes "
            "when the phone scans its QR code.",
            kind=pairing.kind,
        )
    state = effective_status(pairing, now)
    if state == states.PairingStatus.EXPIRED:
        raise PairingExpired("This pairing has expired; start a new one.")
    if state != states.PairingStatus.PENDING:
        raise PairingNotPending("This pairing is already completed.", status=state)


async def confirm(
    session: AsyncSession, runtime: Runtime, client: Client, pairing_id: str, code: str
) -> PairingConfirmed:
    settings, box = runtime.settings, runtime.box
    pairings = PairingRepository(session)
    pairing = await pairings.get_for_client(pairing_id, client.id)
    if pairing is None:
        raise not_found()
    now = datetime.now(UTC)
    check_confirmable(pairing, now)
    secret = open_secret(box, pairing)
    params = TotpParams(secret=secret) if secret is not None else None
    # People type codes as "123 456".
    step = matching_step(params, code.replace(" ", ""), now) if params is not None else None
    if params is None or step is None:
        await reject_code(session, settings, pairing)

    device = Device(
        id=new_id(),
        client_id=client.id,
        kind="totp",
        name=pairing.label or client.name,
        totp_algorithm=params.algorithm,
        totp_digits=params.digits,
        totp_period=params.period,
        push_status="none",
        # The confirming code must not log anyone in afterwards.
        last_otp_step=step,
        created_at=now,
    )
    # Sealed again for its new row: a sealed secret opens only where it was sealed.
    device.totp_secret = box.seal(params.secret, device.secret_site)
    devices = DeviceRepository(session)
    devices.add(device)
    await session.flush()
    if not await devices.complete_pairing(pairing.id, device.id, now):
        raise PairingNotPending("This pairing was completed or expired meanwhile.")
    publish_after_commit(session, pairing_topic(pairing.id))
    record(
        session,
        "device.paired",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        subject_id=device.id,
        kind="totp",
        pairing_id=pairing.id,
    )
    return PairingConfirmed(device=device_out(device))


def open_secret(box: SecretBox, pairing: Pairing) -> str | None:
    """The pairing's TOTP secret; None when it does not open for this pairing (sealed with a
    key no longer configured, or copied here from another row): no code can confirm it."""
    if pairing.totp_secret is None:
        return None
    try:
        return box.open(pairing.totp_secret, pairing.secret_site)
    except ValueError:
        log.warning("TOTP secret of pairing %s does not open for its row; refused", pairing.id)
        return None


async def reject_code(session: AsyncSession, settings: Settings, pairing: Pairing) -> NoReturn:
    """Count the wrong code (persisted despite the error) and refuse it."""
    failures = await PairingRepository(session).record_failure(
        pairing.id, settings.otp_max_failures
    )
    attempts_left = max(settings.otp_max_failures - failures, 0)
    if attempts_left == 0:
        publish_after_commit(session, pairing_topic(pairing.id))
    record(
        session,
        "pairing.code_rejected",
        client_id=pairing.client_id,
        actor="client",
        actor_id=pairing.client_id,
        subject_id=pairing.id,
        attempts_left=attempts_left,
    )
    detail = (
        "Wrong code; check the authenticator app's clock and try the current code."
        if attempts_left
        else "Wrong code; too many wrong codes, so this pairing has expired. Start a new one."
    )
    raise OtpInvalid(detail, commit=True, attempts_left=attempts_left)


async def read_status(db: Database, client_id: str, pairing_id: str) -> PairingStatus:
    """One short session per read: a waiting long-poll holds no connection."""
    async with db.session() as session:
        pairing = await PairingRepository(session).get_for_client(pairing_id, client_id)
        if pairing is None:
            raise not_found()
        device = (
            await DeviceRepository(session).get(pairing.device_id) if pairing.device_id else None
        )
        return PairingStatus.model_validate(
            {
                "pairing_id": pairing.id,
                "kind": pairing.kind,
                "status": effective_status(pairing, datetime.now(UTC)),
                "expires_at": pairing.expires_at,
                "device": device_out(device) if device is not None else None,
            }
        )


async def wait_for_status(
    runtime: Runtime,
    client: ClientRow,
    pairing_id: str,
    wait: float,
    disconnected: Disconnected | None = None,
) -> PairingStatus:
    with runtime.metrics.longpoll_waiters.track_inprogress():
        return await long_poll(
            runtime.notifier,
            pairing_topic(pairing_id),
            lambda: read_status(runtime.db, client.id, pairing_id),
            is_settled=lambda s: s.status != states.PairingStatus.PENDING.value,
            wait=wait,
            deadline_of=lambda s: (
                s.expires_at if s.status == states.PairingStatus.PENDING.value else None
            ),
            share_key=f"{client.id}:{pairing_id}",
            disconnected=disconnected,
        )
