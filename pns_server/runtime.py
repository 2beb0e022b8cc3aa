"""What a running app shares: `AppContext` (settings and metrics, `app.state.context`) from
`create_app` on, and the `Runtime` the lifespan builds on top of it (`app.state.runtime`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pns_server import retention
from pns_server.config import Settings
from pns_server.db import Database, create_engine
from pns_server.metrics import Metrics
from pns_server.push.base import PushSender
from pns_server.push.factory import PushConfigError, PushReadiness, build_senders
from pns_server.push.webpush import WebPushSender
from pns_server.realtime import create_notifier
from pns_server.realtime.base import Notifier
from pns_server.rows import ClaimedRow
from pns_server.schema import migrate_if_behind
from pns_server.security import SecretBox, load_or_create_key_file

log = logging.getLogger("pns")


class BirthLease(Protocol):
    """Room held among the dispatcher's sends for the deliveries a transaction creates
    already leased to this process (`lease_until`): the transaction hands them over with
    `send` once it commits, or gives the room back with `release` (each at most once)."""

    @property
    def lease_until(self) -> datetime: ...

    def send(self, rows: Sequence[ClaimedRow]) -> None: ...

    def release(self) -> None: ...


class Worker(Protocol):
    """A background worker the lifespan stops before the runtime closes (the dispatcher)."""

    @property
    def running(self) -> bool: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    def lease_at_birth(self, count: int, now: datetime) -> BirthLease | None:
        """Room for `count` sends right away, or None (stopping, or no room: the
        deliveries are queued for a claim instead)."""
        ...


@dataclass(frozen=True)
class AppContext:
    """The one home of settings and metrics. It exists before the runtime: the middleware
    (metrics) and the rate limiters (settings) are wired in `create_app`, long before the
    lifespan opens the database. The runtime is built from it and reads through it, so
    there is never a second copy to drift."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class Runtime:
    """Every shared resource of a running app: database, notifier, keys, push senders."""

    context: AppContext
    db: Database
    notifier: Notifier
    box: SecretBox
    push_readiness: PushReadiness = field(default_factory=PushReadiness)
    senders: dict[str, PushSender] = field(default_factory=dict)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    dispatcher: Worker | None = None  # set by the lifespan once it has started one

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def metrics(self) -> Metrics:
        return self.context.metrics

    def sender_for(self, service: str) -> PushSender:
        return self.senders.get(service) or self.senders["log"]

    def vapid_public_key(self) -> str | None:
        sender = self.senders.get("webpush")
        inner = getattr(sender, "inner", sender)  # unwrap the readiness tracker
        return inner.public_key if isinstance(inner, WebPushSender) else None


def secret_keys(settings: Settings) -> list[str]:
    if settings.secret_key is not None:
        keys = [settings.secret_key.get_secret_value()]
    else:
        keys = [load_or_create_key_file(settings.data_dir / "secret.key")]
    # The new key encrypts; old ones still decrypt until `pns-server rotate-key` has run.
    keys += [k.get_secret_value() for k in settings.old_secret_keys]
    return keys


async def build_runtime(context: AppContext) -> Runtime:
    settings = context.settings
    if settings.is_embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    elif (path := settings.sqlite_path) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    keys = secret_keys(settings)
    box = SecretBox(keys)
    push_readiness = PushReadiness()
    try:
        senders = build_senders(settings, push_readiness)
    except PushConfigError as exc:
        log.critical("push configuration is invalid: %s", exc)
        raise
    engine = create_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        pool_timeout=settings.db_pool_timeout_seconds,
    )
    if settings.migrate_on_start:
        try:
            await migrate_if_behind(engine, settings, keys)
        except BaseException:
            await engine.dispose()
            raise
    notifier = create_notifier(settings.sqlalchemy_url, settings.listen_sqlalchemy_url)
    await notifier.start()
    db = Database(
        engine,
        notifier.publish,
        notifier.before_commit,
        notifier.notify_sql,
        waited=context.metrics.db_wait_seconds.observe,
    )
    runtime = Runtime(
        context=context,
        db=db,
        notifier=notifier,
        box=box,
        push_readiness=push_readiness,
        senders=senders,
    )
    start_operations_tasks(runtime)
    return runtime


def start_operations_tasks(runtime: Runtime) -> None:
    settings, db = runtime.settings, runtime.db
    runtime.tasks.append(
        asyncio.create_task(
            retention.run_periodically(
                db, settings.retention_days, settings.retention_interval_seconds
            ),
            name="pns-retention",
        )
    )


async def close_runtime(runtime: Runtime) -> None:
    await runtime.notifier.close()
    for task in runtime.tasks:
        task.cancel()
    for task in runtime.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    for sender in runtime.senders.values():
        with contextlib.suppress(Exception):
            await sender.close()
    await runtime.db.dispose()
