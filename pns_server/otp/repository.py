"""Queries of the otp domain. Every counter change is one SQL expression on the row
(`x = x + 1 ... RETURNING`), so concurrent requests on any number of processes never lose
an update; nothing is read, changed in Python and written back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, delete, exists, func, insert, or_, select, update

from pns_server.audit import AUDIT_FIELDS, AUDIT_TABLE, INSERT_AUDIT, audit_binds, audit_params
from pns_server.driver import DriverUnit, ValueList
from pns_server.models import Base, Client, Device, RecoveryCode
from pns_server.rows import ClientRow
from pns_server.security import SealedAt, new_id

OTP_DEVICE_KINDS = ("app", "totp")

# Every statement is plain Core on the tables, built once with bindparams: it runs on the
# driver connection (`pns_server.driver`), which compiles each statement once per dialect.
_clients = Base.metadata.tables[Client.__tablename__]
_devices = Base.metadata.tables[Device.__tablename__]
_codes = Base.metadata.tables[RecoveryCode.__tablename__]

_THROTTLE_COLUMNS = (
    _clients.c.otp_consecutive_failures,
    _clients.c.otp_failures_since_success,
    _clients.c.otp_lock_count,
    _clients.c.otp_locked_until,
)

# One round trip authenticates an OTP check and takes what it needs: the caller's row by its
# token's hash, locked (FOR UPDATE OF clients on PostgreSQL) or not (`accept_at_once`), with
# its OTP devices. Outer join: a client without devices still gets its row locked and its
# counters read. The device columns are labelled where a client column has the same name.
_CALLER_FOR_VERIFY_READ = (
    select(
        *_clients.c,
        _devices.c.id.label("device_id"),
        _devices.c.kind.label("device_kind"),
        _devices.c.totp_secret,
        _devices.c.totp_algorithm,
        _devices.c.totp_digits,
        _devices.c.totp_period,
        _devices.c.last_otp_step,
    )
    .select_from(
        _clients.outerjoin(
            _devices,
            (_devices.c.client_id == _clients.c.id)
            # Fixed binds, not an expanding IN: nothing to rewrite at each execution.
            & _devices.c.kind.in_([bindparam(f"kind_{kind}", kind) for kind in OTP_DEVICE_KINDS]),
        )
    )
    .where(_clients.c.token_hash == bindparam("token_hash"))
    .order_by(_devices.c.created_at, _devices.c.id)
)
_CALLER_FOR_VERIFY = _CALLER_FOR_VERIFY_READ.with_for_update(of=_clients)

_LOCK_THROTTLE = (
    select(*_THROTTLE_COLUMNS)
    .where(_clients.c.id == bindparam("client_id"))
    .with_for_update(of=_clients)
)

_RECORD_FAILURE = (
    update(_clients)
    .where(_clients.c.id == bindparam("client_id"))
    .values(
        otp_consecutive_failures=_clients.c.otp_consecutive_failures + 1,
        otp_failures_since_success=_clients.c.otp_failures_since_success + 1,
    )
    .returning(*_THROTTLE_COLUMNS)
)

_IMPOSE_LOCK = (
    update(_clients)
    .where(_clients.c.id == bindparam("client_id"))
    .values(
        otp_locked_until=bindparam("until"),
        otp_lock_count=_clients.c.otp_lock_count + 1,
        otp_consecutive_failures=0,
    )
    .returning(*_THROTTLE_COLUMNS)
)

_CLEARED_COUNTERS: dict[str, Any] = {
    "otp_consecutive_failures": 0,
    "otp_failures_since_success": 0,
    "otp_lock_count": 0,
    "otp_locked_until": None,
    "pushes_since_success": 0,
}
_RESET_AFTER_SUCCESS = (
    update(_clients).where(_clients.c.id == bindparam("client_id")).values(_CLEARED_COUNTERS)
)

# The replay guard: the step is taken only if it is newer than the last one taken.
_CLAIM_STEP = (
    update(_devices)
    .where(
        _devices.c.id == bindparam("device_id"),
        or_(_devices.c.last_otp_step.is_(None), _devices.c.last_otp_step < bindparam("step")),
    )
    .values(last_otp_step=bindparam("step"), last_used_at=bindparam("now"))
    .returning(_devices.c.id)
)

# PostgreSQL: the step claim and the audit row of its success in one round trip. The claim
# is a data-modifying CTE; the INSERT reads its RETURNING, so the row exists only if the
# claim won, and the statement returns a row exactly then.
_claimed = _CLAIM_STEP.cte("claimed")
_CLAIM_STEP_AUDITED = (
    insert(AUDIT_TABLE)
    .from_select(
        list(AUDIT_FIELDS),
        select(*{**audit_binds(), "subject_id": _claimed.c.id}.values()),
    )
    .returning(AUDIT_TABLE.c.subject_id)
)
# The same, resetting the client's counters too when the claim wins (a success after
# failures or pushes): the reset is a data-modifying CTE the INSERT does not read, which
# PostgreSQL runs all the same, only where `claimed` returned the device. Its client's
# bind is not `client_id`: in one statement with the devices' UPDATE, a parameter named
# like a column of `devices` would be taken for a value to set there.
_RESET_IF_CLAIMED = (
    update(_clients)
    .where(_clients.c.id == bindparam("reset_client"), exists(select(_claimed.c.id)))
    .values(_CLEARED_COUNTERS)
    .cte("reset")
)
_CLAIM_STEP_AUDITED_AND_RESET = _CLAIM_STEP_AUDITED.add_cte(_RESET_IF_CLAIMED)

# PostgreSQL, a check outside any transaction (`claim_step_if_unchanged`): the claim holds
# only while the caller's row is as the check read it. `FOR UPDATE` in the first CTE locks
# the row for the statement's transaction, and when a concurrent check changed it
# meanwhile, re-reads the newest version against the same conditions (READ COMMITTED):
# then nothing is claimed and the check is decided again under the lock. Whatever follows
# (the claim, the reset, the audit row) reads `unchanged`, so it runs after the lock.
_UNCHANGED = (
    select(_clients.c.id)
    .where(
        _clients.c.id == bindparam("seen_client"),
        _clients.c.otp_consecutive_failures == bindparam("seen_consecutive"),
        _clients.c.otp_failures_since_success == bindparam("seen_since_success"),
        _clients.c.otp_lock_count == bindparam("seen_lock_count"),
        _clients.c.otp_locked_until.is_not_distinct_from(
            bindparam("seen_locked_until", type_=_clients.c.otp_locked_until.type)
        ),
        _clients.c.pushes_since_success == bindparam("seen_pushes"),
    )
    .with_for_update()
    .cte("unchanged")
)
_claimed_if_unchanged = _CLAIM_STEP.where(exists(select(_UNCHANGED.c.id))).cte("claimed")
_CLAIM_IF_UNCHANGED = (
    insert(AUDIT_TABLE)
    .from_select(
        list(AUDIT_FIELDS),
        select(*{**audit_binds(), "subject_id": _claimed_if_unchanged.c.id}.values()),
    )
    .returning(AUDIT_TABLE.c.subject_id)
    .add_cte(_UNCHANGED)
)
_SEEN_AT: dict[str, Any] = {"last_seen_at": bindparam("seen_at")}


def _claim_if_unchanged_and_update(values: dict[str, Any]) -> Any:
    """`_CLAIM_IF_UNCHANGED` that also sets `values` on the caller's row where the claim
    wins (one UPDATE of the row: PostgreSQL applies only one of two in a statement)."""
    return _CLAIM_IF_UNCHANGED.add_cte(
        update(_clients)
        .where(
            _clients.c.id == bindparam("seen_client"), exists(select(_claimed_if_unchanged.c.id))
        )
        .values(values)
        .cte("caller_updated")
    )


# By (reset the counters, note the caller seen).
_CLAIMS_IF_UNCHANGED = {
    (False, False): _CLAIM_IF_UNCHANGED,
    (True, False): _claim_if_unchanged_and_update(_CLEARED_COUNTERS),
    (False, True): _claim_if_unchanged_and_update(_SEEN_AT),
    (True, True): _claim_if_unchanged_and_update({**_CLEARED_COUNTERS, **_SEEN_AT}),
}

_DELETE_RECOVERY_CODES = delete(_codes).where(_codes.c.client_id == bindparam("client_id"))
_INSERT_RECOVERY_CODE = insert(_codes)

# A submitted code's keyed hash under each configured key (one, or a few during a key
# rotation), tried in one statement of a fixed number of binds; more candidates than that
# (an unusual number of old keys) take one statement per group.
HASHES_PER_STATEMENT = 4
_HASHES = ValueList("hash_", (HASHES_PER_STATEMENT,))
_USE_RECOVERY_CODE = _HASHES.statements(
    lambda in_hashes: (
        update(_codes)
        .where(_codes.c.client_id == bindparam("client_id"), in_hashes, _codes.c.used_at.is_(None))
        .values(used_at=bindparam("now"))
        .returning(_codes.c.id)
    ),
    _codes.c.code_hash,
)[HASHES_PER_STATEMENT]

_UNUSED_RECOVERY_CODES = select(func.count(_codes.c.id)).where(
    _codes.c.client_id == bindparam("client_id"), _codes.c.used_at.is_(None)
)


@dataclass(frozen=True, slots=True)
class Throttle:
    """The client's OTP/recovery-code throttling counters as stored."""

    consecutive_failures: int
    failures_since_success: int
    lock_count: int
    locked_until: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Throttle:
        return cls(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), row[3])


@dataclass(frozen=True, slots=True)
class OtpDevice:
    """What checking a code needs of an app or TOTP device: a plain row, not an entity."""

    id: str
    client_id: str
    kind: str
    totp_secret: str
    algorithm: str
    digits: int
    period: int
    last_otp_step: int | None

    @property
    def secret_site(self) -> SealedAt:
        """Where `totp_secret` was sealed (`Device.secret_site` of the same row)."""
        return SealedAt(Device.__tablename__, self.id, self.client_id)


@dataclass(frozen=True, slots=True)
class VerifyCaller:
    """The client checking a code, its row locked: the row, its OTP counters and its OTP
    devices in pairing order."""

    client: ClientRow
    throttle: Throttle
    devices: list[OtpDevice]


class OtpRepository:
    def __init__(self, unit: DriverUnit) -> None:
        self.unit = unit

    async def lock_caller_for_verify(self, token_hash: str) -> VerifyCaller | None:
        """The client whose token hashes to `token_hash`, locked as `lock_throttle` locks
        it, with its OTP devices, in one statement; None for an unknown token."""
        return await self._caller_for_verify(_CALLER_FOR_VERIFY, token_hash)

    async def read_caller_for_verify(self, token_hash: str) -> VerifyCaller | None:
        """`lock_caller_for_verify` without the lock (for `claim_step_if_unchanged`)."""
        return await self._caller_for_verify(_CALLER_FOR_VERIFY_READ, token_hash)

    async def _caller_for_verify(
        self, statement: Select[Any], token_hash: str
    ) -> VerifyCaller | None:
        rows = (await self.unit.execute(statement, {"token_hash": token_hash})).all()
        if not rows:
            return None
        client = rows[0]  # the client's columns under their own names: a ClientRow
        devices = [
            OtpDevice(
                row.device_id,
                client.id,
                row.device_kind,
                row.totp_secret,
                row.totp_algorithm,
                row.totp_digits,
                row.totp_period,
                row.last_otp_step,
            )
            for row in rows
            if row.device_id is not None
        ]
        throttle = Throttle.from_row([getattr(client, c.name) for c in _THROTTLE_COLUMNS])
        return VerifyCaller(client, throttle, devices)

    async def lock_throttle(self, client_id: str) -> Throttle:
        """Read the counters and hold the client row until commit (FOR UPDATE on PostgreSQL;
        SQLite's write transactions are serial already). Every OTP and recovery-code check of
        one client therefore takes the client row first: one lock order, no deadlocks, and
        the lock check sees the latest failures from every process."""
        row = (await self.unit.execute(_LOCK_THROTTLE, {"client_id": client_id})).one()
        return Throttle.from_row(row)

    async def record_failure(self, client_id: str) -> Throttle:
        row = (await self.unit.execute(_RECORD_FAILURE, {"client_id": client_id})).one()
        return Throttle.from_row(row)

    async def impose_lock(self, client_id: str, until: datetime) -> Throttle:
        """Lock until `until`; the next round of attempts starts from zero after it."""
        params = {"client_id": client_id, "until": until}
        row = (await self.unit.execute(_IMPOSE_LOCK, params)).one()
        return Throttle.from_row(row)

    async def reset_after_success(self, client_id: str) -> None:
        """A successful login clears the OTP throttle and the push-fatigue counter."""
        await self.unit.execute(_RESET_AFTER_SUCCESS, {"client_id": client_id})

    async def claim_step(self, device_id: str, step: int, now: datetime) -> bool:
        """Accept a time step for a device at most once: the replay guard is this single
        conditional UPDATE, so two processes submitting one code cannot both win."""
        params = {"device_id": device_id, "step": step, "now": now}
        return (await self.unit.execute(_CLAIM_STEP, params)).first() is not None

    async def claim_step_audited(
        self,
        device_id: str,
        step: int,
        now: datetime,
        audit: dict[str, Any],
        reset_client: str | None = None,
    ) -> bool:
        """`claim_step`, and when it wins, the audit row `audit` (from `audit_row`; its
        subject is the device) and, with `reset_client`, `reset_after_success` of that
        client: one statement on PostgreSQL, each in turn elsewhere."""
        if self.unit.postgres:
            params: dict[str, Any] = {"device_id": device_id, "step": step, "now": now}
            params.update(audit_params(audit))  # its subject is the claimed device
            statement = _CLAIM_STEP_AUDITED
            if reset_client is not None:
                statement = _CLAIM_STEP_AUDITED_AND_RESET
                params["reset_client"] = reset_client
            return (await self.unit.execute(statement, params)).first() is not None
        if not await self.claim_step(device_id, step, now):
            return False
        await self.unit.execute(INSERT_AUDIT, audit)
        if reset_client is not None:
            await self.reset_after_success(reset_client)
        return True

    async def claim_step_if_unchanged(
        self,
        device_id: str,
        step: int,
        now: datetime,
        audit: dict[str, Any],
        caller: VerifyCaller,
        reset: bool,
        seen_at: datetime | None = None,
    ) -> bool:
        """PostgreSQL, as a statement of its own (`Database.unit_alone`): `claim_step_audited`
        with `reset` of the caller's counters, and with `seen_at` as its `last_seen_at`, only
        while the caller's row still holds the counters `caller` read (`_UNCHANGED`); False
        when the step was taken or the row changed meanwhile, and then nothing was written."""
        counters = caller.throttle
        params: dict[str, Any] = {
            "device_id": device_id,
            "step": step,
            "now": now,
            "seen_client": caller.client.id,
            "seen_consecutive": counters.consecutive_failures,
            "seen_since_success": counters.failures_since_success,
            "seen_lock_count": counters.lock_count,
            "seen_locked_until": counters.locked_until,
            "seen_pushes": caller.client.pushes_since_success,
        }
        params.update(audit_params(audit))  # its subject is the claimed device
        if seen_at is not None:
            params["seen_at"] = seen_at
        statement = _CLAIMS_IF_UNCHANGED[reset, seen_at is not None]
        return (await self.unit.execute(statement, params)).first() is not None

    async def replace_recovery_codes(
        self, client_id: str, code_hashes: Sequence[str], now: datetime
    ) -> None:
        """Delete the old set and insert the new one in the caller's transaction (the caller
        holds the client row, so two regenerations cannot interleave into 20 codes)."""
        await self.unit.execute(_DELETE_RECOVERY_CODES, {"client_id": client_id})
        await self.unit.execute(
            _INSERT_RECOVERY_CODE,
            [
                {"id": new_id(), "client_id": client_id, "code_hash": h, "created_at": now}
                for h in code_hashes
            ],
        )

    async def use_recovery_code(
        self, client_id: str, code_hashes: Sequence[str], now: datetime
    ) -> bool:
        """Mark an unused code used; one conditional UPDATE, so a code works exactly once.
        `code_hashes`: the code's keyed hash under each configured key (at most one row)."""
        for _size, named in _HASHES.chunks(code_hashes):
            params = {"client_id": client_id, "now": now, **named}
            if (await self.unit.execute(_USE_RECOVERY_CODE, params)).first() is not None:
                return True
        return False

    async def unused_recovery_codes(self, client_id: str) -> int:
        count = await self.unit.scalar(_UNUSED_RECOVERY_CODES, {"client_id": client_id})
        return int(count or 0)
