// The second baseline pgcast is measured against: the Node design of seed 000 (a `socket.io`
// server fed by PostgreSQL LISTEN/NOTIFY, a trigger sending `row_to_json(NEW)`, JWT in the
// handshake, rooms per resource and emit helpers), speaking what pgcast-bench's Socket.IO
// clients send: `join` (a room, acked), `subscribe:bench` with `{user}` (the room of that user's
// rows), and `POST /api/broadcast` to a room. It reads pgcast's environment (PGCAST_DATABASE_URL,
// PGCAST_LISTEN, PGCAST_JWT_SECRET) so the bench starts it like pgcast.
//
// It is not pgcast and not for production: no recovery, no policies, no slow-consumer limit,
// and a NOTIFY listener misses whatever is committed while it is disconnected. It keeps the
// seed's shape, with socket.io's own advantages: one `io.to(a).to(b).emit` per change (socket.io
// encodes a packet once per emit, and a socket in both rooms gets it once).

import http from "node:http";
import pg from "pg";
import { answer, databaseUrl, host, port, readBody, verify } from "../common.mjs";
import { Server } from "socket.io";

const TABLE = "bench_rows";
const CHANNEL = "pgcast_baseline_sio";

let ready = false;

const server = http.createServer(async (request, response) => {
  const path = (request.url ?? "/").split("?")[0];
  if (path.startsWith("/socket.io/")) return; // socket.io's own handler answers
  if (request.method === "GET" && path === "/ready") {
    answer(response, ready ? 200 : 503, ready ? "ready" : "starting");
  } else if (request.method === "GET" && path === "/metrics") {
    answer(response, 200, `pgcast_connections ${io.engine.clientsCount}\n`);
  } else if (request.method === "POST" && path === "/api/broadcast") {
    if (!verify((request.headers.authorization ?? "").replace(/^Bearer /, ""))) {
      answer(response, 401, "invalid token");
      return;
    }
    try {
      const body = JSON.parse(await readBody(request));
      for (const m of body.messages ?? []) io.to(m.topic).emit(m.event, m.payload);
      answer(response, 202, "{}");
    } catch (error) {
      answer(response, 400, String(error.message));
    }
  } else {
    answer(response, 404, "not found");
  }
});

const io = new Server(server, { serveClient: false });

// Seed 000: the JWT in the handshake, verified once by a middleware.
io.use((socket, next) => {
  const claims = verify(socket.handshake.auth?.token ?? socket.handshake.query?.token);
  if (!claims) return next(new Error("Authentication error"));
  socket.data.user = claims;
  next();
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    if (typeof room !== "string") return ack?.({ error: "join needs a room" });
    socket.join(room);
    ack?.({ ok: true });
  });
  socket.on("leave", (room, ack) => {
    socket.leave(room);
    ack?.({ ok: true });
  });
  socket.on("subscribe:bench", (filter, ack) => {
    socket.join(`user:${filter?.user}`);
    ack?.({ ok: true });
  });
});

/** Seed 000's emit helper: one change to the table's room and its user's room. */
function emitChange(text) {
  let change;
  try {
    change = JSON.parse(text);
  } catch {
    return;
  }
  io.to(TABLE).to(`user:${change.record?.user_id}`).emit("bench", { operation: change.type, row: change.record });
}

async function startListening() {
  const client = new pg.Client({ connectionString: databaseUrl });
  await client.connect();
  await client.query(`
    CREATE OR REPLACE FUNCTION public.pgcast_baseline_sio_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('${CHANNEL}', json_build_object('type', TG_OP, 'record', row_to_json(NEW))::text);
      RETURN NEW;
    END $$;
    DROP TRIGGER IF EXISTS pgcast_baseline_sio ON public.${TABLE};
    CREATE TRIGGER pgcast_baseline_sio AFTER INSERT OR UPDATE ON public.${TABLE}
      FOR EACH ROW EXECUTE FUNCTION public.pgcast_baseline_sio_notify();
  `);
  client.on("notification", (message) => emitChange(message.payload));
  client.on("error", (error) => {
    console.error("database connection lost:", error.message);
    process.exit(1);
  });
  await client.query(`LISTEN ${CHANNEL}`);
  ready = true;
}

await startListening();
server.listen(port, host, () => console.log(`socket.io baseline listening on ${host}:${port}`));
