//! Latency histograms: a lock-free recorder shared by every client task of a process, and a
//! plain, serializable snapshot that worker processes send to the coordinator and that merges.
//!
//! Values are microseconds in log-linear buckets: exact below 256 µs, then 128 buckets per
//! power of two, so a percentile is reported within 0.8% of the true sample. Count, sum, min and
//! max are exact. This is not a general statistics library: no decay, no windows, no negative
//! values; it exists because millions of samples per run cannot be kept (or shipped between
//! processes) as a sorted vector.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (2^7 = 128).
const SUB_BITS: u32 = 7;
/// Buckets cover every `u64`: exact 0..256, then 128 per power of two up to 2^63.
const BUCKETS: usize = ((64 - SUB_BITS as usize) << SUB_BITS) + (1 << SUB_BITS);

fn bucket_of(value: u64) -> usize {
    if value < (1 << (SUB_BITS + 1)) {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let shift = exponent - SUB_BITS;
    let mantissa = (value >> shift) as usize; // in [128, 256)
    ((shift as usize) << SUB_BITS) + mantissa
}

/// The smallest value in `bucket` and the bucket's width.
fn bucket_range(bucket: usize) -> (u64, u64) {
    if bucket < (1 << (SUB_BITS + 1)) {
        return (bucket as u64, 1);
    }
    let shift = (bucket >> SUB_BITS) as u32 - 1;
    let mantissa = (1 << SUB_BITS) + (bucket as u64 & ((1 << SUB_BITS) - 1));
    (mantissa << shift, 1 << shift)
}

/// Records from many tasks at once (relaxed atomics; a snapshot taken while recording may miss
/// the samples in flight, which the bench avoids by snapshotting after the load has drained).
///
/// Each thread records into its own shard: at a million samples a second, counters shared by
/// the bench's threads bounced their cache lines between cores and were the bench's largest
/// cost (12% of its CPU in `perf`), CPU taken from the server it measures on a shared machine.
pub struct Recorder {
    shards: Box<[Shard]>,
}

/// Shards per recorder; threads beyond this share one.
const SHARDS: usize = 4;

/// One thread's counters, on cache lines of their own.
#[repr(align(128))]
struct Shard {
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder { shards: (0..SHARDS).map(|_| Shard::default()).collect() }
    }
}

/// This thread's shard index, handed out in turn as threads first record.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl Recorder {
    pub fn record(&self, micros: u64) {
        let shard = &self.shards[shard_index()];
        shard.counts[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard.sum.fetch_add(micros, Ordering::Relaxed);
        lower_to(&shard.min, micros);
        raise_to(&shard.max, micros);
    }

    /// Everything recorded since the last take, leaving the recorder empty.
    pub fn take(&self) -> Histogram {
        let mut all = Histogram::default();
        for shard in self.shards.iter() {
            let mut buckets = BTreeMap::new();
            for (i, slot) in shard.counts.iter().enumerate() {
                let n = slot.swap(0, Ordering::Relaxed);
                if n > 0 {
                    buckets.insert(i as u32, n);
                }
            }
            all.merge(&Histogram {
                buckets,
                count: shard.count.swap(0, Ordering::Relaxed),
                sum: shard.sum.swap(0, Ordering::Relaxed),
                min: shard.min.swap(u64::MAX, Ordering::Relaxed),
                max: shard.max.swap(0, Ordering::Relaxed),
            });
        }
        all
    }
}

/// Lowers `atomic` to `value` if that is smaller. A plain load comes first: a locked update on
/// every sample would bounce the cache line between the bench's threads.
pub fn lower_to(atomic: &AtomicU64, value: u64) {
    if value < atomic.load(Ordering::Relaxed) {
        atomic.fetch_min(value, Ordering::Relaxed);
    }
}

/// Raises `atomic` to `value` if that is larger (see [`lower_to`]).
pub fn raise_to(atomic: &AtomicU64, value: u64) {
    if value > atomic.load(Ordering::Relaxed) {
        atomic.fetch_max(value, Ordering::Relaxed);
    }
}

/// A snapshot: bucket index -> samples, plus exact count, sum, min and max (µs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    #[serde(with = "bucket_pairs")]
    buckets: BTreeMap<u32, u64>,
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

/// Buckets travel between processes as `[[bucket, samples], ...]`: worker reports are an
/// internally tagged enum, through which serde cannot read integer map keys back from JSON's
/// string keys.
mod bucket_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(buckets: &BTreeMap<u32, u64>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(buckets.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<u32, u64>, D::Error> {
        Ok(Vec::<(u32, u64)>::deserialize(deserializer)?.into_iter().collect())
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { buckets: BTreeMap::new(), count: 0, sum: 0, min: u64::MAX, max: 0 }
    }
}

impl Histogram {
    pub fn from_values(values: impl IntoIterator<Item = u64>) -> Histogram {
        let recorder = Recorder::default();
        values.into_iter().for_each(|v| recorder.record(v));
        recorder.take()
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (bucket, n) in &other.buckets {
            *self.buckets.entry(*bucket).or_insert(0) += n;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile (0..=1) in µs, `None` when empty. Reported as the middle of the sample's
    /// bucket, clamped to the exact min and max; `q = 1` is the exact max.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        if q >= 1.0 {
            return Some(self.max);
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (bucket, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let (low, width) = bucket_range(*bucket as usize);
                return Some((low + width / 2).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// Every value shifted down by `micros` (saturating at 0), for latencies recorded against an
    /// earlier reference than the one reported.
    pub fn shifted_down(&self, micros: u64) -> Histogram {
        if self.count == 0 || micros == 0 {
            return self.clone();
        }
        let mut buckets = BTreeMap::new();
        for (bucket, n) in &self.buckets {
            let (low, width) = bucket_range(*bucket as usize);
            let moved = bucket_of((low + width / 2).saturating_sub(micros)) as u32;
            *buckets.entry(moved).or_insert(0) += n;
        }
        Histogram {
            buckets,
            count: self.count,
            sum: self.sum.saturating_sub(micros.saturating_mul(self.count)),
            min: self.min.saturating_sub(micros),
            max: self.max.saturating_sub(micros),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_their_values() {
        let mut previous = 0;
        for bucket in 1..BUCKETS - 1 {
            let (low, width) = bucket_range(bucket);
            assert!(low > previous, "bucket {bucket} starts at {low}, after {previous}");
            assert_eq!(bucket_of(low), bucket);
            assert_eq!(bucket_of(low + width - 1), bucket);
            assert_eq!(bucket_of(low + width), bucket + 1);
            previous = low;
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn small_values_are_exact_and_large_ones_within_one_percent() {
        let h = Histogram::from_values(1..=200);
        assert_eq!(h.quantile(0.5), Some(100));
        assert_eq!(h.quantile(0.99), Some(198));
        let h = Histogram::from_values((1..=100_000).map(|v| v * 37));
        for q in [0.5, 0.9, 0.99, 0.999] {
            let exact = (q * 100_000.0_f64).ceil() * 37.0;
            let got = h.quantile(q).expect("non-empty") as f64;
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), Some(3_700_000));
        assert_eq!(h.min, 37);
    }

    #[test]
    fn merged_snapshots_equal_one_recording() {
        let mut a = Histogram::from_values([5, 500, 50_000]);
        let b = Histogram::from_values([7, 700_000]);
        a.merge(&b);
        assert_eq!(a, Histogram::from_values([5, 500, 50_000, 7, 700_000]));
        let json = serde_json::to_string(&a).expect("serialize");
        assert_eq!(serde_json::from_str::<Histogram>(&json).expect("deserialize"), a);
    }

    #[test]
    fn taking_empties_the_recorder() {
        let recorder = Recorder::default();
        recorder.record(10);
        assert_eq!(recorder.take().count, 1);
        let empty = recorder.take();
        assert_eq!((empty.count, empty.quantile(0.5)), (0, None));
    }

    #[test]
    fn shifting_moves_every_quantile_by_the_offset() {
        let h = Histogram::from_values((0..1000).map(|v| 100_000 + v * 10));
        let s = h.shifted_down(50_000);
        assert_eq!(s.count, h.count);
        let (before, after) = (h.quantile(0.5).expect("q") as f64, s.quantile(0.5).expect("q") as f64);
        assert!((before - 50_000.0 - after).abs() < 1000.0, "{before} -> {after}");
        assert_eq!(s.max, h.max - 50_000);
    }
}
