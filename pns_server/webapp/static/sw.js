// Service worker: keeps the app available offline (the one-time password needs no network),
// shows login requests pushed by the relay, and opens them when the notification is tapped.
const CACHE = "pns-approver-v1";
const SHELL = [
  "/app/",
  "/app/app.css",
  "/app/app.js",
  "/app/api.js",
  "/app/crypto.js",
  "/app/link.js",
  "/app/store.js",
  "/app/manifest.webmanifest",
  "/app/icons/icon.svg",
  "/app/icons/icon-192.png",
  "/app/icons/icon-512.png",
  "/app/icons/apple-touch-icon.png",
];

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(SHELL))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

// The app's own files: network first (so updates land), the cache when offline.
// The API is never cached: answers must be live.
self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (!url.pathname.startsWith("/app/")) return;
  const key = event.request.mode === "navigate" ? "/app/" : url.pathname;
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        // Pages (/app/, /app/pair: the same file) are kept under /app/, so the offline copy
        // always matches the modules cached beside it.
        if (response.ok && (event.request.mode !== "navigate" || response.headers.get("content-type")?.startsWith("text/html"))) {
          const copy = response.clone();
          caches.open(CACHE).then((cache) => cache.put(key, copy));
        }
        return response;
      })
      .catch(() => caches.match(key).then((hit) => hit || Response.error())),
  );
});

// The payload carries the approval id and a short text, never a secret or the number.
self.addEventListener("push", (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    data = { body: event.data ? event.data.text() : "" };
  }
  const title = data.title || "Login request";
  const options = {
    body: data.body || "Open the approver to answer.",
    tag: data.approval_id || "pns",
    data: { approval_id: data.approval_id || null },
    icon: "/app/icons/icon-192.png",
    badge: "/app/icons/icon-192.png",
    requireInteraction: true,
  };
  event.waitUntil(
    Promise.all([self.registration.showNotification(title, options), tellClients(data.approval_id)]),
  );
});

async function tellClients(approvalId) {
  if (!approvalId) return;
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  for (const client of windows) client.postMessage({ type: "approval", approval_id: approvalId });
}

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const approvalId = event.notification.data && event.notification.data.approval_id;
  event.waitUntil(openRequest(approvalId));
});

async function openRequest(approvalId) {
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  const target = approvalId ? `/app/?approval=${encodeURIComponent(approvalId)}` : "/app/";
  for (const client of windows) {
    if (new URL(client.url).pathname.startsWith("/app/")) {
      client.postMessage({ type: "approval", approval_id: approvalId });
      return client.focus().catch(() => client);
    }
  }
  return self.clients.openWindow(target);
}
