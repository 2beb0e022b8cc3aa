"""Tokens, hashing, secret encryption at rest, ECDSA verification, constant-time compares."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CLIENT_TOKEN_PREFIX = "pnsc_"
DEVICE_TOKEN_PREFIX = "pnsd_"
PAIRING_TOKEN_PREFIX = "pnsp_"


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


class SecretBox:
    """AES-256-GCM for secrets at rest. Ciphertexts name their key so keys can rotate:
    `v1.<key id>.<base64(nonce|ciphertext)>`; the first key encrypts, all decrypt."""

    def __init__(self, secret_keys: Sequence[str]) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        self._keys = [(self._key_id(k), AESGCM(self._derive(k))) for k in secret_keys]

    @staticmethod
    def _derive(secret: str) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pns-secretbox-v1")
        return hkdf.derive(secret.encode())

    @staticmethod
    def _key_id(secret: str) -> str:
        return hashlib.sha256(b"pns-key-id|" + secret.encode()).hexdigest()[:8]

    @property
    def primary_key_id(self) -> str:
        return self._keys[0][0]

    def encrypt(self, plaintext: str) -> str:
        key_id, aead = self._keys[0]
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, plaintext.encode(), key_id.encode())
        return f"v1.{key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str) -> str:
        version, key_id, blob = token.split(".", 2)
        if version != "v1":
            raise ValueError("unknown secret format")
        raw = base64.urlsafe_b64decode(blob)
        for candidate_id, aead in self._keys:
            if candidate_id == key_id:
                try:
                    return aead.decrypt(raw[:12], raw[12:], key_id.encode()).decode()
                except InvalidTag as exc:
                    raise ValueError("secret does not decrypt with its key") from exc
        raise ValueError(f"no configured key has id {key_id}")

    def key_id_of(self, token: str) -> str:
        return token.split(".", 2)[1]


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
