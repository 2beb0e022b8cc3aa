"""docs/test-vectors.json, checked against the code that judges real phones: it cannot drift."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client_sdk import approval_message_v2, context_sha256, key_proof
from client_sdk._keys import verify_approval_signature, verify_key_proof
from client_sdk._wire import pairing_secret_of
from pns_server.approvals import signing as approvals
from pns_server.approvals.signing import signed_message
from pns_server.devices.schemas import DeviceCreate
from pns_server.models import Approval
from pns_server.security import parse_public_key, verify_signature
from pns_server.totp import TotpParams, code_at_step, matching_step, time_step

DOCS = Path(__file__).resolve().parents[2] / "docs"
VECTORS: dict[str, Any] = json.loads((DOCS / "test-vectors.json").read_text())
KEY = VECTORS["p256_key"]
SIGNATURES = VECTORS["approval_signatures"]
PROOF = VECTORS["key_proof"]
SIGNATURES_V2 = VECTORS["approval_signatures_v2"]["vectors"]
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


class TestKeyProof:
    def test_the_phone_reads_k_from_the_qr_fragment(self) -> None:
        secret = pairing_secret_of(PROOF["qr_payload"])
        assert secret is not None and secret.hex() == PROOF["k_hex"]
        assert PROOF["qr_payload"].endswith("#k=" + PROOF["k_base64url"])

    def test_proof_is_what_the_sdk_computes_and_accepts(self) -> None:
        secret = bytes.fromhex(PROOF["k_hex"])
        assert PROOF["message_utf8"] == "pns-pair-v1|" + PROOF["public_key"]
        assert PROOF["public_key"] == KEY["public_key_spki_der_base64"]
        raw = hmac.new(secret, PROOF["message_utf8"].encode(), hashlib.sha256).digest()
        assert raw.hex() == PROOF["hmac_sha256_hex"]
        assert key_proof(secret, PROOF["public_key"]) == PROOF["key_proof"]
        assert verify_key_proof(secret, PROOF["public_key"], PROOF["key_proof"])
        assert not verify_key_proof(bytes(32), PROOF["public_key"], PROOF["key_proof"])

    def test_the_relay_accepts_the_proof_with_that_key(self) -> None:
        body = DeviceCreate.model_validate(
            {
                "pairing_token": "pnsp_x",
                "name": "Ann's iPhone",
                "platform": "ios",
                "os_version": "17.2",
                "public_key": PROOF["public_key"],
                "key_proof": PROOF["key_proof"],
            }
        )
        assert (body.public_key, body.key_proof) == (PROOF["public_key"], PROOF["key_proof"])


def server_approval(vector: dict[str, Any]) -> Approval:
    context = vector["context"]
    return Approval(
        id=vector["approval_id"],
        client_nonce=vector["client_nonce"],
        username=context["username"],
        hostname=context["hostname"],
        ip=context["ip"],
        action=context["action"],
        message=context["message"],
    )


@pytest.mark.parametrize("vector", SIGNATURES_V2, ids=[v["decision"] for v in SIGNATURES_V2])
class TestApprovalSignaturesV2:
    def test_context_hash_on_both_sides(self, vector: dict[str, Any]) -> None:
        context = vector["context"]
        canonical = vector["context_json_utf8"]
        assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == vector["context_sha256_hex"]
        assert context_sha256(context) == vector["context_sha256_hex"]
        server = approvals.context_sha256(
            context["username"],
            context["hostname"],
            context["ip"],
            context["action"],
            context["message"],
        )
        assert server == vector["context_sha256_hex"]
        assert "\\u" not in canonical and '"message":null' in canonical

    def test_message_is_what_server_and_sdk_build(self, vector: dict[str, Any]) -> None:
        built = approvals.signed_message_v2(
            server_approval(vector), vector["decision"], vector["match_code"], vector["timestamp"]
        )
        assert built == vector["message_utf8"]
        sdk = approval_message_v2(
            vector["approval_id"],
            vector["decision"],
            vector["match_code"],
            vector["timestamp"],
            vector["client_nonce"],
            vector["context_sha256_hex"],
        )
        assert sdk == built.encode("utf-8")
        assert hashlib.sha256(sdk).hexdigest() == vector["message_sha256_hex"]

    def test_server_and_sdk_verify_and_rfc6979_reproduces(self, vector: dict[str, Any]) -> None:
        message = vector["message_utf8"].encode("utf-8")
        signature = vector["signature_der_base64"]
        assert verify_signature(public_der(), message, signature)
        assert verify_approval_signature(
            KEY["public_key_spki_der_base64"],
            signature,
            vector["approval_id"],
            vector["decision"],
            vector["match_code"],
            vector["timestamp"],
            vector["client_nonce"],
            vector["context_sha256_hex"],
        )
        algorithm = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
        assert base64.b64encode(private_key().sign(message, algorithm)).decode() == signature

    def test_the_same_signature_fails_as_v1_or_over_another_context(
        self, vector: dict[str, Any]
    ) -> None:
        signature = vector["signature_der_base64"]
        v1 = signed_message(
            vector["approval_id"], vector["decision"], vector["match_code"], vector["timestamp"]
        )
        assert not verify_signature(public_der(), v1.encode(), signature)
        other = vector["message_utf8"].replace(vector["context_sha256_hex"], "0" * 64)
        assert not verify_signature(public_der(), other.encode(), signature)


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
    assert PROOF["key_proof"] in guide and PROOF["message_utf8"] in guide
    assert SIGNATURES_V2[0]["message_utf8"] in guide
    assert SIGNATURES_V2[0]["context_json_utf8"] in guide
    assert (
        "pns-approval-v2|<approval_id>|<decision>|<match_code or empty>|<timestamp>|"
        "<client_nonce>|<context_sha256>" in guide
    )
