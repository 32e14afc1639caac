//! `tenantgate.wasm`: the proxy-wasm adapter over `tenantgate-engine`.
//!
//! Boundary: this crate only moves bytes between Envoy and the engine. Every
//! decision (mapping, policy, quota, reply bodies, audit lines) is made in the
//! engine; an `if` about policy or quota semantics here is a bug.

#[cfg(target_arch = "wasm32")]
mod ffi;
#[cfg(target_arch = "wasm32")]
mod wasm;

/// Metric names, shared with the docs and the tests.
pub mod metric_names {
    pub const ALLOWED: &str = "tenantgate.allowed";
    pub const DENIED_POLICY: &str = "tenantgate.denied_policy";
    pub const DENIED_QUOTA: &str = "tenantgate.denied_quota";
    pub const BAD_REQUEST: &str = "tenantgate.bad_request";
    pub const SHADOW_DENIED: &str = "tenantgate.shadow_denied";
    pub const ERRORS: &str = "tenantgate.errors";
    pub const DECISION_US: &str = "tenantgate.decision_us";
    /// One request in this many has its decision time recorded in
    /// [`DECISION_US`] (the first always).
    pub const DECISION_TIME_SAMPLE: u64 = 8;
    pub const CONFIG_LOADED: &str = "tenantgate.config_loaded";
    pub const CONFIG_REJECTED: &str = "tenantgate.config_rejected";
    /// Gauge: the first 8 hex digits of the loaded bundle's sha256, as a number.
    pub const BUNDLE_VERSION: &str = "tenantgate.bundle_version";

    /// Gauge set to 1: `tenantgate.bundle.<first 12 hex digits>`.
    pub fn bundle(version: &str) -> String {
        let hex = version.strip_prefix("sha256:").unwrap_or(version);
        format!("tenantgate.bundle.{}", hex.get(..12).unwrap_or(hex))
    }

    /// The value of [`BUNDLE_VERSION`] for a `sha256:<hex>` version.
    pub fn bundle_version_value(version: &str) -> u64 {
        let hex = version.strip_prefix("sha256:").unwrap_or(version);
        hex.get(..8)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
    }

    /// `tenantgate.tenant.acme.eu.<what>`; the root is `_root`.
    pub fn tenant(tenant: &tenantgate_engine::TenantPath, what: &str) -> String {
        if tenant.is_root() {
            format!("tenantgate.tenant._root.{what}")
        } else {
            format!(
                "tenantgate.tenant.{}.{what}",
                tenant.segments().collect::<Vec<_>>().join(".")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metric_names::tenant;
    use tenantgate_engine::TenantPath;

    #[test]
    fn bundle_metrics() {
        let v = "sha256:e313b8cd9b886ad888f5986c92ec36aa3bfa66bf24483053114f5c1af4660a6c";
        assert_eq!(
            super::metric_names::bundle(v),
            "tenantgate.bundle.e313b8cd9b88"
        );
        assert_eq!(super::metric_names::bundle_version_value(v), 0xe313b8cd);
    }

    #[test]
    fn tenant_metric_names() {
        assert_eq!(
            tenant(&TenantPath::root(), "allowed"),
            "tenantgate.tenant._root.allowed"
        );
        assert_eq!(
            tenant(&TenantPath::parse("/acme/eu").unwrap(), "denied"),
            "tenantgate.tenant.acme.eu.denied"
        );
    }
}
