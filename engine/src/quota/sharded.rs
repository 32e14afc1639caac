//! Quota buckets in process memory, shared by every worker thread of a
//! process (the native build: Envoy's workers are threads of one process).
//!
//! The Wasm filter keeps bucket state in proxy-wasm shared data, one VM per
//! worker, with compare-and-swap. [`ShardedStore`] is the same contract in
//! process memory: a sharded map with the compare-and-swap semantics of
//! [`BucketStore`] (so admission is exact: a set only lands if nobody wrote
//! the key since it was read). [`super::MemoryStore`] is its one-lock sibling
//! for tests and `simulate`.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::store::{next_cas, KeyHasher};
use super::{BucketStore, StoreError};

/// Shards: enough that 2 to 64 workers rarely wait on one another for
/// different keys; a power of two so a shard is a mask away.
const SHARDS: usize = 64;

type Shard = HashMap<Box<str>, (Vec<u8>, u32), BuildHasherDefault<KeyHasher>>;

/// A process-wide [`BucketStore`]: per-key values with CAS tokens from one
/// global counter (incremented on every successful set, skipping 0), a set
/// on a missing key creates it whatever `cas` says, keys are never deleted
/// (as in Envoy's shared data). Thread-safe; each key's check-and-set holds
/// its shard's lock.
#[derive(Debug)]
pub struct ShardedStore {
    shards: Vec<Mutex<Shard>>,
    cas_counter: AtomicU32,
}

impl Default for ShardedStore {
    fn default() -> Self {
        ShardedStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            cas_counter: AtomicU32::new(0),
        }
    }
}

impl ShardedStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let i = (BuildHasherDefault::<KeyHasher>::default().hash_one(key) as usize) & (SHARDS - 1);
        // `shards` has SHARDS entries and `i` is masked below SHARDS, so the
        // fallback to the first shard is never taken; it keeps this panic-free.
        let shard = self.shards.get(i).or(self.shards.first());
        match shard {
            Some(m) => m.lock().unwrap_or_else(PoisonError::into_inner),
            // Unreachable: `Default` creates SHARDS shards. A fresh empty
            // shard would lose writes, so use a static one instead of panicking.
            None => EMPTY.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// The next CAS token (never 0), from the counter all shards share.
    fn next_cas(&self) -> u32 {
        let mut t = 0;
        // `fetch_update` with a closure that never fails: one atomic step.
        let _ = self
            .cas_counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                t = next_cas(c);
                Some(t)
            });
        t
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

static EMPTY: Mutex<Shard> = Mutex::new(HashMap::with_hasher(BuildHasherDefault::new()));

impl BucketStore for ShardedStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.shard(key).get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some((_, current)) if cas != 0 && cas != *current => Err(StoreError::CasMismatch),
            Some((stored, current)) => {
                stored.clear();
                stored.extend_from_slice(value);
                *current = self.next_cas();
                Ok(())
            }
            None => {
                let token = self.next_cas();
                shard.insert(Box::from(key), (value.to_vec(), token));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpInput, NoMetadata};
    use crate::{Bundle, Engine};
    use std::sync::Arc;

    #[test]
    fn has_the_shared_data_semantics() {
        let s = ShardedStore::new();
        assert_eq!(s.get("a").unwrap(), None);
        // A missing key is created whatever the CAS says.
        s.set("a", b"1", 77).unwrap();
        let (v, cas_a) = s.get("a").unwrap().unwrap();
        assert_eq!((v.as_slice(), cas_a), (&b"1"[..], 1));
        // The counter is global: another key gets the next token.
        s.set("b", b"x", 0).unwrap();
        assert_eq!(s.get("b").unwrap().unwrap().1, 2);
        // A stale token fails, the right one succeeds, 0 always succeeds.
        assert_eq!(s.set("a", b"2", 2), Err(StoreError::CasMismatch));
        s.set("a", b"2", cas_a).unwrap();
        assert_eq!(s.set("a", b"3", cas_a), Err(StoreError::CasMismatch));
        s.set("a", b"3", 0).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap(), (b"3".to_vec(), 4));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn zero_is_never_a_token() {
        let s = ShardedStore::new();
        s.cas_counter.store(u32::MAX - 1, Ordering::Relaxed);
        s.set("a", b"1", 0).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().1, u32::MAX);
        s.set("a", b"2", 0).unwrap();
        assert_eq!(s.get("a").unwrap().unwrap().1, 1, "0 is skipped");
    }

    #[test]
    fn keys_spread_over_the_shards() {
        let h = BuildHasherDefault::<KeyHasher>::default();
        let used: std::collections::BTreeSet<usize> = (0..1000)
            .map(|i| {
                (h.hash_one(format!("tenantgate:quota:v1:/acme/t{i}:rps:0000")) as usize)
                    & (SHARDS - 1)
            })
            .collect();
        assert_eq!(used.len(), SHARDS);
    }

    /// Counters raised by 4 threads with read-modify-CAS loops: no update lost.
    #[test]
    fn compare_and_swap_loses_no_update_across_threads() {
        let s = Arc::new(ShardedStore::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        loop {
                            let (n, cas) = match s.get("n").unwrap() {
                                Some((v, cas)) => (u64::from_le_bytes(v.try_into().unwrap()), cas),
                                None => (0, 0),
                            };
                            if s.set("n", &(n + 1).to_le_bytes(), cas).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (v, _) = s.get("n").unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(v.try_into().unwrap()), 8_000);
    }

    /// A bundle with one tenant `/acme` whose `rph` limit allows `rate`
    /// requests an hour (the bucket starts full: `burst` = `rate`).
    fn engine(limit: &str) -> Engine {
        // One folder per call: the tests run in parallel in one process.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tenantgate-sharded-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tenants/acme")).unwrap();
        std::fs::write(
            dir.join("tenantgate.json"),
            r#"{"tenant": {"header": "x-tenant"}, "principal": {"header": "x-user"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("tenants/allow.cedar"),
            "permit (principal, action, resource);\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("tenants/acme/tenant.json"),
            format!(r#"{{"limits": {limit}}}"#),
        )
        .unwrap();
        let bundle = Bundle::from_dir(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Engine::new(&bundle).unwrap()
    }

    /// 4 threads (Envoy's workers) hammer one bucket through the engine's
    /// admission with the clock stopped: exactly the bucket's tokens are
    /// admitted, whichever thread gets them.
    fn admitted_by_four_threads(engine: Engine, exact: bool) -> u64 {
        // One worker for all threads, as the native module shares one.
        let engine = Arc::new(crate::Worker::new(Arc::new(engine)));
        let store = Arc::new(ShardedStore::new());
        let now = 1_700_000_000_000_000_000u64;
        let threads: Vec<_> = (0..4u64)
            .map(|w| {
                let (engine, store) = (Arc::clone(&engine), Arc::clone(&store));
                std::thread::spawn(move || {
                    let mut admitted = 0u64;
                    for i in 0..250u64 {
                        let user = format!("u{w}-{i}");
                        let headers: Vec<(&str, &[u8])> = vec![
                            (":method", b"GET"),
                            (":path", b"/orders"),
                            ("x-tenant", b"/acme"),
                            ("x-user", user.as_bytes()),
                            ("x-api-key", b"shared-key"),
                        ];
                        let input = HttpInput {
                            headers: &headers,
                            source_address: None,
                            now_ns: now,
                        };
                        let m = engine.map_request(&input, &NoMetadata).unwrap();
                        let d = if exact {
                            engine.decide_quotas(&m.request, &*store)
                        } else {
                            engine.decide(&m.request, &*store)
                        };
                        if d.is_allowed() {
                            admitted += 1;
                        } else {
                            assert_eq!(d.status, 429, "{d:?}");
                        }
                    }
                    admitted
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    }

    #[test]
    fn four_threads_get_exactly_the_limit_through_decide() {
        let e = engine(r#"{"rph": {"rate": 300, "per": "1h"}}"#);
        assert_eq!(admitted_by_four_threads(e, false), 300);
    }

    #[test]
    fn four_threads_get_exactly_the_limit_through_exact_admission() {
        let e = engine(r#"{"rph": {"rate": 300, "per": "1h"}}"#);
        assert_eq!(admitted_by_four_threads(e, true), 300);
    }

    #[test]
    fn four_threads_get_exactly_a_keyed_limit() {
        // Every request carries the same `x-api-key`: one keyed bucket of
        // 120, under a tenant bucket far from empty.
        let e = engine(
            r#"{"rph": {"rate": 1000000, "per": "1h"}, "per_key": {"rate": 120, "per": "1h", "key": {"header": "x-api-key"}}}"#,
        );
        assert_eq!(admitted_by_four_threads(e, false), 120);
    }

    #[test]
    fn the_engine_can_be_shared_by_worker_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Engine>();
        shared::<ShardedStore>();
    }
}
