//! `tenantgate.wasm`: the proxy-wasm adapter over `tenantgate-engine`.
//!
//! Boundary: this crate only moves bytes between Envoy and the engine. Every
//! decision (mapping, policy, quota, reply bodies, audit lines) is made in the
//! engine; an `if` about policy or quota semantics here is a bug.

#[cfg(target_arch = "wasm32")]
mod ffi;
pub mod map;
#[cfg(target_arch = "wasm32")]
mod wasm;

/// Metric names, shared with the docs and the tests (defined in the engine).
pub mod metric_names {
    pub use tenantgate_engine::metrics::names::*;
}
