//! The wall clock as the rest of pgcast reads it: seconds for token claims, microseconds for
//! commit times and latency. A leaf: it imports nothing of pgcast.
//!
//! Not a timer or a monotonic clock (deadlines use `tokio::time::Instant`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (JWT NumericDates); 0 if the clock is before 1970.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Microseconds since the Unix epoch (commit times, commit-to-send latency).
pub fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
