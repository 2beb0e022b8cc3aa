"""`pns-client diagnose`: walk the path to the relay one layer at a time (DNS, TCP, TLS,
`/v1/ping`, clock, credentials) and say in one plain sentence what to fix at the first layer
that fails. Backup clients sit behind corporate firewalls and proxies, so the sentence names
the exact outbound host and port to allow."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

# One-time passwords allow ±1 step of 30 s and signed answers ±120 s: warn well before.
SKEW_WARN_SECONDS = 10.0
SKEW_FAIL_SECONDS = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "warn", "skip")


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(url.rstrip("/"), parts.scheme, parts.hostname, port)


def run_checks(url: str, token: str | None, *, timeout: float = 5.0) -> list[Check]:
    """Every check in order; after the first failure the rest are skipped, because a
    firewall block also makes TLS and ping fail and only the first cause is worth fixing."""
    try:
        target = Target.parse(url)
    except ValueError as exc:
        return [
            Check(
                "url", "fail", str(exc), "Give the relay's base URL, e.g. https://pns.example.com."
            )
        ]
    checks: list[Check] = []
    for step in (check_dns, check_tcp, check_tls):
        checks.append(step(target, timeout))
        if not checks[-1].ok:
            return checks + skipped("ping", "clock", "credentials")
    ping, skew = check_ping(target, timeout)
    checks.append(ping)
    if not ping.ok or skew is None:
        return checks + skipped("clock", "credentials")
    checks.append(check_clock(skew))
    checks.append(check_credentials(target, token, timeout))
    return checks


def skipped(*names: str) -> list[Check]:
    return [Check(name, "skip", "not tried: an earlier check failed") for name in names]


def firewall_sentence(target: Target) -> str:
    return (
        f"Allow outbound TCP from this machine to {target.host} port {target.port} "
        f"in the firewall (and any proxy), and make sure the relay is running there."
    )


def check_dns(target: Target, _timeout: float) -> Check:
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Check(
            "dns",
            "fail",
            f"{target.host} does not resolve ({exc.strerror})",
            f"Check the spelling of the server URL, and that this machine's DNS servers can "
            f"resolve {target.host} (outbound UDP/TCP port 53 to them must be allowed).",
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    return Check("dns", "ok", f"{target.host} resolves to {', '.join(addresses)}")


def check_tcp(target: Target, timeout: float) -> Check:
    started = time.monotonic()
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout):
            pass
    except TimeoutError:
        return Check(
            "tcp",
            "fail",
            f"no answer from {target.host}:{target.port} within {timeout:g} s "
            f"(packets are probably dropped by a firewall)",
            firewall_sentence(target),
        )
    except OSError as exc:
        return Check(
            "tcp",
            "fail",
            f"cannot connect to {target.host}:{target.port} ({exc.strerror or exc})",
            firewall_sentence(target),
        )
    elapsed = (time.monotonic() - started) * 1000
    return Check("tcp", "ok", f"connected to {target.host}:{target.port} in {elapsed:.0f} ms")


def check_tls(target: Target, timeout: float) -> Check:
    if target.scheme != "https":
        return Check(
            "tls",
            "warn",
            "the URL is plain http: tokens and codes cross the network unencrypted",
            "Use an https:// URL (a TLS proxy in front of the relay) outside a lab.",
        )
    context = ssl.create_default_context()
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=target.host) as tls,
        ):
            version = tls.version()
            cert = tls.getpeercert() or {}
    except ssl.SSLCertVerificationError as exc:
        return Check(
            "tls",
            "fail",
            f"the certificate of {target.host} is not trusted ({exc.verify_message})",
            "Install a certificate for this name from a CA this machine trusts, or add the "
            "company CA to the system trust store; a TLS-inspecting proxy must be told to "
            "pass this host through.",
        )
    except (ssl.SSLError, OSError) as exc:
        return Check(
            "tls",
            "fail",
            f"the TLS handshake with {target.host}:{target.port} failed ({exc})",
            f"Check that port {target.port} on {target.host} speaks HTTPS (not plain HTTP) "
            f"and that no proxy intercepts it.",
        )
    expires = cert.get("notAfter")
    until = f", certificate valid until {expires}" if isinstance(expires, str) else ""
    return Check("tls", "ok", f"{version} with a trusted certificate{until}")


def check_ping(target: Target, timeout: float) -> tuple[Check, float | None]:
    url = target.url + "/v1/ping"
    try:
        sent = time.time()
        response = httpx.get(url, timeout=timeout)
        received = time.time()
    except httpx.HTTPError as exc:
        return Check("ping", "fail", f"GET {url} failed ({exc})", firewall_sentence(target)), None
    server_time = ping_time(response)
    if response.status_code != 200 or server_time is None:
        return (
            Check(
                "ping",
                "fail",
                f"GET {url} answered {response.status_code} but not as a PNS relay",
                "The URL reaches a web server that is not the relay (or a proxy's block page): "
                "check the URL and the proxy's rules for this host.",
            ),
            None,
        )
    version = response.json().get("version", "?")
    skew = server_time.timestamp() - (sent + received) / 2
    rtt = (received - sent) * 1000
    return Check("ping", "ok", f"relay version {version} answered in {rtt:.0f} ms"), skew


def ping_time(response: httpx.Response) -> datetime | None:
    try:
        value = response.json()["time"]
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, KeyError, TypeError):
        date = response.headers.get("date")
        return parsedate_to_datetime(date) if date else None


def check_clock(skew: float) -> Check:
    direction = "behind" if skew > 0 else "ahead of"
    detail = f"this machine's clock is {abs(skew):.1f} s {direction} the relay's"
    fix = (
        "Turn on time synchronisation (NTP) on this machine and on the relay: one-time "
        "passwords fail beyond about 30 s of difference."
    )
    if abs(skew) >= SKEW_FAIL_SECONDS:
        return Check("clock", "fail", detail, fix)
    if abs(skew) >= SKEW_WARN_SECONDS:
        return Check("clock", "warn", detail, fix)
    return Check("clock", "ok", detail)


def check_credentials(target: Target, token: str | None, timeout: float) -> Check:
    if not token:
        return Check(
            "credentials",
            "fail",
            "no client token is stored for this relay",
            "Run `pns-client register --name <this machine>` first.",
        )
    try:
        response = httpx.get(
            target.url + "/v1/client",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        detail = f"GET /v1/client failed ({exc})"
        return Check("credentials", "fail", detail, firewall_sentence(target))
    if response.status_code == 401:
        return Check(
            "credentials",
            "fail",
            "the relay does not know the stored client token",
            "The installation was deleted on the relay or the token belongs to another relay: "
            "run `pns-client register` again and pair the phone again.",
        )
    if response.status_code != 200:
        return Check(
            "credentials",
            "fail",
            f"GET /v1/client answered {response.status_code}",
            "Look at the relay's log for this request.",
        )
    info = response.json()
    return Check(
        "credentials",
        "ok",
        f"registered as {info.get('name')!r} with {info.get('devices', 0)} device(s), "
        f"{info.get('push_devices', 0)} for push",
    )
