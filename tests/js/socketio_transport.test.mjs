// The official socket.io-client (npm) against pgcast's Engine.IO transport and Socket.IO framing,
// wired to the conformance echo handlers (`pgcast conformance`): the default transports
// (long-polling, then the upgrade to WebSocket), WebSocket only, acks, binary attachments,
// namespaces, and a refused namespace.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { io } from 'socket.io-client';
import { BIN, freePort, once, waitFor } from './demo.mjs';

let server;
let url;

before(async () => {
  const port = await freePort();
  url = `http://127.0.0.1:${port}`;
  server = spawn(BIN, ['conformance', '--listen', `127.0.0.1:${port}`], {
    stdio: ['ignore', 'inherit', 'inherit'],
    env: { ...process.env, PGCAST_LOG: 'warn' },
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      const res = await fetch(`${url}/socket.io/?EIO=4&transport=polling`);
      if (res.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error('conformance server did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
});

after(() => {
  server?.kill('SIGTERM');
});

function connect(nsp = '/', opts = {}) {
  return io(`${url}${nsp}`, { reconnection: false, forceNew: true, ...opts });
}

for (const [name, opts] of [
  ['default transports (polling, then upgrade)', {}],
  ['WebSocket only', { transports: ['websocket'] }],
]) {
  test(`${name}: connect with auth, events, acks and binary round trip`, async () => {
    const socket = connect('/', { ...opts, auth: { token: 'abc' } });
    const [auth] = await once(socket, 'auth');
    assert.deepEqual(auth, { token: 'abc' }, 'the CONNECT payload reaches the server');
    assert.equal(typeof socket.id, 'string');

    const back = once(socket, 'message-back');
    socket.emit('message', 1, 'two', { three: [true] });
    assert.deepEqual(await back, [1, 'two', { three: [true] }]);

    const acked = await socket.timeout(5000).emitWithAck('message-with-ack', 'x', { y: 2 });
    assert.deepEqual(acked, 'x', 'the ack carries the arguments (the first is resolved)');

    const binary = once(socket, 'message-back');
    socket.emit('message', Buffer.from([1, 2, 3]), { nested: Buffer.from([4, 5]) });
    const [first, second] = await binary;
    assert.deepEqual([...new Uint8Array(first)], [1, 2, 3]);
    assert.deepEqual([...new Uint8Array(second.nested)], [4, 5]);

    if (!opts.transports) {
      await waitFor('the upgrade to WebSocket', () => socket.io.engine?.transport?.name === 'websocket');
      const again = once(socket, 'message-back');
      socket.emit('message', 'after upgrade');
      assert.deepEqual(await again, ['after upgrade']);
    } else {
      assert.equal(socket.io.engine.transport.name, 'websocket');
    }
    socket.disconnect();
  });
}

test('a custom namespace connects; an unknown one is refused with connect_error', async () => {
  const custom = connect('/custom');
  const [auth] = await once(custom, 'auth');
  assert.deepEqual(auth, {});
  custom.disconnect();

  const unknown = connect('/random');
  const [error] = await once(unknown, 'connect_error');
  assert.equal(error.message, 'Invalid namespace');
  unknown.disconnect();
});

test('the connection survives heartbeats: pings answered by the client keep it open', async () => {
  const socket = connect('/', { transports: ['websocket'] });
  await once(socket, 'auth');
  // pingInterval is 300 ms and pingTimeout 200 ms: without pongs it would be gone by 500 ms.
  let pings = 0;
  socket.io.engine.on('ping', () => pings++);
  await waitFor('four server pings', () => pings >= 4);
  assert.equal(socket.connected, true);
  const back = once(socket, 'message-back');
  socket.emit('message', 'still here');
  assert.deepEqual(await back, ['still here']);
  socket.disconnect();
});

async function handshake() {
  const res = await fetch(`${url}/socket.io/?EIO=4&transport=polling`);
  assert.equal(res.status, 200);
  const body = await res.text();
  assert.ok(body.startsWith('0'), `open packet, got ${body.slice(0, 40)}`);
  return JSON.parse(body.slice(1)).sid;
}

test("bad requests get engine.io's error codes; a broken session ends alone", async () => {
  const bystander = connect('/', { transports: ['websocket'] });
  await once(bystander, 'auth');

  const error = async (path, init, status, code) => {
    const res = await fetch(`${url}${path}`, init);
    assert.equal(res.status, status, `${init?.method ?? 'GET'} ${path}`);
    if (code !== undefined) assert.equal((await res.json()).code, code, `${path}: engine.io code`);
  };
  await error('/socket.io/?EIO=4', undefined, 400, 0); // no transport
  await error('/socket.io/?EIO=4&transport=carrier-pigeon', undefined, 400, 0);
  await error('/socket.io/?EIO=3&transport=polling', undefined, 400, 5); // protocol version
  await error('/socket.io/?EIO=4&transport=polling', { method: 'POST', body: '40' }, 400, 2);
  await error('/socket.io/?EIO=4&transport=polling&sid=nope', undefined, 400, 1);

  // A payload over maxPayload: 413, and that session is gone.
  let sid = await handshake();
  const big = '4' + 'x'.repeat(1_000_001);
  await error(`/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body: big }, 413);
  await waitForStatus(`/socket.io/?EIO=4&transport=polling&sid=${sid}`, 400);

  // A malformed payload ends its session.
  sid = await handshake();
  await fetch(`${url}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body: 'not engine.io' });
  await waitForStatus(`/socket.io/?EIO=4&transport=polling&sid=${sid}`, 400);

  // A malformed Socket.IO packet over the WebSocket closes that connection only.
  const broken = connect('/', { transports: ['websocket'] });
  await once(broken, 'auth');
  const gone = once(broken, 'disconnect');
  broken.io.engine.write('4abc'); // Socket.IO packet type 'a' does not exist
  await gone;

  const back = once(bystander, 'message-back');
  bystander.emit('message', 'unharmed');
  assert.deepEqual(await back, ['unharmed']);
  bystander.disconnect();
});

/** Polls a session that should be over: 400, or (if the poll was taken as the session ended)
 * its last word, the close packet `1`, and 400 after that. */
async function waitForStatus(path, status) {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const res = await fetch(`${url}${path}`);
    if (res.status === status) return;
    const body = await res.text();
    assert.equal(body, '1', `a poll on an ending session gets the close packet, got ${res.status} ${body}`);
  }
  throw new Error(`${path} never answered ${status}`);
}

test('clients that leave during the upgrade leave nothing behind that stalls the server', async () => {
  // Each leaves while its WebSocket probe is in flight; a probe whose socket closed once kept
  // a session spinning on it, and two such sessions stalled both of the server's threads.
  for (let i = 0; i < 6; i++) {
    const socket = connect('/');
    await once(socket, 'connect');
    socket.disconnect();
  }
  const socket = connect('/', { transports: ['websocket'] });
  await once(socket, 'auth');
  const back = once(socket, 'message-back');
  socket.emit('message', 'served');
  assert.deepEqual(await back, ['served']);
  socket.disconnect();
});
