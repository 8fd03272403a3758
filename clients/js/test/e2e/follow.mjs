// SDK followers for the Rust end-to-end test `nothing_lost`: one PgcastClient per spec, each
// subscribed to INSERTs on `ticks` (with an optional filter), printing one JSON line per event
// on stdout. Not a test by itself; crates/pgcast/tests/nothing_lost.rs drives it while it kills
// the server and restarts PostgreSQL.
//
// Usage: node follow.mjs <ws base url> <token> '[{"name": "all"}, {"name": "s1", "filter": "shard=eq.1"}]'
import WebSocket from 'ws';
import { PgcastClient } from '../../dist/index.js';

const [url, token, specJson] = process.argv.slice(2);
const specs = JSON.parse(specJson);
const out = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

for (const spec of specs) {
  const client = new PgcastClient(url, {
    token,
    transport: WebSocket,
    initialDelayMs: 100,
    maxDelayMs: 1000,
  });
  client.onStatus((status) => out({ c: spec.name, status }));
  const channel = client
    .channel(`follow-${spec.name}`)
    .onChange({ event: 'INSERT', table: 'ticks', filter: spec.filter }, (change) =>
      out({ c: spec.name, id: Number(change.record.id) }),
    )
    .onResync((notice) => out({ c: spec.name, resync: notice.message }));
  channel.subscribe().then(
    () => out({ c: spec.name, subscribed: true }),
    (error) => out({ c: spec.name, error: String(error) }),
  );
}
