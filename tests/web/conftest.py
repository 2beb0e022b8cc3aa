"""A real browser for the web approver: Debian's Chromium driven by Playwright.

Browsers are never downloaded: Playwright is pointed at the distribution's Chromium
(`make test` installs it where it is missing, when run as root). In CI a missing Chromium
fails these tests instead of skipping them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import LiveServer

CHROMIUM = Path(os.environ.get("PNS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A phone-sized screen.
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "img"

pytestmark = pytest.mark.slow


def chromium_or_skip() -> Path:
    if CHROMIUM.exists() or shutil.which(str(CHROMIUM)):
        return CHROMIUM
    message = f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI requires it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real relay on SQLite (loopback http is a secure context for service workers)."""
    data = tmp_path_factory.mktemp("relay")
    env = {
        "PNS_DATA_DIR": str(data),
        "PNS_DATABASE_URL": f"sqlite:///{data / 'pns.db'}",
        "PNS_LOG_LEVEL": "info",
    }
    server = LiveServer(env, data / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def screenshot(page: object, name: str) -> None:
    """Screenshots for docs/web-approver.md: written there when UPDATE_SCREENSHOTS=1."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name))  # type: ignore[attr-defined]
    else:
        page.screenshot()  # type: ignore[attr-defined]
