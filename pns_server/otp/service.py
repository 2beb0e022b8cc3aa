"""One-time passwords and recovery codes: the rules. Lockout policy: see throttle.py.

Every check takes the client row first (`lock_throttle`, or for an OTP check the
authenticating read `caller_for_verify`, which also reads the devices), refuses at once
when locked, then looks at the code. What is decided from values read (whether a success
has counters to reset) is decided under that lock.
Codes, secrets and code hashes never reach logs, audit or error details."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from pns_server import audit
from pns_server.driver import DriverUnit
from pns_server.errors import OtpInvalid, OtpReplayed, PnsError, RecoveryCodeInvalid
from pns_server.otp import recovery_codes, throttle
from pns_server.otp.repository import OtpDevice, OtpRepository, Throttle, VerifyCaller
from pns_server.otp.schemas import OtpAccepted, RecoveryCodeAccepted, RecoveryCodesCreated
from pns_server.rows import ClientRow
from pns_server.runtime import Runtime
from pns_server.security import SecretBox
from pns_server.totp import TotpParams, could_be_code, matching_step

log = logging.getLogger(__name__)

WrongCode = Callable[..., PnsError]


async def caller_for_verify(
    unit: DriverUnit, token_hash: str, *, lock: bool = True
) -> VerifyCaller | None:
    """The caller of an OTP check, authenticated, its row locked and its devices read in one
    statement (`verify_otp` needs all three); None for an unknown token. Without `lock`:
    the same read for `accept_at_once`, outside any transaction."""
    repo = OtpRepository(unit)
    if lock:
        return await repo.lock_caller_for_verify(token_hash)
    return await repo.read_caller_for_verify(token_hash)


async def accept_at_once(
    unit: DriverUnit, runtime: Runtime, caller: VerifyCaller, code: str, seen_at: datetime | None
) -> OtpAccepted | None:
    """PostgreSQL, without a transaction of its own (`Database.unit_alone`; `caller` read
    unlocked): accept a current code of a step its device has not used, in one statement
    that holds only while the caller's row is as read (`claim_step_if_unchanged`), and
    notes the caller seen at `seen_at` when its `last_seen_at` is due a write. None
    for anything else (no match, a replay, a lock in force, a concurrent check or push
    that changed the row meanwhile): `verify_otp` then decides, under the row's lock, as
    if this had not run, for nothing was written. An accepted code is the common case of a
    check; a wrong one is decided under the lock, so every failure is counted there."""
    now = datetime.now(UTC)
    if throttle.refusal_if_locked(caller.throttle, now) is not None:
        return None
    typed = "".join(code.split())
    for device in caller.devices:
        step = matching_device_step(runtime.box, device, typed, now)
        if step is None:
            continue
        if device.last_otp_step is not None and step <= device.last_otp_step:
            return None
        reset = bool(caller.client.pushes_since_success) or not throttle.is_clear(caller.throttle)
        accepted = accepted_row(caller.client.id, device)
        repo = OtpRepository(unit)
        if not await repo.claim_step_if_unchanged(
            device.id, step, now, accepted, caller, reset, seen_at
        ):
            return None
        runtime.metrics.otp_verifications.labels(result="accepted").inc()
        return OtpAccepted(device_id=device.id)
    return None


def accepted_row(client_id: str, device: OtpDevice) -> dict[str, Any]:
    """The audit row of an accepted code; its subject is the device."""
    return audit.audit_row(
        "otp.accepted",
        client_id=client_id,
        actor="client",
        actor_id=client_id,
        subject_id=device.id,
        kind=device.kind,
    )


async def verify_otp(
    unit: DriverUnit, runtime: Runtime, caller: VerifyCaller, code: str
) -> OtpAccepted:
    """Accept a current code (±1 step) of any of the client's app or TOTP devices, once.

    A code that matches but whose step the device already used is `otp_replayed`; it does
    not count as a failure (it proves nothing an attacker could guess, and a double-click
    by the user must not eat an attempt). Anything else that does not match counts.

    Statements of an accepted code, the caller's authentication included: the locking read
    of the client row with its devices (`caller_for_verify`), then the step claim with its
    audit row and, only when there is something to reset, the counter reset (one statement
    on PostgreSQL, three at most on SQLite)."""
    now = datetime.now(UTC)
    repo = OtpRepository(unit)
    client = caller.client
    refuse_if_locked(runtime, caller.throttle, now)
    # Read under the client's lock: still true when the claim runs.
    to_reset = client.pushes_since_success or not throttle.is_clear(caller.throttle)
    reset_client = client.id if to_reset else None
    typed = "".join(code.split())  # people type "123 456"
    matches = [
        (device, step)
        for device in caller.devices
        if (step := matching_device_step(runtime.box, device, typed, now)) is not None
    ]
    for device, step in matches:
        if device.last_otp_step is not None and step <= device.last_otp_step:
            continue
        # The read above may predate a concurrent claim (PostgreSQL re-reads only the locked
        # client row after waiting for it): this conditional UPDATE is what decides.
        accepted = accepted_row(client.id, device)
        if await repo.claim_step_audited(device.id, step, now, accepted, reset_client):
            runtime.metrics.otp_verifications.labels(result="accepted").inc()
            return OtpAccepted(device_id=device.id)
    if matches:
        runtime.metrics.otp_verifications.labels(result="replayed").inc()
        raise OtpReplayed("This code was already used; wait for the next one and enter it.")
    await fail(unit, runtime, client.id, now, wrong_otp)


def matching_device_step(box: SecretBox, device: OtpDevice, code: str, now: datetime) -> int | None:
    if not could_be_code(code, device.digits):
        return None  # no secret opened for what cannot be a code of this device
    try:
        secret = box.open(device.totp_secret, device.secret_site)
    except ValueError:
        # Sealed with a key no longer configured, or sealed for another row or client (a
        # tampered database): this device cannot match.
        log.warning("TOTP secret of device %s does not open for its row; refused", device.id)
        return None
    params = TotpParams(
        secret=secret,
        algorithm=device.algorithm,
        digits=device.digits,
        period=device.period,
    )
    return matching_step(params, code, now)


async def create_recovery_codes(
    unit: DriverUnit, runtime: Runtime, client: ClientRow
) -> RecoveryCodesCreated:
    """A fresh set of codes replacing every earlier one (used or not), in one transaction."""
    codes = recovery_codes.generate_set()
    inner = await asyncio.to_thread(
        lambda: [recovery_codes.hash_code(client.id, code) for code in codes]
    )
    hashes = [runtime.box.keyed_hash(recovery_codes.pepper_input(client.id, h)) for h in inner]
    repo = OtpRepository(unit)
    await repo.lock_throttle(client.id)
    await repo.replace_recovery_codes(client.id, hashes, datetime.now(UTC))
    await audit.write(
        unit,
        "recovery.generated",
        client_id=client.id,
        actor="client",
        actor_id=client.id,
        count=len(codes),
    )
    return RecoveryCodesCreated(codes=codes)


async def verify_recovery_code(
    unit: DriverUnit, runtime: Runtime, client: ClientRow, code: str
) -> RecoveryCodeAccepted:
    """Accept an unused recovery code once; wrong or used codes count toward the OTP lock."""
    canonical = recovery_codes.normalise(code)
    # Hash before taking the client row: scrypt is the slow part, keep it out of the lock.
    candidates: list[str] = []
    if canonical is not None:
        inner = await asyncio.to_thread(recovery_codes.hash_code, client.id, canonical)
        # One per configured key: codes peppered before a key rotation keep working.
        peppered = recovery_codes.pepper_input(client.id, inner)
        candidates = runtime.box.keyed_hash_candidates(peppered)
    now = datetime.now(UTC)
    repo = OtpRepository(unit)
    await ensure_unlocked(repo, runtime, client.id, now)
    if candidates and await repo.use_recovery_code(client.id, candidates, now):
        await repo.reset_after_success(client.id)
        remaining = await repo.unused_recovery_codes(client.id)
        await audit.write(
            unit,
            "recovery.used",
            client_id=client.id,
            actor="client",
            actor_id=client.id,
            remaining=remaining,
        )
        runtime.metrics.otp_verifications.labels(result="accepted").inc()
        return RecoveryCodeAccepted(remaining=remaining)
    await fail(unit, runtime, client.id, now, wrong_recovery_code)


async def ensure_unlocked(
    repo: OtpRepository, runtime: Runtime, client_id: str, now: datetime
) -> None:
    refuse_if_locked(runtime, await repo.lock_throttle(client_id), now)


def refuse_if_locked(runtime: Runtime, counters: Throttle, now: datetime) -> None:
    refusal = throttle.refusal_if_locked(counters, now)
    if refusal is not None:
        runtime.metrics.otp_verifications.labels(result="locked").inc()
        raise refusal


def wrong_otp(**extra: Any) -> PnsError:
    return OtpInvalid(
        "The code is wrong or too old; enter the current code (check the device's clock).",
        commit=True,
        **extra,
    )


def wrong_recovery_code(**extra: Any) -> PnsError:
    return RecoveryCodeInvalid(
        "This recovery code is unknown or already used; check it or use another one.",
        commit=True,
        **extra,
    )


async def fail(
    unit: DriverUnit, runtime: Runtime, client_id: str, now: datetime, wrong: WrongCode
) -> NoReturn:
    """Count a wrong code (committed although the request fails) and lock when due."""
    repo = OtpRepository(unit)
    settings = runtime.settings
    counters = await repo.record_failure(client_id)
    runtime.metrics.otp_verifications.labels(result="invalid").inc()
    if throttle.is_capped(counters):
        await record_lock(unit, client_id, counters.failures_since_success, None)
        raise wrong(attempts_left=0, locked_until=None, admin_unlock_required=True)
    if counters.consecutive_failures >= settings.otp_max_failures:
        until = now + throttle.lock_duration(settings, counters.lock_count)
        counters = await repo.impose_lock(client_id, until)
        await record_lock(unit, client_id, counters.failures_since_success, until)
        raise wrong(
            attempts_left=0,
            locked_until=until,
            retry_after=throttle.retry_after(until, now),
            admin_unlock_required=False,
        )
    raise wrong(attempts_left=throttle.attempts_left(settings, counters))


async def record_lock(
    unit: DriverUnit, client_id: str, failures: int, until: datetime | None
) -> None:
    await audit.write(
        unit,
        "otp.locked",
        client_id=client_id,
        actor="system",
        failures_since_success=failures,
        locked_until=None if until is None else until.isoformat(),
        admin_unlock_required=until is None,
    )
