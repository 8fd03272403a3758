// The SDK's long-lived behaviour against a real pgcast: refreshing a token before it expires so a
// channel outlives it, giving up after `maxAttempts` with backoff that grows (and starting over
// on `connect()`), and opening exactly the sockets it should.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import WebSocket from 'ws';
import { PgcastClient } from '../dist/index.js';
import { insertAppointment, proxy, recordingTransport, sign, startDemo, waitFor, within } from './harness.mjs';

let demo;

before(async () => {
  demo = await startDemo();
});

after(async () => {
  await demo?.stop();
});

const tokenUntil = (exp) => sign(demo.info.jwt_secret, { role: 'service_role', exp });
const nowSecs = () => Math.floor(Date.now() / 1000);

test('getToken is asked again before expiry and the new token is pushed: the channel outlives its first token, a fixed token’s does not', async () => {
  // Both clients start with a token of the same `exp`, so when the server closes the fixed
  // client's channel, the refreshing client's first token has expired too.
  const firstExp = nowSecs() + 3;
  const asked = []; // every getToken call: when, and the token it returned
  const wire = recordingTransport();
  const refreshing = new PgcastClient(demo.info.realtime_url, {
    getToken: () => {
      const token = tokenUntil(asked.length === 0 ? firstExp : nowSecs() + 3);
      asked.push({ at: Date.now(), token });
      return token;
    },
    transport: wire.transport,
  });
  const fixed = new PgcastClient(demo.info.realtime_url, { token: tokenUntil(firstExp), transport: WebSocket });
  const got = { refreshing: [], fixed: [] };
  const filter = { event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.611' };
  const refreshingChannel = refreshing.channel('refresh-a').onChange(filter, (c) => got.refreshing.push(c.record.id));
  const closed = [];
  const fixedChannel = fixed
    .channel('refresh-b')
    .onChange(filter, (c) => got.fixed.push(c.record.id))
    .onClose((reason) => closed.push(reason));
  await Promise.all([refreshingChannel.subscribe(), fixedChannel.subscribe()]);

  const first = await insertAppointment(demo.db, 611);
  await waitFor('both get the first row', () => got.refreshing.length === 1 && got.fixed.length === 1);

  // The server closes a channel whose token expired: the fixed-token one goes.
  await waitFor('the fixed token’s channel is closed at expiry', () => !fixedChannel.isJoined, 10_000);
  assert.equal(closed.length, 1, 'onClose fired once');
  assert.match(closed[0], /Token has expired/);
  assert.ok(refreshingChannel.isJoined, 'the refreshed channel is still joined');
  assert.ok(asked.length >= 2, 'getToken was asked again');
  assert.ok(asked[1].at < firstExp * 1000, `asked ${firstExp * 1000 - asked[1].at} ms before the first token expired`);
  const pushed = wire.sent.filter((f) => f.topic === 'realtime:refresh-a' && f.event === 'access_token');
  assert.equal(pushed[0]?.payload.access_token, asked[1].token, 'the new token was sent as access_token');

  const second = await insertAppointment(demo.db, 611);
  await waitFor('the refreshed channel gets the row after the first token expired', () => got.refreshing.length === 2);
  assert.deepEqual(got.refreshing, [first, second]);
  // An absence check: the same change would have reached an open channel at the same moment.
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(got.fixed, [first], 'the expired channel receives nothing more');
  refreshing.disconnect();
  fixed.disconnect();
});

test('maxAttempts: after that many failed reconnects, each delay longer, the client gives up: offline and onGiveUp', async () => {
  const cutter = await proxy(demo.port);
  const client = new PgcastClient(`ws://127.0.0.1:${cutter.port}`, {
    token: demo.info.service_token,
    transport: WebSocket,
    initialDelayMs: 100,
    maxDelayMs: 5000,
    maxAttempts: 3,
  });
  const statuses = [];
  const gaveUp = [];
  client.onStatus((s) => statuses.push(s));
  client.onGiveUp((attempts) => gaveUp.push(attempts));
  await client.channel('give-up').onChange({ event: 'INSERT', table: 'appointments' }, () => {}).subscribe();
  assert.equal(client.status, 'live');

  const cutAt = Date.now();
  const before = cutter.attempts.length;
  cutter.cut();
  await waitFor('offline after 3 attempts', () => client.status === 'offline', 15_000);
  const attempts = cutter.attempts.slice(before);
  assert.equal(attempts.length, 3, 'exactly maxAttempts reconnects');
  assert.deepEqual(gaveUp, [3], 'onGiveUp once, with the number of attempts');
  assert.deepEqual(statuses.slice(-2), ['connecting', 'offline']);

  // Delay k is drawn from [base/2, base] with base = 100 ms * 2^k: at least half the nominal,
  // and longer each time (loosely: timers only ever fire late).
  const gaps = attempts.map((t, i) => t - (i === 0 ? cutAt : attempts[i - 1]));
  gaps.forEach((gap, k) => {
    const base = 100 * 2 ** k;
    assert.ok(gap >= base / 2 - 10, `delay ${k} is ${gap} ms, at least ${base / 2} ms (${gaps})`);
    assert.ok(gap <= base + 1000, `delay ${k} is ${gap} ms, near ${base} ms (${gaps})`);
    if (k > 0) assert.ok(gap >= gaps[k - 1] - 30, `delays grow: ${gaps}`);
  });
  assert.ok(gaps[2] > gaps[0], `delays grow: ${gaps}`);

  // An absence check: a 4th attempt would have come at most 800 ms (base 100 * 2^3) after the 3rd.
  await new Promise((r) => setTimeout(r, Math.max(0, attempts[2] + 900 - Date.now())));
  assert.equal(cutter.attempts.length - before, 3, 'and none after giving up');
  assert.deepEqual(gaveUp, [3]);
  await cutter.close();
});

test('after giving up, connect() starts over with maxAttempts fresh attempts, then resumes the channel', async () => {
  const cutter = await proxy(demo.port);
  const client = new PgcastClient(`ws://127.0.0.1:${cutter.port}`, {
    token: demo.info.service_token,
    transport: WebSocket,
    initialDelayMs: 50,
    maxDelayMs: 200,
    maxAttempts: 2,
  });
  const gaveUp = [];
  client.onGiveUp((attempts) => gaveUp.push(attempts));
  const ids = [];
  const channel = client
    .channel('start-over')
    .onChange({ event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.612' }, (c) => ids.push(c.record.id));
  await channel.subscribe();
  const expected = [await insertAppointment(demo.db, 612)];
  await waitFor('the first row', () => ids.length === 1);

  cutter.cut();
  await waitFor('gave up', () => gaveUp.length === 1);
  expected.push(await insertAppointment(demo.db, 612)); // committed while the client is offline

  const before = cutter.attempts.length;
  client.connect(); // still cut: the connect itself, then maxAttempts reconnects
  await waitFor('gave up again', () => gaveUp.length === 2);
  assert.equal(cutter.attempts.length - before, 3, 'one connect and 2 fresh reconnects');
  assert.deepEqual(gaveUp, [2, 2]);

  cutter.restore();
  client.connect();
  await waitFor('rejoined', () => client.status === 'live' && channel.isJoined);
  expected.push(await insertAppointment(demo.db, 612));
  await waitFor('the last row', () => ids.includes(expected.at(-1)));
  assert.deepEqual(ids, expected, 'the row committed while offline, then live, once each');
  client.disconnect();
  await cutter.close();
});

test('subscribe() rejects when the client gives up before it ever connected', async () => {
  const cutter = await proxy(demo.port);
  cutter.cut(); // refuses from the start
  const client = new PgcastClient(`ws://127.0.0.1:${cutter.port}`, {
    token: demo.info.service_token,
    transport: WebSocket,
    initialDelayMs: 50,
    maxAttempts: 2,
  });
  const joined = client.channel('never').onChange({ event: 'INSERT', table: 'appointments' }, () => {}).subscribe();
  await within(5000, 'subscribe() settles', assert.rejects(joined, /gave up after 2 reconnect attempts/));
  assert.equal(client.status, 'offline');
  assert.equal(cutter.attempts.length, 3, 'the first connect, then 2 reconnects');
  await cutter.close();
});

test('connect() while connecting or connected opens no second socket', async () => {
  const wire = recordingTransport();
  const client = new PgcastClient(demo.info.realtime_url, { token: demo.info.service_token, transport: wire.transport });
  client.connect();
  client.connect();
  assert.equal(wire.opened, 1, 'one socket while connecting');
  await waitFor('live', () => client.status === 'live');
  client.connect();
  assert.equal(wire.opened, 1, 'one socket while connected');
  client.disconnect();
});

test('disconnect() while getToken is pending opens no socket', async () => {
  const wire = recordingTransport();
  let giveToken;
  const token = new Promise((r) => (giveToken = r));
  const client = new PgcastClient(demo.info.realtime_url, { getToken: () => token, transport: wire.transport });
  client.connect();
  assert.equal(client.status, 'connecting');
  client.disconnect();
  giveToken(demo.info.service_token);
  // What follows getToken runs on microtasks, which all run before the next macrotask.
  await new Promise((r) => setImmediate(r));
  assert.equal(wire.opened, 0);
  assert.equal(client.status, 'offline');
});

test('after disconnect() no timer of the SDK keeps a Node process alive', async () => {
  // A script that joins, broadcasts (acknowledged) and disconnects should exit at once; a
  // pending push timeout (10 s) or refresh timer would hold it open.
  const script = `
    import WebSocket from 'ws';
    import { PgcastClient } from './dist/index.js';
    const client = new PgcastClient(process.argv[1], { getToken: () => process.argv[2], transport: WebSocket });
    const channel = client.channel('exit');
    await channel.subscribe();
    await channel.send('hello', {});
    client.disconnect();
    console.log('disconnected');
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, demo.info.realtime_url, tokenUntil(nowSecs() + 600)], {
    cwd: new URL('..', import.meta.url),
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((r) => child.on('exit', r));
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await waitFor('the script disconnected', () => out.includes('disconnected'));
  try {
    assert.equal(await within(3000, 'the process exits after disconnect()', exited), 0);
  } finally {
    child.kill();
  }
});
