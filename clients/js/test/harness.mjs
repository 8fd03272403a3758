// Shared by the SDK tests: a real `pgcast demo` (PostgreSQL + server), a TCP proxy the tests
// can cut to play a network drop, HS256 tokens for the demo's secret, and waiting on
// conditions with a deadline.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import pg from 'pg';
import WebSocket from 'ws';

const BIN = process.env.PGCAST_BIN ?? resolve(import.meta.dirname, '../../../target/debug/pgcast');

export function freePort() {
  return new Promise((res) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

export async function waitFor(what, predicate, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Starts `pgcast demo`; resolves with `{ info, db, port, stop }` once it is ready. */
export async function startDemo() {
  const dataDir = mkdtempSync(join(tmpdir(), 'pgcast-sdk-'));
  const args = ['demo', '--dir', dataDir, '--pg-port', String(await freePort()), '--listen', '127.0.0.1:0'];
  const demo = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, PGCAST_LOG: 'warn' } });
  const info = await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error('pgcast demo did not start')), 60_000);
    let buffered = '';
    demo.stdout.on('data', (chunk) => {
      buffered += chunk;
      for (const line of buffered.split('\n')) {
        if (line.startsWith('{') && line.includes('"demo_ready"')) {
          clearTimeout(timer);
          res(JSON.parse(line));
        }
      }
    });
  });
  const db = new pg.Client({ connectionString: info.database_url });
  await db.connect();
  return {
    info,
    db,
    port: Number(new URL(info.realtime_url).port),
    async stop() {
      await db.end();
      if (demo.exitCode === null) {
        // A panicked session is contained by the server, but it is a bug: fail the test.
        const metrics = await (await fetch(`http://${new URL(info.realtime_url).host}/metrics`)).text();
        const line = metrics.split('\n').find((l) => l.startsWith('pgcast_session_panics_total '));
        if (Number(line?.split(' ')[1] ?? 0) !== 0) throw new Error(`a session panicked: ${line}`);
        const exited = new Promise((res) => demo.on('exit', res));
        demo.kill('SIGTERM');
        await exited;
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** An HS256 JWT for the demo's secret. */
export function sign(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/**
 * A TCP proxy to pgcast whose connections can be cut, and which refuses (accepts, then drops)
 * connections while cut. `attempts` records when each connection arrived.
 */
export async function proxy(targetPort) {
  const sockets = new Set();
  const attempts = [];
  let open = true;
  const server = net.createServer((client) => {
    attempts.push(Date.now());
    if (!open) return client.destroy();
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.pipe(b);
      a.on('error', () => {});
      a.on('close', () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  const port = await new Promise((res) => server.listen(0, '127.0.0.1', () => res(server.address().port)));
  return {
    port,
    attempts,
    cut() {
      open = false;
      for (const s of sockets) s.destroy();
    },
    restore() {
      open = true;
    },
    close: () => new Promise((res) => server.close(res)),
  };
}

/**
 * The `ws` WebSocket, recording how many sockets the SDK opened and every frame it sent, for
 * tests that check what reached the wire. It is the real transport; nothing is faked.
 */
export function recordingTransport() {
  const wire = { opened: 0, sent: [] };
  wire.transport = class RecordingWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      wire.opened += 1;
    }
    send(data, ...rest) {
      wire.sent.push(JSON.parse(data));
      super.send(data, ...rest);
    }
  };
  return wire;
}

/** Rejects if `promise` has not settled within `ms`, so a hang fails fast instead of at the test timeout. */
export function within(ms, what, promise) {
  let timer;
  const late = new Promise((_, rej) => (timer = setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms)));
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** Inserts an appointment for `patientId` and returns its id. */
export async function insertAppointment(db, patientId) {
  const { rows } = await db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at) VALUES (1, $1, 1, now()) RETURNING id`,
    [patientId],
  );
  return Number(rows[0].id);
}
