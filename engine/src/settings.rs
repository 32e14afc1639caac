//! `tenantgate.json`: how requests are mapped and what the filter does with a
//! decision. Every key has a default; unknown keys are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tenant::TenantPath;

/// Where a value of the request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A request header (name compared case-insensitively).
    Header(String),
    /// The segments after this path prefix: the longest run of them that names
    /// a tenant of the bundle is the tenant, the rest is the resource path.
    /// Only valid for `tenant`.
    PathPrefix(String),
    /// A dynamic-metadata path, e.g. `["envoy.filters.http.jwt_authn", "payload", "tenant"]`.
    Metadata(Vec<String>),
}

impl Source {
    /// The names Envoy's `get_property` needs for a metadata source.
    pub fn metadata_property_path(&self) -> Option<Vec<&str>> {
        match self {
            Source::Metadata(path) => {
                let mut p = vec!["metadata", "filter_metadata"];
                p.extend(path.iter().map(String::as_str));
                Some(p)
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deny requests the policies or quotas refuse.
    #[default]
    Enforce,
    /// Decide, log and count, never block.
    Shadow,
}

/// What to do when no decision can be made (shared store failure, internal error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

/// What a Cedar evaluation error in one policy does to the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnPolicyError {
    /// Any policy that errors makes the decision deny.
    #[default]
    Deny,
    /// A policy that errors is ignored (Cedar's own semantics).
    Skip,
}

/// Which decisions get an audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Audit {
    All,
    #[default]
    Deny,
    Off,
}

/// The bundle's settings (`tenantgate.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub tenant: Source,
    /// Tenant used when the request names none; without it such a request gets 400.
    pub default_tenant: Option<TenantPath>,
    pub principal: Source,
    /// The principal's home tenant; the request tenant when absent.
    pub principal_tenant: Option<Source>,
    pub mode: Mode,
    pub on_error: OnError,
    pub on_policy_error: OnPolicyError,
    pub expose_reasons: bool,
    pub ratelimit_headers_on_allow: bool,
    pub audit: Audit,
    /// Where `context.claims` comes from: the header Envoy's `jwt_authn`
    /// writes with `forward_payload_header` (the verified token's payload,
    /// base64url JSON). Only `header` is supported.
    pub claims: Option<Source>,
    /// Request headers copied into `context.headers` (names lowercased).
    pub context_headers: Vec<String>,
    /// Token cost per HTTP method; methods not listed cost 1.
    pub costs: BTreeMap<String, u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tenant: Source::Header("x-tenant".into()),
            default_tenant: None,
            principal: Source::Header("x-user".into()),
            principal_tenant: None,
            mode: Mode::Enforce,
            on_error: OnError::Deny,
            on_policy_error: OnPolicyError::Deny,
            expose_reasons: false,
            ratelimit_headers_on_allow: false,
            audit: Audit::Deny,
            claims: None,
            context_headers: Vec::new(),
            costs: BTreeMap::new(),
        }
    }
}

impl Settings {
    /// Token cost of one request with this method.
    pub fn cost(&self, method: &str) -> u64 {
        self.costs.get(method).copied().unwrap_or(1)
    }

    /// Checks what serde cannot: header names, prefixes, costs.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let check_source = |what: &str, s: &Source, errors: &mut Vec<String>| match s {
            Source::Header(h) if !is_header_name(h) => {
                errors.push(format!("`{what}.header`: `{h}` is not a valid header name"))
            }
            Source::PathPrefix(p) if what != "tenant" => {
                errors.push(format!("`{what}` cannot come from `path_prefix` (`{p}`)"))
            }
            Source::PathPrefix(p) if !p.starts_with('/') || p.contains("//") || p.contains('%') => {
                errors.push(format!(
                    "`tenant.path_prefix` must be a path starting with `/`, got `{p}`"
                ))
            }
            Source::Metadata(path) if path.len() < 2 || path.iter().any(String::is_empty) => errors
                .push(format!(
                    "`{what}.metadata` needs a filter name and at least one key, got {path:?}"
                )),
            _ => {}
        };
        check_source("tenant", &self.tenant, &mut errors);
        check_source("principal", &self.principal, &mut errors);
        if let Some(s) = &self.principal_tenant {
            check_source("principal_tenant", s, &mut errors);
        }
        match &self.claims {
            Some(s @ Source::Header(_)) => check_source("claims", s, &mut errors),
            Some(_) => errors.push(
                "`claims` must be `{\"header\": ...}`: the header Envoy's jwt_authn fills with `forward_payload_header`".into(),
            ),
            None => {}
        }
        for h in &self.context_headers {
            if !is_header_name(h) {
                errors.push(format!(
                    "`context_headers`: `{h}` is not a valid header name"
                ));
            }
        }
        for (method, cost) in &self.costs {
            if !is_method(method) {
                errors.push(format!(
                    "`costs`: `{method}` is not an HTTP method (use upper case, e.g. `POST`)"
                ));
            }
            if *cost > 1_000_000 {
                errors.push(format!(
                    "`costs.{method}`: {cost} is larger than the maximum 1000000"
                ));
            }
        }
        errors
    }
}

/// An HTTP header name as Envoy stores it (lowercase token characters).
pub fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 256
        && h.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        })
}

/// An HTTP method token in upper case.
pub fn is_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 32
        && m.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let s: Settings = serde_json::from_str("{}").unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.tenant, Source::Header("x-tenant".into()));
        assert_eq!(s.cost("GET"), 1);
    }

    #[test]
    fn parses_the_spec_example() {
        let s: Settings = serde_json::from_str(
            r#"{ "tenant": { "path_prefix": "/t" }, "principal": { "metadata": ["envoy.filters.http.jwt_authn", "payload", "sub"] },
                 "principal_tenant": null, "mode": "shadow", "on_error": "allow", "on_policy_error": "skip",
                 "expose_reasons": true, "ratelimit_headers_on_allow": true, "audit": "all",
                 "context_headers": ["x-api-key"], "costs": { "POST": 5 } }"#,
        )
        .unwrap();
        assert_eq!(s.tenant, Source::PathPrefix("/t".into()));
        assert_eq!(s.mode, Mode::Shadow);
        assert_eq!(s.cost("POST"), 5);
        assert!(s.check().is_empty());
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        assert!(serde_json::from_str::<Settings>(r#"{"tenants": {}}"#).is_err());
        assert!(serde_json::from_str::<Settings>(r#"{"mode": "audit"}"#).is_err());
        let s: Settings =
            serde_json::from_str(r#"{"tenant": {"header": "X Tenant"}, "costs": {"post": 1}}"#)
                .unwrap();
        assert_eq!(s.check().len(), 2);
    }
}
