#!/usr/bin/env bash
# Runs every test of pgcast. On a fresh machine it first installs what is missing (PostgreSQL,
# Node.js, the npm packages), idempotently. Used by CI through .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo; then sudo "$@"; else "$@"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

log "checking tools"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! have initdb; then
  log "installing PostgreSQL"; apt_install postgresql
fi
if ! have node || ! have npm; then
  log "installing Node.js"; apt_install nodejs npm
fi
if ! have chromium; then
  log "installing Chromium (SDK browser test)"; apt_install chromium
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "building"
cargo build --locked --bins --tests

log "SDK build (clients/js; the Rust end-to-end tests drive SDK clients too)"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run build)

log "Node baselines for the bench (crates/pgcast-bench/baselines/node-ws-notify, node-socketio-notify)"
(cd crates/pgcast-bench/baselines/node-ws-notify && npm ci --no-audit --no-fund --loglevel=error)
(cd crates/pgcast-bench/baselines/node-socketio-notify && npm ci --no-audit --no-fund --loglevel=error)

# Each integration test makes its PostgreSQL cluster under target/tmp; a test process ends before
# the cluster's files can go, so clear them around the runs (they add up to gigabytes).
clear_test_clusters() { rm -rf target/tmp; }
clear_test_clusters

log "Rust tests (unit + integration against real PostgreSQL)"
if have cargo-nextest; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi

# Both capture modes run the same suite: the mode-independent integration tests again, with
# every table captured by the outbox trigger (outbox and nothing_lost cover both modes already).
clear_test_clusters
log "Rust integration tests again in trigger capture mode"
if have cargo-nextest; then
  PGCAST_TEST_CAPTURE=trigger cargo nextest run --locked --no-fail-fast \
    -E 'package(pgcast) & kind(test) & !(binary(outbox) | binary(nothing_lost))'
else
  PGCAST_TEST_CAPTURE=trigger cargo test --locked --no-fail-fast -p pgcast --tests
fi

clear_test_clusters

log "Node tests (official @supabase/realtime-js against pgcast)"
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error && npm test)

log "SDK tests (clients/js, TypeScript build + tests against pgcast)"
(cd clients/js && npm test)
