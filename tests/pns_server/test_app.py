"""The app serves every route of the HTTP contract (API.md), visible in `app.routes`."""

from __future__ import annotations

import re

from fastapi.routing import APIRoute

from pns_server.app import create_app

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


def test_client_and_device_routes_carry_the_per_token_limit_and_problem_docs() -> None:
    for route in create_app().routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/v1/"):
            continue
        names = {d.dependency.__name__ for d in route.dependencies if d.dependency}
        if route.path.startswith("/v1/admin"):
            assert "admin_api_enabled" in names, route.path
        elif route.path != "/v1/ping":
            assert "limit_per_caller" in names, route.path
        if route.path != "/v1/ping":
            assert {"4XX", 503} <= set(route.responses), route.path
