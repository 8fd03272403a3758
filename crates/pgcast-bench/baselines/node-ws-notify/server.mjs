// The baseline pgcast is measured against: the Node design that seed 003 recommends (the `ws`
// WebSocket server fed by PostgreSQL LISTEN/NOTIFY, a trigger sending `row_to_json(NEW)`), made
// to speak just enough of the Supabase Realtime protocol (Phoenix v2 frames) for pgcast-bench's
// clients: `phx_join` with `postgres_changes` on the bench table (table-wide or
// `user_id=eq.N`) or a broadcast topic, `heartbeat`, client `broadcast` pushes and
// `POST /api/broadcast`. It reads pgcast's environment (PGCAST_DATABASE_URL, PGCAST_LISTEN,
// PGCAST_JWT_SECRET) so the bench starts it like pgcast.
//
// It is not pgcast and not for production: no resume, no policies, no slow-consumer limit, and
// a NOTIFY listener misses whatever is committed while it is disconnected. It is kept faithful
// to the seed, with one concession in its favour: own-rows subscribers are found through a map
// by user id instead of the seed's loop over every client, and a message is serialized once
// per topic, not once per recipient.

import http from "node:http";
import pg from "pg";
import { answer, databaseUrl, host, port, readBody, verify } from "../common.mjs";
import { WebSocketServer, WebSocket } from "ws";

const TABLE = "bench_rows";
const CHANNEL = "pgcast_baseline";

// Subscribers: table-wide ones, own-rows ones by user id, and broadcast topics' members.
/** @type {Map<object, {ws: WebSocket, topic: string, ids: number[]}>} */
const tableWide = new Map();
/** @type {Map<string, Map<object, {ws: WebSocket, topic: string, ids: number[]}>>} */
const byUser = new Map();
/** @type {Map<string, Set<WebSocket>>} */
const topics = new Map();
let ready = false;
let nextBindingId = 1;

function reply(ws, joinRef, ref, topic, status, response) {
  ws.send(JSON.stringify([joinRef, ref, topic, "phx_reply", { status, response }]));
}

function join(ws, state, joinRef, ref, topic, payload) {
  const bindings = payload?.config?.postgres_changes ?? [];
  const ids = [];
  for (const binding of bindings) {
    if (binding.table !== TABLE) {
      reply(ws, joinRef, ref, topic, "error", { reason: `unknown table ${binding.table}` });
      return;
    }
    const id = nextBindingId++;
    ids.push({ id, event: binding.event ?? "*", schema: "public", table: TABLE, filter: binding.filter });
    const entry = { ws, topic, ids: [id] };
    const key = {};
    const match = /^user_id=eq\.(.+)$/.exec(binding.filter ?? "");
    if (match) {
      if (!byUser.has(match[1])) byUser.set(match[1], new Map());
      byUser.get(match[1]).set(key, entry);
      state.leave.push(() => {
        const users = byUser.get(match[1]);
        users?.delete(key);
        if (users?.size === 0) byUser.delete(match[1]);
      });
    } else if (!binding.filter) {
      tableWide.set(key, entry);
      state.leave.push(() => tableWide.delete(key));
    } else {
      reply(ws, joinRef, ref, topic, "error", { reason: `unsupported filter ${binding.filter}` });
      return;
    }
  }
  if (!topics.has(topic)) topics.set(topic, new Set());
  topics.get(topic).add(ws);
  state.leave.push(() => topics.get(topic)?.delete(ws));
  reply(ws, joinRef, ref, topic, "ok", { postgres_changes: ids });
}

/** Sends a broadcast to every member of the topic but the sender, serialized once. */
function broadcast(topic, event, payload, sender) {
  const members = topics.get(topic);
  if (!members) return;
  const frame = JSON.stringify([null, null, topic, "broadcast", { type: "broadcast", event, payload }]);
  for (const member of members) {
    if (member !== sender && member.readyState === WebSocket.OPEN) member.send(frame);
  }
}

/** Delivers one NOTIFY payload (`{type, commit_timestamp, record}`) to its subscribers. */
function deliver(text) {
  let change;
  try {
    change = JSON.parse(text);
  } catch {
    return;
  }
  const frames = new Map();
  const send = ({ ws, topic, ids }) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    let frame = frames.get(topic);
    if (frame === undefined) {
      const data = {
        schema: "public",
        table: TABLE,
        commit_timestamp: change.commit_timestamp,
        type: change.type,
        record: change.record,
        old_record: null,
        errors: null,
      };
      frame = JSON.stringify([null, null, topic, "postgres_changes", { ids, data }]);
      frames.set(topic, frame);
    }
    ws.send(frame);
  };
  for (const entry of tableWide.values()) send(entry);
  const own = byUser.get(String(change.record?.user_id));
  if (own) for (const entry of own.values()) send(entry);
}

async function startListening() {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  await client.query(`
    CREATE OR REPLACE FUNCTION public.pgcast_baseline_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('${CHANNEL}', json_build_object(
        'type', TG_OP, 'commit_timestamp', now(), 'record', row_to_json(NEW))::text);
      RETURN NEW;
    END $$;
    DROP TRIGGER IF EXISTS pgcast_baseline ON public.${TABLE};
    CREATE TRIGGER pgcast_baseline AFTER INSERT OR UPDATE ON public.${TABLE}
      FOR EACH ROW EXECUTE FUNCTION public.pgcast_baseline_notify();
  `);
  client.on("notification", (message) => deliver(message.payload));
  client.on("error", (error) => {
    console.error("database connection lost:", error.message);
    process.exit(1);
  });
  await client.query(`LISTEN ${CHANNEL}`);
  ready = true;
}

const server = http.createServer(async (request, response) => {
  const path = (request.url ?? "/").split("?")[0];
  if (request.method === "GET" && path === "/ready") {
    answer(response, ready ? 200 : 503, ready ? "ready" : "starting");
  } else if (request.method === "GET" && path === "/metrics") {
    answer(response, 200, `pgcast_connections ${wss.clients.size}\n`);
  } else if (request.method === "POST" && path === "/api/broadcast") {
    const token = (request.headers.authorization ?? "").replace(/^Bearer /, "");
    if (!verify(token)) {
      answer(response, 401, "invalid token");
      return;
    }
    try {
      const body = JSON.parse(await readBody(request));
      for (const m of body.messages ?? []) broadcast(`realtime:${m.topic}`, m.event, m.payload, null);
      answer(response, 202, "{}");
    } catch (error) {
      answer(response, 400, String(error.message));
    }
  } else {
    answer(response, 404, "not found");
  }
});

const wss = new WebSocketServer({ noServer: true });
server.on("upgrade", (request, socket, head) => {
  const url = new URL(request.url ?? "/", "http://localhost");
  if (url.pathname !== "/realtime/v1/websocket" || !verify(url.searchParams.get("apikey"))) {
    socket.end("HTTP/1.1 401 Unauthorized\r\n\r\n");
    return;
  }
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit("connection", ws));
});

wss.on("connection", (ws) => {
  const state = { leave: [] };
  ws.on("message", (data) => {
    let frame;
    try {
      frame = JSON.parse(data.toString());
    } catch {
      return;
    }
    if (!Array.isArray(frame) || frame.length !== 5) return;
    const [joinRef, ref, topic, event, payload] = frame;
    if (event === "heartbeat") reply(ws, null, ref, topic, "ok", {});
    else if (event === "phx_join") join(ws, state, joinRef, ref, topic, payload);
    else if (event === "broadcast") broadcast(topic, payload?.event, payload?.payload, ws);
    else if (event === "phx_leave") reply(ws, joinRef, ref, topic, "ok", {});
  });
  ws.on("close", () => {
    for (const leave of state.leave) leave();
  });
});

await startListening();
server.listen(port, host, () => console.log(`baseline listening on ${host}:${port}`));
