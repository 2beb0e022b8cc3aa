"""Serving the web approver: strict headers, the pairing page, the switch, the https warning,
and the pairing link the relay offers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pns_server.app import create_app
from pns_server.config import Settings
from pns_server.webapp.router import STATIC, warn_if_not_https
from tests.conftest import make_settings
from tests.support.factories import register_client


class TestServed:
    @pytest.mark.parametrize(
        ("path", "kind"),
        [
            ("/app/", "text/html"),
            ("/app/pair", "text/html"),
            ("/app/app.js", "javascript"),
            ("/app/sw.js", "javascript"),
            ("/app/app.css", "text/css"),
            ("/app/manifest.webmanifest", "application/manifest+json"),
            ("/app/icons/icon-192.png", "image/png"),
        ],
    )
    async def test_every_file_carries_the_strict_policy(
        self, http: httpx.AsyncClient, path: str, kind: str
    ) -> None:
        response = await http.get(path)
        assert response.status_code == 200, path
        assert kind in response.headers["content-type"]
        assert response.headers["content-security-policy"].startswith("default-src 'self';")
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"

    async def test_the_page_loads_nothing_from_another_origin(self) -> None:
        for path in STATIC.rglob("*"):
            if path.suffix in (".html", ".js", ".css", ".webmanifest"):
                text = path.read_text()
                assert "http://" not in text and "//cdn" not in text, path
                if path.suffix == ".html":
                    assert "<script>" not in text and "style=" not in text, path

    async def test_the_service_worker_and_page_are_revalidated(
        self, http: httpx.AsyncClient
    ) -> None:
        for path in ("/app/sw.js", "/app/", "/app/pair"):
            assert (await http.get(path)).headers["cache-control"] == "no-cache"

    async def test_manifest_names_installable_icons(self, http: httpx.AsyncClient) -> None:
        manifest = (await http.get("/app/manifest.webmanifest")).json()
        assert manifest["start_url"] == "/app/" and manifest["display"] == "standalone"
        for icon in manifest["icons"]:
            assert (await http.get(icon["src"])).status_code == 200
        assert {"192x192", "512x512"} <= {icon["sizes"] for icon in manifest["icons"]}

    async def test_an_unknown_file_is_404(self, http: httpx.AsyncClient) -> None:
        assert (await http.get("/app/../pns_server/config.py")).status_code == 404
        assert (await http.get("/app/nothing.js")).status_code == 404


class TestPairingLink:
    async def test_app_pairings_offer_the_link_with_the_code_in_the_fragment(
        self, http: httpx.AsyncClient, settings: Settings
    ) -> None:
        client = await register_client(http)
        started = (
            await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
        ).json()
        link = urlsplit(started["qr_link"])
        assert f"{link.scheme}://{link.netloc}{link.path}" == settings.public_url + "/app/pair"
        assert link.query == ""
        native = parse_qs(urlsplit(started["qr_payload"]).query)
        assert parse_qs(link.fragment) == native

    async def test_totp_pairings_have_none(self, http: httpx.AsyncClient) -> None:
        client = await register_client(http)
        started = await http.post("/v1/pairings", json={"kind": "totp"}, headers=client.headers)
        assert started.json()["qr_link"] is None


class TestSwitchedOff:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {"web_approver": False}

    async def test_no_pages_and_no_link(self, http: httpx.AsyncClient) -> None:
        assert (await http.get("/app/")).status_code == 404
        assert (await http.get("/app/pair")).status_code == 404
        client = await register_client(http)
        started = await http.post("/v1/pairings", json={"kind": "app"}, headers=client.headers)
        assert started.json()["qr_link"] is None
        # Web Push itself stays available to any browser-based approver.
        assert (await http.get("/v1/webpush")).status_code == 200


class TestHttpsWarning:
    @pytest.mark.parametrize(
        ("url", "web_approver", "warned"),
        [
            ("http://pns.example.com", True, True),
            ("http://192.0.2.10:8080", True, True),
            ("https://pns.example.com", True, False),
            ("http://127.0.0.1:8080", True, False),
            ("http://localhost:8080", True, False),
            ("http://[::1]:8080", True, False),
            ("http://pns.example.com", False, False),
        ],
    )
    def test_plain_http_outside_loopback_is_warned_about(
        self,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        url: str,
        web_approver: bool,
        warned: bool,
    ) -> None:
        caplog.set_level(logging.WARNING, "pns")
        settings = make_settings(
            f"sqlite:///{tmp_path / 'pns.db'}", tmp_path, public_url=url, web_approver=web_approver
        )
        assert warn_if_not_https(settings) is warned
        assert ("needs https" in caplog.text or "need https" in caplog.text) is warned

    def test_the_app_factory_warns_at_start(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "pns")
        settings = make_settings(
            f"sqlite:///{tmp_path / 'pns.db'}", tmp_path, public_url="http://pns.example.com"
        )
        app = create_app(settings)
        assert app.router.lifespan_context is not None
        assert "plain http" not in caplog.text  # only when it starts (see the lifespan)


class TestAccessibleMarkup:
    """What a screen reader needs from the page itself (the browser tests use the same names
    through Playwright's role and label locators)."""

    def test_every_control_has_a_name(self) -> None:
        from html.parser import HTMLParser

        class Controls(HTMLParser):
            def __init__(self) -> None:
                super().__init__()
                self.labels: set[str] = set()
                self.inputs: list[tuple[str | None, bool]] = []
                self.buttons: list[str] = []
                self.in_label = 0
                self.in_button = False
                self.lang: str | None = None

            def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
                found = dict(attrs)
                if tag == "html":
                    self.lang = found.get("lang")
                if tag == "label":
                    self.in_label += 1
                    if found.get("for"):
                        self.labels.add(str(found["for"]))
                if tag == "input":
                    self.inputs.append((found.get("id"), self.in_label > 0))
                if tag == "button":
                    self.in_button = True
                    self.buttons.append("")

            def handle_endtag(self, tag: str) -> None:
                if tag == "label":
                    self.in_label -= 1
                if tag == "button":
                    self.in_button = False

            def handle_data(self, data: str) -> None:
                if self.in_button:
                    self.buttons[-1] += data.strip()

        parsed = Controls()
        parsed.feed((STATIC / "index.html").read_text())
        assert parsed.lang == "en"
        assert parsed.inputs and parsed.buttons
        for input_id, wrapped in parsed.inputs:
            assert wrapped or input_id in parsed.labels, input_id
        assert all(parsed.buttons), parsed.buttons
