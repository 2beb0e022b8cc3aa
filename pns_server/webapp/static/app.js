// The web approver: pairing, login requests, one-time passwords, unpairing.
import { ApiError, Offline, call } from "./api.js";
import {
  importTotpKey,
  keyProof,
  newDeviceKey,
  rfc3339Now,
  sign,
  signedMessage,
  totp,
} from "./crypto.js";
import { parsePairingLink } from "./link.js";
import { load, remove, save } from "./store.js";

const $ = (id) => document.getElementById(id);
const SECTIONS = ["loading", "welcome", "pair", "request", "idle", "otp", "device"];
const POLL_WAIT = 25; // seconds a long-poll waits on the relay
const RECHECK_MS = 3000; // while a request is shown: is it still pending?

const state = {
  device: null, // what IndexedDB keeps (see pair())
  link: null, // the pairing link being used
  approval: null, // the request on screen
  finished: new Set(), // approvals answered here (not shown again)
  offline: false,
};

// --- small helpers -------------------------------------------------------------------

function show(...names) {
  for (const name of SECTIONS) $(name).hidden = !names.includes(name);
}

function say(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function alarm(text) {
  $("alert").textContent = text;
  $("alert").hidden = !text;
}

function setConnection(text) {
  $("connection").textContent = text;
}

function plain(error) {
  if (error instanceof Offline) return error.message;
  if (error instanceof ApiError) {
    switch (error.code) {
      case "already_decided": {
        const status = error.problem.approval_status;
        if (status === "expired") return "This request has expired. Start the login again.";
        if (status === "cancelled") return "This request was cancelled on the computer.";
        return `This request was already answered (${status}).`;
      }
      case "pairing_invalid":
        return "This pairing code was already used or is unknown. Show a new QR code and scan it again.";
      case "pairing_expired":
        return "This pairing code has expired. Show a new QR code and scan it again.";
      case "stale_timestamp":
        return "This phone's clock is wrong. Set the date and time automatically, then try again.";
      case "signature_invalid":
        return "The relay did not accept this phone's signature. Unpair and pair this phone again.";
      case "rate_limited":
        return "Too many attempts. Wait a minute and try again.";
      case "webpush_endpoint_forbidden":
        return "This browser's push service is not allowed by the relay; requests appear while this page is open.";
      case "unauthenticated":
        return "This phone is no longer paired with the relay.";
      default:
        return error.message;
    }
  }
  return error && error.message ? error.message : String(error);
}

function clock(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

// --- start ---------------------------------------------------------------------------

async function start() {
  registerServiceWorker();
  navigator.serviceWorker?.addEventListener("message", (event) => {
    if (event.data && event.data.type === "approval" && event.data.approval_id) {
      openApproval(event.data.approval_id);
    }
  });
  window.addEventListener("online", () => setConnection(""));
  window.addEventListener("offline", () => setConnection("Offline"));

  const wanted = new URLSearchParams(location.search).get("approval");
  if (location.pathname.endsWith("/pair") && location.hash) {
    const raw = location.href;
    // The secret parts leave the address bar and the history at once.
    history.replaceState(null, "", "/app/");
    await offerPairing(raw);
    return;
  }
  if (wanted) history.replaceState(null, "", "/app/");
  state.device = await load("device").catch(() => null);
  if (!state.device) {
    show("welcome");
    return;
  }
  showPaired();
  if (wanted) await openApproval(wanted);
  pollLoop();
}

function registerServiceWorker() {
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("/app/sw.js", { scope: "/app/" }).catch(() => {});
  }
}

// --- pairing -------------------------------------------------------------------------

async function offerPairing(rawLink) {
  alarm("");
  let link;
  try {
    link = parsePairingLink(rawLink);
  } catch (error) {
    show("welcome");
    alarm(error.message);
    return;
  }
  if (link.server !== location.origin) {
    show("welcome");
    alarm(`This pairing code is for another relay (${link.server}). Open it there.`);
    return;
  }
  const existing = await load("device").catch(() => null);
  if (existing) {
    state.device = existing;
    showPaired();
    alarm("This phone is already paired. Unpair it first to pair it again.");
    pollLoop();
    return;
  }
  state.link = link;
  state.rawLink = rawLink;
  // iPhone: Web Push only reaches the Home Screen app, whose storage is its own; the
  // link can be copied here and pasted there.
  $("copy-link").hidden = !isIos() || standalone();
  $("pair-server").textContent = link.server;
  $("pair-name").value = defaultName();
  $("pair-no-proof").hidden = Boolean(link.k);
  show("pair");
  $("pair-title").focus();
}

function isIos() {
  return /iPhone|iPad|iPod/.test(navigator.userAgent);
}

function standalone() {
  return window.matchMedia("(display-mode: standalone)").matches || navigator.standalone === true;
}

async function copyLink() {
  try {
    await navigator.clipboard.writeText(state.rawLink);
    say("Link copied. Open PNS from the Home Screen and paste it there.");
  } catch {
    alarm("Copying is not allowed here; scan the QR code again from the Home Screen app.");
  }
}

function defaultName() {
  const ua = navigator.userAgent;
  const platform = /iPhone|iPad/.test(ua) ? "iPhone" : /Android/.test(ua) ? "Android phone" : "browser";
  return `Web approver (${platform})`;
}

async function pair(event) {
  event.preventDefault();
  const link = state.link;
  const name = $("pair-name").value.trim();
  if (!link || !name) return;
  const button = event.submitter || $("pair-form").querySelector("button");
  button.disabled = true;
  alarm("");
  say("Pairing…");
  try {
    const key = await newDeviceKey();
    const body = {
      pairing_token: link.token,
      name,
      platform: "web",
      app_version: "web-1",
      public_key: key.publicKey,
    };
    if (link.k) body.key_proof = await keyProof(link.k, key.publicKey);
    if ($("pair-push").checked) {
      // A push service that never answers must not keep the phone from pairing.
      const push = await withTimeout(subscribePush(), 15000).catch(() => null);
      if (push) body.push = push;
    }
    const created = await call("POST", "/v1/devices", { body });
    const device = {
      server: link.server,
      device_id: created.device_id,
      device_token: created.device_token,
      name,
      paired_at: new Date().toISOString(),
      signing_key: key.privateKey,
      public_key: key.publicKey,
      push: body.push ? "on" : "off",
      totp: {
        key: await importTotpKey(created.totp.secret, created.totp.algorithm),
        digits: created.totp.digits,
        period: created.totp.period,
      },
    };
    await save("device", device);
    state.device = device;
    state.link = null;
    state.rawLink = null;
    say("Paired. Login requests will appear here.");
    showPaired();
    pollLoop();
  } catch (error) {
    say("");
    alarm(plain(error));
  } finally {
    button.disabled = false;
  }
}

async function usePastedLink(event) {
  event.preventDefault();
  await offerPairing($("paste-link").value);
}

// --- Web Push ------------------------------------------------------------------------

async function subscribePush() {
  if (!("serviceWorker" in navigator) || !("PushManager" in window)) return null;
  const permission = await Notification.requestPermission();
  if (permission !== "granted") return null;
  const registration = await navigator.serviceWorker.ready;
  const { public_key: vapid } = await call("GET", "/v1/webpush");
  let subscription = await registration.pushManager.getSubscription();
  if (!subscription) {
    const raw = Uint8Array.from(atob(vapid.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (vapid.length % 4)) % 4)), (c) => c.charCodeAt(0));
    subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: raw });
  }
  const json = subscription.toJSON();
  return { service: "webpush", endpoint: json.endpoint, keys: json.keys };
}

async function enablePush() {
  alarm("");
  try {
    const push = await withTimeout(subscribePush(), 15000).catch(() => null);
    if (!push) {
      alarm("Notifications are blocked or not supported here. On iPhone, add this page to the Home Screen first.");
      return;
    }
    await call("PUT", "/v1/device/push", { token: state.device.device_token, body: push });
    state.device.push = "on";
    await save("device", state.device);
    showDevice();
    say("Notifications are on.");
  } catch (error) {
    alarm(plain(error));
  }
}

// --- the paired screens --------------------------------------------------------------

function showPaired() {
  showDevice();
  startOtp();
  if (state.approval) showRequest(state.approval);
  else show("idle", "otp", "device");
}

function showDevice() {
  const device = state.device;
  $("dev-name").textContent = device.name;
  $("dev-server").textContent = device.server;
  $("dev-id").textContent = device.device_id;
  $("dev-since").textContent = new Date(device.paired_at).toLocaleString();
  $("dev-push").textContent = device.push === "on" ? "On" : "Off (requests appear while this page is open)";
  $("enable-push").hidden = device.push === "on";
}

let otpTimer = null;

function startOtp() {
  clearInterval(otpTimer);
  const tick = async () => {
    const t = state.device && state.device.totp;
    if (!t) return;
    const now = Date.now();
    const code = await totp(t.key, t.digits, t.period, now);
    const left = t.period - (Math.floor(now / 1000) % t.period);
    const shown = code.length === 6 ? `${code.slice(0, 3)} ${code.slice(3)}` : code;
    if ($("otp-code").textContent !== shown) $("otp-code").textContent = shown;
    $("otp-code").dataset.code = code;
    $("otp-left").textContent = `Changes in ${left} s`;
    $("otp-progress").max = t.period;
    $("otp-progress").value = left;
  };
  tick();
  otpTimer = setInterval(tick, 1000);
}

// --- login requests ------------------------------------------------------------------

let pollRunning = false;

async function pollLoop() {
  if (pollRunning) return;
  pollRunning = true;
  let backoff = 1000;
  while (state.device) {
    try {
      if (state.approval) {
        await recheck();
        await sleep(RECHECK_MS);
      } else {
        const wait = document.hidden ? 0 : POLL_WAIT;
        const list = await call("GET", `/v1/device/approvals?wait=${wait}`, { token: state.device.device_token });
        const next = list.approvals.find((a) => !state.finished.has(a.approval_id));
        if (next) showRequest(next);
        // Only requests answered here are pending (the relay has not expired them yet), or
        // the page is in the background: do not ask again at once.
        else if (document.hidden || list.approvals.length) await sleep(RECHECK_MS);
      }
      if (state.offline) setConnection("");
      state.offline = false;
      backoff = 1000;
    } catch (error) {
      if (error instanceof ApiError && error.code === "unauthenticated") {
        await forget("This phone was removed on the relay, so it is no longer paired.");
        break;
      }
      state.offline = error instanceof Offline;
      setConnection(state.offline ? "Offline — retrying" : "");
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 30000);
    }
  }
  pollRunning = false;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function withTimeout(promise, ms) {
  return Promise.race([
    promise,
    sleep(ms).then(() => {
      throw new Error("timed out");
    }),
  ]);
}

async function openApproval(approvalId) {
  if (!state.device || state.finished.has(approvalId)) return;
  try {
    const approval = await call("GET", `/v1/device/approvals/${encodeURIComponent(approvalId)}`, {
      token: state.device.device_token,
    });
    if (approval.status === "pending") showRequest(approval);
    else say(`That request is ${approval.status}.`);
  } catch (error) {
    alarm(plain(error));
  }
}

async function recheck() {
  const current = state.approval;
  const approval = await call("GET", `/v1/device/approvals/${encodeURIComponent(current.approval_id)}`, {
    token: state.device.device_token,
  });
  if (approval.status !== "pending" && state.approval && state.approval.approval_id === current.approval_id) {
    const words = { expired: "expired", cancelled: "was cancelled on the computer" };
    closeRequest(`The request ${words[approval.status] || `was ${approval.status}`}.`);
  }
}

let leftTimer = null;

function showRequest(approval) {
  const fresh = !state.approval || state.approval.approval_id !== approval.approval_id;
  state.approval = approval;
  const c = approval.context || {};
  $("req-client").textContent = approval.client_name;
  $("req-user").textContent = c.username || "(not given)";
  $("req-host").textContent = c.hostname || "(not given)";
  $("req-ip").textContent = c.ip || "(not given)";
  $("req-action").textContent = c.action || "login";
  $("req-time").textContent = clock(approval.created_at);
  $("req-message").textContent = c.message || "";
  $("req-message").hidden = !c.message;
  $("code-field").hidden = !approval.number_matching;
  show("request", "otp", "device");
  clearInterval(leftTimer);
  const updateLeft = () => {
    const left = Math.max(0, Math.round((new Date(approval.expires_at) - Date.now()) / 1000));
    $("req-left").textContent = left > 0 ? `${left} s` : "expired";
    if (left <= 0) {
      clearInterval(leftTimer);
      if (state.approval === approval) closeRequest("The request has expired. Start the login again.");
    }
  };
  updateLeft();
  leftTimer = setInterval(updateLeft, 1000);
  if (fresh) {
    $("match-code").value = "";
    say("");
    alarm("");
    $("request-title").focus();
  }
}

function closeRequest(message) {
  if (state.approval) state.finished.add(state.approval.approval_id);
  state.approval = null;
  clearInterval(leftTimer);
  if (message) say(message);
  show("idle", "otp", "device");
}

async function answer(kind) {
  const approval = state.approval;
  if (!approval) return;
  const decision = kind === "approve" ? "approve" : "reject";
  const code = $("match-code").value.replace(/\s/g, "");
  if (decision === "approve" && approval.number_matching && !/^[0-9]+$/.test(code)) {
    alarm("Type the number shown on the login screen first.");
    $("match-code").focus();
    return;
  }
  const matchCode = decision === "approve" && approval.number_matching ? code : null;
  const buttons = document.querySelectorAll("#answer-form button");
  buttons.forEach((b) => (b.disabled = true));
  alarm("");
  try {
    const timestamp = rfc3339Now();
    const text = await signedMessage(approval, decision, matchCode, timestamp);
    const signature = await sign(state.device.signing_key, text);
    const result = await call("POST", `/v1/device/approvals/${encodeURIComponent(approval.approval_id)}/response`, {
      token: state.device.device_token,
      body: { decision, match_code: matchCode, fraud: kind === "fraud", timestamp, signature },
    });
    const outcome =
      result.status === "approved"
        ? "Approved. The login continues on the computer."
        : kind === "fraud"
          ? "Rejected and reported. Push approvals for this account are paused; if it was you after all, sign in with the one-time password."
          : decision === "approve"
            ? "The number did not match, so the login was rejected. Start the login again."
            : "Rejected.";
    closeRequest(outcome);
  } catch (error) {
    if (error instanceof ApiError && error.code === "already_decided") closeRequest("");
    alarm(plain(error));
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

// --- unpairing -----------------------------------------------------------------------

async function unpair() {
  if (!confirm("Unpair this phone? It will no longer approve logins or show codes.")) return;
  alarm("");
  try {
    await call("DELETE", "/v1/device", { token: state.device.device_token });
  } catch (error) {
    if (!(error instanceof ApiError && error.code === "unauthenticated")) {
      alarm(plain(error));
      return;
    }
  }
  await forget("This phone is unpaired.");
}

async function forget(message) {
  await remove("device").catch(() => {});
  try {
    const registration = await navigator.serviceWorker?.getRegistration("/app/");
    const subscription = await registration?.pushManager.getSubscription();
    await subscription?.unsubscribe();
  } catch {
    // Nothing to unsubscribe from.
  }
  state.device = null;
  state.approval = null;
  clearInterval(otpTimer);
  clearInterval(leftTimer);
  show("welcome");
  say(message);
}

// --- wiring --------------------------------------------------------------------------

$("pair-form").addEventListener("submit", pair);
$("paste-form").addEventListener("submit", usePastedLink);
$("copy-link").addEventListener("click", copyLink);
$("answer-form").addEventListener("submit", (event) => {
  event.preventDefault();
  answer("approve");
});
$("reject").addEventListener("click", () => answer("reject"));
$("fraud").addEventListener("click", () => answer("fraud"));
$("enable-push").addEventListener("click", enablePush);
$("unpair").addEventListener("click", unpair);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && state.device) pollLoop();
});

start().catch((error) => {
  show("welcome");
  alarm(plain(error));
});
