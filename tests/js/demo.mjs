// Shared harness for the Node tests: starts `pgcast demo` (private PostgreSQL + server) on free
// ports, and small helpers to sign tokens, wait with deadlines and cut connections (a proxy).
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import net, { createServer } from 'node:net';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';
import { RealtimeClient } from '@supabase/realtime-js';
import WebSocket from 'ws';
import pg from 'pg';

export const BIN = process.env.PGCAST_BIN ?? resolve(import.meta.dirname, '../../target/debug/pgcast');
export const DEADLINE_MS = 15_000;

export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
    srv.on('error', rej);
  });
}

export async function waitFor(what, predicate) {
  const deadline = Date.now() + DEADLINE_MS;
  while (Date.now() < deadline) {
    if (await predicate()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** The arguments of `emitter`'s next `event` (a Socket.IO socket's, say), within 10 s. */
export function once(emitter, event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within 10 s`)), 10_000);
    emitter.once(event, (...args) => {
      clearTimeout(timer);
      resolve(args);
    });
  });
}

export function sign(claims, secret) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

export function subscribed(channel) {
  return new Promise((res, rej) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') res();
      else if (status === 'CHANNEL_ERROR' || status === 'TIMED_OUT') rej(err ?? new Error(status));
    });
  });
}

/** Fails when a session of the server panicked (the server contains it, but it is a bug). */
export async function assertNoSessionPanics(realtimeUrl) {
  const { host } = new URL(realtimeUrl);
  const metrics = await (await fetch(`http://${host}/metrics`)).text();
  const line = metrics.split('\n').find((l) => l.startsWith('pgcast_session_panics_total '));
  assert.equal(Number(line?.split(' ')[1] ?? 0), 0, 'no session panicked');
}

/** Starts `pgcast demo` (with a policy and a config file if given); returns {info, db,
 * client(vsn, apikey), token(claims), stop()}. */
export async function startDemo({ policy, config } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), 'pgcast-js-'));
  const args = ['demo', '--dir', dataDir, '--pg-port', String(await freePort()), '--listen', '127.0.0.1:0'];
  if (policy) {
    const path = join(dataDir, 'policy.toml');
    writeFileSync(path, policy);
    args.push('--policy', path);
  }
  if (config) {
    const path = join(dataDir, 'pgcast.toml');
    writeFileSync(path, config);
    args.push('--config', path);
  }
  const demo = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, PGCAST_LOG: process.env.PGCAST_LOG ?? 'warn' } });
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
    demo.on('exit', (code) => rej(new Error(`pgcast demo exited with ${code}`)));
  });
  const db = new pg.Client({ connectionString: info.database_url });
  await db.connect();
  const token = (claims) => sign({ exp: Math.floor(Date.now() / 1000) + 600, ...claims }, info.jwt_secret);
  // Node 20 has no global WebSocket: realtime-js documents passing `ws` as the transport.
  const client = (vsn, apikey = info.service_token) =>
    new RealtimeClient(info.realtime_url, { params: { apikey }, transport: WebSocket, vsn });
  const stop = async () => {
    await db.end();
    if (demo.exitCode === null) {
      await assertNoSessionPanics(info.realtime_url);
      const exited = new Promise((res) => demo.on('exit', (code) => res(code)));
      demo.kill('SIGTERM');
      assert.equal(await exited, 0, 'pgcast demo shuts down cleanly on SIGTERM');
    }
    rmSync(dataDir, { recursive: true, force: true });
  };
  return { info, db, client, token, stop };
}

/** A TCP proxy to pgcast that can cut every connection through it, or refuse new ones. */
export async function cuttingProxy(target) {
  const { hostname, port } = new URL(target);
  const pairs = new Set();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    const pair = [client, upstream];
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    /** Cuts every connection at once: what is in flight is lost. */
    cut() {
      const cut = pairs.size;
      for (const [client, upstream] of [...pairs]) {
        client.resetAndDestroy();
        upstream.resetAndDestroy();
      }
      return cut;
    },
    refuse(on) {
      refusing = on;
    },
    close() {
      this.cut(); // keep-alive connections would hold server.close() open
      return new Promise((res) => server.close(res));
    },
  };
}
