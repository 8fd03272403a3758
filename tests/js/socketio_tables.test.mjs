// Socket.IO rooms fed by table changes (examples/socketio.toml on `pgcast demo`, whose policy is
// examples/policy.toml): an INSERT, UPDATE and DELETE reach exactly the rooms their row matches,
// each member in its own policy's shape, once per connection however many of its rooms match; a
// patient never receives another patient's row even in a room it may join; seed 004's
// `subscribe:appointments {date, doctorId}` and `subscribe:queue` filter on the server.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { io } from 'socket.io-client';
import { once, startDemo, waitFor } from './demo.mjs';

const CONFIG = readFileSync(resolve(import.meta.dirname, '../../examples/socketio.toml'), 'utf8');

let demo;

before(async () => {
  demo = await startDemo({ config: CONFIG });
});

after(async () => {
  await demo?.stop();
});

/** A connected socket whose `appointment:updated` / `queue:updated` events are collected. */
async function member(claims) {
  const socket = io(demo.info.http, { auth: { token: demo.token(claims) }, reconnection: false, forceNew: true });
  const got = [];
  const errors = [];
  socket.on('appointment:updated', (data) => got.push(data));
  socket.on('queue:updated', (data) => got.push(data));
  socket.on('error', (e) => errors.push(e));
  await once(socket, 'connect');
  return { socket, got, errors };
}

async function join(m, room) {
  assert.deepEqual(await m.socket.timeout(5000).emitWithAck('join', room), { ok: true }, `join ${room}`);
}

async function insertAppointment({ tenant = 1, patient, provider, at, notes = 'secret' }) {
  const { rows } = await demo.db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes)
     VALUES ($1, $2, $3, $4, $5) RETURNING id`,
    [tenant, patient, provider, at, notes],
  );
  return Number(rows[0].id);
}

const summary = (events) => events.map(({ operation, appointment, queueItem }) => `${operation} ${(appointment ?? queueItem).id}`);

test('changes reach the rooms their row matches, in each member policy shape, once per connection', async () => {
  const a = await insertAppointment({ patient: 100, provider: 7, at: '2026-12-10T10:00Z' });
  const b = await insertAppointment({ patient: 101, provider: 8, at: '2026-12-10T11:00Z' });

  const admin = await member({ role: 'admin', sub: 'a1', tenant_id: 1 });
  await join(admin, 'calendar');
  await join(admin, `appointment:${a}`); // and in the calendar: still one event per change
  const provider = await member({ role: 'provider', sub: '7', tenant_id: 1 });
  await join(provider, 'provider:7');
  const patient = await member({ role: 'patient', sub: '100', tenant_id: 1 });
  await join(patient, `appointment:${a}`);
  const other = await member({ role: 'patient', sub: '101', tenant_id: 1 });
  await join(other, `appointment:${a}`); // may join the room, receives nothing of the row
  await join(other, `appointment:${b}`);
  const elsewhere = await member({ role: 'admin', sub: 'a2', tenant_id: 2 });
  await join(elsewhere, 'calendar');

  await demo.db.query(`UPDATE appointments SET status = 'confirmed' WHERE id = $1`, [a]);
  await demo.db.query(`UPDATE appointments SET status = 'confirmed' WHERE id = $1`, [b]);
  await demo.db.query(`DELETE FROM appointments WHERE id = $1`, [a]);
  await demo.db.query(`UPDATE appointments SET status = 'completed' WHERE id = $1`, [b]);
  const d = await insertAppointment({ patient: 100, provider: 7, at: '2026-12-10T12:00Z' });
  const c = await insertAppointment({ tenant: 2, patient: 200, provider: 9, at: '2026-12-10T12:00Z' });

  await waitFor('the admin events', () => admin.got.length >= 5);
  await waitFor('the provider events', () => provider.got.length >= 3);
  await waitFor('the patient events', () => patient.got.length >= 2);
  await waitFor('the other patient events', () => other.got.length >= 2);
  await waitFor('the other clinic events', () => elsewhere.got.length >= 1);

  assert.deepEqual(summary(admin.got), [`UPDATE ${a}`, `UPDATE ${b}`, `DELETE ${a}`, `UPDATE ${b}`, `INSERT ${d}`]);
  assert.deepEqual(summary(provider.got), [`UPDATE ${a}`, `DELETE ${a}`, `INSERT ${d}`]);
  assert.deepEqual(summary(patient.got), [`UPDATE ${a}`, `DELETE ${a}`]);
  assert.deepEqual(summary(other.got), [`UPDATE ${b}`, `UPDATE ${b}`], 'never patient 100 row');
  assert.deepEqual(summary(elsewhere.got), [`INSERT ${c}`], 'tenant isolation');

  // Shapes: the admin and the patient get the whole row; the provider's rule leaves out notes.
  const [adminUpdate] = admin.got;
  assert.equal(adminUpdate.appointment.status, 'confirmed');
  assert.equal(adminUpdate.appointment.notes, 'secret');
  assert.equal(adminUpdate.appointment.patient_id, 100);
  assert.equal(patient.got[0].appointment.notes, 'secret');
  assert.equal(provider.got[0].appointment.status, 'confirmed');
  assert.ok(!('notes' in provider.got[0].appointment), 'the provider shape has no notes');
  assert.equal(admin.got[2].appointment.status, 'confirmed', 'a DELETE carries the old row (REPLICA IDENTITY FULL)');

  for (const m of [admin, provider, patient, other, elsewhere]) {
    assert.deepEqual(m.errors, []);
    m.socket.disconnect();
  }
});

test('subscribe:appointments filters on the server by {date, doctorId}; unsubscribe ends it', async () => {
  const admin = await member({ role: 'admin', sub: 'a3', tenant_id: 1 });
  const ack = await admin.socket.timeout(5000).emitWithAck('subscribe:appointments', { date: '2026-12-11', doctorId: 7 });
  assert.deepEqual(ack, { ok: true });
  const patient = await member({ role: 'patient', sub: '102', tenant_id: 1 });
  assert.deepEqual(await patient.socket.timeout(5000).emitWithAck('subscribe:appointments'), { ok: true });

  await insertAppointment({ patient: 103, provider: 8, at: '2026-12-11T09:00Z' }); // other doctor
  await insertAppointment({ patient: 103, provider: 7, at: '2026-12-12T09:00Z' }); // other day
  const g = await insertAppointment({ patient: 102, provider: 7, at: '2026-12-11T09:30Z' });
  await waitFor('the matching appointment', () => admin.got.length >= 1 && patient.got.length >= 1);
  assert.deepEqual(summary(admin.got), [`INSERT ${g}`]);
  assert.deepEqual(summary(patient.got), [`INSERT ${g}`], 'unfiltered, the patient still gets only its own rows');

  assert.deepEqual(await admin.socket.timeout(5000).emitWithAck('unsubscribe:appointments'), { ok: true });
  assert.deepEqual(await admin.socket.timeout(5000).emitWithAck('unsubscribe:appointments'), {
    error: 'not subscribed: emit subscribe:appointments first',
  });
  await insertAppointment({ patient: 103, provider: 7, at: '2026-12-11T10:00Z' }); // after unsubscribe
  assert.deepEqual(await admin.socket.timeout(5000).emitWithAck('subscribe:appointments', { doctorId: 8 }), { ok: true });
  const i = await insertAppointment({ patient: 103, provider: 8, at: '2026-12-11T11:00Z' });
  await waitFor('the re-subscribed appointment', () => admin.got.length >= 2);
  assert.deepEqual(summary(admin.got), [`INSERT ${g}`, `INSERT ${i}`]);

  const misspelt = await admin.socket.timeout(5000).emitWithAck('subscribe:appointments', { doctor: 7 });
  assert.equal(misspelt.error, 'subscribe:appointments has no filter "doctor" (it has: date, doctorId)');
  const wrongType = await admin.socket.timeout(5000).emitWithAck('subscribe:appointments', { doctorId: 'seven' });
  assert.match(wrongType.error, /^invalid filter provider_id=eq\.\S+: a value is not a valid int4/);
  admin.socket.disconnect();
  patient.socket.disconnect();
});

test('seed 004 queue: queue:{tenant_id} rooms and subscribe:queue get queue:updated with {queueItem}', async () => {
  const desk = await member({ role: 'admin', sub: 'a4', tenant_id: 1 });
  await join(desk, 'queue:1');
  const doctor = await member({ role: 'provider', sub: '7', tenant_id: 1 });
  assert.deepEqual(await doctor.socket.timeout(5000).emitWithAck('subscribe:queue'), { ok: true });
  const stranger = await member({ role: 'admin', sub: 'a5', tenant_id: 2 });
  const refused = await stranger.socket.timeout(5000).emitWithAck('join', 'queue:1');
  assert.match(refused.error, /^Access denied: /);

  const { rows } = await demo.db.query(
    `INSERT INTO queue_entries (tenant_id, patient_id, position) VALUES (1, 100, 1) RETURNING id`,
  );
  const id = Number(rows[0].id);
  await demo.db.query(`UPDATE queue_entries SET state = 'called' WHERE id = $1`, [id]);
  await waitFor('the queue events', () => desk.got.length >= 2 && doctor.got.length >= 2);
  assert.deepEqual(summary(desk.got), [`INSERT ${id}`, `UPDATE ${id}`]);
  assert.deepEqual(summary(doctor.got), [`INSERT ${id}`, `UPDATE ${id}`]);
  assert.equal(desk.got[1].queueItem.state, 'called');
  for (const m of [desk, doctor, stranger]) m.socket.disconnect();
});

test('bad rooms get a specific error and the connection keeps working', async () => {
  const admin = await member({ role: 'admin', sub: 'a6', tenant_id: 1 });
  const typed = await admin.socket.timeout(5000).emitWithAck('join', 'appointment:abc');
  assert.match(typed.error, /^invalid filter id=eq\.\S+: a value is not a valid int8/);
  const reserved = await admin.socket.timeout(5000).emitWithAck('join', 'subscribe:appointments');
  assert.equal(reserved.error, 'room "subscribe:appointments" is the name of a subscribe event: emit it instead of joining');
  await join(admin, 'calendar');
  const id = await insertAppointment({ patient: 104, provider: 7, at: '2026-12-13T09:00Z' });
  await waitFor('the calendar event', () => admin.got.length >= 1);
  assert.deepEqual(summary(admin.got), [`INSERT ${id}`]);
  admin.socket.disconnect();
});
