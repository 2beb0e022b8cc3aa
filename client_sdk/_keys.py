"""Device keys: the pinned public keys of paired devices, key proofs, approval signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "KeyStore",
    "PinsNotPersistedWarning",
    "approval_message",
    "approval_message_v2",
    "context_sha256",
    "key_proof",
    "sign_approval",
    "verify_approval_signature",
    "verify_key_proof",
]

logger = logging.getLogger("client_sdk")

SIGNATURE_CONTEXT = "pns-approval-v1"
SIGNATURE_CONTEXT_V2 = "pns-approval-v2"
PAIRING_CONTEXT = "pns-pair-v1"
PAIRING_SECRET_BYTES = 32
CONTEXT_FIELDS = ("action", "hostname", "ip", "message", "username")


def b64url(raw: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; ValueError for anything else."""
    if "=" in text or not text.isascii():
        raise ValueError("not base64url without padding")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if b64url(raw) != text:  # characters outside the alphabet, or non-zero spare bits
        raise ValueError("not canonical base64url")
    return raw


def key_proof(secret: bytes, public_key: str) -> str:
    """base64url(HMAC-SHA256(secret, "pns-pair-v1|" + public_key)), no padding: what the phone
    sends at pairing to show the key came from whoever scanned this client's QR code."""
    mac = hmac.new(secret, f"{PAIRING_CONTEXT}|{public_key}".encode(), hashlib.sha256)
    return b64url(mac.digest())


def verify_key_proof(secret: bytes, public_key: str, proof: str) -> bool:
    return hmac.compare_digest(key_proof(secret, public_key).encode(), proof.encode())


def context_sha256(context: Mapping[str, object]) -> str:
    """Lowercase hex SHA-256 of the login context (action, hostname, ip, message, username)
    as JSON with sorted keys, no spaces, no ASCII escaping, null for absent fields."""
    fields = {name: context.get(name) for name in CONTEXT_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def approval_message(
    approval_id: str, decision: str, match_code: str | None, timestamp: str
) -> bytes:
    """The exact bytes a device signs to answer an approval without a client nonce (v1)."""
    return "|".join((SIGNATURE_CONTEXT, approval_id, decision, match_code or "", timestamp)).encode(
        "utf-8"
    )


def approval_message_v2(
    approval_id: str,
    decision: str,
    match_code: str | None,
    timestamp: str,
    client_nonce: str,
    context_hash: str,
) -> bytes:
    """The exact bytes a device signs to answer an approval that carries a client nonce:
    `pns-approval-v2|id|decision|match_code or empty|timestamp|client_nonce|context_sha256`."""
    parts = (
        SIGNATURE_CONTEXT_V2,
        approval_id,
        decision,
        match_code or "",
        timestamp,
        client_nonce,
        context_hash,
    )
    return "|".join(parts).encode("utf-8")


def signed_message(
    approval_id: str,
    decision: str,
    match_code: str | None,
    timestamp: str,
    client_nonce: str | None,
    context_hash: str | None,
) -> bytes:
    if client_nonce is None:
        return approval_message(approval_id, decision, match_code, timestamp)
    if context_hash is None:
        raise ValueError("a v2 signature needs the context hash")
    return approval_message_v2(
        approval_id, decision, match_code, timestamp, client_nonce, context_hash
    )


def sign_approval(
    key: ec.EllipticCurvePrivateKey,
    approval_id: str,
    decision: str,
    match_code: str | None,
    timestamp: str,
    client_nonce: str | None = None,
    context_hash: str | None = None,
) -> str:
    """Base64 DER ECDSA-P256-SHA256 signature: v2 when a client nonce is given, else v1."""
    message = signed_message(
        approval_id, decision, match_code, timestamp, client_nonce, context_hash
    )
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def public_key_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def decode_public_key(value: str) -> ec.EllipticCurvePublicKey | None:
    """A base64 DER SubjectPublicKeyInfo P-256 key, or None if it is anything else."""
    try:
        key = serialization.load_der_public_key(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        return None
    return key


def same_public_key(a: str, b: str) -> bool:
    """Compare by the decoded key, not the text: base64 padding/line breaks may differ."""
    key_a, key_b = decode_public_key(a), decode_public_key(b)
    if key_a is None or key_b is None:
        return False
    return key_a.public_numbers() == key_b.public_numbers()


def verify_approval_signature(
    public_key: str,
    signature: str,
    approval_id: str,
    decision: str,
    match_code: str | None,
    timestamp: str,
    client_nonce: str | None = None,
    context_hash: str | None = None,
) -> bool:
    """True when `signature` is the key's signature over the v2 message (given a client
    nonce and context hash) or the v1 message (given neither)."""
    key = decode_public_key(public_key)
    if key is None:
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        message = signed_message(
            approval_id, decision, match_code, timestamp, client_nonce, context_hash
        )
        key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


class PinsNotPersistedWarning(UserWarning):
    """A `KeyStore` without a path pinned a key: the pin is lost when the process exits."""


_warned_in_memory = threading.Event()


def _warn_in_memory_once() -> None:
    if _warned_in_memory.is_set():
        return
    _warned_in_memory.set()
    text = (
        "device keys are pinned in memory only and will be lost when this process exits; "
        "give KeyStore a path (KeyStore('pns-keys.json')) so approvals keep verifying"
    )
    logger.warning("pns: %s", text)
    warnings.warn(text, PinsNotPersistedWarning, stacklevel=4)


class KeyStore:
    """The public keys of paired devices, and the secrets of pairings still under way.

    The SDK pins a key only when a pairing it started completes and the phone's key proof
    verifies with that pairing's secret; nothing the relay lists is ever pinned. A pin is
    never overwritten: a key that changes for the same device is exactly what pinning
    exists to catch.

    In memory by default (it warns once, at the first pin, that pins die with the process);
    give a `path` to keep pins and pending pairings across restarts (a JSON file written
    atomically, mode 0600: it holds pairing secrets until their pairing completes).

        keys = KeyStore("/var/lib/backup/pns-keys.json")
        client = PnsClient(url, token=token, key_store=keys)
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._keys: dict[str, str] = {}
        self._pairings: dict[str, tuple[str, str]] = {}  # id -> (secret b64url, expires_at)
        self._lock = threading.Lock()
        if self._path is not None and self._path.exists():
            self._keys, self._pairings = self._load(self._path)

    @property
    def path(self) -> Path | None:
        """Where the pins are kept, or None for memory only."""
        return self._path

    @staticmethod
    def _load(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return {}, {}
        keys = data.get("devices", {})
        keys = keys if isinstance(keys, dict) else {}
        pairings: dict[str, tuple[str, str]] = {}
        raw = data.get("pairings", {})
        for pairing_id, item in (raw if isinstance(raw, dict) else {}).items():
            if isinstance(item, dict) and isinstance(item.get("secret"), str):
                pairings[str(pairing_id)] = (item["secret"], str(item.get("expires_at", "")))
        return {str(k): str(v) for k, v in keys.items() if isinstance(v, str)}, pairings

    def get(self, device_id: str) -> str | None:
        """The pinned key of `device_id` (base64 DER), or None if it was never pinned.

        Example::

            store.get(device.device_id)
        """
        with self._lock:
            return self._keys.get(device_id)

    def pin(self, device_id: str, public_key: str) -> bool:
        """Remember `public_key` for `device_id` unless one is pinned already.

        The SDK calls this only after a key proof verified; call it yourself only with a key
        you checked out of band (never with one the relay reports). Returns True when the
        stored pin now equals `public_key`; False means another key is pinned for this
        device: treat it as tampering.

        Example::

            if not store.pin(device_id, key_checked_on_the_phone_screen):
                raise RuntimeError("device key changed")
        """
        with self._lock:
            current = self._keys.get(device_id)
            if current is not None:
                return same_public_key(current, public_key)
            self._keys[device_id] = public_key
            self._save()
        if self._path is None:
            _warn_in_memory_once()
        return True

    def forget(self, device_id: str) -> None:
        """Drop a pin, e.g. after the device was removed and may pair again.

        Example::

            store.forget(device_id)
        """
        self._drop(self._keys, device_id)

    def remember_pairing(self, pairing_id: str, secret: bytes, expires_at: datetime) -> None:
        """Keep the QR secret of a pairing this client started until it completes.

        Example::

            store.remember_pairing(pairing.pairing_id, secret, pairing.expires_at)
        """
        with self._lock:
            self._pairings[pairing_id] = (b64url(secret), expires_at.astimezone(UTC).isoformat())
            self._save()

    def pairing_secret(self, pairing_id: str) -> bytes | None:
        """The QR secret of a pairing this client started, or None if it never did (or the
        pairing was completed or dropped since).

        Example::

            secret = store.pairing_secret(pairing_id)
        """
        with self._lock:
            item = self._pairings.get(pairing_id)
        if item is None:
            return None
        try:
            return b64url_decode(item[0])
        except ValueError:
            return None

    def pending_pairings(self) -> list[str]:
        """The ids of pairings started here whose secret is still kept (not yet completed).

        Example::

            for pairing_id in store.pending_pairings():
                print("waiting for", pairing_id)
        """
        with self._lock:
            self._drop_expired_pairings()
            return list(self._pairings)

    def forget_pairing(self, pairing_id: str) -> None:
        """Drop a pairing's secret (done for you when the pairing completes or expires).

        Example::

            store.forget_pairing(pairing_id)
        """
        self._drop(self._pairings, pairing_id)

    def _drop(self, table: dict[str, Any], key: str) -> None:
        with self._lock:
            if table.pop(key, None) is not None:
                self._save()

    def as_dict(self) -> Mapping[str, str]:
        """A copy of every pin, device id to base64 DER public key.

        Example::

            for device_id, key in store.as_dict().items():
                print(device_id, key[:16])
        """
        with self._lock:
            return dict(self._keys)

    def __contains__(self, device_id: object) -> bool:
        with self._lock:
            return device_id in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    def _drop_expired_pairings(self) -> None:
        now = datetime.now(UTC)
        for pairing_id, (_, expires_at) in list(self._pairings.items()):
            try:
                expired = datetime.fromisoformat(expires_at) < now
            except ValueError:
                expired = True
            if expired:
                del self._pairings[pairing_id]

    def _save(self) -> None:
        self._drop_expired_pairings()
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        pairings = {
            pairing_id: {"secret": secret, "expires_at": expires_at}
            for pairing_id, (secret, expires_at) in self._pairings.items()
        }
        payload = json.dumps(
            {"version": 1, "devices": self._keys, "pairings": pairings}, indent=2, sort_keys=True
        )
        fd, tmp = tempfile.mkstemp(prefix=".pns-keys-", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
