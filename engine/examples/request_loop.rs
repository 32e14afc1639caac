//! One allowed request through the engine N times, as the filter runs it
//! (map the headers, decide with leases, the RateLimit response fields, the
//! identity headers), on the example tree with `audit: deny`: the loop that
//! `scripts/instructions.sh` counts instructions of with callgrind.
//!
//! Run: `cargo run --release -p tenantgate-engine --example request_loop -- N`

#![allow(clippy::unwrap_used)]
use std::hint::black_box;
use std::path::Path;
use tenantgate_engine::http::{HttpInput, NoMetadata};
use tenantgate_engine::quota::MemoryStore;
use tenantgate_engine::{Bundle, Engine};
fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut b = Bundle::from_dir(&dir).unwrap();
    b.settings.audit = tenantgate_engine::settings::Audit::Deny;
    let engine = tenantgate_engine::Worker::new(std::sync::Arc::new(Engine::new(&b).unwrap()));
    let headers: Vec<(String, Vec<u8>)> = [
        (":authority", "api.example.com"),
        (":path", "/orders/1"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("x-request-id", "0b7c1a2e-5d9f-4c1e-9a51-3f1f0f3c2d10"),
        ("x-tenant", "/acme/eu"),
        ("x-user", "alice"),
        ("x-user-tenant", "/acme/eu"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
    .collect();
    let pairs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let store = MemoryStore::new();
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(100_000);
    let mut now = 1_795_707_000_000_000_000u64;
    for _ in 0..n {
        now += 10_000;
        let input = HttpInput {
            headers: &pairs,
            source_address: None,
            now_ns: now,
        };
        let m = engine.map_request(&input, &NoMetadata).unwrap();
        let d = engine.decide(&m.request, &store);
        let h = engine.allow_response_headers(&d);
        black_box((m.upstream_headers().count(), h, d));
    }
}
