"""The `pns-server` entry point: forwards to the CLI, or says in one line that only the SDK
is installed (the whole install is exercised in tests/client_sdk/test_install.py)."""

from __future__ import annotations

import sys

import pytest

from pns_server import __version__, entry


def test_with_the_relay_installed_it_is_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        entry.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == __version__


def test_a_missing_server_dependency_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As in a fresh SDK-only process: none of the relay's modules is loaded yet.
    for name in [m for m in sys.modules if m.startswith("pns_server.") and m != entry.__name__]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an SDK-only install looks like
    monkeypatch.setitem(sys.modules, "pydantic", None)
    assert entry.main(["serve"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert "only the SDK of pns-relay" in line and "[server]" in line


def test_our_own_broken_import_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pns_server.cli", None)
    with pytest.raises(ModuleNotFoundError):
        entry.main(["serve"])
