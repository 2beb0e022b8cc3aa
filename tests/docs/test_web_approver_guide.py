"""docs/web-approver.md stays true: its screenshots exist, its settings exist."""

from __future__ import annotations

import re
from pathlib import Path

from pns_server.config import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = (DOCS / "web-approver.md").read_text()


def test_every_image_it_shows_is_committed() -> None:
    images = re.findall(r"\((img/[^)]+\.png)\)", GUIDE)
    assert len(images) >= 3
    for image in images:
        assert (DOCS / image).stat().st_size > 1000, image


def test_every_setting_it_names_exists() -> None:
    named = set(re.findall(r"`(PNS_[A-Z0-9_]+)", GUIDE))
    settings = {f"PNS_{name.upper()}" for name in Settings.model_fields}
    assert named and named <= settings
