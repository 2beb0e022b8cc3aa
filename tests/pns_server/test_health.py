from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from pns_server import __version__
from pns_server.app import create_app
from tests.conftest import make_settings


async def test_healthz(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ping_reports_server_time_and_version(http: httpx.AsyncClient) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    body = (await http.get("/v1/ping")).json()
    server_time = datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
    assert body["time"].endswith("Z")
    assert before <= server_time.replace(microsecond=0) <= datetime.now(UTC)
    assert body["version"] == __version__


async def test_readyz_ok_at_head(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    schema = response.json()["checks"]["schema"]
    assert schema["current"] == schema["head"] is not None


@pytest.mark.postgres_only
@pytest.mark.parametrize("settings_overrides", [{"db_pool_size": 1}])
async def test_readyz_answers_while_every_request_connection_is_taken(
    app, http: httpx.AsyncClient
) -> None:
    """A relay busy with every connection its requests may hold is still ready: the
    readiness check has a connection of its own beside them, so a load balancer does not
    take a busy relay out."""
    db = app.state.runtime.db
    async with contextlib.AsyncExitStack() as held:
        for _ in range(2):  # twice the pool size
            await held.enter_async_context(db.unit())
        assert db.connection_stats().in_use == 2
        async with asyncio.timeout(4):
            response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"


async def test_readyz_503_when_schema_missing(tmp_path: Path) -> None:
    """A database nobody migrated is reachable but not ready: the operator must migrate."""
    settings = make_settings(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "unavailable"
    assert body["checks"]["schema"]["current"] is None


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("PUT", "/v1/clients", 405, "method_not_allowed"),
    ],
)
async def test_framework_errors_are_problem_json(
    http: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    response = await http.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


async def test_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    body = b'{"name": "' + b"x" * 70_000 + b'", "edition": "pro"}'
    response = await http.post(
        "/v1/clients", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "settings_overrides", [{"db_pool_size": 1, "db_pool_timeout_seconds": 0.2}]
)
async def test_an_exhausted_pool_is_503_with_retry_after(app, http: httpx.AsyncClient) -> None:
    client = await http.post("/v1/clients", json={"name": "a", "edition": "pro"})
    token = client.json()["client_token"]
    db = app.state.runtime.db
    async with contextlib.AsyncExitStack() as held:
        if db.dialect == "postgresql":
            # Every connection the relay holds (up to twice the pool size), as a burst of
            # units would.
            for _ in range(2):
                await held.enter_async_context(db.unit())
        else:
            # SQLite's units take turns on one connection: a unit that does not end.
            await held.enter_async_context(db.unit())
        response = await http.get("/v1/client", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    # Once the connection is back, the same request works.
    again = await http.get("/v1/client", headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 200
