"""Shared pieces of the HTTP schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer, StringConstraints

from pns_server.errors import format_time

Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str)]

# Text that is signed or hashed by someone else (a login's context, a device's signed answer,
# a key and its proof) is kept byte for byte: stripping it would break the signature.
Verbatim = StringConstraints(strip_whitespace=False)


class RequestModel(BaseModel):
    """Request bodies: strict types (no "12" for 12), unknown fields ignored so newer
    clients keep working against older servers."""

    model_config = ConfigDict(strict=True, extra="ignore", str_strip_whitespace=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)
