//! Random identifiers: history epochs, presence keys, the demo's secret. A leaf: it imports
//! nothing of pgcast but the clock.
//!
//! 128 bits from the OS (`/dev/urandom`), as hex. Not a general random-number generator.

/// 32 hex characters of OS randomness (time and pid if `/dev/urandom` cannot be read: still
/// unique per run).
pub fn hex_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let seed = crate::clock::now_micros() as u128 ^ ((std::process::id() as u128) << 64);
        bytes = seed.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
