//! The host's controllable clock, shared by all its VMs: it serves
//! `proxy_get_current_time_nanoseconds` and WASI `clock_time_get`, and only
//! moves when a test moves it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// 2026-01-01T00:00:00Z, the default start.
pub const DEFAULT_START_NS: u64 = 1_767_225_600_000_000_000;

#[derive(Debug, Clone)]
pub struct Clock {
    now_ns: Arc<AtomicU64>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::at(DEFAULT_START_NS)
    }
}

impl Clock {
    /// A clock at this time (nanoseconds since the Unix epoch).
    pub fn at(now_ns: u64) -> Self {
        Clock {
            now_ns: Arc::new(AtomicU64::new(now_ns)),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::SeqCst)
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .now_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ns))
            });
    }

    /// Sets the time, backwards too (to test a clock that jumps back).
    pub fn set_ns(&self, now_ns: u64) {
        self.now_ns.store(now_ns, Ordering::SeqCst);
    }
}
