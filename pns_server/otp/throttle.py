"""The lockout policy shared by one-time passwords and recovery codes (NIST SP 800-63B).

- A client is checked for a lock BEFORE its code is looked at: while locked, even the
  right code is refused (429 `otp_locked`), so a lock cannot be probed for correct guesses.
- `otp_max_failures` consecutive wrong codes lock OTP for `otp_lock_seconds * 2**n`, n being
  the number of locks since the last success (30 s, 60 s, 120 s ... by default), capped at
  `MAX_LOCK` so the arithmetic stays in range. The wrong code that imposes the lock is
  answered 401 `otp_invalid` with `attempts_left: 0` and `locked_until`; later attempts 429.
- `FAILURE_CAP` wrong codes without a success lock OTP until an administrator unlocks the
  client, however long the attacker waits.
- A success resets every counter (and the push-fatigue counter).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from pns_server.config import Settings
from pns_server.errors import OtpLocked
from pns_server.otp.repository import Throttle

FAILURE_CAP = 100
MAX_LOCK = timedelta(days=1)


def lock_duration(settings: Settings, lock_count: int) -> timedelta:
    seconds = settings.otp_lock_seconds * 2 ** min(lock_count, 32)
    return min(timedelta(seconds=seconds), MAX_LOCK)


def is_capped(throttle: Throttle) -> bool:
    return throttle.failures_since_success >= FAILURE_CAP


def is_clear(throttle: Throttle) -> bool:
    """Nothing a success would reset: no failures, no locks, no lock in force or past."""
    return not (
        throttle.consecutive_failures
        or throttle.failures_since_success
        or throttle.lock_count
        or throttle.locked_until is not None
    )


def retry_after(locked_until: datetime, now: datetime) -> int:
    return max(1, math.ceil((locked_until - now).total_seconds()))


def attempts_left(settings: Settings, throttle: Throttle) -> int:
    return max(
        0,
        min(
            settings.otp_max_failures - throttle.consecutive_failures,
            FAILURE_CAP - throttle.failures_since_success,
        ),
    )


def capped_error(*, commit: bool = False) -> OtpLocked:
    return OtpLocked(
        f"One-time passwords and recovery codes are locked after {FAILURE_CAP} failures "
        "without a successful login; an administrator must unlock this client "
        "(POST /v1/admin/clients/{id}/unlock).",
        commit=commit,
        locked_until=None,
        admin_unlock_required=True,
    )


def locked_error(locked_until: datetime, now: datetime, *, commit: bool = False) -> OtpLocked:
    seconds = retry_after(locked_until, now)
    return OtpLocked(
        f"Too many wrong codes; one-time passwords are locked for {seconds} more seconds. "
        "Retry after that, or approve the login by push.",
        headers={"Retry-After": str(seconds)},
        commit=commit,
        locked_until=locked_until,
        retry_after=seconds,
        admin_unlock_required=False,
    )


def refusal_if_locked(throttle: Throttle, now: datetime) -> OtpLocked | None:
    """The error to answer before looking at the code, or None when codes may be tried."""
    if is_capped(throttle):
        return capped_error()
    if throttle.locked_until is not None and throttle.locked_until > now:
        return locked_error(throttle.locked_until, now)
    return None
