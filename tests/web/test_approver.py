"""The web approver in a real browser against a live relay, with the real SDK on the other side.

One phone (a browser context) is paired once through the pairing link and then used for the
whole story: logins approved by typing the number (the SDK verifies the browser's v2
signature), a wrong number, the one-time password offline, a Web Push message delivered to
the service worker, and finally a fraud report and unpairing. The tests run in file order."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from client_sdk import KeyStore, PnsClient, PushLocked
from client_sdk._models import CodePrompt, LoginResult
from tests.support.server import LiveServer
from tests.web.conftest import PHONE, screenshot

pytestmark = pytest.mark.slow

APP_NAME = "Web approver (test phone)"


@dataclass
class Phone:
    context: BrowserContext
    page: Page
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def client(relay: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PnsClient]:
    registration = PnsClient.register(relay.url, name="FILESRV01", edition="pro")
    keys = KeyStore(tmp_path_factory.mktemp("sdk") / "keys.json")
    with PnsClient(relay.url, registration.client_token, key_store=keys) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def phone(browser: Any, relay: LiveServer) -> Iterator[Phone]:
    context = browser.new_context(
        viewport=PHONE, permissions=["notifications"], base_url=relay.url, is_mobile=True
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    state = Phone(context, page)
    context.on("request", lambda request: state.requests.append(request.url))
    page.on("console", lambda message: state.console.append(message.text))
    page.on("pageerror", lambda error: state.console.append(f"page error: {error}"))
    try:
        yield state
    finally:
        context.close()


def login_in_background(
    client: PnsClient, **fields: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    """`login()` as a backup client runs it: shows the code, waits, falls back to a code."""
    out: dict[str, Any] = {"shown": threading.Event()}

    def show(requested: Any) -> None:
        out["requested"] = requested
        out["shown"].set()

    def ask(prompt: CodePrompt) -> str | None:
        out["prompt"] = prompt
        return None  # the user gives up instead of typing a code

    def run() -> None:
        try:
            out["result"] = client.login(
                username="admin",
                hostname="FILESRV01",
                ip="203.0.113.7",
                show_match_code=show,
                ask_code=ask,
                ttl_seconds=120,
                **fields,
            )
        except Exception as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert out["shown"].wait(15), out.get("error")
    return thread, out


def finish(thread: threading.Thread, out: dict[str, Any]) -> LoginResult:
    thread.join(60)
    assert not thread.is_alive(), "login() did not return"
    assert "error" not in out, out.get("error")
    result: LoginResult = out["result"]
    return result


def request_card(page: Page) -> Any:
    return page.get_by_role("region", name="Login request")


# --- pairing ------------------------------------------------------------------------------


def test_pairing_through_the_link_with_the_sdk_waiting(
    phone: Phone, client: PnsClient, relay: LiveServer
) -> None:
    pairing = client.start_pairing("app")
    link = pairing.qr_link
    assert link is not None and link.startswith(f"{relay.url}/app/pair#server=")

    waited: dict[str, Any] = {}
    waiter = threading.Thread(
        target=lambda: waited.setdefault("pairing", client.wait_for_pairing(pairing.pairing_id, 60))
    )
    waiter.start()

    page = phone.page
    page.goto(link)
    expect(page.get_by_role("heading", name="Pair with this relay?")).to_be_visible()
    # The secrets left the address bar and the history at once.
    assert page.url == f"{relay.url}/app/"
    expect(page.locator("#pair-server")).to_have_text(relay.url)
    page.get_by_label("Name for this phone").fill(APP_NAME)
    # Headless Chromium has no push service to subscribe to; pushes are tested below
    # through the DevTools protocol.
    page.get_by_label("Notify me of login requests").uncheck()
    screenshot(page, "web-approver-pair.png")
    page.get_by_role("button", name="Pair this phone").click()
    expect(page.get_by_text("Paired. Login requests will appear here.")).to_be_visible()

    waiter.join(30)
    done = waited["pairing"]
    # The SDK pinned the browser's key only because its key proof verified with k.
    assert done.status == "completed" and done.pinned
    device = done.device
    assert device is not None and device.platform == "web" and device.name == APP_NAME
    k = base64.urlsafe_b64decode(link.rsplit("&k=", 1)[1] + "=")
    expected = hmac.new(k, f"pns-pair-v1|{device.public_key}".encode(), hashlib.sha256).digest()
    assert device.key_proof == base64.urlsafe_b64encode(expected).rstrip(b"=").decode()
    assert client.key_store.get(device.device_id) == device.public_key

    # The private key is a non-extractable CryptoKey in IndexedDB.
    stored = page.evaluate(
        """async () => {
            const { load } = await import('/app/store.js');
            const device = await load('device');
            let exported = 'refused';
            try { await crypto.subtle.exportKey('pkcs8', device.signing_key); exported = 'yes'; }
            catch (e) { exported = 'refused'; }
            return { extractable: device.signing_key.extractable, exported,
                     totp: device.totp.key.extractable, token: typeof device.device_token };
        }"""
    )
    assert stored == {"extractable": False, "exported": "refused", "totp": False, "token": "string"}
    expect(page.get_by_role("region", name="This phone")).to_contain_text(APP_NAME)


# --- logins ---------------------------------------------------------------------------------


def test_login_approved_in_the_browser_by_typing_the_number(
    phone: Phone, client: PnsClient
) -> None:
    page = phone.page
    thread, out = login_in_background(client, message="Backup restore requested")
    code = out["requested"].match_code
    card = request_card(page)
    expect(card).to_be_visible()
    expect(card).to_contain_text("admin")
    expect(card).to_contain_text("FILESRV01")
    expect(card).to_contain_text("203.0.113.7")
    expect(card).to_contain_text("Backup restore requested")
    expect(page.locator("#req-left")).to_have_text(re.compile(r"^\d+ s$"))
    # Only a number field: no choices of codes are offered.
    assert page.get_by_role("button", name=code).count() == 0
    screenshot(page, "web-approver-request.png")
    # Keyboard only: focus starts on the request; Tab reaches the number; Enter approves.
    expect(page.get_by_role("heading", name="Login request")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Type the number shown on the login screen")).to_be_focused()
    page.keyboard.type(code)
    page.keyboard.press("Enter")
    expect(page.get_by_text("Approved. The login continues on the computer.")).to_be_visible()

    result = finish(thread, out)
    # login() succeeded only after the SDK verified the browser's v2 signature itself.
    assert result.success and result.method == "push"
    assert result.approval is not None and result.approval.response is not None
    assert result.approval.response.version == "pns-approval-v2"


def test_a_wrong_number_rejects_the_login(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    thread, out = login_in_background(client)
    code = out["requested"].match_code
    wrong = str((int(code) + 1) % 10 ** len(code)).zfill(len(code))
    expect(request_card(page)).to_be_visible()
    page.get_by_label("Type the number shown on the login screen").fill(wrong)
    page.get_by_role("button", name="Approve").click()
    expect(page.get_by_text("The number did not match")).to_be_visible()
    result = finish(thread, out)
    assert not result.success
    assert out["prompt"].reason == "rejected"
    assert result.approval is not None and result.approval.reason == "number_mismatch"


def test_a_plain_reject(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    thread, out = login_in_background(client)
    expect(request_card(page)).to_be_visible()
    page.get_by_role("button", name="Reject", exact=True).click()
    expect(page.get_by_text("Rejected.", exact=True)).to_be_visible()
    result = finish(thread, out)
    assert not result.success
    assert result.approval is not None and result.approval.reason == "user_rejected"


def test_an_expired_request_says_so_in_plain_words(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    requested = client.request_approval(username="admin", hostname="FILESRV01", ttl_seconds=10)
    expect(request_card(page)).to_be_visible()
    expect(page.get_by_text("The request has expired. Start the login again.")).to_be_visible(
        timeout=20_000
    )
    assert client.get_approval(requested.approval_id, wait=5).status == "expired"


# --- one-time password, offline -------------------------------------------------------------


def test_the_otp_works_offline_and_the_relay_accepts_it(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    page.goto("/app/")
    expect(page.get_by_role("heading", name="One-time password")).to_be_visible()
    # The service worker has the app: without any network it still shows the code.
    phone.context.set_offline(True)
    try:
        page.reload()
        expect(page.locator("#connection")).to_have_text("Offline — retrying")
        otp = page.locator("#otp-code")
        expect(otp).to_have_text(re.compile(r"^\d{3} \d{3}$"))
        screenshot(page, "web-approver-otp-offline.png")
        code = otp.get_attribute("data-code")
    finally:
        phone.context.set_offline(False)
    assert code is not None and len(code) == 6
    accepted = client.verify_otp(code)
    assert accepted.result == "accepted"


# --- Web Push -------------------------------------------------------------------------------


def test_a_web_push_shows_a_notification_that_opens_the_request(
    phone: Phone, client: PnsClient, relay: LiveServer
) -> None:
    context, page = phone.context, phone.page
    page.goto("/app/")
    expect(page.get_by_role("heading", name="No login waiting")).to_be_visible()
    cdp = context.new_cdp_session(page)
    registrations: list[dict[str, Any]] = []
    cdp.on(
        "ServiceWorker.workerRegistrationUpdated",
        lambda event: registrations.extend(event["registrations"]),
    )
    cdp.send("ServiceWorker.enable")
    deadline = time.monotonic() + 10
    while not any(r["scopeURL"] == f"{relay.url}/app/" for r in registrations):
        assert time.monotonic() < deadline, registrations
        page.wait_for_timeout(100)
    registration_id = next(
        r["registrationId"] for r in registrations if r["scopeURL"] == f"{relay.url}/app/"
    )
    # Leave the app, so only the push can bring the request to the screen.
    page.goto("/healthz")
    requested = client.request_approval(username="admin", hostname="FILESRV01", ip="203.0.113.7")
    # Exactly what the relay encrypts for the push service (see pns_server/push/webpush.py).
    payload = {
        "type": "approval",
        "approval_id": requested.approval_id,
        "title": "FILESRV01: approve login?",
        "body": "admin wants to login on FILESRV01. Open the app to answer.",
    }
    message = {"origin": relay.url, "registrationId": registration_id, "data": json.dumps(payload)}
    notifications: list[dict[str, Any]] = []
    deadline = time.monotonic() + 40
    while not notifications:
        assert time.monotonic() < deadline, "no notification shown"
        # Sent again if a busy machine lost it while waking the worker: the tag is the
        # approval id, so a second copy replaces the first.
        cdp.send("ServiceWorker.deliverPushMessage", message)
        for _ in range(50):
            notifications = page.evaluate(
                """async () => {
                    const registration = await navigator.serviceWorker.getRegistration('/app/');
                    const shown = await registration.getNotifications();
                    return shown.map((n) => (
                        { title: n.title, body: n.body, data: n.data, tag: n.tag }));
                }"""
            )
            if notifications:
                break
            page.wait_for_timeout(200)
    [shown] = notifications
    assert shown == {
        "title": payload["title"],
        "body": payload["body"],
        "data": {"approval_id": requested.approval_id},
        "tag": requested.approval_id,
    }
    # Tapping it with no app window open opens /app/?approval=<id> (clients.openWindow;
    # a synthetic click has no user gesture, so the test opens that address itself).
    page.goto(f"/app/?approval={requested.approval_id}")
    expect(request_card(page)).to_be_visible()
    expect(request_card(page)).to_contain_text("203.0.113.7")
    assert page.url == f"{relay.url}/app/"  # the approval id left the address bar too
    # Tapping it with the app open: the service worker's notificationclick hands the
    # request to that window.
    page.evaluate(
        """() => {
            window.handed = [];
            navigator.serviceWorker.addEventListener('message', (e) => window.handed.push(e.data));
        }"""
    )
    [worker] = [w for w in context.service_workers if w.url.endswith("/app/sw.js")]
    worker.evaluate(
        """async () => {
            const [n] = await self.registration.getNotifications();
            self.dispatchEvent(new NotificationEvent('notificationclick', { notification: n }));
        }"""
    )
    page.wait_for_function("window.handed.length > 0")
    assert page.evaluate("window.handed") == [
        {"type": "approval", "approval_id": requested.approval_id}
    ]
    # The notification is gone once tapped.
    assert (
        page.evaluate(
            "navigator.serviceWorker.getRegistration('/app/').then(r => r.getNotifications())"
            ".then(ns => ns.length)"
        )
        == 0
    )
    client.cancel_approval(requested.approval_id)


# --- the page's own safety ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/app/", "/app/pair", "/app/app.js", "/app/sw.js"])
def test_strict_content_security_policy(relay: LiveServer, path: str) -> None:
    response = httpx.get(relay.url + path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert policy.startswith("default-src 'self';")
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_nothing_left_the_relay_origin_and_no_policy_was_violated(
    phone: Phone, relay: LiveServer
) -> None:
    assert phone.requests, "the phone made no requests?"
    foreign = [url for url in phone.requests if not url.startswith(relay.url + "/")]
    assert foreign == []
    assert [m for m in phone.console if "Content Security Policy" in m] == []
    assert [m for m in phone.console if m.startswith("page error")] == []


def test_js_matches_the_python_reference(phone: Phone, relay: LiveServer) -> None:
    """The browser's key proof, DER signatures, context hash, signed string, TOTP and link
    parser against the SDK's own computations of the same bytes."""
    import pyotp
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from client_sdk._keys import context_sha256, key_proof

    page = phone.page
    page.goto("/app/")
    k = bytes(range(32))
    public_key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE" + "A" * 88
    context = {
        "username": 'ann "the admin" \\ O\u2019Neil',
        "hostname": "файл-сервер",
        "ip": None,
        "action": "login",
        "message": "line\u2028two 🙂 </script>",
    }
    pairs = [(1, 2), (2**255 + 5, 7), (2**256 - 1, 2**248), (2**200, 2**255)]
    raw = [
        base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode() for r, s in pairs
    ]
    secret = pyotp.random_base32()
    times = [0, 59, 1111111109, 2000000000]
    approval = {
        "approval_id": "a" * 32,
        "client_nonce": "bm9uY2Vub25jZW5vbmNlbm9uY2Vub25jZQ",
        "context": context,
    }
    got = page.evaluate(
        """async ({ k, publicKey, context, raw, secret, times, approval, origin }) => {
            const c = await import('/app/crypto.js');
            const { parsePairingLink } = await import('/app/link.js');
            const bytes = (b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
            const key = await c.importTotpKey(secret, 'SHA1');
            const server = `server=${encodeURIComponent(origin)}&token=pnsp_x`;
            const secret64 = c.b64url(new Uint8Array(k));
            const native = parsePairingLink(`pns://pair?${server}#k=${secret64}`);
            const web = parsePairingLink(`${origin}/app/pair#${server}&k=${secret64}`);
            return {
                proof: await c.keyProof(new Uint8Array(k), publicKey),
                der: raw.map((r) => c.b64(c.rawToDer(bytes(r)))),
                context: await c.contextSha256(context),
                message: await c.signedMessage(approval, 'approve', '042', '2026-11-30T09:12:18Z'),
                v1: await c.signedMessage({ ...approval, client_nonce: null }, 'reject', null, 'T'),
                totp: await Promise.all(times.map((t) => c.totp(key, 6, 30, t * 1000))),
                links: [native, web].map((l) => [l.server, l.token, Array.from(l.k)]),
            };
        }""",
        {
            "k": list(k),
            "publicKey": public_key,
            "context": context,
            "raw": raw,
            "secret": secret,
            "times": times,
            "approval": approval,
            "origin": relay.url,
        },
    )
    assert got["proof"] == key_proof(k, public_key)
    assert got["der"] == [base64.b64encode(encode_dss_signature(r, s)).decode() for r, s in pairs]
    assert got["context"] == context_sha256(context)
    assert got["message"] == (
        f"pns-approval-v2|{'a' * 32}|approve|042|2026-11-30T09:12:18Z|"
        f"{approval['client_nonce']}|{context_sha256(context)}"
    )
    assert got["v1"] == f"pns-approval-v1|{'a' * 32}|reject||T"
    assert got["totp"] == [pyotp.TOTP(secret).at(t) for t in times]
    assert got["links"] == [[relay.url, "pnsp_x", list(k)]] * 2


def test_dark_mode_is_readable(browser: Any, relay: LiveServer) -> None:
    context = browser.new_context(viewport=PHONE, color_scheme="dark", base_url=relay.url)
    try:
        page = context.new_page()
        page.goto("/app/")
        expect(page.get_by_role("heading", name="Pair this phone")).to_be_visible()
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        text = page.evaluate("getComputedStyle(document.body).color")
        assert background == "rgb(16, 19, 24)" and text == "rgb(238, 241, 245)"
        screenshot(page, "web-approver-dark.png")
    finally:
        context.close()


# --- fraud, then unpairing (last: the fraud report locks push for this client) -------------------


def test_reject_and_report_locks_push(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    page.goto("/app/")
    thread, out = login_in_background(client)
    expect(request_card(page)).to_be_visible()
    page.get_by_role("button", name="Reject and report — this wasn't me").click()
    expect(page.get_by_text("Rejected and reported.")).to_be_visible()
    result = finish(thread, out)
    assert not result.success
    assert result.approval is not None and result.approval.reason == "fraud"
    with pytest.raises(PushLocked):
        client.request_approval(username="admin")


def test_unpair(phone: Phone, client: PnsClient) -> None:
    page = phone.page
    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Unpair this phone").click()
    expect(page.get_by_text("This phone is unpaired.")).to_be_visible()
    expect(page.get_by_role("heading", name="Pair this phone")).to_be_visible()
    assert [d for d in client.list_devices() if d.kind == "app"] == []
    assert page.evaluate("import('/app/store.js').then((s) => s.load('device'))") is None
