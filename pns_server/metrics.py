"""Prometheus metrics on a per-app registry (several apps can live in one test process)."""

from __future__ import annotations

import logging
import platform
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy import func, select

from pns_server import __version__
from pns_server.db import Database
from pns_server.models import Delivery, Device
from pns_server.states import OPEN_DELIVERY

log = logging.getLogger(__name__)
# Request durations include long-polls, which are held up to 60 s: buckets reach that far.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# From a turn's hand-over under load (a millisecond) to PNS_DB_POOL_TIMEOUT_SECONDS.
DB_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The `_created` timestamp series double every counter and histogram (and would name one
# `pns_approvals_created_created`); rate() needs none of them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, open files), python_info, python_gc_*: the usual collectors,
        # on this app's registry rather than the process-global one.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("pns_build", "The running relay", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.http_requests = Counter(
            "pns_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "pns_http_request_seconds",
            "HTTP request duration (long-polls included)",
            ["method", "route"],
            registry=r,
            buckets=HTTP_BUCKETS,
        )
        self.otp_verifications = Counter(
            "pns_otp_verifications_total", "OTP and recovery-code checks", ["result"], registry=r
        )
        self.approvals_created = Counter(
            "pns_approvals_created_total", "Push approvals created", registry=r
        )
        self.approvals_decided = Counter(
            "pns_approvals_decided_total",
            "Approvals reaching a final state",
            ["status"],
            registry=r,
        )
        self.approval_decision_seconds = Histogram(
            "pns_approval_decision_seconds",
            "From creation to decision",
            registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        )
        self.push_sends = Counter(
            "pns_push_sends_total", "Push sends", ["service", "outcome"], registry=r
        )
        self.push_send_seconds = Histogram(
            "pns_push_send_seconds", "Push send duration", ["service"], registry=r
        )
        self.outbox_pending = Gauge("pns_outbox_pending", "Deliveries not yet sent", registry=r)
        self.longpoll_waiters = Gauge(
            "pns_longpoll_waiters", "Long-polls waiting right now", registry=r
        )
        self.devices = Gauge("pns_devices", "Active devices", ["kind", "push"], registry=r)
        self.db_connections = Gauge(
            "pns_db_connections",
            "This process's database connections, in use or idle",
            ["state"],
            registry=r,
        )
        self.db_waiting = Gauge(
            "pns_db_waiting",
            "Requests waiting for a database connection (PostgreSQL) or their turn (SQLite)",
            registry=r,
        )
        self.db_wait_seconds = Histogram(
            "pns_db_wait_seconds",
            "How long the requests that had to wait for a database connection (or turn) waited",
            registry=r,
            buckets=DB_WAIT_BUCKETS,
        )
        self.gc_pause_seconds = Histogram(
            "pns_gc_pause_seconds",
            "Garbage collections, by generation: every request in the process waits for one",
            ["generation"],
            registry=r,
            buckets=GC_BUCKETS,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def refresh_from_database(self, db: Database) -> None:
        """The database-backed gauges: two cheap COUNT queries. The connection gauges
        first: they need no connection, so they are current even when none is free."""
        stats = db.connection_stats()
        self.db_connections.labels("in_use").set(stats.in_use)
        self.db_connections.labels("idle").set(stats.idle)
        self.db_waiting.set(stats.waiting)
        push = func.coalesce(Device.push_service, "none")
        async with db.session() as session:
            device_rows = (
                await session.execute(
                    select(Device.kind, push, func.count()).group_by(Device.kind, push)
                )
            ).all()
            pending = await session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.status.in_(OPEN_DELIVERY))
            )
        # clear() first: a label set whose last device is gone must read 0, not its old value.
        self.devices.clear()
        for kind, service, count in device_rows:
            self.devices.labels(kind, service).set(count)
        self.outbox_pending.set(pending or 0)


class GcPauses:
    """A `gc.callbacks` entry timing each collection into `pns_gc_pause_seconds`. While one
    runs the event loop stands still; a full collection walks every object the process
    holds, so with thousands of long-polls waiting it takes a large part of a second: this
    is the series that explains such a latency spike."""

    def __init__(self, histogram: Histogram) -> None:
        self._by_generation = [histogram.labels(str(g)) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)
