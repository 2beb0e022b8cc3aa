"""Abuse limits: fixed-window counters in the `rate_limits` table.

Each hit is one atomic upsert (`INSERT ... ON CONFLICT DO UPDATE ... RETURNING count`), so
every replica sharing the database counts against the same window. The counter lives in
its own short transaction: a limit check never holds a connection while a long-poll waits.

Route owners attach the ready-made per-IP dependencies: `dependencies=[RegisterLimit]`,
`[PairingLimit]`, `[AdminLimit]`. Per-caller limits count only callers whose token is valid
(`count_caller`, from the authentication dependencies), so a stream of made-up tokens
neither writes rows nor crowds out real callers.

The per-caller API limit guards load, not a secret, so it is counted in process memory
(`LocalWindows`): a database round trip on every call would cost more than it protects, and
with N replicas a caller gets at most N times the limit. So is the per-client limit on
approval requests (the push-fatigue guard that matters, pushes without a successful sign-in,
is counted in the database with each push). Limits that guard secrets (registration,
pairing tokens, admin token, OTP attempts) stay in the database."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Depends, Request
from sqlalchemy import case
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from pns_server.config import Settings
from pns_server.db import Database
from pns_server.errors import RateLimited
from pns_server.models import RateLimitBucket


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    limit: int
    window_seconds: int


@dataclass(frozen=True, slots=True)
class Hit:
    count: int
    limit: int
    retry_after: int

    @property
    def allowed(self) -> bool:
        return self.count <= self.limit


def window_start(now: datetime, window_seconds: int) -> datetime:
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % window_seconds, UTC)


async def count_hit(session: AsyncSession, key: str, window: datetime) -> int:
    """Add one hit to `key` in `window` (a new window restarts at 1); returns the count."""
    is_postgres = session.get_bind().dialect.name == "postgresql"
    insert = postgresql.insert if is_postgres else sqlite.insert
    table = RateLimitBucket.__table__
    values = insert(RateLimitBucket).values(key=key, window_start=window, count=1)
    upsert = values.on_conflict_do_update(
        index_elements=[table.c.key],
        set_={
            # Both expressions read the row as it was before this UPDATE.
            "count": case(
                (table.c.window_start == values.excluded.window_start, table.c.count + 1),
                else_=1,
            ),
            "window_start": values.excluded.window_start,
        },
    ).returning(table.c.count)
    return int((await session.execute(upsert)).scalar_one())


async def hit(db: Database, limit: Limit, subject: str, now: datetime | None = None) -> Hit:
    async with db.session() as session:
        return await hit_in(session, limit, subject, now)


async def hit_in(
    session: AsyncSession, limit: Limit, subject: str, now: datetime | None = None
) -> Hit:
    """Count a hit in the caller's transaction (one that commits even if the limit is hit)."""
    now = now or datetime.now(UTC)
    start = window_start(now, limit.window_seconds)
    count = await count_hit(session, f"{limit.name}:{subject}", start)
    window_end = start + timedelta(seconds=limit.window_seconds)
    retry_after = max(1, math.ceil((window_end - now).total_seconds()))
    return Hit(count=count, limit=limit.limit, retry_after=retry_after)


async def enforce(db: Database, limit: Limit, subject: str) -> None:
    raise_if_exceeded(limit, await hit(db, limit, subject))


class LocalWindows:
    """Fixed-window counters in this process's memory, pruned as windows pass."""

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}  # key -> (window start epoch, count)

    def hit(self, limit: Limit, subject: str, now: float) -> Hit:
        start = int(now) - int(now) % limit.window_seconds
        key = f"{limit.name}:{subject}"
        window, count = self._counts.get(key, (start, 0))
        count = count + 1 if window == start else 1
        if len(self._counts) >= self.MAX_KEYS:
            self._prune(start)
        self._counts[key] = (start, count)
        retry_after = max(1, math.ceil(start + limit.window_seconds - now))
        return Hit(count=count, limit=limit.limit, retry_after=retry_after)

    def _prune(self, current_window: int) -> None:
        self._counts = {k: v for k, v in self._counts.items() if v[0] >= current_window}
        if len(self._counts) >= self.MAX_KEYS:
            self._counts.clear()  # a flood of distinct keys: forget rather than grow


def raise_if_exceeded(limit: Limit, result: Hit) -> None:
    if not result.allowed:
        raise RateLimited(
            f"Too many requests ({limit.limit} per {limit.window_seconds} s); "
            f"retry in {result.retry_after} s.",
            headers={"Retry-After": str(result.retry_after)},
            retry_after=result.retry_after,
        )


def register_limit(settings: Settings) -> Limit:
    return Limit("register", settings.rate_register_per_hour, 3600)


def pairing_limit(settings: Settings) -> Limit:
    return Limit("pairing", settings.rate_pairing_per_minute, 60)


def caller_limit(settings: Settings) -> Limit:
    return Limit("caller", settings.rate_client_per_minute, 60)


def admin_limit(settings: Settings) -> Limit:
    return Limit("admin", settings.rate_admin_per_minute, 60)


def client_ip(request: Request) -> str:
    # The app's proxy-headers middleware already replaced this with the X-Forwarded-For
    # address when, and only when, the peer is in PNS_FORWARDED_ALLOW_IPS.
    return request.client.host if request.client else "unknown"


def _runtime_parts(request: Request) -> tuple[Database, Settings]:
    return request.app.state.runtime.db, request.app.state.context.settings


async def limit_registration_per_ip(request: Request) -> None:
    db, settings = _runtime_parts(request)
    await enforce(db, register_limit(settings), client_ip(request))


async def limit_pairing_per_ip(request: Request) -> None:
    db, settings = _runtime_parts(request)
    await enforce(db, pairing_limit(settings), client_ip(request))


def count_caller(request: Request, subject: str) -> None:
    """The per-caller API limit, in process memory; called by the authentication
    dependencies once a token is known to be valid, so made-up tokens count toward nothing."""
    settings: Settings = request.app.state.context.settings
    windows: LocalWindows = request.app.state.local_limits
    limit = caller_limit(settings)
    raise_if_exceeded(limit, windows.hit(limit, subject, time.time()))


def approval_limit(settings: Settings) -> Limit:
    return Limit("approvals", settings.approval_rate_per_minute, 60)


def count_approval(request: Request, client_id: str) -> None:
    """The per-client limit on approval requests, in process memory like the API limit: it
    guards load and the owner's patience, not a secret, and the durable guard against push
    fatigue (PNS_MAX_PUSHES_WITHOUT_SUCCESS) is counted in the database with each push."""
    settings: Settings = request.app.state.context.settings
    windows: LocalWindows = request.app.state.local_limits
    limit = approval_limit(settings)
    raise_if_exceeded(limit, windows.hit(limit, client_id, time.time()))


async def limit_admin_per_ip(request: Request) -> None:
    """Every admin call, right or wrong token, counts: this is what slows a token search."""
    db, settings = _runtime_parts(request)
    await enforce(db, admin_limit(settings), client_ip(request))


RegisterLimit = Depends(limit_registration_per_ip)
PairingLimit = Depends(limit_pairing_per_ip)
AdminLimit = Depends(limit_admin_per_ip)
