"""pns_server.totp against RFC 6238 and the Google Authenticator Key Uri Format (no database)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest

from pns_server.totp import (
    TotpParams,
    code_at_step,
    matching_step,
    new_secret,
    otpauth_uri,
    time_step,
)

SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}

# RFC 6238 Appendix B: (Unix time, algorithm, 8-digit TOTP).
RFC6238_VECTORS = [
    (59, "SHA1", "94287082"),
    (59, "SHA256", "46119246"),
    (59, "SHA512", "90693936"),
    (1111111109, "SHA1", "07081804"),
    (1111111109, "SHA256", "68084774"),
    (1111111109, "SHA512", "25091201"),
    (1111111111, "SHA1", "14050471"),
    (1111111111, "SHA256", "67062674"),
    (1111111111, "SHA512", "99943326"),
    (1234567890, "SHA1", "89005924"),
    (1234567890, "SHA256", "91819424"),
    (1234567890, "SHA512", "93441116"),
    (2000000000, "SHA1", "69279037"),
    (2000000000, "SHA256", "90698825"),
    (2000000000, "SHA512", "38618901"),
    (20000000000, "SHA1", "65353130"),
    (20000000000, "SHA256", "77737706"),
    (20000000000, "SHA512", "47863826"),
]


def rfc_params(algorithm: str) -> TotpParams:
    secret = base64.b32encode(SEEDS[algorithm]).decode()
    return TotpParams(secret=secret, algorithm=algorithm, digits=8, period=30)


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


class TestRfc6238Vectors:
    @pytest.mark.parametrize(("unix", "algorithm", "expected"), RFC6238_VECTORS)
    def test_code_at_step(self, unix: int, algorithm: str, expected: str) -> None:
        params = rfc_params(algorithm)
        assert code_at_step(params, time_step(params, at(unix))) == expected

    @pytest.mark.parametrize(("unix", "algorithm", "expected"), RFC6238_VECTORS)
    def test_matching_step_accepts_the_vector(
        self, unix: int, algorithm: str, expected: str
    ) -> None:
        params = rfc_params(algorithm)
        assert matching_step(params, expected, at(unix)) == unix // 30

    def test_unpadded_secret_gives_the_same_codes(self) -> None:
        padded = rfc_params("SHA256")
        unpadded = TotpParams(padded.secret.rstrip("="), "SHA256", 8, 30)
        assert padded.secret != unpadded.secret
        assert code_at_step(unpadded, 1) == code_at_step(padded, 1)


class TestMatchingStep:
    # A fixed secret: with a random one, a far step's code could equal a near one's (1e-6).
    params = TotpParams(secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")
    now = datetime(2026, 3, 1, 12, 0, 10, tzinfo=UTC)

    @pytest.mark.parametrize("offset", [-1, 0, 1])
    def test_adjacent_steps_match(self, offset: int) -> None:
        step = time_step(self.params, self.now) + offset
        assert matching_step(self.params, code_at_step(self.params, step), self.now) == step

    @pytest.mark.parametrize("offset", [-2, 2, 10])
    def test_steps_further_away_do_not(self, offset: int) -> None:
        step = time_step(self.params, self.now) + offset
        assert matching_step(self.params, code_at_step(self.params, step), self.now) is None

    def test_agrees_with_pyotp(self) -> None:
        assert matching_step(self.params, pyotp.TOTP(self.params.secret).at(self.now), self.now)

    @pytest.mark.parametrize(
        "code", ["", "12345", "1234567", "12345a", " 12345", "\uff11\uff12\uff13\uff14\uff15\uff16"]
    )
    def test_malformed_codes_never_match_nor_raise(self, code: str) -> None:
        assert matching_step(self.params, code, self.now) is None

    def test_period_and_digits_come_from_the_params(self) -> None:
        params = TotpParams(secret=new_secret(), algorithm="SHA256", digits=8, period=60)
        later = self.now + timedelta(seconds=45)
        code = code_at_step(params, time_step(params, self.now))
        assert len(code) == 8
        assert matching_step(params, code, later) == time_step(params, self.now)


class TestNewSecret:
    def test_is_160_bits_of_base32(self) -> None:
        secret = new_secret()
        assert len(base64.b32decode(secret)) == 20
        assert secret != new_secret()


class TestOtpauthUri:
    params = TotpParams(secret="JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP")

    def test_google_key_uri_format(self) -> None:
        uri = otpauth_uri(self.params, "PNS", "ann")
        assert uri == (
            "otpauth://totp/PNS:ann?secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
            "&issuer=PNS&algorithm=SHA1&digits=6&period=30"
        )

    def test_spaces_and_colons_are_percent_encoded(self) -> None:
        uri = otpauth_uri(self.params, "Acme Backup", "Ann's phone: work")
        parsed = urlparse(uri)
        assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
        assert parsed.path == "/Acme%20Backup:Ann%27s%20phone%3A%20work"
        assert "+" not in uri and " " not in uri
        issuer, _, account = unquote(parsed.path[1:]).partition(":")
        assert (issuer, account) == ("Acme Backup", "Ann's phone: work")
        assert parse_qs(parsed.query)["issuer"] == ["Acme Backup"]
        assert "issuer=Acme%20Backup" in parsed.query

    def test_issuer_prefix_equals_issuer_parameter_even_with_a_colon(self) -> None:
        uri = otpauth_uri(self.params, "Acme:Corp", "ann")
        parsed = urlparse(uri)
        prefix = unquote(parsed.path[1:]).split(":", 1)[0]
        assert prefix == parse_qs(parsed.query)["issuer"][0] == "Acme Corp"

    def test_parameters_round_trip_through_pyotp(self) -> None:
        params = TotpParams(secret=rfc_params("SHA512").secret, algorithm="SHA512", digits=8)
        parsed = pyotp.parse_uri(otpauth_uri(params, "PNS", "Google Authenticator"))
        assert isinstance(parsed, pyotp.TOTP)
        assert parsed.digits == 8 and parsed.interval == 30
        assert parsed.issuer == "PNS" and parsed.name == "Google Authenticator"
        assert parsed.at(at(59)) == "90693936"
        assert "=" not in parse_qs(urlparse(otpauth_uri(params, "PNS", "x")).query)["secret"][0]
