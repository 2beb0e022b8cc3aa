"""What the senders' connections take from the environment: the forward proxy."""

from __future__ import annotations

import pytest

from pns_server.push.transport import ProxyConfigError, environment_proxy

APPLE = "https://api.push.apple.com"


@pytest.fixture(autouse=True)
def _no_proxy_settings(no_proxy_settings: None) -> None:
    pass


def test_no_proxy_named_means_a_direct_connection() -> None:
    assert environment_proxy(APPLE) is None


def test_https_proxy_wins_over_all_proxy_and_its_credentials_stay_out_of_its_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("all_proxy", "http://elsewhere:8080")
    monkeypatch.setenv("https_proxy", "http://relay:hunter2@proxy.internal:3128")
    proxy = environment_proxy(APPLE)
    assert proxy is not None and proxy.url == "http://proxy.internal:3128"
    assert proxy.auth == ("relay", "hunter2") and "hunter2" not in repr(proxy)


def test_a_bare_host_and_port_is_an_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "proxy.internal:3128")
    proxy = environment_proxy(APPLE)
    assert proxy is not None and proxy.url == "http://proxy.internal:3128" and proxy.auth is None


@pytest.mark.parametrize(
    "exempt", ["api.push.apple.com", ".apple.com", "*", "example.org, apple.com"]
)
def test_no_proxy_exempts_a_host(monkeypatch: pytest.MonkeyPatch, exempt: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", exempt)
    assert environment_proxy(APPLE) is None


def test_no_proxy_for_another_host_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "googleapis.com")
    assert environment_proxy(APPLE) is not None


def test_a_socks_proxy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ProxyConfigError, match="names a socks5 proxy"):
        environment_proxy(APPLE)
