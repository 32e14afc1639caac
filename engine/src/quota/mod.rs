//! Hierarchical token buckets (SPEC section 4). STUB: the interface the rest of
//! the engine relies on; the implementation is being written.

use std::collections::BTreeMap;

use crate::diag::Diagnostic;
use crate::tenant::TenantPath;

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

/// The limits one tenant declares, as read from its `tenant.json`.
pub struct LimitsInput<'a> {
    pub tenant: &'a TenantPath,
    /// `tenant.json` path relative to the policy folder, for diagnostics.
    pub file: &'a str,
    /// `tenant.json` text, to locate errors (line, column).
    pub text: &'a str,
    pub limits: &'a BTreeMap<String, serde_json::Value>,
}

/// Compiled quota configuration of a whole bundle.
#[derive(Debug, Clone, Default)]
pub struct QuotaModel {}

impl QuotaModel {
    /// Builds and validates the limits of every tenant; `inputs` come parents first.
    pub fn build(_inputs: &[LimitsInput<'_>]) -> Result<QuotaModel, Vec<Diagnostic>> {
        Ok(QuotaModel {})
    }

    pub fn is_empty(&self) -> bool {
        true
    }
}

/// STUB (see the interface): the quota part of a decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuotaDecision {
    pub admitted: bool,
    pub limit: Option<String>,
    pub tenant: Option<TenantPath>,
    pub remaining: u64,
    pub retry_after_s: u64,
    pub ratelimit_policy: Option<String>,
    pub ratelimit: Option<String>,
}
