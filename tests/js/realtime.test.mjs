// pgcast against the official @supabase/realtime-js client from the npm registry, unchanged,
// with both serializers. The server under test is `pgcast demo` (private PostgreSQL + server).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { startDemo, subscribed, waitFor } from './demo.mjs';

let demo;
let info;
let db;
let client;

before(async () => {
  demo = await startDemo();
  ({ info, db, client } = demo);
});

after(async () => {
  await demo?.stop();
});

for (const vsn of ['1.0.0', '2.0.0']) {
  test(`realtime-js vsn ${vsn}: filtered and unfiltered postgres_changes`, async () => {
    const patient = vsn === '1.0.0' ? 101 : 202;
    const other = patient + 1;
    const rt = client(vsn);
    const all = [];
    const mine = [];
    const inserts = [];
    const chAll = rt
      .channel(`all-${vsn}`)
      .on('postgres_changes', { event: '*', schema: 'public', table: 'appointments' }, (p) => {
        if ([patient, other].includes(p.new.patient_id ?? p.old.patient_id)) all.push(p);
      });
    const chMine = rt
      .channel(`mine-${vsn}`)
      .on(
        'postgres_changes',
        { event: '*', schema: 'public', table: 'appointments', filter: `patient_id=eq.${patient}` },
        (p) => mine.push(p),
      )
      .on(
        'postgres_changes',
        { event: 'INSERT', schema: 'public', table: 'appointments', filter: `patient_id=in.(${patient},${other})` },
        (p) => inserts.push(p),
      );
    await subscribed(chAll);
    await subscribed(chMine);

    const { rows } = await db.query(
      `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes)
       VALUES (1, $1, 5, '2030-01-02 10:00:00+00', 'first'), (1, $2, 5, '2030-01-02 11:00:00+00', null)
       RETURNING id`,
      [patient, other],
    );
    const [mineId, otherId] = rows.map((r) => Number(r.id));
    await db.query(`UPDATE appointments SET status = 'confirmed' WHERE id = $1`, [mineId]);
    await db.query(`DELETE FROM appointments WHERE id = $1`, [mineId]);

    await waitFor('4 unfiltered events', () => all.length >= 4);
    await waitFor('3 filtered events', () => mine.length >= 3);
    await waitFor('2 inserts', () => inserts.length >= 2);

    assert.deepEqual(
      all.map((p) => p.eventType),
      ['INSERT', 'INSERT', 'UPDATE', 'DELETE'],
    );
    assert.deepEqual(
      mine.map((p) => p.eventType),
      ['INSERT', 'UPDATE', 'DELETE'],
    );
    assert.deepEqual(
      inserts.map((p) => p.new.id),
      [mineId, otherId],
    );

    const [insert, update, del] = mine;
    assert.equal(insert.schema, 'public');
    assert.equal(insert.table, 'appointments');
    assert.equal(insert.errors, null);
    assert.match(insert.commit_timestamp, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    assert.equal(insert.new.id, mineId);
    assert.equal(insert.new.patient_id, patient);
    assert.equal(insert.new.status, 'booked');
    assert.equal(insert.new.notes, 'first');
    assert.equal(insert.new.starts_at, '2030-01-02T10:00:00+00:00');
    assert.deepEqual(insert.old, {});
    assert.equal(update.new.status, 'confirmed');
    assert.equal(update.old.status, 'booked', 'REPLICA IDENTITY FULL gives the old row');
    assert.deepEqual(del.new, {});
    assert.equal(del.old.id, mineId);
    assert.equal(del.old.patient_id, patient);

    await rt.removeAllChannels();
    rt.disconnect();
  });
}

test('row policies reach realtime-js clients: own rows only, hidden columns, refusals with reasons', async () => {
  const patient = client('2.0.0', info.patient_token);
  const own = [];
  const ch = patient
    .channel('patient:7', { config: { private: true } })
    .on('postgres_changes', { event: '*', schema: 'public', table: 'appointments' }, (p) => own.push(p));
  await subscribed(ch);
  const provider = client('1.0.0', info.provider_token);
  const schedule = [];
  const pch = provider
    .channel('provider:3', { config: { private: true } })
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'appointments' }, (p) => schedule.push(p));
  await subscribed(pch);

  await db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES
       (1, 7, 3, now(), 'clinical note'), (1, 8, 3, now(), 'someone else'), (2, 7, 3, now(), 'other clinic')`,
  );
  await waitFor('the patient own row', () => own.length >= 1);
  await waitFor('the provider schedule', () => schedule.length >= 2);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(own.length, 1, 'only their own row of their own clinic');
  assert.equal(own[0].new.patient_id, 7);
  assert.equal(own[0].new.notes, 'clinical note');
  assert.equal(schedule.length, 2, "the provider's two rows in clinic 1");
  assert.equal(schedule[0].new.notes, undefined, 'notes are not in the provider shape');
  assert.deepEqual(Object.keys(schedule[0].new).sort(), ['id', 'patient_id', 'provider_id', 'starts_at', 'status', 'tenant_id']);

  const other = client('2.0.0', info.patient_token);
  const forged = other
    .channel('patient:7', { config: { private: true } })
    .on('postgres_changes', { event: '*', schema: 'public', table: 'appointments', filter: 'patient_id=eq.8' }, () => {});
  await assert.rejects(subscribed(forged), /can never match/);
  await assert.rejects(subscribed(other.channel('patient:8', { config: { private: true } })), /not allowed to join private channel/);
  await assert.rejects(subscribed(other.channel('lobby')), /public channels are disabled/);
  const service = client('2.0.0');
  const bad = service.channel('bad').on('postgres_changes', { event: '*', schema: 'public', table: 'nope' }, () => {});
  await assert.rejects(subscribed(bad), /not in publication/);
  for (const c of [patient, provider, other, service]) c.disconnect();
});

test('realtime-js: a filter of several conditions, with not. and like, delivers exactly the rows that meet all of them', async () => {
  const rt = client('2.0.0');
  const got = [];
  const channel = rt
    .channel('and-filter')
    .on(
      'postgres_changes',
      { event: 'INSERT', schema: 'public', table: 'appointments', filter: 'patient_id=eq.404,notes=ilike.KEEP*,provider_id=not.in.(7,8)' },
      (p) => got.push(p.new.notes),
    );
  await subscribed(channel);
  await db.query(
    `INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES
       (1, 404, 9, now(), 'keep: all three hold'),
       (1, 404, 9, now(), 'drop: the pattern does not match'),
       (1, 405, 9, now(), 'keep, but another patient'),
       (1, 404, 7, now(), 'keep, but provider 7'),
       (1, 404, 9, now(), null),
       (1, 404, 10, now(), 'Keep: this one too')`,
  );
  await waitFor('the two rows meeting every condition', () => got.length >= 2);
  // A last row that passes, so anything wrongly let through before it would be seen.
  await db.query(`INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at, notes) VALUES (1, 404, 9, now(), 'keep: last')`);
  await waitFor('the last row', () => got.length >= 3);
  assert.deepEqual(got, ['keep: all three hold', 'Keep: this one too', 'keep: last']);
  rt.disconnect();
});

test('supabase-js pointed at pgcast receives changes through supabase.channel()', async () => {
  const { createClient } = await import('@supabase/supabase-js');
  const http = info.realtime_url.replace(/^ws/, 'http').replace(/\/realtime\/v1$/, '');
  const supabase = createClient(http, info.service_token, {
    auth: { persistSession: false, autoRefreshToken: false },
    realtime: { transport: WebSocket },
  });
  const got = [];
  const channel = supabase
    .channel('supabase-js')
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'appointments', filter: 'patient_id=eq.303' }, (p) =>
      got.push(p),
    );
  await subscribed(channel);
  await db.query(`INSERT INTO appointments (tenant_id, patient_id, provider_id, starts_at) VALUES (1, 303, 9, now())`);
  await waitFor('supabase-js insert', () => got.length === 1);
  assert.equal(got[0].new.patient_id, 303);
  await supabase.removeAllChannels();
});
