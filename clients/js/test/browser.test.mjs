// The built SDK (dist/, plain ES modules) in a real browser: Debian's Chromium driven by
// playwright-core, using the browser's own WebSocket and atob. The page subscribes through a
// proxy the test cuts: rows committed while it is cut arrive after the reconnect, in order, once
// each; and a token refreshed in the page keeps its channel past the first token's expiry.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { insertAppointment, proxy, sign, startDemo, waitFor } from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const DIST = resolve(import.meta.dirname, '../dist');

let demo;
let site;
let browser;

/** Serves a page that loads the SDK as `window.sdk`, and the SDK's dist files. */
async function serve() {
  const page = `<!doctype html><meta charset="utf-8"><title>pgcast SDK</title>
<script type="module">
  import * as sdk from '/dist/index.js';
  window.sdk = sdk;
</script>`;
  const server = http.createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/') {
      res.writeHead(200, { 'content-type': 'text/html' }).end(page);
    } else if (/^\/dist\/[a-z]+\.js$/.test(path)) {
      res.writeHead(200, { 'content-type': 'text/javascript' }).end(await readFile(`${DIST}/${path.slice(6)}`));
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}

/** A fresh page with the SDK loaded; page errors are collected in `errors`. */
async function openPage() {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(`http://127.0.0.1:${site.address().port}/`);
  await page.waitForFunction(() => window.sdk !== undefined);
  return { page, errors, read: (expr) => page.evaluate(expr) };
}

before(async () => {
  demo = await startDemo();
  site = await serve();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  site?.close();
  await demo?.stop();
});

test('in Chromium: live, cut, reconnect and resume with every row once, in order', async () => {
  const cutter = await proxy(demo.port);
  const { page, errors, read } = await openPage();
  await page.evaluate(
    ({ url, token }) => {
      window.ids = [];
      window.statuses = [];
      const client = new window.sdk.PgcastClient(url, { getToken: () => token, initialDelayMs: 200, maxDelayMs: 1000 });
      client.onStatus((s) => window.statuses.push(s));
      return client
        .channel('browser')
        .onChange({ event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.808' }, (c) => window.ids.push(c.record.id))
        .subscribe();
    },
    { url: `ws://127.0.0.1:${cutter.port}`, token: demo.info.service_token },
  );

  const expected = [await insertAppointment(demo.db, 808), await insertAppointment(demo.db, 808)];
  await waitFor('first rows in the page', async () => (await read('window.ids.length')) === 2);

  cutter.cut();
  await waitFor('the page notices the drop', async () => (await read('window.statuses.at(-1)')) === 'connecting');
  for (let i = 0; i < 3; i++) expected.push(await insertAppointment(demo.db, 808));
  cutter.restore();
  await waitFor('live again', async () => (await read('window.statuses.at(-1)')) === 'live');
  expected.push(await insertAppointment(demo.db, 808));
  // Changes arrive in commit order, so once the last row is in, any duplicate of an earlier
  // one would be in too.
  const last = expected.at(-1);
  await waitFor('the last row', async () => (await read('window.ids')).includes(last));
  assert.deepEqual(await read('window.ids'), expected, 'in order, exactly once across the cut');
  const statuses = await read('window.statuses');
  assert.deepEqual(statuses.slice(0, 3), ['connecting', 'live', 'connecting']);
  assert.equal(statuses.at(-1), 'live');
  assert.deepEqual(errors, []);
  await page.close();
  await cutter.close();
});

test('in Chromium: getToken refreshes a 3-second token before it expires and the channel outlives it', async () => {
  const { page, errors, read } = await openPage();
  const minted = []; // every token the page asked for: when, and its exp
  await page.exposeFunction('mintToken', () => {
    const exp = Math.floor(Date.now() / 1000) + 3;
    minted.push({ at: Date.now(), exp });
    return sign(demo.info.jwt_secret, { role: 'service_role', exp });
  });
  await page.evaluate((url) => {
    window.ids = [];
    const client = new window.sdk.PgcastClient(url, { getToken: () => window.mintToken() });
    window.channel = client
      .channel('browser-refresh')
      .onChange({ event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.809' }, (c) => window.ids.push(c.record.id));
    return window.channel.subscribe();
  }, demo.info.realtime_url);
  const expected = [await insertAppointment(demo.db, 809)];
  await waitFor('the first row', async () => (await read('window.ids.length')) === 1);

  // The server closes a channel at most a second after its token's `exp` (it counts whole
  // seconds from the join); wait until that has certainly passed for the first token.
  const firstExp = minted[0].exp;
  await waitFor('past the first token’s expiry', () => Date.now() > firstExp * 1000 + 1500, 10_000);
  assert.ok(minted.length >= 2 && minted[1].at < firstExp * 1000, 'a new token was asked for before expiry');
  assert.equal(await read('window.channel.isJoined'), true);
  expected.push(await insertAppointment(demo.db, 809));
  await waitFor('the row after expiry', async () => (await read('window.ids.length')) === 2);
  assert.deepEqual(await read('window.ids'), expected);
  assert.deepEqual(errors, []);
  await page.close();
});
