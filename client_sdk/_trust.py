"""What the SDK believes, and why: a device key is pinned only through a key proof made with
the QR secret of a pairing this client started, and an `approved` counts only when that
pinned key signed this login (pns-approval-v2 over the client's nonce and context), in time,
with the code shown. Everything else the relay says is only its word."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from client_sdk._exceptions import (
    ApprovalSignatureError,
    KeyProofError,
    KeyProofInvalid,
    KeyProofMissing,
    PairingSecretUnknown,
)
from client_sdk._keys import KeyStore, same_public_key, verify_approval_signature, verify_key_proof
from client_sdk._models import Approval, Pairing
from client_sdk._wire import parse_time

logger = logging.getLogger("client_sdk")


@dataclass(frozen=True)
class Expected:
    """What this client knows about an approval it created: the phone's signed answer must
    match all of it. Times are this machine's epoch seconds."""

    approval_id: str
    client_nonce: str
    context_hash: str
    match_code: str | None
    not_before: float
    not_after: float


def complete_pairing(key_store: KeyStore, pairing: Pairing) -> Pairing:
    """Pin a completed app pairing's device key if, and only if, its key proof verifies
    with the QR secret this client drew for that pairing."""
    if pairing.status == "expired":
        key_store.forget_pairing(pairing.pairing_id)
        return pairing
    device = pairing.device
    if pairing.status != "completed" or device is None or device.kind != "app":
        return pairing
    pinned = key_store.get(device.device_id)
    if pinned is not None and device.public_key and same_public_key(pinned, device.public_key):
        key_store.forget_pairing(pairing.pairing_id)
        return replace(pairing, pinned=True)
    secret = key_store.pairing_secret(pairing.pairing_id)
    problem = _key_problem(pairing, secret, pinned)
    if problem is not None:
        key_store.forget_pairing(pairing.pairing_id)  # completed: it cannot recover
        if isinstance(problem, KeyProofInvalid):
            logger.error("pns: the relay may be compromised: %s", problem)
        else:
            logger.warning("pns: device key not pinned: %s", problem)
        raise problem
    assert device.public_key is not None
    key_store.pin(device.device_id, device.public_key)
    key_store.forget_pairing(pairing.pairing_id)
    return replace(pairing, pinned=True)


def _key_problem(
    pairing: Pairing, secret: bytes | None, pinned: str | None
) -> KeyProofError | None:
    device = pairing.device
    assert device is not None
    ids = {"pairing_id": pairing.pairing_id, "device_id": device.device_id}
    if pinned is not None:
        return KeyProofInvalid(
            f"the relay reports another key for device {device.device_id} than the one "
            "pinned at its pairing",
            **ids,
        )
    if secret is None:
        return PairingSecretUnknown(
            f"pairing {pairing.pairing_id} completed, but this client holds no QR secret "
            "for it (it was started elsewhere, or the KeyStore lost it): start a new "
            "pairing from this client",
            **ids,
        )
    if not device.public_key:
        return KeyProofInvalid(f"app device {device.device_id} comes without a public key", **ids)
    if not device.key_proof:
        return KeyProofMissing(
            f"device {device.device_id} ({device.name!r}) sent no key proof: its app "
            "predates key proofs, so its key cannot be trusted; update the app, remove "
            "the device and pair again",
            **ids,
        )
    if not verify_key_proof(secret, device.public_key, device.key_proof):
        return KeyProofInvalid(
            f"the key reported for device {device.device_id} does not match the proof "
            "made with this pairing's QR secret: it was substituted on the way",
            **ids,
        )
    return None


def check_approval(
    key_store: KeyStore,
    expected: Expected | None,
    approval: Approval,
    approval_id: str,
    *,
    match_code: str | None = None,
) -> Approval:
    """Believe an `approved` only when this client created `approval_id`, and the
    pinned key of the answering device signed pns-approval-v2 over this client's nonce
    and login context, within the login's time window, deciding approve with the code
    that was shown. Anything else raises `ApprovalSignatureError` (and logs that the
    relay may be compromised). A rejection grants nothing: it is marked verified when
    it checks out and returned as it is otherwise."""
    if approval.approval_id != approval_id:
        raise _forged(
            approval,
            "approval_id",
            f"the relay answered with approval {approval.approval_id!r} when asked about "
            f"{approval_id!r}",
        )
    if approval.status not in ("approved", "rejected"):
        return approval
    try:
        _check_signed(key_store, approval, expected)
    except ApprovalSignatureError:
        if approval.status == "rejected":
            return approval
        raise
    if approval.status == "rejected":
        return replace(approval, verified=True)
    assert expected is not None and approval.response is not None
    _check_decision(approval, expected, match_code)
    return replace(approval, verified=True)


def _check_signed(key_store: KeyStore, approval: Approval, expected: Expected | None) -> None:
    quiet = approval.status != "approved"  # a failed rejection is no attack on the login
    response = approval.response

    def forged(check: str, why: str) -> ApprovalSignatureError:
        return _forged(approval, check, why, log=not quiet)

    if expected is None:
        raise forged(
            "unknown_approval",
            "this client did not request it (or not in this process): only an approval "
            "requested here can be checked",
        )
    if response is None:
        raise forged("response", "it carries no signed device response")
    if not approval.device_id:
        raise forged("device", "it names no device")
    pinned = key_store.get(approval.device_id)
    if pinned is None:
        raise forged(
            "device",
            f"device {approval.device_id} has no key pinned through a key proof at a "
            "pairing this client started",
        )
    if response.public_key and not same_public_key(pinned, response.public_key):
        raise forged("key", "the relay reports another key than the one pinned at pairing")
    signed = (
        pinned,
        response.signature,
        approval.approval_id,
        response.decision,
        response.match_code,
        response.timestamp,
    )
    if not verify_approval_signature(*signed, expected.client_nonce, expected.context_hash):
        why = (
            "it is a pns-approval-v1 signature where pns-approval-v2 (with this login's "
            "nonce and context) is due"
            if verify_approval_signature(*signed)
            else "its signature by the pinned key does not cover this login's nonce and "
            "context (pns-approval-v2)"
        )
        raise forged("signature", why)


def _check_decision(
    approval: Approval,
    expected: Expected,
    match_code: str | None,
) -> None:
    response = approval.response
    assert response is not None
    if response.decision != "approve":
        raise _forged(approval, "decision", f"the device answered {response.decision!r}")
    try:
        signed_at = parse_time(response.timestamp).timestamp()
    except ValueError:
        signed_at = None
    if signed_at is None or not expected.not_before <= signed_at <= expected.not_after:
        raise _forged(
            approval,
            "timestamp",
            f"it was signed at {response.timestamp!r}, outside this login's window",
        )
    typed = response.match_code or ""
    if typed != (expected.match_code or "") or (match_code is not None and typed != match_code):
        raise _forged(
            approval, "match_code", "the device typed a different match code than the one shown"
        )


def _forged(
    approval: Approval, check: str, why: str, *, log: bool = True
) -> ApprovalSignatureError:
    message = (
        f"approval {approval.approval_id} is {approval.status} but {why}; the relay or "
        "its database may be compromised"
    )
    if log:
        logger.error("pns: the relay may be compromised (%s check failed): %s", check, message)
    return ApprovalSignatureError(
        message, approval_id=approval.approval_id, device_id=approval.device_id, check=check
    )
