"""The application factory: routers, error handlers, and a lifespan that builds the runtime."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from pns_server import __version__
from pns_server.admin.router import router as admin_router
from pns_server.approvals.expiry import sweep_periodically
from pns_server.approvals.router import router as approvals_router
from pns_server.clients.router import router as clients_router
from pns_server.config import Settings
from pns_server.devices.router import router as devices_router
from pns_server.docs_page import install_docs_page
from pns_server.health import router as health_router
from pns_server.metrics import GcPauses, Metrics
from pns_server.middleware import BodyLimitMiddleware, RefuseControlCharacters
from pns_server.observability import AnswerUnexpected, RequestObserver
from pns_server.otp.router import router as otp_router
from pns_server.outbox.dispatcher import start_dispatcher
from pns_server.pairings.router import router as pairings_router
from pns_server.problems import install_error_handlers
from pns_server.ratelimit import LocalWindows
from pns_server.realtime.longpoll import LongPollParking
from pns_server.runtime import AppContext, build_runtime, close_runtime
from pns_server.webapp import router as webapp

log = logging.getLogger("pns")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    context: AppContext = app.state.context
    settings = context.settings
    webapp.warn_if_not_https(settings)
    runtime = await build_runtime(context)
    app.state.runtime = runtime
    gc_pauses = GcPauses(context.metrics.gc_pause_seconds)
    gc.callbacks.append(gc_pauses)
    dispatcher = start_dispatcher(runtime)
    runtime.tasks.append(
        asyncio.create_task(sweep_periodically(runtime.db, runtime.metrics), name="pns-expiry")
    )
    try:
        yield
    finally:
        gc.callbacks.remove(gc_pauses)
        # Let pushes already in flight finish before the connections go away.
        await dispatcher.stop(timeout=min(5.0, settings.shutdown_timeout))
        await close_runtime(runtime)


class RelayApp(FastAPI):
    """FastAPI with the request's edge outside it: the proxy-headers rewrite, the request
    observer and the long-poll parking run before FastAPI's own layers (its error,
    telemetry and body-limit middleware, the application objects), not inside them.

    A parked long-poll holds only the frames outside the parking, so ten thousand waits
    hold four frames each rather than eight, and the framework's layers take no part in
    their answers. Everything else (routes, state, error handlers, lifespan, the OpenAPI
    document) is FastAPI's, and tests drive this object as they would FastAPI."""

    def __init__(self, edge: Callable[[ASGIApp], ASGIApp], **options: Any) -> None:
        super().__init__(**options)
        self.edge = edge(super().__call__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.edge(scope, receive, send)


def request_edge(settings: Settings, metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """The layers outside the framework, outermost first. The access log, the metrics and
    the per-IP limits see the caller's address, taken from X-Forwarded-For only when the
    peer is a trusted proxy; the observer logs, counts and gives its request id to a
    parked long-poll's answer too."""

    def wrap(framework: ASGIApp) -> ASGIApp:
        parking = LongPollParking(framework)
        observer = RequestObserver(parking, metrics=metrics)
        # uvicorn types its ASGI callables more narrowly than Starlette; they are the same.
        proxied = ProxyHeadersMiddleware(cast(Any, observer), settings.forwarded_allow_ips)
        return cast(ASGIApp, proxied)

    return wrap


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    context = AppContext(settings)
    app = RelayApp(
        request_edge(settings, context.metrics),
        title="PNS relay",
        version=__version__,
        description="Push approvals and one-time passwords for backup-client logins.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: /docs is our own page instead,
        # so it works on an air-gapped site (the schema stays at /openapi.json).
        docs_url=None,
        redoc_url=None,
        # The relay reports through its own /metrics and logs. FastAPI's OpenTelemetry hooks
        # would otherwise look the OpenTelemetry providers up in os.environ on every request
        # (several per cent of a request's CPU) to learn that none is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.context = context
    app.state.local_limits = LocalWindows()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RefuseControlCharacters)
    # Added last = outermost inside the framework (the edge is outside it, see RelayApp).
    app.add_middleware(AnswerUnexpected)
    for router in (
        health_router,
        clients_router,
        pairings_router,
        devices_router,
        approvals_router,
        otp_router,
        admin_router,
    ):
        # Flat on the app, not include_router: recent FastAPI keeps included routers as
        # opaque entries, and operators' tools (and our contract test) read `app.routes`.
        # Each router carries its own dependencies and documented error responses.
        app.router.routes.extend(router.routes)
    install_docs_page(app)
    webapp.install(app, settings)
    return app
