//! tenantgate's engine: the pure core of the filter. It turns a tenant tree of
//! Cedar policies and limits (a [`Bundle`]) into decisions. No proxy-wasm here:
//! time, shared storage and request attributes come in through traits.

pub mod bundle;
mod cache;
mod compile;
pub mod decision;
pub mod diag;
mod engine;
mod entities;
pub mod flow;
pub mod http;
pub mod metrics;
pub mod path;
pub mod quota;
pub mod request;
pub mod settings;
pub mod tenant;
#[cfg(test)]
mod testing;
mod worker;

pub use bundle::Bundle;
pub use decision::{Decision, Outcome};
pub use diag::{Diagnostic, Diagnostics};
pub use engine::{Engine, PolicyInfo};
pub use request::Request;
pub use settings::Settings;
pub use tenant::TenantPath;
pub use worker::Worker;
