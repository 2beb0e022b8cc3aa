"""The app serves every route of the HTTP contract (API.md), visible in `app.routes`."""

from __future__ import annotations

import re

from fastapi.dependencies.models import Dependant
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


def dependency_names(dependant: Dependant) -> set[str]:
    names = {getattr(dependant.call, "__name__", "")}
    for sub in dependant.dependencies:
        names |= dependency_names(sub)
    return names


# Each authenticates its caller and then counts it against the per-caller limit.
COUNTING_AUTH = {"current_client", "current_client_detached", "current_device"}
PER_IP = {"limit_registration_per_ip", "limit_pairing_per_ip"}


def test_every_route_is_limited_and_carries_problem_docs() -> None:
    for route in create_app().routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/v1/"):
            continue
        names = dependency_names(route.dependant)
        if route.path.startswith("/v1/admin"):
            assert {"admin_api_enabled", "limit_admin_per_ip"} <= names, route.path
        elif route.path != "/v1/ping":
            assert names & (COUNTING_AUTH | PER_IP), route.path
        if route.path != "/v1/ping":
            assert {"4XX", 503} <= set(route.responses), route.path
