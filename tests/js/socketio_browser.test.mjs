// socket.io-client in a real browser (Debian's Chromium driven by playwright-core), loaded from its
// own browser bundle on a page served from the same origin as pgcast (a small reverse proxy, as a
// deployment puts one in front): the default transports start on long-polling and upgrade to
// WebSocket; `transports: ['websocket']` too. Rooms by join, a table change in the room's event
// and shape, a refused join, and connection state recovery across a cut.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { resolve } from 'node:path';
import { chromium } from 'playwright-core';
import { startDemo, waitFor } from './demo.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const BUNDLE = readFileSync(resolve(import.meta.dirname, 'node_modules/socket.io-client/dist/socket.io.min.js'));
const CONFIG = readFileSync(resolve(import.meta.dirname, '../../examples/socketio.toml'), 'utf8');

let demo;
let site;
let browser;
const upstreams = new Set();

/** The page and the client bundle at `/`, everything else passed to pgcast (WebSockets too). */
async function serve(target) {
  const { hostname, port } = new URL(target);
  const server = http.createServer((req, res) => {
    if (req.url === '/') return res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><script src="/sio.js"></script>');
    if (req.url === '/sio.js') return res.writeHead(200, { 'content-type': 'text/javascript' }).end(BUNDLE);
    const forward = http.request({ host: hostname, port, path: req.url, method: req.method, headers: req.headers }, (up) => {
      res.writeHead(up.statusCode, up.headers);
      up.pipe(res);
    });
    forward.on('error', () => res.destroy());
    req.pipe(forward);
  });
  server.on('upgrade', (req, socket, head) => {
    const upstream = net.connect(Number(port), hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`, ...Object.entries(req.headers).map(([k, v]) => `${k}: ${v}`)];
      upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
      upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstreams.add(socket);
    const end = () => (upstreams.delete(socket), socket.destroy(), upstream.destroy());
    socket.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}

before(async () => {
  demo = await startDemo({ config: CONFIG });
  site = await serve(demo.info.http);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
});

after(async () => {
  await browser?.close();
  upstreams.forEach((s) => s.destroy());
  site?.close();
  await demo?.stop();
});

async function insert(notes) {
  await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 5, 6, now() + interval '1 day', $1)`,
    [notes],
  );
}

for (const transports of [undefined, ['websocket']]) {
  test(`in Chromium (${transports ? 'WebSocket only' : 'polling, then the upgrade'}): rooms, table events, refusals, recovery`, async () => {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`http://127.0.0.1:${site.address().port}/`);
    await page.waitForFunction(() => typeof window.io === 'function');
    const read = (expr) => page.evaluate(expr);
    const answer = await page.evaluate(
      async ({ token, transports }) => {
        window.notes = [];
        window.connects = [];
        const socket = window.io({ auth: { token }, ...(transports ? { transports } : {}), reconnectionDelay: 100 });
        window.socket = socket;
        socket.on('connect', () => window.connects.push(socket.recovered));
        socket.on('appointment:updated', ({ operation, appointment }) => window.notes.push(`${operation} ${appointment.notes}`));
        await new Promise((r) => socket.once('connect', r));
        const joined = await socket.timeout(5000).emitWithAck('join', 'calendar');
        const refused = await socket.timeout(5000).emitWithAck('join', 'subscribe:queue');
        return { joined, refused };
      },
      { token: demo.token({ role: 'admin', sub: `browser-${transports ? 'ws' : 'poll'}`, tenant_id: 1 }), transports },
    );
    assert.deepEqual(answer.joined, { ok: true });
    assert.match(answer.refused.error, /is the name of a subscribe event/);
    await waitFor('the transport to be a WebSocket', async () => (await read(() => window.socket.io.engine.transport.name)) === 'websocket');

    await insert(`${transports ? 'ws' : 'poll'} 1`);
    await waitFor('the first change', async () => (await read(() => window.notes.length)) === 1);
    // Cut the page's WebSocket at the proxy: the client reconnects and recovers its room.
    upstreams.forEach((s) => s.resetAndDestroy());
    await insert(`${transports ? 'ws' : 'poll'} 2`);
    await waitFor('the reconnect', async () => (await read(() => window.connects.length)) === 2);
    await waitFor('the change made while cut', async () => (await read(() => window.notes.length)) === 2);
    const prefix = transports ? 'ws' : 'poll';
    assert.deepEqual(await read(() => window.notes), [`INSERT ${prefix} 1`, `INSERT ${prefix} 2`]);
    assert.deepEqual(await read(() => window.connects), [false, true], 'recovered after the cut');
    assert.deepEqual(errors, []);
    await page.evaluate(() => window.socket.disconnect());
    await page.close();
  });
}
