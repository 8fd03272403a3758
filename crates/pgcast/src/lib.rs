//! pgcast: PostgreSQL row changes streamed to WebSocket clients that speak the Supabase Realtime
//! protocol.
//!
//! Data flows one way: `capture` (logical replication -> typed transactions) -> `router`
//! (subscription index, shared serialization) -> `session` (bounded queue per connection) ->
//! `protocol` (wire framing). `server` wires the stages together and owns their lifecycle; see
//! ARCHITECTURE.md for the map and its invariants.

pub mod accept;
pub mod audit;
pub mod auth;
pub mod broadcast;
pub mod capture;
pub mod clock;
pub mod config;
pub mod conformance;
pub mod db;
pub mod demo;
pub mod http;
pub mod json;
pub mod local_postgres;
pub mod log;
pub mod outbound;
pub mod presence;
pub mod protocol;
pub mod random;
pub mod rls;
pub mod rooms;
pub mod router;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod text;
pub mod transport;
