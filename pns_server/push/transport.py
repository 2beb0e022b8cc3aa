"""What the push senders' connections share: FCM's are httpcore's pools (the transport
under httpx) without httpx's client on top, which cost a quarter to a third of a sender's
CPU per push (docs/benchmarks.md); APNs has one connection of its own per host
(`push/http2.py`).

What httpx's client did besides, and a sender still needs, is here: the TLS trust, the
forward proxy the environment names (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`), the errors
that mean "try again on a new connection", and a response header by name."""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import httpcore

# What httpx calls a TransportError: the connection could not be made or was lost, or the
# peer broke the protocol.
TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


class ProxyConfigError(ValueError):
    """The environment names a proxy the senders cannot use."""


@dataclass(frozen=True)
class Proxy:
    url: str
    auth: tuple[str, str] | None = field(default=None, repr=False)  # never in a log line


def environment_proxy(url: str) -> Proxy | None:
    """The forward proxy `HTTPS_PROXY` (or `ALL_PROXY`) names for `url`, unless `NO_PROXY`
    exempts its host, read through the standard library as httpx reads it. Only HTTP
    proxies, which tunnel with CONNECT."""
    proxies = urllib.request.getproxies()
    named = proxies.get("https") or proxies.get("all")
    if not named or urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
        return None
    parts = urlsplit(named if "://" in named else f"http://{named}")
    if parts.scheme not in ("http", "https"):
        raise ProxyConfigError(
            f"HTTPS_PROXY/ALL_PROXY names a {parts.scheme} proxy: push services are reached "
            "only through HTTP proxies (CONNECT); list their hosts in NO_PROXY to connect "
            "directly"
        )
    netloc = parts.netloc.rpartition("@")[2]
    auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
    return Proxy(f"{parts.scheme}://{netloc}", auth)


def connection_pool(proxy: Proxy | None, **options: Any) -> httpcore.AsyncConnectionPool:
    """A pool of `options` (httpcore's), through `proxy` when there is one."""
    if proxy is None:
        return httpcore.AsyncConnectionPool(**options)
    return httpcore.AsyncHTTPProxy(proxy_url=proxy.url, proxy_auth=proxy.auth, **options)


def send_timeouts(seconds: float) -> dict[str, Any]:
    """The request extension: no read timeout, because in httpcore one read timeout fails
    every stream on the connection; the sender gives each send its own deadline instead."""
    return {"timeout": {"connect": seconds, "read": None, "write": seconds, "pool": seconds}}


class HasHeaders(Protocol):
    """A response (httpcore's, or `push.http2.Response`)."""

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...


def header(response: HasHeaders, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def ssl_context(ca_file: Path | None, cert_file: Path | None = None) -> ssl.SSLContext:
    """System trust plus PNS_PUSH_CA_FILE (TLS-inspecting proxies), plus a client certificate."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        context.load_cert_chain(str(cert_file))
    return context


def proxy_ssl_context(proxy: Proxy | None, ca_file: Path | None) -> ssl.SSLContext | None:
    """The TLS to an https proxy itself, with the same extra trust; None without one."""
    if proxy is None or urlsplit(proxy.url).scheme != "https":
        return None
    return ssl_context(ca_file)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
