//! Fixed-window counters in Redis, checked and incremented by one Lua script
//! per request, so a request's descriptors are admitted together or not at all
//! and concurrent requests cannot over-admit.

use std::time::Duration;

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

/// The counters, over a reconnecting connection.
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

    /// Runs the script over `hits` (one atomic step); the answers are aligned
    /// with `hits`.
    pub async fn apply(&self, hits: &[Hit]) -> Result<Vec<Count>, CounterError> {
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
