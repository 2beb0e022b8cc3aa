"""Recovery codes: format, normalisation and hashing (pure functions, no I/O)."""

from __future__ import annotations

import hashlib
import secrets

# Lowercase letters and digits without the look-alikes 0/o and 1/l: 32 symbols, 5 bits each.
ALPHABET = "23456789abcdefghijkmnpqrstuvwxyz"
GROUPS = (4, 4, 2)
LENGTH = sum(GROUPS)  # 10 symbols = 50 bits per code
COUNT = 10

# Stored: HMAC(pepper from PNS_SECRET_KEY, client id | scrypt(code, salt = client id)).
# The pepper means write access to the database is not enough to plant a code, and a leaked
# database cannot be searched offline without the key. scrypt (memory-hard) stays inside
# because 50 bits is within reach of a search against a fast hash if the key leaks too; it
# is what release 1 stored, so the upgrade migration can pepper existing codes. The client
# id in both means a hash copied to another client's rows does not verify. Deterministic,
# so a submitted code is found with one indexed lookup instead of one slow hash per code.
_SCRYPT_N = 2**12
_SCRYPT_R = 8
_SCRYPT_P = 1


def generate() -> str:
    """One code, grouped for reading aloud: `xxxx-xxxx-xx`."""
    return group("".join(secrets.choice(ALPHABET) for _ in range(LENGTH)))


def generate_set(count: int = COUNT) -> list[str]:
    codes: list[str] = []
    while len(codes) < count:
        code = generate()
        if code not in codes:
            codes.append(code)
    return codes


def group(raw: str) -> str:
    parts, start = [], 0
    for size in GROUPS:
        parts.append(raw[start : start + size])
        start += size
    return "-".join(parts)


def normalise(typed: str) -> str | None:
    """What the user typed -> the canonical `xxxx-xxxx-xx`, or None if it cannot be a code.

    Accepts upper case, spaces anywhere and missing (or extra) dashes."""
    raw = "".join(ch for ch in typed.lower() if not ch.isspace() and ch != "-")
    if len(raw) != LENGTH or any(ch not in ALPHABET for ch in raw):
        return None
    return group(raw)


def hash_code(client_id: str, code: str) -> str:
    """Hex scrypt of a canonical code, bound to its client (64 hex characters): the inner
    hash, peppered by `pepper_input` + `SecretBox.keyed_hash` before it is stored."""
    digest = hashlib.scrypt(
        code.encode(),
        salt=b"pns-recovery-v1|" + client_id.encode(),
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=32,
    )
    return digest.hex()


def pepper_input(client_id: str, inner_hash: str) -> bytes:
    """What the keyed hash covers: the client and the inner scrypt hash."""
    return f"pns-recovery-v2|{client_id}|{inner_hash}".encode()
