"""The README is the operator's first page: keep its commands and configuration table true."""

from __future__ import annotations

import re
from pathlib import Path

from pns_server.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    text = README.read_text()
    documented = set(re.findall(r"`(PNS_[A-Z0-9_]+)`", text))
    expected = {f"PNS_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "add these to the README's configuration table"
    assert documented - expected == set(), "the README documents settings that do not exist"


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text and "make test" in text
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()
