//! One allowed request through `tenantgate.wasm` in the wasmtime host, N
//! times: the loop `scripts/profile-wasm.sh` runs under `perf record` to see
//! which of the module's functions a warm request spends its time in.
//!
//!   wasm_request_loop BUNDLE.json N [WASM]
//!
//! The request is the benchmark's (alice reads /orders/1 of /acme/eu); the
//! clock moves 10 µs per request.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tenantgate_host_tests::{locate_wasm, Host};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: wasm_request_loop BUNDLE.json N [WASM]";
    let bundle = args.next().ok_or_else(|| anyhow!(usage))?;
    let n: u64 = args.next().ok_or_else(|| anyhow!(usage))?.parse()?;
    let wasm = match args.next() {
        Some(p) => p.into(),
        None => locate_wasm()?,
    };
    let text = std::fs::read(&bundle).with_context(|| format!("cannot read {bundle}"))?;
    let host = Host::builder(&wasm).log_capacity(100).build()?;
    let mut vm = host.vm()?;
    if !vm.configure(text)? {
        bail!("the filter refused {bundle}: {:?}", host.logs());
    }
    let started = Instant::now();
    for i in 0..n {
        host.clock().advance(Duration::from_micros(10));
        let r = vm
            .request()
            .header("x-tenant", "/acme/eu")
            .header("x-user", "alice")
            .header("x-user-tenant", "/acme/eu")
            .path("/orders/1")
            .send()?;
        if !r.is_continue() {
            bail!("request {i} was not allowed: {} {}", r.status, r.body_str());
        }
        if i % 1000 == 999 {
            vm.tick()?;
        }
    }
    let per = started.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    println!("{n} requests, {per:?} each (host calls included)");
    Ok(())
}
