// The SDK against a real pgcast (`pgcast demo`), through a TCP proxy the test can cut to play a
// phone changing networks: the client reconnects by itself and resumes with no gap.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import React from 'react';
import TestRenderer from 'react-test-renderer';
import { PgcastClient } from '../dist/index.js';
import { useConnectionStatus, useTableChanges } from '../dist/react.js';
import { proxy, startDemo, waitFor } from './harness.mjs';

let demo;
let info;
let db;

before(async () => {
  demo = await startDemo();
  ({ info, db } = demo);
});

after(async () => {
  await demo?.stop();
});

function serverPort() {
  return demo.port;
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
  // Changes arrive in commit order: once the last is in, a duplicate of any earlier one would be too.
  await waitFor('the last change', () => ids.includes(expected.at(-1)));
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
