//! Integration tests over the real `tenantgate.wasm` in the wasmtime host.
//! Build the module first: `scripts/build-wasm.sh` (or set `TENANTGATE_WASM`).

// The whole binary is test code: clippy.toml allows these inside `#[test]`
// functions, and the shared helpers below them are test code too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

mod bad_input;
mod budget;
mod config;
mod differential;
mod faults;
mod host_abi;
mod identity;
mod isolation;
mod keyed;
mod observability;
mod quotas;
mod responses;
mod workers;
