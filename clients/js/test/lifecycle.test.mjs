// The SDK's long-lived behaviour against a real pgcast: refreshing a token before it expires so a
// channel outlives it, and giving up after `maxAttempts` with backoff that grows.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { PgcastClient } from '../dist/index.js';
import { insertAppointment, proxy, sign, startDemo, waitFor } from './harness.mjs';

let demo;

before(async () => {
  demo = await startDemo();
});

after(async () => {
  await demo?.stop();
});

const shortToken = (seconds) =>
  sign(demo.info.jwt_secret, { role: 'service_role', exp: Math.floor(Date.now() / 1000) + seconds });

test('a refreshed token keeps the channel past the first token’s expiry; a fixed one loses it', async () => {
  let refreshes = 0;
  const refreshing = new PgcastClient(demo.info.realtime_url, {
    getToken: () => {
      refreshes += 1;
      return shortToken(3);
    },
    transport: WebSocket,
  });
  const fixed = new PgcastClient(demo.info.realtime_url, { token: shortToken(3), transport: WebSocket });
  const got = { refreshing: [], fixed: [] };
  const filter = { event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.611' };
  const refreshingChannel = refreshing.channel('refresh-a').onChange(filter, (c) => got.refreshing.push(c.record.id));
  const fixedChannel = fixed.channel('refresh-b').onChange(filter, (c) => got.fixed.push(c.record.id));
  await Promise.all([refreshingChannel.subscribe(), fixedChannel.subscribe()]);

  const first = await insertAppointment(demo.db, 611);
  await waitFor('both get the first row', () => got.refreshing.length === 1 && got.fixed.length === 1);

  // The server closes a channel whose token expired: the fixed-token one goes.
  await waitFor('the fixed token’s channel is closed at expiry', () => !fixedChannel.isJoined, 10_000);
  assert.ok(refreshes >= 2, `the token was refreshed before expiry (${refreshes} tokens asked for)`);
  assert.ok(refreshingChannel.isJoined, 'the refreshed channel is still joined');

  const second = await insertAppointment(demo.db, 611);
  await waitFor('the refreshed channel gets the row after the first token expired', () => got.refreshing.length === 2);
  await new Promise((r) => setTimeout(r, 300)); // the same change would have reached both by now
  assert.deepEqual(got.refreshing, [first, second]);
  assert.deepEqual(got.fixed, [first], 'the expired channel receives nothing more');
  refreshing.disconnect();
  fixed.disconnect();
});

test('maxAttempts: gives up offline after that many reconnects, each delay growing', async () => {
  const cutter = await proxy(demo.port);
  const client = new PgcastClient(`ws://127.0.0.1:${cutter.port}`, {
    token: demo.info.service_token,
    transport: WebSocket,
    initialDelayMs: 200,
    maxDelayMs: 5000,
    maxAttempts: 3,
  });
  const statuses = [];
  client.onStatus((s) => statuses.push(s));
  await client.channel('give-up').onChange({ event: 'INSERT', table: 'appointments' }, () => {}).subscribe();
  assert.equal(client.status, 'live');

  const cutAt = Date.now();
  const before = cutter.attempts.length;
  cutter.cut();
  await waitFor('offline after 3 attempts', () => client.status === 'offline', 15_000);
  const attempts = cutter.attempts.slice(before);
  assert.equal(attempts.length, 3, 'exactly maxAttempts reconnects');
  await new Promise((r) => setTimeout(r, 1000)); // longer than the next delay would have been
  assert.equal(cutter.attempts.length - before, 3, 'and no more after giving up');

  // Delay k is drawn from [base/2, base] with base = 200 ms * 2^k: it grows every time.
  const gaps = attempts.map((t, i) => t - (i === 0 ? cutAt : attempts[i - 1]));
  gaps.forEach((gap, k) => {
    const base = 200 * 2 ** k;
    assert.ok(gap >= base / 2 - 20, `delay ${k} ${gap} ms >= ${base / 2} ms (${gaps})`);
    assert.ok(gap <= base + 1000, `delay ${k} ${gap} ms is near ${base} ms (${gaps})`);
    if (k > 0) assert.ok(gap >= gaps[k - 1] - 20, `delays grow: ${gaps}`);
  });
  assert.deepEqual(statuses.slice(-2), ['connecting', 'offline']);
  await cutter.close();
});
