"""Serves the web approver's files with a strict Content-Security-Policy, and the VAPID key.

The app is plain HTML, CSS and JavaScript modules from this package (no build step, no
third-party origin). Its pages never carry secrets in the URL path or query: the pairing
link keeps them in the fragment, which browsers do not send to servers."""

from __future__ import annotations

import logging
import mimetypes
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from pns_server.config import Settings
from pns_server.deps import RuntimeDep
from pns_server.errors import NotFound
from pns_server.problems import PROBLEM_RESPONSES

log = logging.getLogger("pns")
STATIC = Path(__file__).parent / "static"
mimetypes.add_type("application/manifest+json", ".webmanifest")

# `default-src 'self'` and nothing looser: no inline script or style, no other origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def secure(response: Response, path: str) -> Response:
    response.headers.update(SECURITY_HEADERS)
    html = response.headers.get("content-type", "").startswith("text/html")
    if path.endswith("sw.js") or html:
        # The service worker and the page are checked on every visit, so an update lands.
        response.headers["Cache-Control"] = "no-cache"
    return response


class AppFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        return secure(await super().get_response(path, scope), path)


def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


router = APIRouter(tags=["web approver"], responses=PROBLEM_RESPONSES)


@router.get("/app/pair", include_in_schema=False)
async def pair_page() -> Response:
    """The link the pairing QR opens; the app reads server, token and k from the fragment."""
    return secure(page(), "index.html")


class WebPushKey(BaseModel):
    public_key: str


# No token and no limit, like /v1/ping: it serves one public key.
webpush_router = APIRouter(tags=["devices"], responses=PROBLEM_RESPONSES)


@webpush_router.get("/v1/webpush", response_model=WebPushKey)
async def webpush_key(runtime: RuntimeDep) -> WebPushKey:
    """The VAPID public key (base64url uncompressed P-256 point) for `pushManager.subscribe`."""
    key = runtime.vapid_public_key()
    if key is None:
        raise NotFound("Web Push is not available on this relay.")
    return WebPushKey(public_key=key)


def install(app: FastAPI, settings: Settings) -> None:
    app.router.routes.extend(webpush_router.routes)
    if not settings.web_approver:
        return
    app.router.routes.extend(router.routes)
    app.mount("/app", AppFiles(directory=STATIC, html=True), name="web-approver")


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_not_https(settings: Settings) -> bool:
    """Phones refuse service workers and Web Push on plain http (except loopback)."""
    url = settings.public_url
    if not settings.web_approver or url.startswith("https://") or is_loopback_url(url):
        return False
    log.warning(
        "web approver: PNS_PUBLIC_URL %s is plain http; phones need https for the web "
        "approver (service worker, Web Push) - put the relay behind a TLS proxy",
        url,
    )
    return True
