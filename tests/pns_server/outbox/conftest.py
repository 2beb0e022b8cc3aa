from __future__ import annotations

import httpx
import pytest

from tests.support.factories import PairedDevice, RegisteredClient, pair_app_device, register_client


@pytest.fixture
async def client(http: httpx.AsyncClient) -> RegisteredClient:
    return await register_client(http, name="FILESRV01")


@pytest.fixture
async def phone(http: httpx.AsyncClient, client: RegisteredClient) -> PairedDevice:
    return await pair_app_device(http, client)
