"""The https pairing link: the relay's `qr_link` gets the same secret as `qr_payload`, one
parser reads both forms, and a link that disagrees with the pairing code is refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from client_sdk import PnsClient, UnexpectedResponse
from client_sdk._wire import pairing_secret_of, parse_qr_payload

URL = "https://pns.example.com"
TOKEN = "pnsp_abcDEF123"
QUERY = "server=https%3A%2F%2Fpns.example.com&token=pnsp_abcDEF123"


def relay_answering(qr_link: str | None) -> PnsClient:
    def handler(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = {
            "pairing_id": "p1",
            "kind": "app",
            "status": "pending",
            "expires_at": "2030-01-01T00:00:00Z",
            "qr_payload": f"pns://pair?{QUERY}",
        }
        if qr_link is not None:
            body["qr_link"] = qr_link
        return httpx.Response(201, json=body)

    return PnsClient(URL, token="tok", transport=httpx.MockTransport(handler))


def test_the_link_carries_the_same_secret_and_is_what_to_draw() -> None:
    with relay_answering(f"{URL}/app/pair#{QUERY}") as client:
        pairing = client.start_pairing("app")
    assert pairing.qr_link is not None and pairing.qr == pairing.qr_link
    assert pairing.qr_link.startswith(f"{URL}/app/pair#{QUERY}&k=")
    assert parse_qr_payload(pairing.qr_link) == parse_qr_payload(pairing.qr_payload or "")
    secret = pairing_secret_of(pairing.qr_link)
    assert secret is not None and secret == pairing_secret_of(pairing.qr_payload or "")


def test_without_a_link_the_qr_is_the_pairing_code() -> None:
    with relay_answering(None) as client:
        pairing = client.start_pairing("app")
    assert pairing.qr_link is None and pairing.qr == pairing.qr_payload


@pytest.mark.parametrize(
    "link",
    [
        f"{URL}/app/pair#{QUERY}&k=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # planted k
        f"{URL}/app/pair#server=https%3A%2F%2Fevil.example&token={TOKEN}",  # other relay
        f"{URL}/app/pair#server=https%3A%2F%2Fpns.example.com&token=pnsp_other",
        f"{URL}/app/pair?{QUERY}",  # secrets in the query would reach server logs
        f"{URL}/elsewhere#{QUERY}",
    ],
)
def test_a_link_that_disagrees_with_the_code_is_refused(link: str) -> None:
    with relay_answering(link) as client, pytest.raises(UnexpectedResponse):
        client.start_pairing("app")


def test_one_parser_reads_both_forms() -> None:
    k = "A" * 43
    native = f"pns://pair?{QUERY}#k={k}"
    web = f"{URL}/app/pair#{QUERY}&k={k}"
    assert parse_qr_payload(native) == parse_qr_payload(web) == (URL, TOKEN)
    assert pairing_secret_of(native) == pairing_secret_of(web)
    with pytest.raises(ValueError, match="exactly once"):
        pairing_secret_of(f"{web}&k={k}")
    with pytest.raises(ValueError, match="fragment only"):
        parse_qr_payload(f"{URL}/app/pair?{QUERY}")
