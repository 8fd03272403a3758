// Socket.IO connection state recovery with the unchanged official client: 1,000 changes (and
// server broadcasts between them) while the client's connection is cut again and again by a
// proxy between it and pgcast. Every event arrives exactly once, in order, each reconnect says
// `socket.recovered === true`, and the rooms are there again without a join. A client away
// longer than the recovery window gets `recovered === false` (it refetches) and its rooms from
// claims again, never a silent gap.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { io } from 'socket.io-client';
import { cuttingProxy, once, startDemo, waitFor } from './demo.mjs';

const WINDOW_SECS = 3;
const CONFIG = readFileSync(resolve(import.meta.dirname, '../../examples/socketio.toml'), 'utf8').replace(
  '[socketio]\n',
  `[socketio]\nrecovery_max_disconnection_secs = ${WINDOW_SECS}\n`,
);

let demo;

before(async () => {
  demo = await startDemo({ config: CONFIG });
});

after(async () => {
  await demo?.stop();
});

async function broadcast(topic, event, payload) {
  const response = await fetch(`${demo.info.http}/api/broadcast`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${demo.info.service_token}` },
    body: JSON.stringify({ messages: [{ topic, event, payload }] }),
  });
  assert.equal(response.status, 202);
}

function recoveringClient(url, claims, transports) {
  const socket = io(url, {
    auth: { token: demo.token(claims) },
    forceNew: true,
    transports,
    reconnectionDelay: 50,
    reconnectionDelayMax: 200,
    randomizationFactor: 0,
  });
  const connects = [];
  const trail = []; // what happened to the connection, for a failure's message
  socket.on('connect', () => connects.push(socket.recovered));
  socket.on('disconnect', (reason) => trail.push(`disconnect: ${reason}`));
  socket.on('connect_error', (e) => trail.push(`connect_error: ${e.message}`));
  socket.io.on('reconnect_attempt', (n) => trail.push(`attempt ${n}`));
  return { socket, connects, trail };
}

for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
  test(`1,000 changes through a cutting proxy (${transports.join('+')}): every event once, in order, recovered`, async () => {
    const proxy = await cuttingProxy(demo.info.http);
    const { socket, connects, trail } = recoveringClient(proxy.url, { role: 'admin', sub: 'recover-admin', tenant_id: 1 }, transports);
    const seen = [];
    socket.on('appointment:updated', ({ operation, appointment }) => seen.push(`${operation} ${appointment.notes}`));
    socket.on('notice', ({ n }) => seen.push(`notice ${n}`));
    await once(socket, 'connect');
    assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'calendar'), { ok: true });

    const expected = [];
    let cuts = 0;
    for (let i = 0; i < 1000; i++) {
      await demo.db.query(
        `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 5, 6, now() + interval '1 day', $1)`,
        [`r${i}`],
      );
      expected.push(`INSERT r${i}`);
      if (i % 20 === 10) {
        await broadcast('calendar', 'notice', { n: i });
        expected.push(`notice ${i}`);
      }
      if (i % 50 === 25) {
        // Wait for the client to be back, so each cut lands on a live connection.
        await waitFor('the client to reconnect', () => socket.connected);
        cuts += proxy.cut() > 0 ? 1 : 0;
      }
    }
    await waitFor(`every event (${expected.length})`, () => seen.length >= expected.length).catch((e) => {
      const missing = expected.filter((x) => !seen.includes(x));
      throw new Error(
        `${e.message}: ${seen.length} seen, missing ${missing.slice(0, 10)}, connects ${JSON.stringify(connects)}, ${trail.slice(-8)}`,
      );
    });
    // Let anything doubled arrive before comparing.
    await broadcast('calendar', 'notice', { n: 'end' });
    expected.push('notice end');
    await waitFor('the last notice', () => seen.at(-1) === 'notice end');
    assert.ok(cuts >= 15, `the connection was cut ${cuts} times`);
    assert.equal(seen.length, expected.length, 'nothing lost, nothing doubled');
    // Two streams, each in its order: changes in commit order, broadcasts in the order sent (a
    // broadcast does not wait for a change committed before it to be captured).
    const stream = (events, kind) => events.filter((e) => e.startsWith(kind));
    assert.deepEqual(stream(seen, 'INSERT'), stream(expected, 'INSERT'), 'changes once each, in commit order');
    assert.deepEqual(stream(seen, 'notice'), stream(expected, 'notice'), 'broadcasts once each, in order');
    assert.ok(connects.length > 1, 'the client reconnected');
    assert.deepEqual(connects.slice(1), connects.slice(1).map(() => true), 'every reconnect recovered');
    socket.disconnect();
    await proxy.close();
  });
}

test('a client away longer than the recovery window gets recovered === false and its claims rooms again', async () => {
  const proxy = await cuttingProxy(demo.info.http);
  const { socket, connects } = recoveringClient(proxy.url, { role: 'admin', sub: 'away-admin', tenant_id: 1 }, ['websocket']);
  const seen = [];
  socket.on('appointment:updated', ({ appointment }) => seen.push(appointment.notes));
  socket.on('hello', (payload) => seen.push(payload.to));
  await once(socket, 'connect');
  assert.deepEqual(await socket.timeout(5000).emitWithAck('join', 'calendar'), { ok: true });
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 5, 6, now() + interval '1 day', 'before')`,
  );
  await waitFor('the first change', () => seen.includes('before'));

  proxy.refuse(true);
  proxy.cut();
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 5, 6, now() + interval '1 day', 'while away')`,
  );
  await new Promise((res) => setTimeout(res, (WINDOW_SECS + 2) * 1000)); // away past the window
  proxy.refuse(false);
  await waitFor('the reconnect', () => connects.length === 2);
  assert.equal(connects[1], false, 'recovered is false past the window');
  // A fresh session: the rooms from claims are joined again, `calendar` (joined by the app) is not.
  await broadcast('user:away-admin', 'hello', { to: 'user room' });
  await waitFor('the user room broadcast', () => seen.includes('user room'));
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 5, 6, now() + interval '1 day', 'after')`,
  );
  await broadcast('user:away-admin', 'hello', { to: 'done' });
  await waitFor('the last broadcast', () => seen.includes('done'));
  assert.deepEqual(seen, ['before', 'user room', 'done'], 'no replay of the gap, and no calendar room');
  socket.disconnect();
  await proxy.close();
});

test("an error event repeats the last offset: the client's place survives it", async () => {
  const proxy = await cuttingProxy(demo.info.http);
  const { socket, connects } = recoveringClient(proxy.url, { role: 'admin', sub: 'error-admin', tenant_id: 1 }, ['websocket']);
  const events = [];
  socket.onAny((event, ...args) => events.push([event, ...args]));
  await once(socket, 'connect');
  await broadcast('user:error-admin', 'hello', { n: 1 });
  await waitFor('the broadcast', () => events.length === 1);
  const offset = events[0].at(-1);
  assert.match(offset, /^b[0-9a-f]+$/);
  const refused = await socket.timeout(5000).emitWithAck('join', 'subscribe:appointments');
  assert.match(refused.error, /is the name of a subscribe event/);
  await waitFor('the error event', () => events.length === 2);
  assert.deepEqual(events[1], ['error', refused.error, offset], 'the error carries the offset read last');

  proxy.cut();
  await broadcast('user:error-admin', 'hello', { n: 2 });
  await waitFor('the reconnect', () => connects.length === 2);
  await waitFor('the missed broadcast', () => events.length === 3);
  assert.equal(connects[1], true);
  assert.deepEqual(events[2].slice(0, 2), ['hello', { n: 2 }]);
  socket.disconnect();
  await proxy.close();
});

async function binaryBroadcast(topic, event, bytes) {
  const response = await fetch(`${demo.info.http}/realtime/v1/api/broadcast/${topic}/events/${event}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/octet-stream', Authorization: `Bearer ${demo.info.service_token}` },
    body: bytes,
  });
  assert.equal(response.status, 202);
}

for (const transports of [['websocket'], ['polling']]) {
  test(`binary broadcasts reach a room as an attachment (${transports}), and are recovered with it`, async () => {
    const proxy = await cuttingProxy(demo.info.http);
    const { socket, connects, trail } = recoveringClient(proxy.url, { role: 'admin', sub: `bin-${transports}`, tenant_id: 1 }, transports);
    const files = [];
    const shown = (data) => (Buffer.isBuffer(data) || data instanceof ArrayBuffer ? Buffer.from(data).toString('hex') : JSON.stringify(data));
    socket.on('file', (data, offset) => files.push([shown(data), typeof offset]));
    await once(socket, 'connect');
    const room = `user:bin-${transports}`; // joined at connect (connect_rooms)
    await binaryBroadcast(room, 'file', new Uint8Array([0, 1, 2, 255]));
    await waitFor('the first file', () => files.length === 1);
    assert.deepEqual(files[0], ['000102ff', 'string'], 'the bytes, then the offset');

    proxy.cut();
    await binaryBroadcast(room, 'file', new Uint8Array([7, 7]));
    await broadcast(room, 'file', { not: 'binary' });
    await waitFor('the reconnect', () => connects.length === 2).catch((e) => {
      throw new Error(`${e.message}: ${trail}`);
    });
    await waitFor('what was sent while cut', () => files.length === 3);
    assert.equal(connects[1], true);
    assert.deepEqual(files.slice(1).map(([data]) => data), ['0707', '{"not":"binary"}']);
    socket.disconnect();
    await proxy.close();
  });
}

test("a pid brought with another user's token gets a fresh session, and the session stays its owner's", async () => {
  const proxy = await cuttingProxy(demo.info.http);
  const owner = recoveringClient(proxy.url, { role: 'admin', sub: 'pid-owner', tenant_id: 1 }, ['websocket']);
  const seen = [];
  owner.socket.on('hello', ({ n }) => seen.push(n));
  await once(owner.socket, 'connect');
  const pid = owner.socket._pid;
  assert.match(pid, /^[0-9a-f]{32}$/);
  proxy.refuse(true);
  proxy.cut();
  await broadcast('user:pid-owner', 'hello', { n: 1 });

  const fresh = async () => {
    const text = await (await fetch(`${demo.info.http}/metrics`)).text();
    return Number(/^pgcast_socketio_recoveries_total\{result="fresh"\} (\d+)/m.exec(text)?.[1] ?? 0);
  };
  const freshBefore = await fresh();
  // Someone else presents the owner's pid (socket.io-client sends `pid` from its own state).
  const thief = io(demo.info.http, { auth: { token: demo.token({ role: 'admin', sub: 'pid-thief', tenant_id: 1 }) }, transports: ['websocket'], reconnection: false, forceNew: true });
  thief._pid = pid;
  thief._lastOffset = '0';
  const stolen = [];
  thief.on('hello', ({ n }) => stolen.push(n));
  await once(thief, 'connect');
  assert.equal(thief.recovered, false, 'not recovered with another user\'s token');
  assert.notEqual(thief._pid, pid);
  assert.equal(await fresh(), freshBefore + 1, 'the pid was presented and refused');

  proxy.refuse(false);
  await waitFor('the owner back', () => owner.connects.length === 2);
  assert.equal(owner.connects[1], true, 'the owner still recovers its session');
  await waitFor('the missed broadcast', () => seen.includes(1));
  assert.deepEqual(stolen, []);
  thief.disconnect();
  owner.socket.disconnect();
  await proxy.close();
});
