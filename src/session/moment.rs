//! An instant in 8 bytes, for the clocks a session keeps while idle.
//!
//! Why: tokio's `Instant` is 16 bytes (seconds and nanoseconds), and so is an `Option` of one.
//! A session holds four (when it last heard from the client, when it pinged, its auth deadline,
//! its close deadline), paid by every idle connection; as microseconds since the process's first
//! use of this clock, in a `NonZeroU64` so that `Option<Moment>` stays 8 bytes, they take half.
//! 2^64 microseconds is 584,000 years.

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The instant every moment counts from: an hour before the first use of this clock (or the
/// clock's own start, if sooner), so that instants taken shortly before that first use, such
/// as the start of a read, still count exactly.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    })
}

/// An instant, to the microsecond; ordered as instants are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Moment(NonZeroU64);

impl Moment {
    /// `at`, rounded down to the microsecond: a deadline read back is never later than the one
    /// set, so its timer never fires late. An instant from before the epoch becomes the epoch;
    /// the session's are all from its own start or shortly before, after the epoch.
    pub(super) fn of(at: Instant) -> Self {
        let micros = at.saturating_duration_since(epoch()).as_micros();
        let micros = u64::try_from(micros).unwrap_or(u64::MAX - 1);
        Self(NonZeroU64::MIN.saturating_add(micros))
    }

    pub(super) fn now() -> Self {
        Self::of(Instant::now())
    }

    pub(super) fn instant(self) -> Instant {
        epoch() + Duration::from_micros(self.0.get() - 1)
    }

    /// This moment plus `d`, as an instant.
    pub(super) fn after(self, d: Duration) -> Instant {
        self.instant() + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moment_reads_back_within_a_microsecond_and_never_later() {
        let base = Instant::now() - Duration::from_secs(1);
        for nanos in [0, 1, 999, 1_000, 1_001, 123_456_789, 86_400_000_000_123] {
            let at = base + Duration::from_nanos(nanos);
            let back = Moment::of(at).instant();
            assert!(back <= at, "{nanos} ns read back later");
            assert!(
                at - back < Duration::from_micros(1),
                "{nanos} ns lost too much"
            );
        }
        assert!(Moment::of(base) < Moment::of(base + Duration::from_micros(1)));
        assert_eq!(std::mem::size_of::<Option<Moment>>(), 8);
    }
}
