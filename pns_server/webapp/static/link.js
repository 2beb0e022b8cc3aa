// One parser for both pairing forms:
//   pns://pair?server=<url>&token=<token>#k=<k>              (native apps)
//   https://<relay>/app/pair#server=<url>&token=<token>&k=<k> (web approver, universal link)
// Parameters are read from the query and the fragment alike; the names never change.
import { fromB64url } from "./crypto.js";

export function parsePairingLink(text) {
  let url;
  try {
    url = new URL(String(text).trim());
  } catch {
    throw new Error("This is not a pairing link.");
  }
  const isNative = url.protocol === "pns:";
  const isWeb = (url.protocol === "https:" || url.protocol === "http:") && /\/app\/pair$/.test(url.pathname);
  if (!isNative && !isWeb) throw new Error("This is not a pairing link.");
  const params = new URLSearchParams(url.search);
  for (const [name, value] of new URLSearchParams(url.hash.replace(/^#/, ""))) {
    params.append(name, value);
  }
  const servers = params.getAll("server");
  const tokens = params.getAll("token");
  if (servers.length !== 1 || tokens.length !== 1 || !tokens[0]) {
    throw new Error("The pairing link must carry exactly one server and one token.");
  }
  const server = servers[0].replace(/\/+$/, "");
  if (!/^https?:\/\//.test(server)) throw new Error("The pairing link's server is not a web address.");
  const k = params.get("k");
  let secret = null;
  if (k) {
    secret = fromB64url(k);
    if (secret.length < 16) throw new Error("The pairing link's key is too short.");
  }
  return { server, token: tokens[0], k: secret };
}
