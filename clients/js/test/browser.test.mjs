// The built SDK (dist/, plain ES modules) in a real browser: Debian's Chromium driven by
// playwright-core, using the browser's own WebSocket. The page subscribes through a proxy the
// test cuts; rows committed while it is cut arrive after the reconnect, in order, once each.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { insertAppointment, proxy, startDemo, waitFor } from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const DIST = resolve(import.meta.dirname, '../dist');

let demo;
let site;
let browser;

/** Serves the test page and the SDK's dist files. */
async function serve() {
  const page = `<!doctype html><meta charset="utf-8"><title>pgcast SDK</title>
<script type="module">
  import { PgcastClient } from '/dist/index.js';
  const params = new URLSearchParams(location.search);
  window.ids = [];
  window.statuses = [];
  const client = new PgcastClient(params.get('url'), {
    getToken: () => params.get('token'),
    initialDelayMs: 200,
    maxDelayMs: 1000,
  });
  client.onStatus((s) => window.statuses.push(s));
  client
    .channel('browser')
    .onChange({ event: 'INSERT', table: 'appointments', filter: 'patient_id=eq.808' }, (c) => window.ids.push(c.record.id))
    .subscribe()
    .then(() => (window.subscribed = true), (e) => (window.failed = String(e)));
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
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const query = new URLSearchParams({ url: `ws://127.0.0.1:${cutter.port}`, token: demo.info.service_token });
  await page.goto(`http://127.0.0.1:${site.address().port}/?${query}`);
  const read = (expr) => page.evaluate(expr);
  await waitFor('subscribed in the page', async () => (await read('window.subscribed || window.failed')) !== undefined);
  assert.equal(await read('window.failed'), undefined);

  const expected = [await insertAppointment(demo.db, 808), await insertAppointment(demo.db, 808)];
  await waitFor('first rows in the page', async () => (await read('window.ids.length')) === 2);

  cutter.cut();
  await waitFor('the page notices the drop', async () => (await read('window.statuses.at(-1)')) === 'connecting');
  for (let i = 0; i < 3; i++) expected.push(await insertAppointment(demo.db, 808));
  cutter.restore();
  await waitFor('live again', async () => (await read('window.statuses.at(-1)')) === 'live');
  expected.push(await insertAppointment(demo.db, 808));
  await waitFor('every row', async () => (await read('window.ids.length')) >= expected.length);
  await new Promise((r) => setTimeout(r, 300)); // a duplicate would arrive right behind
  assert.deepEqual(await read('window.ids'), expected, 'in order, exactly once across the cut');
  const statuses = await read('window.statuses');
  assert.deepEqual(statuses.slice(0, 3), ['connecting', 'live', 'connecting']);
  assert.equal(statuses.at(-1), 'live');
  assert.deepEqual(errors, []);
  await page.close();
  await cutter.close();
});
