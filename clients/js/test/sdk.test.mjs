// The SDK against a real pgcast (`pgcast demo`), through a TCP proxy the test can cut to play a
// phone changing networks: the client reconnects by itself and resumes with no gap.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import WebSocket from 'ws';
import pg from 'pg';
import React from 'react';
import TestRenderer from 'react-test-renderer';
import { PgcastClient } from '../dist/index.js';
import { useConnectionStatus, useTableChanges } from '../dist/react.js';

const BIN = process.env.PGCAST_BIN ?? resolve(import.meta.dirname, '../../../target/debug/pgcast');
let demo;
let info;
let db;
let dataDir;

function freePort() {
  return new Promise((res) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

async function waitFor(what, predicate, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (predicate()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A TCP proxy to pgcast whose connections can be cut and refused for a while. */
async function proxy(targetPort) {
  const sockets = new Set();
  let open = true;
  const server = net.createServer((client) => {
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

before(async () => {
  dataDir = mkdtempSync(join(tmpdir(), 'pgcast-sdk-'));
  const args = ['demo', '--dir', dataDir, '--pg-port', String(await freePort()), '--listen', '127.0.0.1:0'];
  demo = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, PGCAST_LOG: 'warn' } });
  info = await new Promise((res, rej) => {
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
  db = new pg.Client({ connectionString: info.database_url });
  await db.connect();
});

after(async () => {
  await db?.end();
  if (demo && demo.exitCode === null) {
    const exited = new Promise((res) => demo.on('exit', res));
    demo.kill('SIGTERM');
    await exited;
  }
  rmSync(dataDir, { recursive: true, force: true });
});

function serverPort() {
  return Number(new URL(info.realtime_url).port);
}

test('a connection cut for 5 s reconnects by itself and resumes with no gap and no duplicate', async () => {
  const cutter = await proxy(serverPort());
  const client = new PgcastClient(`ws://127.0.0.1:${cutter.port}`, {
    getToken: () => info.service_token,
    transport: WebSocket,
    initialDelayMs: 200,
    maxDelayMs: 1000,
  });
  const statuses = [];
  client.onStatus((s) => statuses.push(s));
  const ids = [];
  const channel = client
    .channel('sdk-resume')
    .onChange({ event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.501' }, (c) => ids.push(c.record.id));
  await channel.subscribe();
  assert.equal(client.status, 'live');

  const insert = async () =>
    Number(
      (
        await db.query(
          `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at) VALUES (1, 501, 1, now()) RETURNING id`,
        )
      ).rows[0].id,
    );
  const expected = [await insert(), await insert()];
  await waitFor('first two', () => ids.length === 2);

  cutter.cut();
  await waitFor('connecting', () => client.status === 'connecting');
  for (let i = 0; i < 5; i++) expected.push(await insert());
  await new Promise((r) => setTimeout(r, 5000)); // the scenario: 5 s without network
  cutter.restore();
  await waitFor('live again', () => client.status === 'live');
  expected.push(await insert());
  await waitFor('every change', () => ids.length >= expected.length);
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(ids, expected, 'in order, exactly once across the cut');
  assert.deepEqual(statuses.slice(0, 3), ['connecting', 'live', 'connecting']);
  client.disconnect();
  assert.equal(client.status, 'offline');
  await cutter.close();
});

test('broadcast and presence through the SDK, resumed after a cut', async () => {
  const cutter = await proxy(serverPort());
  const make = (port) =>
    new PgcastClient(`ws://127.0.0.1:${port}`, { token: info.service_token, transport: WebSocket, initialDelayMs: 200 });
  const listener = make(cutter.port);
  const speaker = make(serverPort());
  const heard = [];
  let present = {};
  await listener
    .channel('sdk-room', { presenceKey: 'listener' })
    .onBroadcast('note', (p) => heard.push(p.n))
    .onPresence((state) => (present = state))
    .subscribe();
  const room = speaker.channel('sdk-room', { presenceKey: 'speaker' });
  await room.subscribe();
  await room.track({ online: true });
  await waitFor('speaker present', () => present.speaker?.length === 1);
  await room.send('note', { n: 1 });
  await waitFor('note 1', () => heard.length === 1);
  cutter.cut();
  await room.send('note', { n: 2 });
  await room.send('note', { n: 3 });
  cutter.restore();
  await waitFor('missed notes replayed', () => heard.length === 3);
  assert.deepEqual(heard, [1, 2, 3]);
  listener.disconnect();
  speaker.disconnect();
  await cutter.close();
});

test('React hooks: useConnectionStatus and useTableChanges', async () => {
  const client = new PgcastClient(info.realtime_url, { token: info.service_token, transport: WebSocket });
  const seen = [];
  function Badge() {
    const status = useConnectionStatus(client);
    useTableChanges(client, { event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.777' }, (change) =>
      seen.push(change.record.id),
    );
    return React.createElement('span', null, status === 'live' ? 'Live' : 'Connecting');
  }
  let renderer;
  await TestRenderer.act(async () => {
    renderer = TestRenderer.create(React.createElement(Badge));
  });
  await waitFor('Live badge', () => renderer.toJSON().children[0] === 'Live');
  // The join completes shortly after the socket is live.
  await waitFor('subscribed', () => client.channel('table:public:appointments:INSERT:patient_id=eq.777').isJoined);
  await db.query(`INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at) VALUES (1, 777, 1, now())`);
  await waitFor('hook received the change', () => seen.length === 1);
  await TestRenderer.act(async () => renderer.unmount());
  client.disconnect();
});
