//! Where the per-request time goes, natively, for one allowed request on the
//! example tree (`policies/`): each step the filter runs between its host
//! calls, timed alone.
//!
//! Run: `cargo bench -p tenantgate-engine --bench request`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use tenantgate_engine::http::{HttpInput, NoMetadata};
use tenantgate_engine::quota::MemoryStore;
use tenantgate_engine::{Bundle, Engine};

const NOW: u64 = 1_795_707_000_000_000_000;

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let engine = tenantgate_engine::Worker::new(std::sync::Arc::new(
        Engine::new(&Bundle::from_dir(&dir).unwrap()).unwrap(),
    ));
    let headers: Vec<(String, Vec<u8>)> = [
        (":authority", "api.example.com"),
        (":path", "/orders/1?page=2"),
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
    let input = HttpInput {
        headers: &pairs,
        source_address: Some("10.0.0.7:40000"),
        now_ns: NOW,
    };
    let mapped = engine.map_request(&input, &NoMetadata).unwrap();
    let store = MemoryStore::new();
    let decision = engine.decide(&mapped.request, &store);
    assert!(decision.is_allowed(), "{decision:?}");

    let mut g = c.benchmark_group("request");
    g.bench_function("1_map_request", |b| {
        b.iter(|| black_box(engine.map_request(black_box(&input), &NoMetadata)))
    });
    g.bench_function("2_policy_cache_hit", |b| {
        b.iter(|| black_box(engine.decide_policy_cached(black_box(&mapped.request))))
    });
    g.bench_function("2b_policy_uncached", |b| {
        b.iter(|| black_box(engine.decide_policy(black_box(&mapped.request))))
    });
    let mut now = NOW;
    g.bench_function("3_quota_admit", |b| {
        b.iter(|| {
            // 1 ms apart: /acme/eu refills 0.2 tokens per ms at rate 200/s and
            // can borrow up to 500/s, so this stays admitted.
            now += 3_000_000;
            black_box(
                engine
                    .quotas()
                    .admit(&mapped.request.tenant, 1, now, &store)
                    .unwrap(),
            )
        })
    });
    g.bench_function("4_audit_line", |b| {
        b.iter(|| {
            black_box(engine.audit_line(
                black_box(&decision),
                Some(&mapped),
                mapped.request_id.as_deref(),
            ))
        })
    });
    g.bench_function("5_response_headers", |b| {
        b.iter(|| black_box(engine.allow_response_headers(black_box(&decision))))
    });
    g.bench_function("all_steps", |b| {
        b.iter(|| {
            let m = engine.map_request(&input, &NoMetadata).unwrap();
            let d = engine.decide(&m.request, &store);
            black_box(engine.audit_line(&d, Some(&m), m.request_id.as_deref()));
            black_box(engine.allow_response_headers(&d))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
