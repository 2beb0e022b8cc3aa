"""The `KeyStore`: pins persist and are never overwritten, in-memory pins warn once, pairing
secrets expire."""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from client_sdk import (
    KeyStore,
    PinsNotPersistedWarning,
)
from client_sdk import _keys as keys_module
from client_sdk._keys import public_key_b64
from tests.support.factories import new_key


@pytest.fixture(autouse=True)
def _quiet_in_memory_pins() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinsNotPersistedWarning)
        yield


class TestKeyStore:
    def test_persists_and_never_overwrites_a_pin(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.json"
        first, second = public_key_b64(new_key()), public_key_b64(new_key())
        store = KeyStore(path)
        assert store.pin("d1", first)
        assert not store.pin("d1", second)
        reloaded = KeyStore(path)
        assert reloaded.get("d1") == first
        assert json.loads(path.read_text())["devices"] == {"d1": first}
        assert path.stat().st_mode & 0o777 == 0o600
        reloaded.forget("d1")
        assert KeyStore(path).get("d1") is None

    def test_in_memory_pins_warn_once(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
    ) -> None:
        monkeypatch.setattr(keys_module, "_warned_in_memory", threading.Event())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            KeyStore(tmp_path / "keys.json").pin("d0", public_key_b64(new_key()))
            assert seen == []
            KeyStore().pin("d1", public_key_b64(new_key()))
            KeyStore().pin("d2", public_key_b64(new_key()))
        assert [w.category for w in seen] == [PinsNotPersistedWarning]
        assert "lost when this process exits" in str(seen[0].message)
        assert caplog.text.count("lost when this process exits") == 1

    def test_expired_pairing_secrets_are_dropped(self, tmp_path: Path) -> None:
        store = KeyStore(tmp_path / "keys.json")
        store.remember_pairing("old", bytes(32), datetime.now(UTC) - timedelta(seconds=1))
        store.remember_pairing("new", bytes(32), datetime.now(UTC) + timedelta(minutes=5))
        assert KeyStore(tmp_path / "keys.json").pending_pairings() == ["new"]
        assert store.pairing_secret("new") == bytes(32)
