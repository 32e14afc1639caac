//! The quota step: random admissions (tenant, cost, time steps, including the
//! clock going back) against the example tree's limits, with some stored
//! values replaced by garbage. Never panics; a corrupt value is an error, not
//! free tokens.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tenantgate_engine::quota::{BucketStore, MemoryStore, QuotaModel, StoreError};
use tenantgate_engine::{Bundle, Engine, TenantPath};

fn model() -> &'static (QuotaModel, Vec<TenantPath>) {
    static M: OnceLock<(QuotaModel, Vec<TenantPath>)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).expect("policies/ loads");
        let engine = Engine::new(&bundle).expect("policies/ compiles");
        let tenants = engine.tenants().into_iter().cloned().collect();
        (engine.quotas().clone(), tenants)
    })
}

fuzz_target!(|data: &[u8]| {
    let (model, tenants) = model();
    let store = MemoryStore::new();
    let mut now: u64 = 1_000_000_000_000;
    for chunk in data.chunks(4) {
        let [t, c, dt, op] = [chunk.first(), chunk.get(1), chunk.get(2), chunk.get(3)].map(|b| b.copied().unwrap_or(0));
        let tenant = &tenants[usize::from(t) % tenants.len()];
        match op % 8 {
            // The clock jumps back.
            0 => now = now.saturating_sub(u64::from(dt) * 100_000_000),
            // A stored value is replaced by garbage.
            1 => {
                for (key, _) in model.initial_buckets(now) {
                    if key.contains(tenant.as_str()) {
                        let _ = store.set(&key, &chunk[..chunk.len().min(3)], 0);
                    }
                }
            }
            _ => now = now.saturating_add(u64::from(dt) * 1_000_000),
        }
        match model.admit(tenant, u64::from(c % 4), now, &store) {
            Ok(d) => assert!(d.admitted || d.retry_after_s >= 1, "{d:?}"),
            Err(StoreError::Corrupt(_)) | Err(StoreError::Contended) | Err(StoreError::Unavailable(_)) => {}
            Err(StoreError::CasMismatch) => panic!("a CAS mismatch escaped the retry loop"),
        }
    }
});
