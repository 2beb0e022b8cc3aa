"""Hostile input: each attack gets the right 4xx and leaves the database exactly as it was."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select, update

from pns_server.models import Base, Pairing
from tests.pns_server.approvals.helpers import LOGIN, runtime_of, signed_answer
from tests.support.factories import (
    new_key,
    pair_app_device,
    pairing_token_from,
    public_key_b64,
    register_client,
)

# Request counters move with every call by design; everything else must stay put.
VOLATILE_TABLES = {"rate_limits"}


async def snapshot(app: FastAPI) -> dict[str, list[tuple[Any, ...]]]:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with runtime_of(app).db.session() as session:
        for table in Base.metadata.sorted_tables:
            if table.name in VOLATILE_TABLES:
                continue
            result = await session.execute(select(table))
            rows[table.name] = sorted((tuple(map(repr, row)) for row in result), key=repr)
    return rows


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    if code is not None:
        assert response.json()["code"] == code, response.text


async def test_hostile_requests_are_refused_and_change_nothing(
    http: httpx.AsyncClient, app: FastAPI
) -> None:
    ann = await register_client(http, "ANN")
    bob = await register_client(http, "BOB")
    ann_phone = await pair_app_device(http, ann, push=None)
    bob_phone = await pair_app_device(http, bob, push=None)

    decided = (await http.post("/v1/approvals", json=LOGIN, headers=ann.headers)).json()
    old_answer = signed_answer(ann_phone, decided["approval_id"], "approve", decided["match_code"])
    approve = await http.post(
        f"/v1/device/approvals/{decided['approval_id']}/response",
        json=old_answer,
        headers=ann_phone.headers,
    )
    assert approve.json()["status"] == "approved"
    pending = (await http.post("/v1/approvals", json=LOGIN, headers=ann.headers)).json()
    respond = f"/v1/device/approvals/{pending['approval_id']}/response"

    started = await http.post("/v1/pairings", json={"kind": "app"}, headers=ann.headers)
    expired_token = pairing_token_from(started.json()["qr_payload"])
    async with runtime_of(app).db.session() as session:
        await session.execute(
            update(Pairing)
            .where(Pairing.id == started.json()["pairing_id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )

    before = await snapshot(app)
    json_headers = {**ann.headers, "content-type": "application/json"}

    oversized = b'{"username": "' + b"a" * 200_000 + b'"}'
    assert_problem(await http.post("/v1/approvals", content=oversized, headers=json_headers), 413)

    deep = b"[" * 10_000 + b"]" * 10_000
    assert_problem(
        await http.post("/v1/approvals", content=deep, headers=json_headers), 422, "invalid_request"
    )
    deep_object = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    assert_problem(await http.post("/v1/clients", content=deep_object, headers=json_headers), 422)

    bad_utf8 = b'{"username": "\xff\xfe\xc3\x28", "hostname": "x"}'
    assert_problem(
        await http.post("/v1/approvals", content=bad_utf8, headers=json_headers),
        422,
        "invalid_request",
    )

    for huge in (10**100, -(10**100), 1e308, "1" * 5000):
        assert_problem(
            await http.post(
                "/v1/approvals", json={**LOGIN, "ttl_seconds": huge}, headers=ann.headers
            ),
            422,
            "invalid_request",
        )
    assert_problem(
        await http.get(
            f"/v1/approvals/{pending['approval_id']}?wait=1" + "0" * 400, headers=ann.headers
        ),
        422,
    )

    # The answer that decided the first approval, replayed on it and moved to the pending one.
    assert_problem(
        await http.post(
            f"/v1/device/approvals/{decided['approval_id']}/response",
            json=old_answer,
            headers=ann_phone.headers,
        ),
        409,
        "already_decided",
    )
    assert_problem(
        await http.post(respond, json=old_answer, headers=ann_phone.headers),
        401,
        "signature_invalid",
    )

    # A signature by another device's key (Bob's phone), presented with Ann's phone token.
    forged = signed_answer(bob_phone, pending["approval_id"], "approve", pending["match_code"])
    assert_problem(
        await http.post(respond, json=forged, headers=ann_phone.headers), 401, "signature_invalid"
    )
    # Bob's phone answering Ann's approval with its own valid signature.
    assert_problem(await http.post(respond, json=forged, headers=bob_phone.headers), 404)

    # Bob's client token on Ann's objects.
    assert_problem(
        await http.get(f"/v1/approvals/{pending['approval_id']}", headers=bob.headers), 404
    )
    assert_problem(
        await http.delete(f"/v1/approvals/{pending['approval_id']}", headers=bob.headers), 404
    )
    assert_problem(
        await http.delete(f"/v1/devices/{ann_phone.device_id}", headers=bob.headers), 404
    )
    assert_problem(
        await http.get(f"/v1/pairings/{started.json()['pairing_id']}", headers=bob.headers), 404
    )
    # A phone token is not a client token, and a client token is not a phone token.
    assert_problem(await http.get("/v1/client", headers=ann_phone.headers), 401, "unauthenticated")
    assert_problem(await http.get("/v1/device/approvals", headers=ann.headers), 401)

    key = new_key()
    phone_body = {
        "pairing_token": expired_token,
        "name": "Late phone",
        "platform": "ios",
        "os_version": "17.2",
        "app_version": "4.3.0",
        "public_key": public_key_b64(key),
    }
    assert_problem(await http.post("/v1/devices", json=phone_body), 410, "pairing_expired")

    after = await snapshot(app)
    assert after == before
    state = await http.get(f"/v1/approvals/{pending['approval_id']}", headers=ann.headers)
    assert state.json()["status"] == "pending"
