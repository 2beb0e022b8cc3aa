"""The app serves every route of the HTTP contract (docs/api.md), visible in `app.routes`,
and follows the operations conventions (proxy addresses, 500s, docs, metrics)."""

from __future__ import annotations

import inspect
import logging
import os
import platform
import re
import sys
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from pns_server import __version__
from pns_server.app import create_app
from tests.support.factories import register_client

CONTRACT = """
GET /healthz
GET /readyz
GET /metrics
GET /v1/ping
POST /v1/clients
GET /v1/client
POST /v1/pairings
POST /v1/pairings/{pairing_id}/confirm
GET /v1/pairings/{pairing_id}
GET /v1/devices
DELETE /v1/devices/{device_id}
POST /v1/devices
PUT /v1/device/push
DELETE /v1/device
GET /v1/device/approvals
GET /v1/device/approvals/{approval_id}
POST /v1/device/approvals/{approval_id}/response
POST /v1/approvals
GET /v1/approvals/{approval_id}
DELETE /v1/approvals/{approval_id}
POST /v1/otp/verify
POST /v1/recovery-codes
POST /v1/recovery-codes/verify
GET /v1/admin/clients
GET /v1/admin/clients/{client_id}
POST /v1/admin/clients/{client_id}/unlock
DELETE /v1/admin/clients/{client_id}
"""


def served(app_routes: list[object]) -> set[tuple[str, str]]:
    pairs = set()
    for route in app_routes:
        for method in getattr(route, "methods", None) or ():
            pairs.add((method, re.sub(r"\{[^}]+\}", "{}", getattr(route, "path", ""))))
    return pairs


def test_every_contract_route_is_served() -> None:
    have = served(create_app().routes)
    want = {
        (method, re.sub(r"\{[^}]+\}", "{}", path))
        for method, path in (line.split() for line in CONTRACT.strip().splitlines())
    }
    assert want - have == set()


def dependency_names(dependant: Dependant) -> set[str]:
    names = {getattr(dependant.call, "__name__", "")}
    for sub in dependant.dependencies:
        names |= dependency_names(sub)
    return names


# Each authenticates its caller and then counts it against the per-caller limit.
COUNTING_AUTH = {
    "current_client",
    "current_client_detached",
    "current_device",
    "current_device_detached",
    "unit_client",
    "unit_client_locked",
    "unit_device",
    # An OTP check authenticates in its own statements, its caller read with its devices:
    # the route itself (otp/router.py, `verifying_client` and `accepted_at_once`).
    "verify_otp",
    # An answer authenticates in its own statements, its device read with the approval:
    # the route itself (approvals/router.py, `answering_device`).
    "answer_approval",
    # So does a phone's detail, its device read with the approval and its client's name.
    "get_device_approval",
}
PER_IP = {"limit_registration_per_ip", "limit_pairing_per_ip"}
# No token and nothing behind them but the clock or one public key.
UNLIMITED = {"/v1/ping", "/v1/webpush"}


def test_every_route_is_limited_and_carries_problem_docs() -> None:
    for route in create_app().routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/v1/"):
            continue
        names = dependency_names(route.dependant)
        if route.path.startswith("/v1/admin"):
            assert {"admin_api_enabled", "limit_admin_per_ip"} <= names, route.path
        elif route.path not in UNLIMITED:
            assert names & (COUNTING_AUTH | PER_IP), route.path
        if route.path != "/v1/ping":
            assert {"4XX", 503} <= set(route.responses), route.path


def dependency_calls(dependant: Dependant) -> list[object]:
    calls: list[object] = [] if dependant.call is None else [dependant.call]
    for sub in dependant.dependencies:
        calls += dependency_calls(sub)
    return calls


def test_no_route_runs_work_in_a_worker_thread() -> None:
    """FastAPI runs a plain `def` endpoint or dependency in a worker thread: a hand-off
    that costs more CPU than a short request's own work, on every request."""
    threaded = {
        f"{route.path}: {getattr(call, '__qualname__', call)}"
        for route in create_app().routes
        if isinstance(route, APIRoute)
        for call in dependency_calls(route.dependant)
        if not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
        and not (inspect.isclass(call))  # request parameters and security schemes
    }
    assert threaded == set()


# -- operations conventions ------------------------------------------------------------


def _client_from(app: FastAPI, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://pns.test")


async def _register(http: httpx.AsyncClient, forwarded_for: str) -> int:
    response = await http.post(
        "/v1/clients",
        json={"name": "FILESRV01", "edition": "pro"},
        headers={"x-forwarded-for": forwarded_for},
    )
    return response.status_code


@pytest.mark.parametrize("settings_overrides", [{"rate_register_per_hour": 2}])
class TestForwardedAddresses:
    """The per-IP registration limit, seen by callers behind a proxy."""

    async def test_a_trusted_proxy_gives_each_caller_their_own_limit(self, app: FastAPI) -> None:
        async with _client_from(app, "127.0.0.1") as http:
            statuses = [await _register(http, f"203.0.113.{n}") for n in range(1, 5)]
            assert statuses == [201, 201, 201, 201]
            # ...and one caller is still held to the limit.
            same = [await _register(http, "198.51.100.7, 127.0.0.1") for _ in range(3)]
        assert same[:2] == [201, 201] and same[2] == 429

    async def test_an_untrusted_peer_cannot_pick_its_address(self, app: FastAPI) -> None:
        async with _client_from(app, "192.0.2.50") as http:
            statuses = [await _register(http, f"203.0.113.{n}") for n in range(1, 4)]
        # Every forged X-Forwarded-For counts against the peer's own address.
        assert statuses == [201, 201, 429]


@pytest.mark.parametrize(
    "settings_overrides", [{"rate_register_per_hour": 2, "forwarded_allow_ips": ["10.20.0.0/16"]}]
)
async def test_the_trusted_proxies_are_configurable(app: FastAPI) -> None:
    async with _client_from(app, "10.20.3.4") as proxy:
        assert [await _register(proxy, f"203.0.113.{n}") for n in range(1, 4)] == [201] * 3
    async with _client_from(app, "127.0.0.1") as loopback:  # no longer trusted
        statuses = [await _register(loopback, f"198.51.100.{n}") for n in range(1, 4)]
    assert statuses == [201, 201, 429]


async def test_an_unexpected_error_is_a_500_problem(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/broken-for-test", broken)
    # The exception must not leave the application either: the server would log its whole
    # text (a statement's values included) as "Exception in ASGI application".
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    with caplog.at_level(logging.ERROR, logger="pns_server.problems"):
        async with httpx.AsyncClient(transport=transport, base_url="http://pns.test") as http:
            response = await http.get("/v1/broken-for-test")
    logged = [r for r in caplog.records if r.name == "pns_server.problems"]
    assert [r.getMessage() for r in logged] == ["unhandled error: RuntimeError"]  # once
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "internal_error" and body["status"] == 500
    assert "a bug" not in response.text  # no internals leak to the caller
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("settings_overrides", [{"public_url": "", "port": 18089}])
async def test_qr_codes_carry_the_listening_port_by_default(http: httpx.AsyncClient) -> None:
    client = await register_client(http)
    started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
    assert started.status_code == 201, started.text
    server = parse_qs(urlparse(started.json()["qr_payload"]).query)["server"][0]
    assert server == "http://127.0.0.1:18089"


async def test_docs_page_needs_no_network(http: httpx.AsyncClient) -> None:
    response = await http.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" not in page.lower()
    external = [u for u in re.findall(r'(?:src|href)="([^"]+)"', page) if "//" in u]
    assert external == []
    for path in ("/v1/approvals/{approval_id}", "/v1/otp/verify", "/v1/admin/audit"):
        assert path in page
    assert (await http.get("/redoc")).status_code == 404  # it would load a CDN script


async def test_metrics_carry_process_build_and_long_poll_buckets(http: httpx.AsyncClient) -> None:
    await http.get("/v1/ping")
    text = (await http.get("/metrics")).text
    build = f'pns_build_info{{python="{platform.python_version()}",version="{__version__}"}} 1.0'
    assert build in text
    assert "python_info{" in text and "python_gc_objects_collected_total" in text
    if sys.platform == "linux":
        assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert 'pns_http_request_seconds_bucket{le="60.0",method="GET",route="/v1/ping"}' in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert [n for n in names if n.endswith("_created")] == []


async def test_a_request_does_not_search_the_environment(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI's OpenTelemetry hooks are off: the relay has its own metrics and logs, and the
    hooks looked the providers up in os.environ on every request, to find none."""
    await http.get("/healthz")
    environ = type(os.environ)
    lookups: list[str] = []
    original = environ.__getitem__

    def counting(self: os._Environ[str], key: str) -> str:
        lookups.append(key)
        return original(self, key)

    monkeypatch.setattr(environ, "__getitem__", counting)
    for _ in range(5):
        assert (await http.get("/healthz")).status_code == 200
    monkeypatch.undo()
    assert lookups == []
