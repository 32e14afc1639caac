//! The quota step: random admissions (tenant, cost, time steps, including the
//! clock going back) against the example tree's limits, with stored values
//! replaced by garbage of three kinds: values that decode (the version tag
//! and 44 arbitrary bytes, so any stamp, `tokens`, `ctokens` and `last`; a
//! stamp other than the limit's starts the bucket afresh), real
//! values with a few bytes changed (near the states admission meets), and
//! values that do not decode (wrong length or tag). Never panics; a value
//! that decodes is never reported corrupt, and one that does not is an
//! error, not free tokens.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::quota::{BucketStore, MemoryStore, QuotaModel, StoreError};
use tenantgate_engine::{Bundle, Engine, TenantPath};

/// Length of a stored bucket: the version tag, the stamp of the limit's
/// numbers (`u32`), `tokens` and `ctokens` (`i128`), `last` (`u64`).
const VALUE_LEN: usize = 45;
const TAG: u8 = 1;

struct Model {
    quotas: QuotaModel,
    tenants: Vec<TenantPath>,
    /// Every bucket key with its value when full (at time 0).
    buckets: Vec<(String, Vec<u8>)>,
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).expect("policies/ loads");
        let engine = Engine::new(&bundle).expect("policies/ compiles");
        let tenants = engine.tenants().into_iter().cloned().collect();
        let quotas = engine.quotas().clone();
        let mut buckets = quotas.initial_buckets(0);
        buckets.sort();
        assert!(
            buckets
                .iter()
                .all(|(_, v)| v.len() == VALUE_LEN && v[0] == TAG),
            "the bucket encoding changed: update this target"
        );
        Model {
            quotas,
            tenants,
            buckets,
        }
    })
}

/// The fuzz input, read a byte or a run of bytes at a time (zeros past its end).
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

fuzz_target!(|data: &[u8]| {
    let m = model();
    let store = MemoryStore::new();
    let mut now: u64 = 1_000_000_000_000;
    // Keys that hold bytes which do not decode as a bucket.
    let mut undecodable: HashSet<&str> = HashSet::new();
    let mut input = Input(data);
    while !input.0.is_empty() {
        let op = input.byte();
        let (key, full) = &m.buckets[usize::from(input.byte()) % m.buckets.len()];
        let written = match op % 8 {
            // The clock jumps back.
            0 => {
                now = now.saturating_sub(u64::from(input.byte()) * 100_000_000);
                None
            }
            // A value that decodes: the tag and 44 arbitrary bytes.
            1 => {
                let mut v = vec![TAG];
                v.extend_from_slice(input.take(VALUE_LEN - 1));
                v.resize(VALUE_LEN, 0);
                Some((v, true))
            }
            // A real value with up to three bytes changed (the tag kept).
            2 => {
                let mut v = full.clone();
                for _ in 0..=input.byte() % 3 {
                    let at = 1 + usize::from(input.byte()) % (VALUE_LEN - 1);
                    v[at] ^= input.byte() | 1;
                }
                Some((v, true))
            }
            // A value that does not decode: too short, or a wrong tag.
            3 => {
                let len = usize::from(input.byte()) % VALUE_LEN;
                let mut v = input.take(len).to_vec();
                if v.is_empty() {
                    v = full.clone();
                    v[0] = TAG.wrapping_add(1 + input.byte() % 254);
                }
                Some((v, false))
            }
            _ => {
                now = now.saturating_add(u64::from(input.byte()) * 1_000_000);
                None
            }
        };
        if let Some((value, decodes)) = written {
            if store.set(key, &value, 0).is_ok() {
                if decodes {
                    undecodable.remove(key.as_str());
                } else {
                    undecodable.insert(key.as_str());
                }
            }
        }
        let tenant = &m.tenants[usize::from(input.byte()) % m.tenants.len()];
        let cost = u64::from(input.byte() % 4);
        match m.quotas.admit(tenant, cost, now, &store) {
            Ok(d) => assert!(d.admitted || d.retry_after_s >= 1, "{d:?}"),
            Err(StoreError::Corrupt(msg)) => assert!(
                undecodable.iter().any(|k| msg.contains(&format!("`{k}`"))),
                "a value that decodes was reported corrupt: {msg}"
            ),
            Err(StoreError::Contended) | Err(StoreError::Unavailable(_)) => {}
            Err(StoreError::CasMismatch) => panic!("a CAS mismatch escaped the retry loop"),
        }
    }
});
