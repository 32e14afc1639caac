//! The policy decision on a generated tree: our per-tenant slice against plain
//! Cedar evaluating the whole policy set, and the slice at 100 vs 10,000
//! policies (the cost must not grow with policies attached elsewhere).
//!
//! Run: `cargo bench -p tenantgate-engine --bench decision`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::str::FromStr;

use cedar_policy::{Authorizer, PolicySet};
use criterion::{criterion_group, criterion_main, Criterion};
use tenantgate_engine::bundle::{BundleTenant, SourceFile, FORMAT};
use tenantgate_engine::{Bundle, Engine, Request, Settings, TenantPath};

/// Ten policies for one tenant, ids unique across the tree.
fn policies_for(t: &TenantPath) -> String {
    let tag = t.as_str().replace('/', "_");
    let mut out = String::new();
    for i in 0..8 {
        out.push_str(&format!(
            "@id(\"{tag}-p{i}\")\npermit(principal, action == Action::\"GET\", resource in Tenant::\"{t}\")\n  when {{ resource.path like \"/svc{i}/*\" && principal in Tenant::\"{t}\" }};\n"
        ));
    }
    out.push_str(&format!(
        "@id(\"{tag}-f0\")\nforbid(principal, action in Action::\"write\", resource in Tenant::\"{t}\")\n  when {{ resource.path like \"/admin/*\" }};\n"
    ));
    out.push_str(&format!(
        "@id(\"{tag}-f1\")\nforbid(principal, action, resource in Tenant::\"{t}\")\n  unless {{ context.time.hour_utc >= 0 }};\n"
    ));
    out
}

/// A tree: root, `fanout[0]` children, each with `fanout[1]` children, each with `fanout[2]`.
fn tree(fanout: [usize; 3]) -> Bundle {
    let mut paths = vec![TenantPath::root()];
    let mut level = vec![TenantPath::root()];
    for n in fanout {
        let mut next = Vec::new();
        for parent in &level {
            for i in 0..n {
                next.push(parent.child(&format!("t{i}")).unwrap());
            }
        }
        paths.extend(next.iter().cloned());
        level = next;
    }
    let tenants = paths
        .iter()
        .map(|p| BundleTenant {
            path: p.clone(),
            config: None,
            policies: vec![SourceFile {
                file: format!("tenants{}/p.cedar", p),
                text: policies_for(p),
            }],
        })
        .collect();
    let mut b = Bundle {
        format: FORMAT,
        version: String::new(),
        settings: Settings::default(),
        schema: None,
        tenants,
    };
    b.version = b.compute_version();
    b
}

fn request() -> Request {
    let t = TenantPath::parse("/t3/t4/t5").unwrap();
    Request::new(t.clone(), "GET", "/svc7/items/1")
        .with_principal("alice", Some(t))
        .at(1_795_707_000_000_000_000)
}

fn bench(c: &mut Criterion) {
    let large = tree([10, 10, 9]); // 1 + 10 + 100 + 900 = 1,011 tenants, 10,110 policies
    let small = tree([1, 1, 8]); // 1 + 1 + 1 + 8 = 11 tenants, 110 policies
    let large_engine =
        tenantgate_engine::Worker::new(std::sync::Arc::new(Engine::new(&large).unwrap()));
    let small_t = TenantPath::parse("/t0/t0/t5").unwrap();
    let small_req = Request::new(small_t.clone(), "GET", "/svc7/items/1")
        .with_principal("alice", Some(small_t))
        .at(1_795_707_000_000_000_000);
    let small_engine =
        tenantgate_engine::Worker::new(std::sync::Arc::new(Engine::new(&small).unwrap()));
    let req = request();
    assert!(large_engine.decide_policy(&req).is_allowed());
    assert!(small_engine.decide_policy(&small_req).is_allowed());
    eprintln!(
        "large tree: {} tenants, {} policies; small tree: {} tenants, {} policies",
        large.tenants.len(),
        large_engine.policy_count(),
        small.tenants.len(),
        small_engine.policy_count()
    );

    // Plain Cedar: every policy of the tree in one set, same request and entities.
    let mut whole = String::new();
    for t in &large.tenants {
        for p in &t.policies {
            whole.push_str(&p.text);
        }
    }
    let whole = PolicySet::from_str(&whole).unwrap();
    let authorizer = Authorizer::new();
    let (cedar_req, entities) = large_engine.cedar_parts(&req).unwrap();
    assert_eq!(
        authorizer
            .is_authorized(&cedar_req, &whole, &entities)
            .decision(),
        cedar_policy::Decision::Allow
    );

    let mut g = c.benchmark_group("decision");
    g.bench_function("sliced_10k_policies", |b| {
        b.iter(|| black_box(large_engine.decide_policy(black_box(&req))))
    });
    g.bench_function("sliced_100_policies", |b| {
        b.iter(|| black_box(small_engine.decide_policy(black_box(&small_req))))
    });
    g.bench_function("plain_cedar_whole_set_10k", |b| {
        b.iter(|| {
            // Building the request and entities is part of any decision; do it
            // for plain Cedar too so the comparison is like for like.
            let (r, e) = large_engine.cedar_parts(black_box(&req)).unwrap();
            black_box(authorizer.is_authorized(&r, &whole, &e))
        })
    });
    g.bench_function("sliced_10k_cache_hit", |b| {
        b.iter(|| black_box(large_engine.decide_policy_cached(black_box(&req))))
    });
    g.bench_function("build_request_and_entities_only", |b| {
        b.iter(|| black_box(large_engine.cedar_parts(black_box(&req)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
