"""docs/api.md is the API reference: whatever the relay serves must be in it.

Each test reads the app itself (its OpenAPI document, its error classes, its source) and
names what docs/api.md is missing, so adding an endpoint, a field or an error code without
documenting it fails here. docs/openapi.json must be what the code generates today
(`make openapi` rewrites it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pns_server import errors
from pns_server.app import create_app
from pns_server.config import Settings
from pns_server.docs_page import openapi_json

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "api.md"
OPENAPI = ROOT / "docs" / "openapi.json"
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    app = create_app(Settings(database_url="", public_url="http://x"))
    return app.openapi()


@pytest.fixture(scope="module")
def reference() -> str:
    return REFERENCE.read_text(encoding="utf-8")


def _placeholders(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_openapi_json_is_current() -> None:
    generated = openapi_json(create_app(Settings(database_url="", public_url="http://x")))
    committed = OPENAPI.read_text(encoding="utf-8") if OPENAPI.exists() else ""
    assert committed == generated, "docs/openapi.json is stale: run `make openapi`"


def test_every_route_is_in_the_reference(schema: dict[str, Any], reference: str) -> None:
    documented = _placeholders(reference)
    missing = []
    for path, item in schema["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            # `GET /v1/approvals/{approval_id}` (any placeholder name), then not more path.
            wanted = re.escape(f"{method.upper()} {_placeholders(path)}") + r"(?![\w/{}-])"
            if not re.search(wanted, documented):
                missing.append(f"{method.upper()} {path}")
    assert missing == [], "add these routes to docs/api.md"


def _field_names(schema: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for definition in schema.get("components", {}).get("schemas", {}).values():
        names.update(definition.get("properties", {}))
    for item in schema["paths"].values():
        for method in METHODS:
            for parameter in item.get(method, {}).get("parameters", []):
                names.add(parameter["name"])
    return names


def test_every_request_and_response_field_is_in_the_reference(
    schema: dict[str, Any], reference: str
) -> None:
    names = _field_names(schema)
    assert {"approval_id", "match_code", "Idempotency-Key", "wait"} <= names  # the check works
    missing = sorted(n for n in names if not re.search(rf"[`\"]{re.escape(n)}[`\"]", reference))
    assert missing == [], 'add these fields (as `name` or "name") to docs/api.md'


def _error_classes() -> list[type[errors.PnsError]]:
    found: list[type[errors.PnsError]] = []
    pending = [errors.PnsError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ == errors.__name__]


def _error_table(reference: str) -> dict[str, str]:
    section = reference[reference.index("## Error codes") :]
    section = section[: section.find("\n## ", 1)]
    return dict(re.findall(r"^\| `([a-z_]+)` \| ([0-9]{3}|4xx) \|", section, re.M))


def test_every_error_code_is_in_the_table_with_its_status(reference: str) -> None:
    table = _error_table(reference)
    codes = {cls.code: str(cls.status) for cls in _error_classes()}
    assert len(codes) >= 30  # the enumeration found the error family
    codes["bad_request"] = "4xx"  # the base: any other framework refusal, status as given
    missing = {code: status for code, status in codes.items() if table.get(code) != status}
    assert missing == {}, "add these codes with these statuses to the Error codes table"
    assert set(table) - set(codes) == set(), "the table lists codes the relay does not have"


def test_no_code_is_made_up_outside_the_error_classes(reference: str) -> None:
    """A problem built by hand (e.g. /readyz) must use a documented code too."""
    table = _error_table(reference)
    literal = re.compile(r"""(?:\bcode=|["']code["']:\s*)["']([a-z_]+)["']""")
    found: dict[str, str] = {}
    for source in (ROOT / "pns_server").rglob("*.py"):
        for code in literal.findall(source.read_text(encoding="utf-8")):
            found[code] = source.relative_to(ROOT).as_posix()
    assert "unavailable" in found  # /readyz builds its problem by hand
    undocumented = {code: where for code, where in found.items() if code not in table}
    assert undocumented == {}


def test_the_reference_keeps_the_first_contract_word_for_word(reference: str) -> None:
    """Nothing agreed may be dropped: every route line and every code of version 1 stays."""
    contract = reference[reference.index("## The contract (version 1)") :]
    contract = contract[: contract.index("## Additions since the first contract")]
    for phrase in (
        "`POST /v1/device/approvals/{approval_id}/response` (device)",
        "`pns-approval-v1|<approval_id>|<decision>|<match_code or empty>|<timestamp>`",
        "`409 code=already_decided` (with its status)",
        "`PNS_MAX_PUSHES_WITHOUT_SUCCESS` (default 10)",
    ):
        assert phrase in contract


def test_the_docs_link_the_reference_inside_the_repository() -> None:
    for name in ("README.md", "docs/sdk.md", "docs/mobile.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "shared/" not in text and "API.md" not in text, name
        assert re.search(r"\]\((docs/)?api\.md(#[\w-]+)?\)", text), f"{name} does not link api.md"
