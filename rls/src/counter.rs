//! Fixed-window counters, checked and incremented in one atomic step per
//! request, so a request's descriptors are admitted together or not at all
//! and concurrent requests cannot over-admit. [`Counters`] keeps them in
//! Redis (one Lua script per step, [`SCRIPT`]); [`MemoryCounters`] keeps them
//! in this process with the same semantics, so the service's logic is tested
//! without Redis (the binary always counts in Redis).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;

/// The script. `KEYS[i]` is a counter; `ARGV` holds four values per counter:
/// limit, window in milliseconds, hits, and `1` for a report (`0` for a check).
///
/// First every counter is read. The request is refused if any *check* would
/// go over its limit. Then reports always increment, and checks increment
/// only when nothing refused. A counter's window starts at its first hit: the
/// key gets the window as its TTL when it has none. Answers, per counter:
/// `{count, ttl_ms, over}` where `count` is the count after this request,
/// `ttl_ms` the key's PTTL (-2 when it does not exist) and `over` 1 for a
/// refused check or a report that left the count above the limit.
pub const SCRIPT: &str = r"
local refused = false
local cur = {}
for i = 1, #KEYS do
  local a = (i - 1) * 4
  local c = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  cur[i] = c
  if ARGV[a + 4] ~= '1' and c + tonumber(ARGV[a + 3]) > tonumber(ARGV[a + 1]) then
    refused = true
  end
end
local out = {}
for i = 1, #KEYS do
  local a = (i - 1) * 4
  local limit = tonumber(ARGV[a + 1])
  local hits = tonumber(ARGV[a + 3])
  local report = ARGV[a + 4] == '1'
  local c = cur[i]
  local over = 0
  if report or not refused then
    if hits > 0 then
      c = redis.call('INCRBY', KEYS[i], hits)
      if redis.call('PTTL', KEYS[i]) < 0 then
        redis.call('PEXPIRE', KEYS[i], ARGV[a + 2])
      end
    end
    if c > limit then over = 1 end
  elseif c + hits > limit then
    over = 1
  end
  out[i] = {c, redis.call('PTTL', KEYS[i]), over}
end
return out
";

/// One counter to check (or report to) in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub key: String,
    pub limit: u64,
    pub window_ms: u64,
    pub hits: u64,
    pub report: bool,
}

/// One counter after the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// The count after this request (before it, for a refused check).
    pub count: u64,
    /// Time left in the window; `None` when the counter does not exist
    /// (nothing counted yet: a full window is ahead).
    pub ttl: Option<Duration>,
    pub over: bool,
}

/// Why a check could not be made.
#[derive(Debug)]
pub enum CounterError {
    Redis(redis::RedisError),
    Timeout(Duration),
    Malformed,
}

impl std::fmt::Display for CounterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CounterError::Redis(e) => write!(f, "redis: {e}"),
            CounterError::Timeout(d) => write!(f, "redis: no answer within {} ms", d.as_millis()),
            CounterError::Malformed => {
                f.write_str("redis: the script answered an unexpected shape")
            }
        }
    }
}

/// Where the counters live: one atomic step over a request's counters.
///
/// Semantics (those of [`SCRIPT`]): every counter is read first; the request
/// is refused if any *check* would go over its limit; then reports always
/// increment and checks increment only when nothing refused. A counter's
/// window starts at its first hit. The answers are aligned with `hits`.
pub trait CounterStore: Send + Sync + 'static {
    fn apply(&self, hits: &[Hit]) -> impl Future<Output = Result<Vec<Count>, CounterError>> + Send;
}

/// The counters in Redis, over a reconnecting connection.
#[derive(Clone)]
pub struct Counters {
    conn: ConnectionManager,
    script: Script,
    timeout: Duration,
}

impl Counters {
    pub fn new(conn: ConnectionManager, timeout: Duration) -> Counters {
        Counters {
            conn,
            script: Script::new(SCRIPT),
            timeout,
        }
    }

    /// Loads the script into Redis (`SCRIPT LOAD`), so calls find it by hash.
    pub async fn load(&self) -> Result<(), CounterError> {
        let mut conn = self.conn.clone();
        let invocation = self.script.prepare_invoke();
        match tokio::time::timeout(self.timeout, invocation.load_async(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CounterError::Redis(e)),
            Err(_) => Err(CounterError::Timeout(self.timeout)),
        }
    }
}

impl CounterStore for Counters {
    /// Runs the script over `hits` (one atomic step); the answers are aligned
    /// with `hits`.
    async fn apply(&self, hits: &[Hit]) -> Result<Vec<Count>, CounterError> {
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.script.prepare_invoke();
        for h in hits {
            inv.key(&h.key)
                .arg(h.limit)
                .arg(h.window_ms)
                .arg(h.hits)
                .arg(u8::from(h.report));
        }
        let mut conn = self.conn.clone();
        let answer: Vec<(i64, i64, i64)> =
            match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return Err(CounterError::Redis(e)),
                Err(_) => return Err(CounterError::Timeout(self.timeout)),
            };
        if answer.len() != hits.len() {
            return Err(CounterError::Malformed);
        }
        Ok(answer
            .into_iter()
            .map(|(count, ttl_ms, over)| Count {
                count: u64::try_from(count).unwrap_or(0),
                ttl: u64::try_from(ttl_ms).ok().map(Duration::from_millis),
                over: over == 1,
            })
            .collect())
    }
}

/// The clock of [`MemoryCounters`]: a function, so tests can move time.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// One counter in memory: its count and when its window ends.
#[derive(Debug, Clone, Copy)]
struct Slot {
    count: u64,
    expires: Instant,
}

/// The counters in this process, with exactly the semantics of [`SCRIPT`]
/// (a key expires when its window ends; its time left is reported in whole
/// milliseconds, as Redis' `PTTL`). One process's counts: for tests, not a
/// fleet. Expired windows are dropped as the map grows,
/// so memory follows the counters in use, not every key ever seen.
pub struct MemoryCounters {
    slots: Mutex<(HashMap<String, Slot>, usize)>,
    clock: Clock,
}

impl Default for MemoryCounters {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCounters {
    /// Counters on the monotonic clock.
    pub fn new() -> MemoryCounters {
        Self::with_clock(Arc::new(Instant::now))
    }

    /// Counters on a given clock.
    pub fn with_clock(clock: Clock) -> MemoryCounters {
        MemoryCounters {
            slots: Mutex::new((HashMap::new(), 1024)),
            clock,
        }
    }

    /// The live counters (windows not yet over), for tests.
    pub fn len(&self) -> usize {
        let now = (self.clock)();
        let guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.values().filter(|s| s.expires > now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One atomic step at `now` (see [`CounterStore`]).
    pub fn apply_at(&self, hits: &[Hit], now: Instant) -> Vec<Count> {
        let mut guard = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let (slots, prune_at) = &mut *guard;
        if slots.len() >= *prune_at {
            slots.retain(|_, s| s.expires > now);
            *prune_at = slots.len().saturating_mul(2).max(1024);
        }
        // A key whose window is over is gone, as in Redis.
        let live = |slots: &HashMap<String, Slot>, key: &str| {
            slots.get(key).copied().filter(|s| s.expires > now)
        };
        let cur: Vec<u64> = hits
            .iter()
            .map(|h| live(slots, &h.key).map_or(0, |s| s.count))
            .collect();
        let refused = hits
            .iter()
            .zip(&cur)
            .any(|(h, c)| !h.report && c.saturating_add(h.hits) > h.limit);
        let mut out = Vec::with_capacity(hits.len());
        for (h, c) in hits.iter().zip(cur) {
            let mut count = c;
            let over = if h.report || !refused {
                if h.hits > 0 {
                    let slot = match live(slots, &h.key) {
                        Some(s) => s,
                        None => Slot {
                            count: 0,
                            expires: now + Duration::from_millis(h.window_ms),
                        },
                    };
                    count = slot.count.saturating_add(h.hits);
                    slots.insert(h.key.clone(), Slot { count, ..slot });
                }
                count > h.limit
            } else {
                c.saturating_add(h.hits) > h.limit
            };
            let ttl = live(slots, &h.key).map(|s| {
                let left = s.expires.saturating_duration_since(now);
                Duration::from_millis(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
            });
            out.push(Count { count, ttl, over });
        }
        out
    }
}

impl CounterStore for MemoryCounters {
    async fn apply(&self, hits: &[Hit]) -> Result<Vec<Count>, CounterError> {
        Ok(self.apply_at(hits, (self.clock)()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(key: &str, limit: u64, hits: u64, report: bool) -> Hit {
        Hit {
            key: key.into(),
            limit,
            window_ms: 60_000,
            hits,
            report,
        }
    }

    fn counts(c: &[Count]) -> Vec<(u64, bool)> {
        c.iter().map(|c| (c.count, c.over)).collect()
    }

    #[test]
    fn checks_are_all_or_nothing_and_reports_always_count() {
        let m = MemoryCounters::new();
        let t0 = Instant::now();
        let r = m.apply_at(&[hit("a", 6, 3, false), hit("p", 10, 8, false)], t0);
        assert_eq!(counts(&r), vec![(3, false), (8, false)]);
        // `a` has room, `p` does not: nothing is charged.
        let r = m.apply_at(&[hit("a", 6, 3, false), hit("p", 10, 3, false)], t0);
        assert_eq!(counts(&r), vec![(3, false), (8, true)]);
        // A report counts past the limit even when a check of the same call refuses.
        let r = m.apply_at(&[hit("p", 10, 5, true), hit("a", 6, 4, false)], t0);
        assert_eq!(counts(&r), vec![(13, true), (3, true)]);
        // The same key twice in one step: both read the count before the step.
        let r = m.apply_at(&[hit("b", 5, 5, false), hit("b", 5, 1, true)], t0);
        assert_eq!(counts(&r), vec![(5, false), (6, true)]);
    }

    #[test]
    fn a_window_starts_at_the_first_hit_and_ends_with_its_key() {
        let t0 = Instant::now();
        let m = MemoryCounters::new();
        let r = m.apply_at(&[hit("a", 2, 0, false)], t0);
        assert_eq!(
            (r[0].count, r[0].ttl, r[0].over),
            (0, None, false),
            "no hit, no key"
        );
        let r = m.apply_at(&[hit("a", 2, 2, false)], t0 + Duration::from_secs(5));
        assert_eq!(r[0].ttl, Some(Duration::from_secs(60)));
        let r = m.apply_at(&[hit("a", 2, 1, false)], t0 + Duration::from_secs(30));
        assert_eq!(
            (r[0].count, r[0].ttl, r[0].over),
            (2, Some(Duration::from_secs(35)), true)
        );
        // The window ends 60 s after its first hit, not after the last one.
        let r = m.apply_at(
            &[hit("a", 2, 1, false)],
            t0 + Duration::from_secs(65) + Duration::from_millis(1),
        );
        assert_eq!(
            (r[0].count, r[0].ttl, r[0].over),
            (1, Some(Duration::from_secs(60)), false)
        );
    }

    #[test]
    fn expired_windows_are_dropped_as_the_map_grows() {
        let t0 = Instant::now();
        let m = MemoryCounters::new();
        for i in 0..5000 {
            let at = t0 + Duration::from_secs(i / 100 * 61);
            m.apply_at(&[hit(&format!("k{i}"), 1, 1, false)], at);
        }
        let guard = m.slots.lock().unwrap();
        assert!(guard.0.len() <= 1024, "{} slots kept", guard.0.len());
    }
}
