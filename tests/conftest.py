"""Fixtures shared by the whole suite.

Every database-touching test runs twice: on a real SQLite file and on a real PostgreSQL
database cloned from a migrated template in a throwaway cluster (started once per run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pns_server.app import create_app
from pns_server.config import Settings
from pns_server.migrate import upgrade_to_head
from tests.support.postgres import Cluster, postgres_available, start_cluster
from tests.support.server import LiveServer
from tests.support.tcp_proxy import TcpProxy

SECRET_KEY = "test-secret-key-0123456789abcdef"
ADMIN_TOKEN = "test-admin-token-0123456789abcdefgh"
TEMPLATE_DB = "pns_template"
T = TypeVar("T")


def in_thread(func: Callable[..., T], *args: Any) -> T:
    """Run blocking set-up that owns an event loop (alembic, asyncio.run) off the test's loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(func, *args).result()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL (initdb, pg_ctl, postgres) is required in CI")
        yield None
        return
    cluster = start_cluster()
    try:
        in_thread(asyncio.run, _create_database(cluster.database_url("postgres"), TEMPLATE_DB))
        in_thread(
            upgrade_to_head,
            "postgresql+asyncpg://" + cluster.database_url(TEMPLATE_DB).split("://")[1],
        )
        yield cluster
    finally:
        cluster.destroy()


async def _create_database(admin_url: str, name: str, template: str | None = None) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        suffix = f" TEMPLATE {template}" if template else ""
        await conn.execute(f'CREATE DATABASE "{name}"{suffix}')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "pns.db"
    in_thread(upgrade_to_head, f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "sqlite" and request.node.get_closest_marker("postgres_only"):
        pytest.skip("PostgreSQL-only test")
    return kind


@pytest.fixture
async def database_url(
    db_kind: str, tmp_path: Path, sqlite_template: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A fresh, migrated database for this test, as the plain URL an operator would write.
    A PostgreSQL one is dropped after the test: kept, the suite's databases would fill
    gigabytes of the cluster's temp dir by the end of the run."""
    if db_kind == "sqlite":
        path = tmp_path / "pns.db"
        shutil.copyfile(sqlite_template, path)
        yield f"sqlite:///{path}"
        return
    cluster: Cluster | None = request.getfixturevalue("pg_cluster")
    if cluster is None:
        pytest.skip("PostgreSQL is not installed here (CI requires it)")
    name = "t_" + uuid.uuid4().hex[:16]
    admin_url = cluster.database_url("postgres")
    await _create_database(admin_url, name, template=TEMPLATE_DB)
    yield cluster.database_url(name)
    await _drop_database(admin_url, name)


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of this test's PostgreSQL database, which can go silent
    (`TcpProxy.black_hole`) or close: point a connection at `proxy.url_for(database_url)`."""
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    tcp = await TcpProxy(parts.hostname, parts.port).start()
    yield tcp
    await tcp.close()


async def _drop_database(admin_url: str, name: str) -> None:
    """Best effort: a test that stopped the cluster, or a server still connected that
    FORCE cannot end, leaves its database to the cluster's removal at the end."""
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=10)
        finally:
            await conn.close()


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "secret_key": SECRET_KEY,
        "admin_token": ADMIN_TOKEN,
        "public_url": "https://pns.example.test",
        "migrate_on_start": False,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or with indirect parametrisation) to change settings."""
    return {}


@pytest.fixture
def settings(database_url: str, tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
    return make_settings(database_url, tmp_path, **settings_overrides)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the app in-process (ASGI), lifespan running."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pns.test") as client:
        yield client


def server_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        "PNS_DATABASE_URL": database_url,
        "PNS_DATA_DIR": str(data_dir),
        "PNS_SECRET_KEY": SECRET_KEY,
        "PNS_ADMIN_TOKEN": ADMIN_TOKEN,
        "PNS_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


@pytest.fixture
def live_server(database_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    """A real `pns-server serve` process on a free port, on this test's database."""
    server = LiveServer(server_env(database_url, tmp_path), tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
