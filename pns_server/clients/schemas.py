from __future__ import annotations

from pydantic import Field

from pns_server.schemas import RequestModel, ResponseModel, Timestamp


class ClientCreate(RequestModel):
    name: str = Field(min_length=1, max_length=200)
    edition: str = Field(min_length=1, max_length=50)
    hostname: str | None = Field(default=None, max_length=255)
    registration_key: str | None = Field(default=None, max_length=500)


class ClientCreated(ResponseModel):
    client_id: str
    client_token: str
    edition: str


class ClientInfo(ResponseModel):
    client_id: str
    name: str
    edition: str
    hostname: str | None
    created_at: Timestamp
    devices: int
    push_devices: int
    locked_until: Timestamp | None
