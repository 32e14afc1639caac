//! A bounded cache of policy decisions.
//!
//! Cedar evaluation is deterministic in its inputs, and the inputs of a
//! request are few: tenant, principal and home tenant, method, path, and the
//! context fields the policies can read. The key holds all of them (the time
//! only when some policy mentions `time`, at one-second resolution; host,
//! source IP and headers only when some policy mentions them, plus whether
//! each was present), byte for byte, so a hit is exactly the decision a fresh
//! evaluation would give. Quotas are never cached.
//!
//! Memory is bounded: at most [`CAPACITY`] entries, and a key longer than
//! [`MAX_KEY_LEN`] bytes (a very long path, say) is not cached at all.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;
use lru::LruCache;

use crate::decision::Decision;
use crate::request::Request;

/// Entries per engine (one engine per Wasm VM).
pub const CAPACITY: usize = 2048;
/// Longest key cached, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Which optional inputs the policies can see (decided once from their text;
/// a mention anywhere, even in a comment, counts, which is only ever safe).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyShape {
    pub time: bool,
    pub host: bool,
    pub source_ip: bool,
    pub headers: bool,
}

impl KeyShape {
    pub fn from_texts<'a>(texts: impl Iterator<Item = &'a str>) -> Self {
        let mut s = KeyShape::default();
        for t in texts {
            s.time |= t.contains("time");
            s.host |= t.contains("host");
            s.source_ip |= t.contains("source_ip");
            s.headers |= t.contains("headers");
            // A policy that compares the whole context record sees everything.
            if t.contains("context ==") || t.contains("== context") || t.contains("context)") {
                s = KeyShape {
                    time: true,
                    host: true,
                    source_ip: true,
                    headers: true,
                };
            }
        }
        s
    }
}

pub(crate) struct DecisionCache {
    shape: KeyShape,
    entries: Mutex<LruCache<Vec<u8>, Decision, SeedableRandomState>>,
}

/// The cache's hasher: foldhash (SipHash over a ~60-byte key was a tenth of
/// a cache hit) with seeds from the operating system (WASI `random_get` in
/// the filter), so the clients who choose paths cannot choose collisions.
fn hasher() -> SeedableRandomState {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    fn random() -> u64 {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    }
    static SHARED: OnceLock<SharedSeed> = OnceLock::new();
    SeedableRandomState::with_seed(
        random(),
        SHARED.get_or_init(|| SharedSeed::from_u64(random())),
    )
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("shape", &self.shape)
            .finish()
    }
}

fn push(key: &mut Vec<u8>, field: &[u8]) {
    key.extend_from_slice(&(field.len() as u32).to_le_bytes());
    key.extend_from_slice(field);
}

impl DecisionCache {
    pub fn new(shape: KeyShape) -> Self {
        let cap = NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN);
        DecisionCache {
            shape,
            entries: Mutex::new(LruCache::with_hasher(cap, hasher())),
        }
    }

    /// The cache key of a request, or `None` if it must not be cached.
    pub fn key(&self, req: &Request) -> Option<Vec<u8>> {
        if req.extra_context.is_some() || req.claims.is_some() {
            return None;
        }
        let mut k = Vec::with_capacity(64 + req.path.len());
        push(&mut k, req.tenant.as_str().as_bytes());
        match &req.principal {
            Some(p) => {
                k.push(1);
                push(&mut k, p.id.as_bytes());
                push(&mut k, p.tenant.as_str().as_bytes());
            }
            None => k.push(0),
        }
        push(&mut k, req.method.as_bytes());
        push(&mut k, req.action.unwrap_or("").as_bytes());
        push(&mut k, req.path.as_bytes());
        if self.shape.time {
            k.extend_from_slice(&(req.time_ns / 1_000_000_000).to_le_bytes());
        }
        let optional = |k: &mut Vec<u8>, used: bool, v: Option<&String>| match v {
            Some(v) if used => {
                k.push(1);
                push(k, v.as_bytes());
            }
            Some(_) => k.push(1),
            None => k.push(0),
        };
        optional(&mut k, self.shape.host, req.host.as_ref());
        optional(&mut k, self.shape.source_ip, req.source_ip.as_ref());
        k.extend_from_slice(&(req.headers.len() as u32).to_le_bytes());
        for (name, value) in &req.headers {
            push(&mut k, name.as_bytes());
            if self.shape.headers {
                push(&mut k, value.as_bytes());
            }
        }
        (k.len() <= MAX_KEY_LEN).then_some(k)
    }

    pub fn get(&self, key: &[u8]) -> Option<Decision> {
        self.entries.lock().ok()?.get(key).cloned()
    }

    pub fn put(&self, key: Vec<u8>, decision: &Decision) {
        if let Ok(mut e) = self.entries.lock() {
            e.put(key, decision.clone());
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantPath;

    fn req() -> Request {
        let t = TenantPath::parse("/acme").unwrap();
        Request::new(t, "GET", "/orders")
            .with_principal("alice", None)
            .at(5_000_000_000)
    }

    #[test]
    fn keys_separate_what_policies_can_see() {
        let all = DecisionCache::new(KeyShape {
            time: true,
            host: true,
            source_ip: true,
            headers: true,
        });
        let base = all.key(&req()).unwrap();
        let mut r = req();
        r.path = "/orders/".into();
        assert_ne!(all.key(&r).unwrap(), base);
        let mut r = req();
        r.principal = None;
        assert_ne!(all.key(&r).unwrap(), base);
        let mut r = req();
        r.time_ns += 1_000_000_000;
        assert_ne!(all.key(&r).unwrap(), base);
        let mut r = req();
        r.time_ns += 1;
        assert_eq!(all.key(&r).unwrap(), base, "same second, same key");
        let mut r = req();
        r.headers.push(("x-api-key".into(), "k".into()));
        let with_header = all.key(&r).unwrap();
        r.headers[0].1 = "other".into();
        assert_ne!(all.key(&r).unwrap(), with_header);
        // Field boundaries are length-prefixed: ("ab","c") != ("a","bc").
        let mut a = req();
        a.principal = Some(crate::request::Principal {
            id: "ab".into(),
            tenant: TenantPath::root(),
        });
        a.method = "C".into();
        let mut b = a.clone();
        b.principal = Some(crate::request::Principal {
            id: "a".into(),
            tenant: TenantPath::root(),
        });
        b.method = "BC".into();
        assert_ne!(all.key(&a), all.key(&b));
    }

    #[test]
    fn unused_fields_stay_out_but_presence_counts() {
        let none = DecisionCache::new(KeyShape::default());
        let mut a = req();
        a.host = Some("a.example".into());
        let mut b = req();
        b.host = Some("b.example".into());
        assert_eq!(none.key(&a), none.key(&b));
        assert_ne!(none.key(&a), none.key(&req()));
        let mut later = req();
        later.time_ns += 3_600_000_000_000;
        assert_eq!(none.key(&later), none.key(&req()));
    }

    #[test]
    fn bounded() {
        let c = DecisionCache::new(KeyShape::default());
        let d = Decision::allow(vec![], vec![]);
        for i in 0..(CAPACITY + 100) {
            let mut r = req();
            r.path = format!("/p/{i}");
            c.put(c.key(&r).unwrap(), &d);
        }
        assert_eq!(c.len(), CAPACITY);
        let mut r = req();
        r.path = format!("/{}", "x".repeat(MAX_KEY_LEN));
        assert!(c.key(&r).is_none());
        r.path = "/".into();
        r.extra_context = Some(Default::default());
        assert!(c.key(&r).is_none());
    }
}
