//! `libtenantgate.so`: tenantgate as an Envoy dynamic module
//! (`envoy.filters.http.dynamic_modules`), the native build beside the
//! proxy-wasm filter. Loading it is described in `docs/reference.md`
//! ("Native build"); the ABI version it targets in `docs/decisions.md`.
//!
//! Boundary: this crate only moves bytes between Envoy and the engine, like
//! `filter/`. `abi` holds all of its `unsafe` code (declarations of the
//! ABI, exported hooks); `host` the pure half of the host layer; `config`,
//! `request` and `rlqs` (mode `assigned`'s stream) the adapter (the quota buckets every worker shares are the
//! engine's `quota::ShardedStore`). The `pure` feature builds `host` alone
//! (no ABI, no hooks), for the fuzz targets.

pub mod host;

#[cfg(not(any(test, feature = "pure")))]
mod abi;
#[cfg(not(any(test, feature = "pure")))]
mod config;
#[cfg(not(any(test, feature = "pure")))]
mod request;
#[cfg(not(any(test, feature = "pure")))]
mod rlqs;
