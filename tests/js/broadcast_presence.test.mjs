// Broadcast (self, ack, JSON and binary, HTTP) and presence across three official realtime-js
// clients, with both serializers, and private-channel authorization from the policy file.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDemo, subscribed, waitFor } from './demo.mjs';

const POLICY = `
[channels]
[[channels.allow]]
topic = "patient:{claims.sub}"
role = "patient"
read = true
write = true

[[channels.allow]]
topic = "ward:*"
role = "nurse"
read = true
`;

let demo;

before(async () => {
  demo = await startDemo({ policy: POLICY });
});

after(async () => {
  await demo?.stop();
});

function member(vsn, name, config = {}) {
  const rt = demo.client(vsn, demo.token({ role: 'authenticated', sub: name }));
  const got = [];
  const channel = rt.channel(`room-${vsn}`, { config: { presence: { key: name }, ...config } });
  channel.on('broadcast', { event: 'cursor' }, (msg) => got.push(msg));
  return { rt, channel, got };
}

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`broadcast with self and ack between three clients, vsn ${vsn}`, async () => {
    const a = member(vsn, 'alice', { broadcast: { self: true, ack: true } });
    const b = member(vsn, 'bob');
    const c = member(vsn, 'carol');
    await Promise.all([subscribed(a.channel), subscribed(b.channel), subscribed(c.channel)]);

    assert.equal(await a.channel.send({ type: 'broadcast', event: 'cursor', payload: { x: 1 } }), 'ok', 'acked');
    await waitFor('alice, bob and carol get x=1', () => [a, b, c].every((m) => m.got.length === 1));
    assert.deepEqual(b.got[0].payload, { x: 1 });
    assert.equal(b.got[0].event, 'cursor');
    assert.equal(typeof b.got[0].meta?.seq, 'number', 'pgcast sequence in meta, both serializers');

    await b.channel.send({ type: 'broadcast', event: 'cursor', payload: { x: 2 } });
    await waitFor('alice and carol get x=2', () => a.got.length === 2 && c.got.length === 2);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(b.got.length, 1, 'bob did not ask for his own broadcasts');

    if (vsn === '2.0.0') {
      const bytes = new Uint8Array([0, 1, 2, 250, 255]);
      await a.channel.send({ type: 'broadcast', event: 'cursor', payload: bytes.buffer });
      await waitFor('binary payload', () => b.got.length === 2);
      assert.ok(b.got[1].payload instanceof ArrayBuffer, 'binary arrives as an ArrayBuffer');
      assert.deepEqual(new Uint8Array(b.got[1].payload), bytes);
    }

    // Server-side broadcast over HTTP, as application code emits after a write.
    const result = await a.channel.httpSend('cursor', { from: 'server' }).catch((e) => e);
    assert.ok(result instanceof Error, 'httpSend with a non-service token is refused');
    const http = demo.info.http;
    const response = await fetch(`${http}/realtime/v1/api/broadcast`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${demo.info.service_token}` },
      body: JSON.stringify({ messages: [{ topic: `room-${vsn}`, event: 'cursor', payload: { from: 'server' } }] }),
    });
    assert.equal(response.status, 202);
    await waitFor('server broadcast reaches all three', () =>
      [a, b, c].every((m) => m.got.some((msg) => msg.payload?.from === 'server')),
    );

    for (const m of [a, b, c]) m.rt.disconnect();
  });

  test(`presence across three clients, vsn ${vsn}`, async () => {
    const a = member(vsn, 'alice');
    const b = member(vsn, 'bob');
    const c = member(vsn, 'carol');
    const leaves = [];
    c.channel.on('presence', { event: 'sync' }, () => {});
    c.channel.on('presence', { event: 'leave' }, ({ key }) => leaves.push(key));
    await Promise.all([subscribed(a.channel), subscribed(b.channel), subscribed(c.channel)]);

    assert.equal(await a.channel.track({ status: 'online' }), 'ok');
    assert.equal(await b.channel.track({ status: 'busy' }), 'ok');
    await waitFor('carol sees alice and bob', () => {
      const state = c.channel.presenceState();
      return state.alice?.[0]?.status === 'online' && state.bob?.[0]?.status === 'busy';
    });

    await b.channel.untrack();
    await waitFor('bob untracked', () => leaves.includes('bob'));
    assert.equal(c.channel.presenceState().bob, undefined);

    // A client whose socket goes away leaves presence.
    a.rt.disconnect();
    await waitFor('alice left when her socket closed', () => leaves.includes('alice'));
    assert.deepEqual(Object.keys(c.channel.presenceState()), []);
    for (const m of [b, c]) m.rt.disconnect();
  });
}

test('broadcast crosses serializers: a 1.0.0 sender reaches a 2.0.0 receiver', async () => {
  const sender = demo.client('1.0.0', demo.token({ role: 'authenticated', sub: 's' }));
  const receiver = demo.client('2.0.0', demo.token({ role: 'authenticated', sub: 'r' }));
  const got = [];
  const tx = sender.channel('mixed');
  const rx = receiver.channel('mixed').on('broadcast', { event: 'ping' }, (m) => got.push(m.payload));
  await Promise.all([subscribed(tx), subscribed(rx)]);
  await tx.send({ type: 'broadcast', event: 'ping', payload: { n: 1 } });
  await waitFor('ping', () => got.length === 1);
  assert.deepEqual(got[0], { n: 1 });
  sender.disconnect();
  receiver.disconnect();
});

test('private channels follow the policy: own topic only, read-only roles cannot send', async () => {
  const patient = demo.client('2.0.0', demo.token({ role: 'patient', sub: '7' }));
  const own = patient.channel('patient:7', { config: { private: true, broadcast: { ack: true } } });
  await subscribed(own);
  assert.equal(await own.send({ type: 'broadcast', event: 'note', payload: {} }), 'ok');
  const other = patient.channel('patient:8', { config: { private: true } });
  await assert.rejects(subscribed(other), /not allowed to join private channel "patient:8"/);

  const nurse = demo.client('2.0.0', demo.token({ role: 'nurse', sub: 'n1' }));
  const ward = nurse.channel('ward:3', { config: { private: true, broadcast: { ack: true } } });
  await subscribed(ward);
  assert.equal(await ward.send({ type: 'broadcast', event: 'note', payload: {} }), 'error', 'read-only');
  assert.equal(await ward.track({ here: true }), 'error', 'read-only cannot track');
  patient.disconnect();
  nurse.disconnect();
});
