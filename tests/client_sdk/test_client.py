"""`PnsClient` over a scripted relay: login branches a real relay cannot be made to take on
demand (a push provider failing), and a wait's timeout."""

from __future__ import annotations

from typing import Any

import httpx

from tests.client_sdk.mock_relay import client_for


def pending_approval(delivery: dict[str, Any]) -> dict[str, Any]:
    return {
        "approval_id": "appr1",
        "status": "pending",
        "reason": None,
        "created_at": "2026-11-30T09:12:00Z",
        "expires_at": "2026-11-30T09:13:00Z",
        "decided_at": None,
        "device_id": None,
        "response": None,
        "delivery": delivery,
    }


class TestLoginRules:
    """Branches a real relay cannot be made to take on demand (a push provider failing)."""

    def test_failed_delivery_cancels_and_falls_back_to_the_code(self) -> None:
        seen: list[str] = []
        states = iter(
            [
                pending_approval({"queued": 1, "sent": 0, "failed": 0, "last_error": None}),
                pending_approval({"queued": 0, "sent": 0, "failed": 1, "last_error": "410"}),
            ]
        )

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(f"{request.method} {request.url.path}")
            if request.method == "POST" and request.url.path == "/v1/approvals":
                return httpx.Response(
                    201,
                    json={
                        "approval_id": "appr1",
                        "status": "pending",
                        "expires_at": "2026-11-30T09:13:00Z",
                        "match_code": "417",
                        "devices_notified": 1,
                    },
                )
            if request.method == "GET":
                return httpx.Response(200, json=next(states))
            if request.method == "DELETE":
                cancelled = pending_approval({"queued": 0, "sent": 0, "failed": 1})
                return httpx.Response(200, json={**cancelled, "status": "cancelled"})
            return httpx.Response(200, json={"result": "accepted", "device_id": "dev1"})

        progress: list[Any] = []
        with client_for(handler) as client:
            result = client.login(
                username="admin", ask_code=lambda _p: "123 456", on_progress=progress.append
            )
        assert (result.success, result.method, result.fallback_reason) == (
            True,
            "otp",
            "delivery_failed",
        )
        assert [p.delivery.failed for p in progress] == [0, 1]
        assert seen == [
            "POST /v1/approvals",
            "GET /v1/approvals/appr1",
            "GET /v1/approvals/appr1",
            "DELETE /v1/approvals/appr1",
            "POST /v1/otp/verify",
        ]

    def test_wait_for_approval_returns_pending_state_at_its_timeout(self) -> None:
        waits: list[str] = []

        def handler(request: httpx.Request) -> httpx.Response:
            waits.append(request.url.params["wait"])
            return httpx.Response(200, json=pending_approval({"queued": 0, "sent": 1, "failed": 0}))

        with client_for(handler) as client:
            approval = client.wait_for_approval("appr1", timeout=0)
        assert approval.status == "pending" and not approval.is_final
        assert waits == ["0"]
