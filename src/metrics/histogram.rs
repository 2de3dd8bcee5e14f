//! A fixed-bucket histogram of durations (or counts) for `/metrics` and the dashboard.
//!
//! Buckets are powers of two of the unit (1, 2, 4, … 2^21, then +Inf): 23 relaxed counters, so
//! an observation is a leading-zeros count and three `fetch_add`s, with no lock and no
//! allocation. It is observed once per message or per handshake, never once per recipient.
//! Powers of two give each bucket a 2× range, coarse but enough to tell 50 µs from 5 ms.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Finite buckets: upper bounds 2^0 … 2^(FINITE-1) units. 2^21 µs is about 2 s.
const FINITE: usize = 22;
/// The finite buckets and +Inf.
pub const BUCKETS: usize = FINITE + 1;

/// Counts of observations by bucket, with their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Not cumulative: `counts[i]` holds observations in (2^(i-1), 2^i], `counts[FINITE]`
    /// the rest.
    counts: [AtomicU64; BUCKETS],
    sum: AtomicU64,
}

/// A copy of a [`Histogram`]'s counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Observations by bucket, not cumulative.
    pub counts: [u64; BUCKETS],
    /// The sum of all observed values.
    pub sum: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            counts: [0; BUCKETS],
            sum: 0,
        }
    }
}

impl Histogram {
    /// Records one observation of `value` units.
    pub fn observe(&self, value: u64) {
        self.counts[bucket_of(value)].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// Records `n` observations of `value` units at once.
    pub fn observe_n(&self, value: u64, n: u64) {
        self.counts[bucket_of(value)].fetch_add(n, Relaxed);
        self.sum.fetch_add(value * n, Relaxed);
    }

    /// The counters now, each read once.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            sum: self.sum.load(Relaxed),
        }
    }
}

/// The bucket holding `value`: the smallest `i` with `value <= 2^i`.
fn bucket_of(value: u64) -> usize {
    if value <= 1 {
        return 0;
    }
    let i = (u64::BITS - (value - 1).leading_zeros()) as usize;
    i.min(FINITE)
}

/// The upper bound of bucket `i` in units (`None` for +Inf).
fn upper(i: usize) -> Option<u64> {
    (i < FINITE).then(|| 1u64 << i)
}

impl HistogramSnapshot {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
            sum: self.sum.saturating_sub(earlier.sum),
        }
    }

    /// The upper bound of the bucket holding quantile `q` (0 < q ≤ 1): an estimate at most
    /// 2× the true value. `None` without observations; past the last finite bucket, twice its
    /// bound.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(upper(i).unwrap_or(1 << FINITE));
            }
        }
        None
    }

    /// Prometheus text for a histogram `name` whose unit is `scale` of the base unit (for
    /// seconds from microseconds, 1e-6), with its HELP line.
    pub fn prometheus(&self, out: &mut String, name: &str, help: &str, scale: f64) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            cumulative += n;
            match upper(i) {
                Some(bound) => {
                    let le = bound as f64 * scale;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum as f64 * scale);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_power_of_two_above_them() {
        let expect = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (1024, 10),
            (1025, 11),
        ];
        for (value, bucket) in expect {
            assert_eq!(bucket_of(value), bucket, "{value}");
        }
        assert_eq!(bucket_of(u64::MAX), FINITE, "+Inf");
    }

    #[test]
    fn quantiles_and_differences() {
        let h = Histogram::default();
        for v in [3, 3, 3, 3, 3, 3, 3, 3, 3, 900] {
            h.observe(v);
        }
        let before = h.snapshot();
        assert_eq!(before.count(), 10);
        assert_eq!(before.quantile(0.5), Some(4));
        assert_eq!(before.quantile(0.99), Some(1024));
        h.observe(5000);
        let delta = h.snapshot().since(&before);
        assert_eq!((delta.count(), delta.sum), (1, 5000));
        assert_eq!(delta.quantile(0.5), Some(8192));
        assert_eq!(HistogramSnapshot::default().quantile(0.5), None);
    }

    #[test]
    fn prometheus_buckets_are_cumulative_and_scaled() {
        let h = Histogram::default();
        h.observe(1);
        h.observe(3);
        let mut out = String::new();
        h.snapshot().prometheus(&mut out, "x_seconds", "help", 1e-6);
        assert!(out.contains("# TYPE x_seconds histogram"), "{out}");
        assert!(
            out.contains("x_seconds_bucket{le=\"0.000001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{le=\"0.000004\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_count 2\n"), "{out}");
    }
}
