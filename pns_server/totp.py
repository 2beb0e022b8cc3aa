"""RFC 6238 time-based one-time passwords (what Google/Microsoft/LastPass Authenticator do)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlencode

import pyotp

DIGESTS: dict[str, Callable[..., hashlib._Hash]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}


@dataclass(frozen=True, slots=True)
class TotpParams:
    secret: str  # base32
    algorithm: str = "SHA1"
    digits: int = 6
    period: int = 30

    def totp(self) -> pyotp.TOTP:
        return pyotp.TOTP(
            self.secret, digits=self.digits, digest=DIGESTS[self.algorithm], interval=self.period
        )


def new_secret() -> str:
    """160 random bits in base32, the size RFC 4226 recommends for SHA1."""
    return pyotp.random_base32(length=32)


def time_step(params: TotpParams, at: datetime) -> int:
    return int(at.timestamp()) // params.period


def code_at_step(params: TotpParams, step: int) -> str:
    return str(params.totp().generate_otp(step))


def could_be_code(code: str, digits: int) -> bool:
    """Whether `code` has the shape of a `digits`-digit code: a cheap test that spares
    opening a secret for input that cannot match."""
    # isdigit() alone admits non-ASCII digits, which compare_digest refuses with a TypeError.
    return len(code) == digits and code.isascii() and code.isdigit()


def matching_step(params: TotpParams, code: str, at: datetime, window: int = 1) -> int | None:
    """The time step (within ±window of `at`) whose code equals `code`, else None.

    Compares in constant time and checks every candidate, so timing does not reveal which
    step matched."""
    if not could_be_code(code, params.digits):
        return None
    totp = params.totp()  # one generator for every candidate step
    now = time_step(params, at)
    found: int | None = None
    for step in range(now - window, now + window + 1):
        if hmac.compare_digest(totp.generate_otp(step), code) and found is None:
            found = step
    return found


def otpauth_uri(params: TotpParams, issuer: str, label: str) -> str:
    """Google Authenticator Key Uri Format: otpauth://totp/Issuer:label?secret=...&issuer=...

    Apps split the label at its first colon, so a colon inside the issuer would move the
    split: it is dropped. A colon in the account label stays, percent-encoded, after the
    split point. Spaces are %20 (not "+"), and the secret goes without base32 padding,
    as the format asks."""
    issuer = " ".join(issuer.replace(":", " ").split())
    query = urlencode(
        {
            "secret": params.secret.rstrip("="),
            "issuer": issuer,
            "algorithm": params.algorithm,
            "digits": params.digits,
            "period": params.period,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{quote(issuer, safe='')}:{quote(label, safe='')}?{query}"
