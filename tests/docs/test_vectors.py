"""docs/test-vectors.json, checked against the code that judges real phones: it cannot drift."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pns_server.approvals.service import signed_message
from pns_server.security import parse_public_key, verify_signature
from pns_server.totp import TotpParams, code_at_step, matching_step, time_step

DOCS = Path(__file__).resolve().parents[2] / "docs"
VECTORS: dict[str, Any] = json.loads((DOCS / "test-vectors.json").read_text())
KEY = VECTORS["p256_key"]
SIGNATURES = VECTORS["approval_signatures"]
TOTP = VECTORS["totp"]


def private_key() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(KEY["private_key_pkcs8_pem"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def public_der() -> bytes:
    return base64.b64decode(KEY["public_key_spki_der_base64"], validate=True)


class TestKey:
    def test_public_key_is_the_private_keys_and_the_server_accepts_it(self) -> None:
        derived = (
            private_key()
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert derived == public_der()
        assert parse_public_key(KEY["public_key_spki_der_base64"]) == derived

    def test_private_scalar_matches_the_pem(self) -> None:
        assert private_key().private_numbers().private_value == int(KEY["private_scalar_hex"], 16)

    def test_spki_is_the_fixed_prefix_plus_the_x963_point(self) -> None:
        point = bytes.fromhex(KEY["public_key_x963_hex"])
        assert len(point) == 65 and point[0] == 4
        assert bytes.fromhex(KEY["spki_der_prefix_hex"]) + point == public_der()


@pytest.mark.parametrize("vector", SIGNATURES, ids=[v["decision"] for v in SIGNATURES])
class TestApprovalSignatures:
    def test_message_is_what_the_server_builds(self, vector: dict[str, Any]) -> None:
        built = signed_message(
            vector["approval_id"], vector["decision"], vector["match_code"], vector["timestamp"]
        )
        assert built == vector["message_utf8"]
        assert hashlib.sha256(built.encode()).hexdigest() == vector["message_sha256_hex"]

    def test_server_verifies_the_signature(self, vector: dict[str, Any]) -> None:
        message = vector["message_utf8"].encode("utf-8")
        assert verify_signature(public_der(), message, vector["signature_der_base64"])

    def test_cryptography_verifies_the_signature(self, vector: dict[str, Any]) -> None:
        signature = base64.b64decode(vector["signature_der_base64"])
        # Raises InvalidSignature on a mismatch.
        private_key().public_key().verify(
            signature, vector["message_utf8"].encode(), ec.ECDSA(hashes.SHA256())
        )


def test_tampered_message_fails_verification() -> None:
    tampered = VECTORS["tampered"]
    assert tampered["message_utf8"] != SIGNATURES[0]["message_utf8"]
    assert tampered["signature_der_base64"] == SIGNATURES[0]["signature_der_base64"]
    assert not verify_signature(
        public_der(), tampered["message_utf8"].encode(), tampered["signature_der_base64"]
    )


def test_fresh_signatures_differ_but_verify() -> None:
    """ECDSA is randomised: a phone's signature will not equal the vector, and need not."""
    message = SIGNATURES[0]["message_utf8"].encode()
    fresh = [
        base64.b64encode(private_key().sign(message, ec.ECDSA(hashes.SHA256()))).decode()
        for _ in range(2)
    ]
    assert fresh[0] != fresh[1]
    assert all(verify_signature(public_der(), message, sig) for sig in fresh)


def test_rfc6979_signature_is_reproduced_and_verifies() -> None:
    vector = VECTORS["rfc6979_deterministic"]
    message = vector["message_utf8"].encode()
    algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    reproduced = base64.b64encode(private_key().sign(message, algorithm)).decode()
    assert reproduced == vector["signature_der_base64"]
    assert verify_signature(public_der(), message, reproduced)


@pytest.mark.parametrize("entry", TOTP["codes"], ids=[str(c["unix_time"]) for c in TOTP["codes"]])
def test_totp_codes_match_the_server(entry: dict[str, Any]) -> None:
    params = TotpParams(
        secret=TOTP["secret_base32"],
        algorithm=TOTP["algorithm"],
        digits=TOTP["digits"],
        period=TOTP["period"],
    )
    at = datetime.fromtimestamp(entry["unix_time"], UTC)
    assert at.strftime("%Y-%m-%dT%H:%M:%SZ") == entry["utc"]
    assert time_step(params, at) == entry["time_step"]
    assert code_at_step(params, entry["time_step"]) == entry["code"]
    assert matching_step(params, entry["code"], at) == entry["time_step"]


def test_mobile_guide_quotes_the_vectors() -> None:
    guide = (DOCS / "mobile.md").read_text()
    assert KEY["public_key_spki_der_base64"] in guide
    assert SIGNATURES[0]["message_utf8"] in guide
    assert "pns-approval-v1|<approval_id>|<decision>|<match_code or empty>|<timestamp>" in guide
