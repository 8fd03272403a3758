// The official socket.io-client (npm) against pgcast's Socket.IO endpoint on `pgcast demo`:
// the token in `auth.token`, an `Authorization` header or `?token=`; refusals as connect_error;
// rooms joined at connect from claims and by `join` (acked), authorized by the policy file's
// channel rules; `leave`; and one broadcast space with the Supabase endpoint.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { once, startDemo, subscribed, waitFor } from './demo.mjs';

const POLICY = `
[channels]
[[channels.allow]]
topic = "patient:{claims.sub}"
role = "patient"
read = true
`;

const CONFIG = `
[socketio]
path = "/api/socket"
connect_rooms = ["user:{claims.sub}", "{claims.role}s"]
`;

let demo;

before(async () => {
  demo = await startDemo({ policy: POLICY, config: CONFIG });
});

after(async () => {
  await demo?.stop();
});

/** An event's arguments without its recovery offset: socket.io-client takes the last argument of
 * every event as one (connection state recovery), so pgcast ends each event with it. */
function payloadOf(args) {
  assert.match(String(args.at(-1)), /^(b[0-9a-f]+|c[0-9A-F]{16}\.[0-9A-F]{8}\.[0-9a-f]+|0)$/, 'the event ends with its offset');
  return args.slice(0, -1);
}

function connect(opts = {}) {
  return io(demo.info.http, { path: '/api/socket', reconnection: false, forceNew: true, ...opts });
}

async function serverBroadcast(messages) {
  const response = await fetch(`${demo.info.http}/api/broadcast`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${demo.info.service_token}` },
    body: JSON.stringify({ messages }),
  });
  assert.equal(response.status, 202);
}

test('a token in auth.token, an Authorization header or ?token= connects; none or a bad one is refused', async () => {
  const token = demo.token({ role: 'authenticated', sub: 'alice' });
  for (const opts of [
    { auth: { token } },
    { extraHeaders: { Authorization: `Bearer ${token}` } },
    { query: { token } },
    { auth: { token }, transports: ['websocket'] },
  ]) {
    const socket = connect(opts);
    await once(socket, 'connect');
    assert.equal(typeof socket.id, 'string');
    socket.disconnect();
  }

  const none = connect();
  const [missing] = await once(none, 'connect_error');
  assert.match(missing.message, /^no token: pass it as auth\.token/);
  none.disconnect();

  const forged = connect({ auth: { token: token.slice(0, -4) + 'AAAA' } });
  const [bad] = await once(forged, 'connect_error');
  assert.equal(bad.message, 'invalid token: token signature is invalid');
  forged.disconnect();
  const refusals = await (await fetch(`${demo.info.http}/metrics`)).text();
  assert.match(refusals, /^pgcast_auth_failures_total\{protocol="socketio"\} [1-9]/m, 'refusals counted by protocol');

  const expired = connect({ auth: { token: demo.token({ role: 'authenticated', exp: 1 }) } });
  const [old] = await once(expired, 'connect_error');
  assert.equal(old.message, 'invalid token: token has expired');
  expired.disconnect();
});

test('rooms: joined at connect from claims, by join (acked), left by leave; one broadcast space with Phoenix', async () => {
  const socket = connect({ auth: { token: demo.token({ role: 'nurse', sub: 'bob' }) } });
  const got = [];
  socket.onAny((event, ...args) => got.push({ event, args: payloadOf(args) }));
  await once(socket, 'connect');

  const metrics = await (await fetch(`${demo.info.http}/metrics`)).text();
  assert.match(metrics, /^pgcast_connections_by_protocol\{protocol="socketio"\} [1-9]/m, 'counted by protocol');

  // Connect rooms from the config: user:{claims.sub} and {claims.role}s.
  await serverBroadcast([
    { topic: 'user:bob', event: 'inbox:updated', payload: { n: 1 } },
    { topic: 'nurses', event: 'ward:updated', payload: { n: 2 } },
  ]);
  await waitFor('both connect-room events', () => got.length === 2);
  const sent = await (await fetch(`${demo.info.http}/metrics`)).text();
  assert.match(sent, /^pgcast_messages_sent_total\{protocol="socketio"\} [1-9]/m, 'messages counted by protocol');
  assert.deepEqual(got, [
    { event: 'inbox:updated', args: [{ n: 1 }] },
    { event: 'ward:updated', args: [{ n: 2 }] },
  ]);

  // A public room, joined with an ack; a Phoenix member of the same topic gets the same broadcast.
  assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'calendar'), { ok: true });
  const rt = demo.client('2.0.0');
  const phoenix = [];
  const channel = rt.channel('calendar');
  channel.on('broadcast', { event: 'appointment:updated' }, (msg) => phoenix.push(msg.payload));
  await subscribed(channel);
  await serverBroadcast([{ topic: 'calendar', event: 'appointment:updated', payload: { id: 42 } }]);
  await waitFor('the broadcast on both protocols', () => got.length === 3 && phoenix.length === 1);
  assert.deepEqual(got[2], { event: 'appointment:updated', args: [{ id: 42 }] });
  assert.deepEqual(phoenix[0], { id: 42 });

  // After leave, the room's broadcasts stop; the connect room still delivers (and, behind it in
  // the same connection's order, proves the left room's event was not sent).
  assert.deepEqual(await socket.timeout(5000).emitWithAck('leave', 'calendar'), { ok: true });
  await serverBroadcast([
    { topic: 'calendar', event: 'appointment:updated', payload: { id: 43 } },
    { topic: 'user:bob', event: 'inbox:updated', payload: { n: 3 } },
  ]);
  await waitFor('the fence event', () => got.length === 4);
  assert.deepEqual(got[3], { event: 'inbox:updated', args: [{ n: 3 }] });
  assert.deepEqual(await socket.timeout(5000).emitWithAck('leave', 'calendar'), { error: 'not in room "calendar"' });

  rt.disconnect();
  socket.disconnect();
});

test("a room a channel rule names is the rule's: own room joins, another's is refused with ack and error", async () => {
  const socket = connect({ auth: { token: demo.token({ role: 'patient', sub: '7' }) } });
  const errors = [];
  socket.on('error', (message) => errors.push(message));
  await once(socket, 'connect');
  assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'patient:7'), { ok: true });
  const refused = await socket.timeout(5000).emitWithAck('join', 'patient:8');
  assert.match(refused.error, /^Access denied: role "patient" is not allowed to join private channel "patient:8"/);
  await waitFor('the error event', () => errors.length === 1);
  assert.equal(errors[0], refused.error);

  const odd = await socket.timeout(5000).emitWithAck('join', 'bad\u0000room');
  assert.match(odd.error, /control characters are not allowed/);
  const unknown = await socket.timeout(5000).emitWithAck('teleport', 'x');
  assert.equal(unknown.error, 'unknown event "teleport"');

  // The connection is unharmed: its own room still delivers.
  const inbox = once(socket, 'visit:updated');
  await serverBroadcast([{ topic: 'patient:7', event: 'visit:updated', payload: { id: 1 } }]);
  assert.deepEqual(payloadOf(await inbox), [{ id: 1 }]);
  socket.disconnect();
});

test('access_token hands a new token and keeps the rooms; a bad one is refused', async () => {
  const socket = connect({ auth: { token: demo.token({ role: 'authenticated', sub: 'carol' }) } });
  await once(socket, 'connect');
  assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'lobby'), { ok: true });
  const fresh = demo.token({ role: 'authenticated', sub: 'carol', exp: Math.floor(Date.now() / 1000) + 3600 });
  assert.deepEqual(await socket.timeout(5000).emitWithAck('access_token', fresh), { ok: true });
  const bad = await socket.timeout(5000).emitWithAck('access_token', 'not-a-jwt');
  assert.equal(bad.error, 'invalid token: token is malformed (not a JWT)');
  const event = once(socket, 'lobby:news');
  await serverBroadcast([{ topic: 'lobby', event: 'lobby:news', payload: { still: 'joined' } }]);
  assert.deepEqual(payloadOf(await event), [{ still: 'joined' }]);
  socket.disconnect();
});

test('a token that expires ends delivery: an error event naming it, then a server disconnect', async () => {
  const exp = Math.floor(Date.now() / 1000) + 2;
  const socket = connect({ auth: { token: demo.token({ role: 'authenticated', sub: 'dave', exp }) } });
  const errors = [];
  socket.on('error', (message) => errors.push(message));
  await once(socket, 'connect');
  assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'lobby'), { ok: true });
  const [reason] = await once(socket, 'disconnect');
  assert.equal(reason, 'io server disconnect', 'the server ended it: no automatic reconnect');
  assert.ok(errors.some((e) => /^Token has expired \d+ seconds ago$/.test(e)), JSON.stringify(errors));
});

test('handshakes without a valid token are bounded (503 past max_unauthenticated_connections); with one they are not counted', async () => {
  const small = await startDemo({ config: 'max_unauthenticated_connections = 1\n' });
  try {
    const handshake = (query = '') => fetch(`${small.info.http}/socket.io/?EIO=4&transport=polling${query}`);
    const first = await handshake();
    assert.equal(first.status, 200, 'the first tokenless session is admitted (and stays until it connects)');
    const second = await handshake();
    assert.equal(second.status, 503);
    assert.match((await second.json()).message, /^too many connections without a token \(at most 1\)/);
    const token = small.token({ role: 'authenticated', sub: 'erin' });
    const third = await handshake(`&token=${token}`);
    assert.equal(third.status, 200, 'a handshake with a valid token does not count as unauthenticated');
  } finally {
    await small.stop();
  }
});
