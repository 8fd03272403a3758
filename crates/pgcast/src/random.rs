//! Random identifiers: history epochs, presence keys, the demo's secret. A leaf: it imports
//! nothing of pgcast but the clock.
//!
//! 128 bits from the OS (`/dev/urandom`), as hex. Not a general random-number generator (the
//! tests' seeded `XorShift` is for fuzzing only).

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

/// xorshift64: a seeded, repeatable stream for the seeded fuzz tests. Not for identifiers.
#[cfg(test)]
pub(crate) struct XorShift(pub u64);

#[cfg(test)]
impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
