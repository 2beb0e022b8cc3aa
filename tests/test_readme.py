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


def test_readme_draws_the_flows_and_the_deployment() -> None:
    text = README.read_text()
    diagrams = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    sequence = next(d for d in diagrams if d.startswith("sequenceDiagram"))
    for step in ("POST /v1/pairings", "POST /v1/approvals", "POST /v1/otp/verify"):
        assert step in sequence
    deployment = next(d for d in diagrams if d.startswith("flowchart"))
    for part in ("proxy", "PostgreSQL", "APNs", "FCM", "Backup clients"):
        assert part in deployment


def test_readme_says_which_phone_apps_exist_and_how_to_deploy() -> None:
    text = README.read_text()
    phones = text[text.index("## Phone apps") :]
    phones = phones[: phones.index("\n## ", 1)]
    assert "/app/" in phones and "docs/mobile.md" in phones and "pns-device" in phones
    deploying = text[text.index("## Deploying") :]
    deploying = deploying[: deploying.index("\n## ", 1)]
    for step in ("PNS_SECRET_KEY", "POSTGRES_PASSWORD", "PNS_PUBLIC_URL", "docker compose up"):
        assert step in deploying
    assert "CHANGELOG.md" in deploying


def test_changelog_has_an_unreleased_section_first() -> None:
    changelog = (README.parent / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\S+)", changelog, re.M)
    assert versions[0] == "Unreleased" and "0.1.0" in versions
    assert "### Upgrading" in changelog


def test_relative_links_in_the_docs_lead_to_files_in_the_repository() -> None:
    root = README.parent
    pages = [README, root / "CHANGELOG.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            resolved = (page.parent / target).resolve()
            if not resolved.exists() or root.resolve() not in resolved.parents:
                broken.append(f"{page.name}: {target}")
    assert broken == []
