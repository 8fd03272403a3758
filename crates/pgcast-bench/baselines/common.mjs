// What both Node baselines share: pgcast's environment (PGCAST_DATABASE_URL, PGCAST_LISTEN,
// PGCAST_JWT_SECRET, so pgcast-bench starts them like pgcast), the HS256 token check, and the
// HTTP helpers of their small REST side. Node built-ins only: each baseline's own packages stay
// in its directory.

import crypto from "node:crypto";

const databaseUrl = process.env.PGCAST_DATABASE_URL;
const secret = process.env.PGCAST_JWT_SECRET;
const listen = process.env.PGCAST_LISTEN ?? "127.0.0.1:4000";
if (!databaseUrl || !secret) {
  console.error("PGCAST_DATABASE_URL and PGCAST_JWT_SECRET are required");
  process.exit(2);
}
const colon = listen.lastIndexOf(":");

export { databaseUrl };
export const host = listen.slice(0, colon);
export const port = Number(listen.slice(colon + 1));

/** HS256 JWT check (signature and expiry); returns the claims or null. */
export function verify(token) {
  const parts = (token ?? "").split(".");
  if (parts.length !== 3) return null;
  const expected = crypto.createHmac("sha256", secret).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], "base64url");
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString("utf8"));
    if (typeof claims.exp === "number" && claims.exp < Date.now() / 1000) return null;
    return claims;
  } catch {
    return null;
  }
}

export function readBody(request) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    request.on("data", (chunk) => chunks.push(chunk));
    request.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    request.on("error", reject);
  });
}

/** Answers with an explicit Content-Length (pgcast-bench's HTTP client reads no chunks). */
export function answer(response, status, body) {
  response.writeHead(status, { "content-type": "text/plain", "content-length": Buffer.byteLength(body) });
  response.end(body);
}
