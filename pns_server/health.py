"""Service endpoints: liveness, readiness, metrics, ping."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from pns_server import __version__
from pns_server.deps import RuntimeDep
from pns_server.errors import format_time
from pns_server.schema import SCHEMA_HEAD, current_revision

log = logging.getLogger(__name__)
router = APIRouter(tags=["service"])


class Health(BaseModel):
    status: str


class Ping(BaseModel):
    time: str
    version: str


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    ready = True
    try:
        # In the database's turn: on SQLite a connection opened beside the units' own can
        # meet them on the file's lock (setting WAL on a database not yet migrated).
        async with asyncio.timeout(5), runtime.db.turn():
            async with runtime.db.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            current = await current_revision(runtime.db.engine)
        head = SCHEMA_HEAD
        checks["database"] = "ok"
        checks["schema"] = {"current": current, "head": head}
        if current != head:
            ready = False
            checks["schema"]["error"] = "run `pns-server migrate`"
    except Exception as exc:
        ready = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["push"] = runtime.push_readiness()
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    if not ready:
        body.update(
            type="https://pns.dev/problems/unavailable",
            title="Not ready",
            code="unavailable",
            detail="The database is unreachable or its schema is not at the latest migration.",
        )
    return JSONResponse(
        body,
        status_code=200 if ready else 503,
        media_type="application/json" if ready else "application/problem+json",
    )


@router.get("/metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    # The database-backed gauges are counted per scrape: always current, and no work at all
    # between scrapes.
    try:
        async with asyncio.timeout(2):
            await runtime.metrics.refresh_from_database(runtime.db)
    except Exception as exc:
        log.warning("metrics: database gauges not refreshed (%s)", type(exc).__name__)
    rendered = runtime.metrics.render()
    return Response(rendered, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/ping", response_model=Ping)
async def ping() -> Ping:
    return Ping(time=format_time(datetime.now(UTC)), version=__version__)
