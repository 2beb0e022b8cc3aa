"""Tokens, hashing, secret encryption at rest, ECDSA verification, constant-time compares."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CLIENT_TOKEN_PREFIX = "pnsc_"
DEVICE_TOKEN_PREFIX = "pnsd_"
PAIRING_TOKEN_PREFIX = "pnsp_"
# HKDF info of the keyed-hash (pepper) key; the sealing key uses another, so they differ.
PEPPER = b"pns-pepper-v1"


def new_id() -> str:
    """An opaque 128-bit identifier."""
    return secrets.token_hex(16)


def new_token(prefix: str) -> str:
    """A 256-bit bearer token; the prefix lets secret scanners recognise leaked ones."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class SealedAt:
    """Where a sealed secret lives: its table, its row and the client owning the row.

    Sealed into the ciphertext as AEAD associated data, so a secret copied to another row,
    another client, or another table no longer opens: the database alone cannot move a
    factor from one account to another."""

    table: str
    row_id: str
    client_id: str

    def associated_data(self, key_id: str) -> bytes:
        # A JSON list, not a joined string: no choice of ids can make two places spell alike.
        fields = ["pns-seal-v2", key_id, self.table, self.row_id, self.client_id]
        return json.dumps(fields, separators=(",", ":")).encode()


class SecretBox:
    """The relay's keyring, from PNS_SECRET_KEY (and PNS_OLD_SECRET_KEYS while rotating).

    - Secrets at rest: AES-256-GCM bound to where they are stored (`SealedAt`),
      `v2.<key id>.<base64url(nonce|ciphertext)>`; the first key seals, all open.
    - Keyed hashes (a pepper): HMAC-SHA256, `h2.<key id>.<base64url(mac)>`, for values the
      relay must find again by lookup (recovery codes); without the key no valid one can be
      written into the database.

    Release 1 sealed with `v1.` and no binding; only the upgrade migration reads those."""

    def __init__(self, secret_keys: Sequence[str]) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        self._keys = [
            (self._key_id(k), AESGCM(self._derive(k, b"pns-secretbox-v1")), self._derive(k, PEPPER))
            for k in secret_keys
        ]

    @staticmethod
    def _derive(secret: str, info: bytes) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
        return hkdf.derive(secret.encode())

    @staticmethod
    def _key_id(secret: str) -> str:
        return hashlib.sha256(b"pns-key-id|" + secret.encode()).hexdigest()[:8]

    @property
    def primary_key_id(self) -> str:
        return self._keys[0][0]

    def seal(self, plaintext: str, at: SealedAt) -> str:
        key_id, aead, _pepper = self._keys[0]
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, plaintext.encode(), at.associated_data(key_id))
        return f"v2.{key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, token: str, at: SealedAt) -> str:
        """The plaintext, or ValueError when the token was not sealed for `at` by our keys."""
        version, key_id, raw = self._parse(token)
        if version != "v2":
            raise ValueError("secret is not bound to its row (run `pns-server migrate`)")
        return self._decrypt(key_id, raw, at.associated_data(key_id))

    def open_legacy(self, token: str) -> str:
        """A release-1 `v1.` secret (bound to nothing); for the upgrade migration only."""
        version, key_id, raw = self._parse(token)
        if version != "v1":
            raise ValueError("not a v1 secret")
        return self._decrypt(key_id, raw, key_id.encode())

    def seal_legacy(self, plaintext: str) -> str:
        """The release-1 format; only the downgrade migration writes it."""
        key_id, aead, _pepper = self._keys[0]
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, plaintext.encode(), key_id.encode())
        return f"v1.{key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    @staticmethod
    def _parse(token: str) -> tuple[str, str, bytes]:
        try:
            version, key_id, blob = token.split(".", 2)
            raw = base64.urlsafe_b64decode(blob)
        except (ValueError, binascii.Error) as exc:
            raise ValueError("malformed sealed secret") from exc
        if len(raw) < 12 + 16:
            raise ValueError("malformed sealed secret")
        return version, key_id, raw

    def _decrypt(self, key_id: str, raw: bytes, associated_data: bytes) -> str:
        for candidate_id, aead, _pepper in self._keys:
            if candidate_id == key_id:
                try:
                    return aead.decrypt(raw[:12], raw[12:], associated_data).decode()
                except InvalidTag as exc:
                    raise ValueError("secret does not open with its key and place") from exc
        raise ValueError(f"no configured key has id {key_id}")

    def keyed_hash(self, message: bytes) -> str:
        """HMAC-SHA256 of `message` under the primary key's pepper (55 characters)."""
        key_id, _aead, pepper = self._keys[0]
        return self._mac(key_id, pepper, message)

    def keyed_hash_candidates(self, message: bytes) -> list[str]:
        """The keyed hash under every configured key: values stored before a rotation are
        still found while their key is in PNS_OLD_SECRET_KEYS."""
        return [self._mac(key_id, pepper, message) for key_id, _aead, pepper in self._keys]

    @staticmethod
    def _mac(key_id: str, pepper: bytes, message: bytes) -> str:
        digest = hmac.new(pepper, message, hashlib.sha256).digest()
        return f"h2.{key_id}.{base64.urlsafe_b64encode(digest).decode().rstrip('=')}"


def load_or_create_key_file(path: Path) -> str:
    """The embedded default's key: generated once, kept beside the database, mode 0600."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def parse_public_key(value: str) -> bytes:
    """Base64 DER SubjectPublicKeyInfo of a P-256 key -> DER bytes; ValueError otherwise."""
    try:
        der = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("public_key is not valid base64") from exc
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise ValueError("public_key is not a DER SubjectPublicKeyInfo") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("public_key must be an ECDSA P-256 key")
    return der


def verify_signature(public_key_der: bytes, message: bytes, signature_b64: str) -> bool:
    """ECDSA P-256 / SHA-256 over `message`, DER signature in base64."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key = serialization.load_der_public_key(public_key_der)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
