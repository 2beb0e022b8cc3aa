"""Fake APNs/FCM fixtures and message builders shared by the push tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pns_server.push.base import PushMessage
from tests.fakes.apns import FakeApns
from tests.fakes.fcm import FakeFcm


def push_message(
    token: str = "ab" * 32,
    *,
    service: str = "apns",
    environment: str = "production",
    body: str = "FILESRV01 asks to approve a login as admin",
    approval_id: str = "appr_0123456789abcdef",
    expires_in: float = 120,
) -> PushMessage:
    return PushMessage(
        approval_id=approval_id,
        device_id="dev_0123456789",
        service=service,
        token=token,
        environment=environment,
        title="Approve login?",
        body=body,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


@pytest.fixture
async def fake_apns() -> AsyncIterator[FakeApns]:
    async with FakeApns() as fake:
        yield fake


@pytest.fixture
def fake_fcm(tmp_path: Path) -> Iterator[FakeFcm]:
    with FakeFcm() as fake:
        yield fake
