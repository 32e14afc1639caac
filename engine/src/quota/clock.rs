//! Time for the quota model. The model never reads a clock itself: callers pass
//! `now` to [`super::QuotaModel::admit`], taking it from a [`Clock`]. The fake
//! clock ships in the library so every test (and `tenantgate simulate`) can
//! move time deterministically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Nanos;

/// A source of the current time, in nanoseconds since the Unix epoch.
pub trait Clock {
    fn now(&self) -> Nanos;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Nanos {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Clones share the same time, so a test
/// can hand one clone to the code under test and move the other.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A fake clock reading `start`.
    pub fn new(start: Nanos) -> Self {
        FakeClock(Arc::new(AtomicU64::new(start)))
    }

    /// Moves the clock forward by `by` (saturating at the end of time).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// Sets the clock to `t`, which may be earlier than the current time (to
    /// test a clock going backwards).
    pub fn set(&self, t: Nanos) {
        self.0.store(t, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Nanos {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_clones_share_time() {
        let a = FakeClock::new(10);
        let b = a.clone();
        a.advance(Duration::from_nanos(5));
        assert_eq!(b.now(), 15);
        b.set(3);
        assert_eq!(a.now(), 3);
        a.set(u64::MAX - 1);
        a.advance(Duration::from_secs(1));
        assert_eq!(a.now(), u64::MAX);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > 1_577_836_800 * 1_000_000_000);
    }
}
