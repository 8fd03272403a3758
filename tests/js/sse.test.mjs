// Server-Sent Events at /realtime/v1/sse on `pgcast demo` (examples/policy.toml): a table's
// changes with the Supabase filter syntax and the same policies, each with its place as `id:`;
// `Last-Event-ID` resumes exactly once or says `resync_required`; keep-alive comments; refusals
// as HTTP statuses with a reason. A plain HTTP client here, the browser's EventSource in
// Chromium below.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { chromium } from 'playwright-core';
import { cuttingProxy, startDemo, waitFor } from './demo.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';

let demo;

before(async () => {
  demo = await startDemo({ config: 'sse_keepalive_secs = 1\nmax_connections_per_user = 3\n' });
});

after(async () => {
  await demo?.stop();
});

const admin = () => demo.token({ role: 'admin', sub: 'sse-admin', tenant_id: 1 });

function url(params, base = demo.info.http) {
  return `${base}/realtime/v1/sse?${new URLSearchParams(params)}`;
}

/** Opens a stream with a plain HTTP client; its events (and comments) are parsed as they come. */
function stream(target, headers = {}) {
  const events = [];
  const comments = [];
  let status;
  let contentType;
  let error = '';
  const request = http.get(target, { headers }, (response) => {
    status = response.statusCode;
    contentType = response.headers['content-type'];
    response.setEncoding('utf8');
    let buffered = '';
    response.on('data', (chunk) => {
      if (status !== 200) {
        error += chunk;
        return;
      }
      buffered += chunk;
      let end;
      while ((end = buffered.indexOf('\n\n')) >= 0) {
        const block = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const event = {};
        for (const line of block.split('\n')) {
          if (line.startsWith(':')) comments.push(line);
          const at = line.indexOf(': ');
          if (at > 0) event[line.slice(0, at)] = line.slice(at + 2);
        }
        if (event.data !== undefined) {
          event.data = JSON.parse(event.data);
          events.push(event);
        } else if (event.retry) events.push(event);
      }
    });
  });
  request.on('error', () => {});
  return {
    events,
    comments,
    status: () => status,
    contentType: () => contentType,
    error: () => (error ? JSON.parse(error).error : undefined),
    changes: () => events.filter((e) => !e.event && e.data?.record),
    close: () => request.destroy(),
  };
}

async function insert(provider, notes) {
  const { rows } = await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes)
     VALUES (1, 55, $1, now() + interval '1 day', $2) RETURNING id`,
    [provider, notes],
  );
  return Number(rows[0].id);
}

test('a filtered stream: retry, ready with its place, then each change with its id', async () => {
  const s = stream(url({ schema: 'public', table: 'appointments', event: '*', filter: 'provider_id=eq.3', apikey: admin() }));
  await waitFor('ready', () => s.events.some((e) => e.event === 'ready'));
  assert.equal(s.status(), 200);
  assert.equal(s.contentType(), 'text/event-stream');
  assert.equal(s.events[0].retry, '2000');
  const ready = s.events.find((e) => e.event === 'ready');
  assert.equal(ready.id, `${ready.data.epoch}:${ready.data.position}`);
  assert.equal(ready.data.resumed, null);

  await insert(4, 'not mine');
  const id = await insert(3, 'mine');
  await demo.db.query(`UPDATE appointments SET status = 'confirmed' WHERE id = $1`, [id]);
  await waitFor('two changes', () => s.changes().length === 2);
  const [created, updated] = s.changes();
  assert.equal(created.data.type, 'INSERT');
  assert.equal(created.data.record.notes, 'mine');
  assert.equal(updated.data.type, 'UPDATE');
  assert.equal(updated.data.record.status, 'confirmed');
  assert.match(created.id, /^[0-9a-f]+:[0-9A-F]{16}\.[0-9A-F]{8}$/);
  assert.ok(created.id < updated.id, 'ids grow with the stream');
  await waitFor('a keep-alive comment', () => s.comments.includes(': keep-alive'));
  s.close();
});

test('Last-Event-ID resumes after that change exactly once; an unknown place gets resync_required', async () => {
  const params = { table: 'appointments', filter: 'provider_id=eq.33', apikey: admin() };
  const first = stream(url(params));
  await waitFor('ready', () => first.events.some((e) => e.event === 'ready'));
  await insert(33, 'r1');
  await waitFor('r1', () => first.changes().length === 1);
  const last = first.changes()[0].id;
  first.close();

  for (const n of ['r2', 'r3', 'r4']) await insert(33, n);
  const again = stream(url(params), { 'Last-Event-ID': last });
  await waitFor('ready after the replay', () => again.events.some((e) => e.event === 'ready'));
  assert.deepEqual(again.changes().map((e) => e.data.record.notes), ['r2', 'r3', 'r4'], 'the missed ones, in order');
  assert.equal(again.events.find((e) => e.event === 'ready').data.resumed, 3);
  await insert(33, 'r5');
  await waitFor('r5 live', () => again.changes().length === 4);
  assert.deepEqual(again.changes().map((e) => e.data.record.notes), ['r2', 'r3', 'r4', 'r5'], 'nothing twice');
  again.close();

  // A place from another history (a reset server, a made-up epoch): said, not skipped.
  const stale = stream(url({ ...params, last_event_id: `0badc0de:${last.split(':')[1]}` }));
  await waitFor('ready', () => stale.events.some((e) => e.event === 'ready'));
  const resync = stale.events.find((e) => e.event === 'resync_required');
  assert.match(resync.data.reason, /is not the current epoch/);
  assert.equal(resync.id, stale.events.find((e) => e.event === 'ready').id, 'the place moves to the head');
  stale.close();
});

test('the row policy decides: a patient streams only their own rows', async () => {
  const patient = demo.token({ role: 'patient', sub: '56', tenant_id: 1 });
  const s = stream(url({ table: 'appointments', apikey: patient }));
  await waitFor('ready', () => s.events.some((e) => e.event === 'ready'));
  await insert(3, 'someone else');
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 56, 3, now() + interval '1 day', 'own')`,
  );
  await waitFor('the own row', () => s.changes().length >= 1);
  await insert(3, 'fence');
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 56, 3, now() + interval '1 day', 'own 2')`,
  );
  await waitFor('the second own row', () => s.changes().length >= 2);
  assert.deepEqual(s.changes().map((e) => e.data.record.notes), ['own', 'own 2']);
  s.close();
});

test('refusals are HTTP statuses with a reason; the server stays healthy', async () => {
  const cases = [
    [{ table: 'appointments' }, {}, 401, /^no token/],
    [{ table: 'appointments', apikey: 'not-a-jwt' }, {}, 401, /^invalid token/],
    [{ apikey: admin() }, {}, 400, /^table is required/],
    [{ table: 'nope', apikey: admin() }, {}, 400, /nope/],
    [{ table: 'appointments', filter: 'provider_id=eq.abc', apikey: admin() }, {}, 400, /not a valid int4/],
    [{ table: 'appointments', filter: 'notes=zz.1', apikey: admin() }, {}, 400, /operator/],
    [{ table: 'appointments', event: 'EXPLODE', apikey: admin() }, {}, 400, /EXPLODE/],
    [{ table: 'appointments', apikey: admin() }, { 'Last-Event-ID': 'garbage' }, 400, /^invalid Last-Event-ID/],
  ];
  for (const [params, headers, status, reason] of cases) {
    const s = stream(url(params), headers);
    await waitFor(`the refusal of ${JSON.stringify(params)}`, () => s.status() !== undefined && s.error() !== undefined);
    assert.equal(s.status(), status, JSON.stringify(params));
    assert.match(s.error(), reason, JSON.stringify(params));
  }
  // Bearer works as well as apikey.
  const s = stream(url({ table: 'appointments' }), { Authorization: `Bearer ${admin()}` });
  await waitFor('ready', () => s.events.some((e) => e.event === 'ready'));
  s.close();
  const health = await fetch(`${demo.info.http}/health`);
  assert.equal(health.status, 200);
});

test('max_connections_per_user bounds a user\'s streams: the next one is a 429 with the reason', async () => {
  const token = demo.token({ role: 'admin', sub: 'sse-many', tenant_id: 1 });
  const open = [];
  for (let i = 0; i < 3; i++) {
    const s = stream(url({ table: 'appointments', apikey: token }));
    await waitFor(`stream ${i}`, () => s.events.some((e) => e.event === 'ready'));
    open.push(s);
  }
  const over = stream(url({ table: 'appointments', apikey: token }));
  await waitFor('the refusal', () => over.error() !== undefined);
  assert.equal(over.status(), 429);
  assert.match(over.error(), /too many connections for this user: at most 3/);
  open.forEach((s) => s.close());
});

test('a token that expires ends the stream with a closing event naming it', async () => {
  const exp = Math.floor(Date.now() / 1000) + 2;
  const s = stream(url({ table: 'appointments', apikey: demo.token({ role: 'admin', sub: 'sse-expiring', tenant_id: 1, exp }) }));
  await waitFor('ready', () => s.events.some((e) => e.event === 'ready'));
  await waitFor('the closing event', () => s.events.some((e) => e.event === 'closing'));
  const closing = s.events.find((e) => e.event === 'closing');
  assert.equal(closing.data.code, 4004);
  assert.match(closing.data.reason, /^Token has expired/);
  const metrics = await (await fetch(`${demo.info.http}/metrics`)).text();
  assert.match(metrics, /^pgcast_connections_by_protocol\{protocol="sse"\} /m, 'counted by protocol');
  s.close();
  // Audited like the other endpoints: connect, join and leave, with the user id.
  await waitFor('the audit records', async () => {
    const { rows } = await demo.db.query(
      `SELECT action FROM pgcast.audit_log WHERE user_id = 'sse-expiring' AND action IN ('connect', 'join', 'leave')`,
    );
    return new Set(rows.map((r) => r.action)).size === 3;
  });
  const { rows } = await demo.db.query(`SELECT DISTINCT channel FROM pgcast.audit_log WHERE user_id = 'sse-expiring' AND action = 'join'`);
  assert.deepEqual(rows.map((r) => r.channel), ['realtime:sse:public.appointments']);
});

test("in Chromium: EventSource gets each change once, in order, across a cut (its own Last-Event-ID)", async () => {
  const proxy = await cuttingProxy(demo.info.http);
  const page = http.createServer((_, res) => res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>sse</title>'));
  await new Promise((r) => page.listen(0, '127.0.0.1', r));
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  try {
    const tab = await browser.newPage();
    await tab.goto(`http://127.0.0.1:${page.address().port}/`);
    await tab.evaluate((source) => {
      window.notes = [];
      window.opens = 0;
      const es = new EventSource(source); // another origin: pgcast allows it (CORS)
      es.onopen = () => window.opens++;
      es.onmessage = (e) => window.notes.push(JSON.parse(e.data).record.notes);
    }, url({ table: 'appointments', filter: 'provider_id=eq.44', apikey: admin() }, proxy.url));
    const read = (expr) => tab.evaluate(expr);
    await waitFor('the stream to open', async () => (await read(() => window.opens)) === 1);
    await insert(44, 'b1');
    await waitFor('b1', async () => (await read(() => window.notes.length)) === 1);
    proxy.cut();
    for (const n of ['b2', 'b3']) await insert(44, n);
    await waitFor('the reconnect', async () => (await read(() => window.opens)) === 2);
    await insert(44, 'b4');
    await waitFor('every change', async () => (await read(() => window.notes.length)) >= 4);
    assert.deepEqual(await read(() => window.notes), ['b1', 'b2', 'b3', 'b4']);
  } finally {
    await browser.close();
    page.close();
    await proxy.close();
  }
});
