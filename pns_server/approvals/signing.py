"""What a device signs, and the check that its answer's signature verifies.

Two versions: v2 binds the answer to the client's nonce and the login context; v1
(no nonce) is kept for clients that predate it. The documented test vectors
(docs/) are built from these functions."""

from __future__ import annotations

import hashlib
import json

from pns_server.approvals.schemas import (
    SIGNATURE_V1,
    SIGNATURE_V2,
    DeviceDecision,
)
from pns_server.errors import (
    SignatureInvalid,
)
from pns_server.rows import ApprovalRow, DeviceRow
from pns_server.security import verify_signature


def signed_message(approval_id: str, decision: str, match_code: str | None, timestamp: str) -> str:
    return f"{SIGNATURE_V1}|{approval_id}|{decision}|{match_code or ''}|{timestamp}"


def context_sha256(
    username: str | None,
    hostname: str | None,
    ip: str | None,
    action: str | None,
    message: str | None,
) -> str:
    """Lowercase hex SHA-256 of the login context as canonical JSON (sorted keys, no spaces,
    no ASCII escaping, null for absent): what a v2 signature binds the answer to."""
    canonical = json.dumps(
        {
            "action": action,
            "hostname": hostname,
            "ip": ip,
            "message": message,
            "username": username,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def signed_message_v2(
    approval: ApprovalRow, decision: str, match_code: str | None, timestamp: str
) -> str:
    assert approval.client_nonce is not None
    context = context_sha256(
        approval.username, approval.hostname, approval.ip, approval.action, approval.message
    )
    return (
        f"{SIGNATURE_V2}|{approval.id}|{decision}|{match_code or ''}|{timestamp}|"
        f"{approval.client_nonce}|{context}"
    )


def signature_version(approval: ApprovalRow) -> str:
    return SIGNATURE_V2 if approval.client_nonce is not None else SIGNATURE_V1


def check_signature(device: DeviceRow, approval: ApprovalRow, answer: DeviceDecision) -> None:
    """v2 (nonce and context) for approvals whose client sent a nonce, v1 otherwise: a v1
    signature never answers an approval that asked for v2."""
    if approval.client_nonce is not None:
        message = signed_message_v2(approval, answer.decision, answer.match_code, answer.timestamp)
        shape = (
            "'pns-approval-v2|<approval_id>|<decision>|<match_code or empty>|<timestamp>|"
            "<client_nonce>|<context_sha256>'"
        )
    else:
        message = signed_message(approval.id, answer.decision, answer.match_code, answer.timestamp)
        shape = "'pns-approval-v1|<approval_id>|<decision>|<match_code or empty>|<timestamp>'"
    if device.public_key is None or not verify_signature(
        device.public_key, message.encode("utf-8"), answer.signature
    ):
        raise SignatureInvalid(
            f"The signature does not verify with this device's registered key; sign {shape}.",
            version=signature_version(approval),
        )
