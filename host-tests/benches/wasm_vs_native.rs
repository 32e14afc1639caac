//! The same decision through `tenantgate.wasm` in the wasmtime host (every
//! host call included: context creation, header maps, properties, shared
//! data, metrics, the audit line, response headers, done/log/delete) and
//! through the native engine (request mapping, policy, quota on an
//! in-memory store with Envoy's semantics, audit line, response headers).
//!
//! `cargo bench -p tenantgate-host-tests` (build `tenantgate.wasm` first).
//! Prints criterion's figures, then the wasm/native ratio of medians.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use criterion::Criterion;
use tenantgate_engine::http::{HttpInput, NoMetadata};
use tenantgate_engine::quota::MemoryStore;
use tenantgate_engine::{Bundle, Engine};
use tenantgate_host_tests::{locate_wasm, Host, Vm};

const SECOND: u64 = 1_000_000_000;

/// A scenario: a bundle and one request that it allows.
struct Scenario {
    name: &'static str,
    /// How far the clock moves between requests. The policies read the
    /// time, so a step of a second misses the decision cache every time;
    /// 10 ms hits it 99 times in 100 (the quota still refills).
    step_ns: u64,
    bundle: Bundle,
    tenant: &'static str,
    user: &'static str,
    home: &'static str,
    method: &'static str,
    path: &'static str,
}

fn scenarios() -> Result<Vec<Scenario>> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = Bundle::from_dir(&repo.join("policies"))
        .map_err(|d| anyhow!("policies/ does not bundle:\n{d}"))?;
    let mut no_quota = example.clone();
    for t in &mut no_quota.tenants {
        if let Some(config) = &mut t.config {
            let mut v: serde_json::Value = serde_json::from_str(&config.text)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("limits");
            }
            config.text = v.to_string();
        }
    }
    no_quota.version = no_quota.compute_version();
    Ok(vec![
        Scenario {
            name: "policies+quota, cache hits",
            step_ns: SECOND / 100,
            bundle: example.clone(),
            tenant: "/acme/eu",
            user: "alice",
            home: "/acme/eu",
            method: "GET",
            path: "/orders/1",
        },
        Scenario {
            name: "policies+quota",
            step_ns: SECOND,
            bundle: example,
            tenant: "/acme/eu",
            user: "alice",
            home: "/acme/eu",
            method: "GET",
            path: "/orders/1",
        },
        Scenario {
            name: "policies",
            step_ns: SECOND,
            bundle: no_quota,
            tenant: "/acme/eu",
            user: "alice",
            home: "/acme/eu",
            method: "GET",
            path: "/orders/1",
        },
    ])
}

struct Native {
    step_ns: u64,
    engine: tenantgate_engine::Worker,
    store: MemoryStore,
    headers: Vec<(String, Vec<u8>)>,
    now: u64,
}

impl Native {
    fn new(s: &Scenario) -> Result<Native> {
        let engine = tenantgate_engine::Worker::new(std::sync::Arc::new(
            Engine::new(&s.bundle).map_err(|d| anyhow!("{d}"))?,
        ));
        let headers = [
            (":authority", "api.example.com"),
            (":path", s.path),
            (":method", s.method),
            (":scheme", "http"),
            ("x-request-id", "req-1"),
            ("x-tenant", s.tenant),
            ("x-user", s.user),
            ("x-user-tenant", s.home),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        Ok(Native {
            step_ns: s.step_ns,
            engine,
            store: MemoryStore::new(),
            headers,
            now: 1_767_225_600 * SECOND,
        })
    }

    /// What the filter does per request, minus the host calls.
    fn decide(&mut self) -> bool {
        self.now += self.step_ns;
        let pairs: Vec<(&str, &[u8])> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let input = HttpInput {
            headers: &pairs,
            source_address: Some("10.0.0.7:40000"),
            now_ns: self.now,
        };
        let Ok(mapped) = self.engine.map_request(&input, &NoMetadata) else {
            return false;
        };
        let decision = self.engine.decide(&mapped.request, &self.store);
        black_box(
            self.engine
                .audit_line(&decision, Some(&mapped), mapped.request_id.as_deref()),
        );
        black_box(self.engine.allow_response_headers(&decision));
        decision.is_allowed()
    }
}

struct Wasm {
    step: Duration,
    host: Host,
    vm: Vm,
    s: (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        &'static str,
    ),
}

impl Wasm {
    fn new(wasm: &Path, s: &Scenario) -> Result<Wasm> {
        // Keep few log lines: the audit line of every request is still written
        // through `proxy_log` and copied out, but not piled up.
        let host = Host::builder(wasm).log_capacity(1000).build()?;
        let mut vm = host.vm()?;
        if !vm.configure(s.bundle.to_json())? {
            bail!("{}: the filter refused the bundle", s.name);
        }
        Ok(Wasm {
            step: Duration::from_nanos(s.step_ns),
            host,
            vm,
            s: (s.tenant, s.user, s.home, s.method, s.path),
        })
    }

    fn decide(&mut self) -> bool {
        self.host.clock().advance(self.step);
        let (tenant, user, home, method, path) = self.s;
        let resp = self
            .vm
            .request()
            .header("x-tenant", tenant)
            .header("x-user", user)
            .header("x-user-tenant", home)
            .method(method)
            .path(path)
            .send();
        resp.is_ok_and(|r| r.is_continue())
    }
}

/// Time per call of a batch of `n` calls.
fn per_call(f: &mut impl FnMut() -> bool, n: usize) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        black_box(f());
    }
    t.elapsed() / u32::try_from(n).unwrap_or(u32::MAX)
}

fn median<T: PartialOrd + Copy + Default>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Interleaved rounds (native batch, then wasm batch), so a noisy machine
/// affects both sides alike: median native time, median wasm time, median
/// of the per-round ratios.
fn interleaved(
    mut native: impl FnMut() -> bool,
    mut wasm: impl FnMut() -> bool,
    rounds: usize,
    n: usize,
) -> (Duration, Duration, f64) {
    let (mut ns, mut ws, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let a = per_call(&mut native, n);
        let b = per_call(&mut wasm, n);
        rs.push(b.as_secs_f64() / a.as_secs_f64().max(1e-12));
        ns.push(a);
        ws.push(b);
    }
    (median(ns), median(ws), median(rs))
}

fn main() -> Result<()> {
    let wasm = locate_wasm()?;
    let mut c = Criterion::default()
        .sample_size(50)
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut ratios = Vec::new();
    for s in scenarios()? {
        let mut native = Native::new(&s)?;
        let mut wasm_side = Wasm::new(&wasm, &s)?;
        if !native.decide() || !wasm_side.decide() {
            bail!("{}: the request is not allowed on both sides", s.name);
        }
        let mut g = c.benchmark_group(s.name);
        g.bench_function("native", |b| b.iter(|| native.decide()));
        g.bench_function("wasm", |b| b.iter(|| wasm_side.decide()));
        g.finish();
        ratios.push((
            s.name,
            interleaved(|| native.decide(), || wasm_side.decide(), 21, 1000),
        ));
    }
    c.final_summary();
    for (name, (n, w, r)) in ratios {
        println!(
            "{name}: native {n:?}, wasm {w:?} per request (medians of interleaved rounds): wasm/native = {r:.2}"
        );
    }
    Ok(())
}
