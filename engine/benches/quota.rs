//! Quota admission for a request to a depth-4 tenant whose lineage defines two
//! limit names (per second and per day) on every level: 8 buckets read,
//! decided and written with compare-and-swap, in the in-memory store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tenantgate_engine::quota::{BucketStore, LimitsInput, MemoryStore, QuotaModel};
use tenantgate_engine::TenantPath;

const S: u64 = 1_000_000_000;

fn model() -> QuotaModel {
    let tree = [
        (
            "/acme",
            r#"{"rps": {"rate": 1000000000}, "daily": {"rate": 1000000000000, "per": "1d"}}"#,
        ),
        (
            "/acme/eu",
            r#"{"rps": {"rate": "50%", "ceil": "100%"}, "daily": {"rate": "50%"}}"#,
        ),
        (
            "/acme/eu/team-a",
            r#"{"rps": {"rate": "50%", "ceil": "100%"}, "daily": {"rate": "50%"}}"#,
        ),
        (
            "/acme/eu/team-a/svc",
            r#"{"rps": {"rate": "50%", "ceil": "100%"}, "daily": {"rate": "50%"}}"#,
        ),
    ];
    let owned: Vec<(TenantPath, String, BTreeMap<String, serde_json::Value>)> = tree
        .iter()
        .map(|(p, limits)| {
            (
                TenantPath::parse(p).unwrap(),
                limits.to_string(),
                serde_json::from_str(limits).unwrap(),
            )
        })
        .collect();
    let inputs: Vec<LimitsInput<'_>> = owned
        .iter()
        .map(|(tenant, text, limits)| LimitsInput {
            tenant,
            file: "tenant.json",
            text,
            limits,
        })
        .collect();
    QuotaModel::build(&inputs).unwrap()
}

fn bench(c: &mut Criterion) {
    let m = model();
    let store = MemoryStore::new();
    let t0 = 1_700_000_000 * S;
    for (k, v) in m.initial_buckets(t0) {
        store.set(&k, &v, 0).unwrap();
    }
    let tenant = TenantPath::parse("/acme/eu/team-a/svc").unwrap();
    assert_eq!(tenant.depth(), 4);
    let mut now = t0;
    c.bench_function("quota_admit_depth4_two_limits", |b| {
        b.iter(|| {
            now += 1_000;
            let d = m.admit(black_box(&tenant), 1, now, &store).unwrap();
            assert!(d.admitted);
            d
        })
    });
    // The same tenant once every token is gone: read and decide, no writes.
    let tight = {
        let owned = (
            TenantPath::parse("/acme").unwrap(),
            r#"{"rps": {"rate": 1}}"#.to_string(),
        );
        let limits: BTreeMap<String, serde_json::Value> = serde_json::from_str(&owned.1).unwrap();
        QuotaModel::build(&[LimitsInput {
            tenant: &owned.0,
            file: "tenant.json",
            text: &owned.1,
            limits: &limits,
        }])
        .unwrap()
    };
    let store = MemoryStore::new();
    assert!(tight.admit(&tenant, 1, t0, &store).unwrap().admitted);
    c.bench_function("quota_refuse", |b| {
        b.iter(|| {
            let d = tight.admit(black_box(&tenant), 1, t0, &store).unwrap();
            assert!(!d.admitted);
            d
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
