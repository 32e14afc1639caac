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
    pub const CONFIG_LOADED: &str = "tenantgate.config_loaded";
    pub const CONFIG_REJECTED: &str = "tenantgate.config_rejected";

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
