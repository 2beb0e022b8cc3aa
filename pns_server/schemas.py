"""Shared pieces of the HTTP schemas."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pns_server.errors import format_time

Timestamp = Annotated[datetime, PlainSerializer(format_time, return_type=str)]

# Text that is signed or hashed by someone else (a login's context, a device's signed answer,
# a key and its proof) is kept byte for byte: stripping it would break the signature.
Verbatim = StringConstraints(strip_whitespace=False)

# C0 and C1 control characters (NUL, CR, LF, ESC...), DEL, and lone UTF-16 surrogates
# (which JSON can spell but UTF-8 cannot store). No text field of the API needs them; they
# forge log lines and terminal output, and PostgreSQL refuses NUL in text outright.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def has_control_character(value: str) -> bool:
    return CONTROL_CHARACTERS.search(value) is not None


class RequestModel(BaseModel):
    """Request bodies: strict types (no "12" for 12), unknown fields ignored so newer
    clients keep working against older servers."""

    model_config = ConfigDict(strict=True, extra="ignore", str_strip_whitespace=True)

    # Fields whose value may span lines (a base64 key wrapped at 76 columns, as Android's
    # Base64.DEFAULT writes it): CR, LF and TAB pass there; every other control does not.
    multiline_fields: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        """Every text field of every request body, nested ones included: one rule, so the
        same body is refused alike on SQLite and PostgreSQL (422, not a database error)."""
        if not isinstance(value, str):
            return value
        if info.field_name in cls.multiline_fields:
            value_to_check = value.replace("\r", "").replace("\n", "").replace("\t", "")
        else:
            value_to_check = value
        if has_control_character(value_to_check):
            raise PydanticCustomError(
                "control_character", "must not contain control characters (NUL, CR, LF...)"
            )
        return value


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)
