"""Schemathesis over every operation of the relay's own OpenAPI schema, against a real server:
no 500, every response as the schema says, every 4xx a problem+json with a `code`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pns_server.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings, server_env
from tests.support.factories import bearer, pair_app_device, register_client
from tests.support.server import LiveServer

pytestmark = pytest.mark.slow

EXAMPLES = 15
RAISED = str(10**9)


def every_4xx_is_a_problem(ctx: CheckContext, response: Any, case: schemathesis.Case) -> bool:
    if 400 <= response.status_code < 500:
        kind = response.headers.get("content-type", [""])
        kind = kind[0] if isinstance(kind, list) else kind
        assert kind.startswith("application/problem+json"), f"{response.status_code} as {kind}"
        assert response.json().get("code"), f"{response.status_code} without a code"
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    every_4xx_is_a_problem,
]


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[LiveServer]:
    env = server_env(
        database_url,
        tmp_path,
        PNS_RATE_CLIENT_PER_MINUTE=RAISED,
        PNS_RATE_REGISTER_PER_HOUR=RAISED,
        PNS_RATE_PAIRING_PER_MINUTE=RAISED,
        PNS_APPROVAL_RATE_PER_MINUTE=RAISED,
        PNS_LOG_LEVEL="warning",
    )
    with LiveServer(env, tmp_path / "server.log") as live:
        yield live


async def callers(url: str) -> dict[str, dict[str, str]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        client = await register_client(http)
        phone = await pair_app_device(http, client, push=None)
        return {"client": client.headers, "device": phone.headers, "admin": bearer(ADMIN_TOKEN)}


def caller_for(path: str) -> str:
    if path.startswith("/v1/admin"):
        return "admin"
    if path.startswith("/v1/device/") or path == "/v1/device":
        return "device"
    return "client"


def fuzz(operation: Any, url: str, auth: dict[str, str]) -> None:
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers=auth, checks=CHECKS)

    run()


def test_every_operation_keeps_its_schema(server: LiveServer, tmp_path: Path) -> None:
    spec = create_app(make_settings("sqlite:///" + str(tmp_path / "s.db"), tmp_path)).openapi()
    schema = schemathesis.openapi.from_dict(spec)
    headers = asyncio.run(callers(server.url))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:
        try:
            fuzz(operation, server.url, headers[caller_for(operation.path)])
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:1500])
    assert not failures, "\n\n".join(failures)
