// WebCrypto pieces of the web approver: the device key, key proof, signed answers, TOTP.
// Every string here is byte-exact with the API reference (docs/api.md, docs/mobile.md).

const enc = new TextEncoder();

export function b64(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text);
}

export function b64url(bytes) {
  return b64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function fromB64url(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const raw = atob(padded);
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

export function fromBase32(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  const clean = text.toUpperCase().replace(/=+$/, "").replace(/\s/g, "");
  const out = [];
  let bits = 0;
  let value = 0;
  for (const ch of clean) {
    const index = alphabet.indexOf(ch);
    if (index < 0) throw new Error("not base32");
    value = (value << 5) | index;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return new Uint8Array(out);
}

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The device key: ECDSA P-256, private half non-extractable (it never leaves the browser).
export async function newDeviceKey() {
  const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, [
    "sign",
    "verify",
  ]);
  const spki = await crypto.subtle.exportKey("spki", pair.publicKey);
  return { privateKey: pair.privateKey, publicKey: b64(spki) };
}

// key_proof = base64url-no-padding(HMAC-SHA256(k, "pns-pair-v1|" + public_key)).
export async function keyProof(k, publicKey) {
  const key = await crypto.subtle.importKey("raw", k, { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  const mac = await crypto.subtle.sign("HMAC", key, enc.encode("pns-pair-v1|" + publicKey));
  return b64url(mac);
}

// WebCrypto signs ECDSA as raw r||s; the API wants DER (SEQUENCE of two INTEGERs).
export function rawToDer(raw) {
  const bytes = new Uint8Array(raw);
  const half = bytes.length / 2;
  const integer = (part) => {
    let start = 0;
    while (start < part.length - 1 && part[start] === 0) start += 1;
    let body = part.slice(start);
    if (body[0] & 0x80) body = Uint8Array.of(0, ...body);
    return Uint8Array.of(0x02, body.length, ...body);
  };
  const r = integer(bytes.slice(0, half));
  const s = integer(bytes.slice(half));
  return Uint8Array.of(0x30, r.length + s.length, ...r, ...s);
}

// Sorted keys, no spaces, no ASCII escaping, null for absent: JSON.stringify of an object
// built in key order gives exactly Python's json.dumps(sort_keys=True, separators=(",", ":"),
// ensure_ascii=False).
export async function contextSha256(context) {
  const pick = (name) => (context[name] === undefined ? null : context[name]);
  const canonical = JSON.stringify({
    action: pick("action"),
    hostname: pick("hostname"),
    ip: pick("ip"),
    message: pick("message"),
    username: pick("username"),
  });
  return hex(await crypto.subtle.digest("SHA-256", enc.encode(canonical)));
}

export async function signedMessage(approval, decision, matchCode, timestamp) {
  const code = matchCode || "";
  if (approval.client_nonce) {
    const context = await contextSha256(approval.context || {});
    return [
      "pns-approval-v2",
      approval.approval_id,
      decision,
      code,
      timestamp,
      approval.client_nonce,
      context,
    ].join("|");
  }
  return ["pns-approval-v1", approval.approval_id, decision, code, timestamp].join("|");
}

export async function sign(privateKey, text) {
  const raw = await crypto.subtle.sign(
    { name: "ECDSA", hash: "SHA-256" },
    privateKey,
    enc.encode(text),
  );
  return b64(rawToDer(raw));
}

export function rfc3339Now() {
  return new Date().toISOString().replace(/\.\d{3}Z$/, "Z");
}

// TOTP (RFC 6238) with the seed kept as a non-extractable HMAC key.
const HASHES = { SHA1: "SHA-1", SHA256: "SHA-256", SHA512: "SHA-512" };

export async function importTotpKey(secret, algorithm) {
  const hash = HASHES[(algorithm || "SHA1").toUpperCase()] || "SHA-1";
  return crypto.subtle.importKey("raw", fromBase32(secret), { name: "HMAC", hash }, false, [
    "sign",
  ]);
}

export async function totp(key, digits, period, nowMs) {
  const counter = Math.floor(nowMs / 1000 / period);
  const message = new Uint8Array(8);
  new DataView(message.buffer).setBigUint64(0, BigInt(counter));
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, message));
  const offset = mac[mac.length - 1] & 0x0f;
  const binary =
    ((mac[offset] & 0x7f) << 24) |
    (mac[offset + 1] << 16) |
    (mac[offset + 2] << 8) |
    mac[offset + 3];
  return String(binary % 10 ** digits).padStart(digits, "0");
}
