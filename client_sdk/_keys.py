"""Device keys: the pinned public keys of paired devices, and the approval signature."""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["KeyStore", "approval_message", "sign_approval", "verify_approval_signature"]

SIGNATURE_CONTEXT = "pns-approval-v1"


def approval_message(
    approval_id: str, decision: str, match_code: str | None, timestamp: str
) -> bytes:
    """The exact bytes a device signs to answer an approval (see API.md)."""
    return "|".join((SIGNATURE_CONTEXT, approval_id, decision, match_code or "", timestamp)).encode(
        "utf-8"
    )


def sign_approval(
    key: ec.EllipticCurvePrivateKey,
    approval_id: str,
    decision: str,
    match_code: str | None,
    timestamp: str,
) -> str:
    """Base64 DER ECDSA-P256-SHA256 signature of the approval message."""
    message = approval_message(approval_id, decision, match_code, timestamp)
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
) -> bool:
    key = decode_public_key(public_key)
    if key is None:
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(
            raw,
            approval_message(approval_id, decision, match_code, timestamp),
            ec.ECDSA(hashes.SHA256()),
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


class KeyStore:
    """The public keys of paired devices, pinned the first time the SDK sees them.

    In memory by default; give a `path` to keep the pins across restarts (a JSON file
    written atomically). A pin is never overwritten: a key that changes for the same device
    is exactly what pinning exists to catch.

        keys = KeyStore("/var/lib/backup/pns-keys.json")
        client = PnsClient(url, token=token, key_store=keys)
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()
        if self._path is not None and self._path.exists():
            self._keys = self._load(self._path)

    @staticmethod
    def _load(path: Path) -> dict[str, str]:
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = data.get("devices", {}) if isinstance(data, dict) else {}
        return {str(k): str(v) for k, v in keys.items() if isinstance(v, str)}

    def get(self, device_id: str) -> str | None:
        """The pinned key of `device_id` (base64 DER), or None if it was never seen.

        Example::

            store.get(device.device_id)
        """
        with self._lock:
            return self._keys.get(device_id)

    def pin(self, device_id: str, public_key: str) -> bool:
        """Remember `public_key` for `device_id` unless one is pinned already.

        Returns True when the stored pin now equals `public_key`; False means the relay
        now shows another key for a known device: treat it as tampering.

        Example::

            if not store.pin(device.device_id, device.public_key):
                raise RuntimeError("device key changed")
        """
        with self._lock:
            current = self._keys.get(device_id)
            if current is not None:
                return same_public_key(current, public_key)
            self._keys[device_id] = public_key
            self._save()
            return True

    def forget(self, device_id: str) -> None:
        """Drop a pin, e.g. after the device was removed and may pair again.

        Example::

            store.forget(device_id)
        """
        with self._lock:
            if self._keys.pop(device_id, None) is not None:
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

    def _save(self) -> None:
        if self._path is None:
            return
        self._path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": 1, "devices": self._keys}, indent=2, sort_keys=True)
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
