//! Integration tests over the real `tenantgate.wasm` in the wasmtime host.
//! Build the module first: `scripts/build-wasm.sh` (or set `TENANTGATE_WASM`).

mod support;

mod bad_input;
mod config;
mod faults;
mod host_abi;
mod identity;
mod observability;
mod quotas;
mod responses;
mod workers;
