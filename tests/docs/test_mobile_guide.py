"""The push payload printed in docs/mobile.md is the one the APNs sender builds."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from pns_server.push.apns import build_payload
from pns_server.push.base import PushMessage

GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "mobile.md").read_text()


def documented_apns_payload() -> dict[str, object]:
    section = GUIDE[GUIDE.index("**APNs**") : GUIDE.index("**FCM**")]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None
    payload: dict[str, object] = json.loads(block.group(1))
    return payload


def test_apns_payload_matches_the_sender() -> None:
    documented = documented_apns_payload()
    alert = documented["aps"]["alert"]  # type: ignore[index]
    message = PushMessage(
        approval_id=str(documented["approval_id"]),
        device_id="d",
        service="apns",
        token="00" * 32,
        environment="production",
        title=alert["title"],
        body=alert["body"],
        expires_at=datetime(2026, 11, 30, 9, 13, tzinfo=UTC),
        data={"approval_id": str(documented["approval_id"]), "type": "approval"},
    )
    built = build_payload(message)
    assert built is not None
    assert json.loads(built) == documented
