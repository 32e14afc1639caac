//! `tenantgate.json`: how requests are mapped and what the filter does with a
//! decision. Every key has a default; unknown keys are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tenant::TenantPath;

/// Where a value of the request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "snake_case",
    deny_unknown_fields,
    try_from = "SourceRepr"
)]
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

/// The names Envoy's `get_property` needs for a dynamic-metadata path
/// (`["envoy.filters.http.jwt_authn", "payload", "tenant"]`).
pub fn metadata_property(path: &[String]) -> Vec<&str> {
    let mut p = Vec::with_capacity(path.len() + 2);
    p.extend(["metadata", "filter_metadata"]);
    p.extend(path.iter().map(String::as_str));
    p
}

/// What a [`Source`] is read as, so that a string or a wrong object gets a
/// message saying what is expected (serde's would name a Rust enum).
#[derive(Deserialize)]
#[serde(untagged)]
enum SourceRepr {
    Tagged(SourceTagged),
    Text(String),
    Other(serde_json::Value),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum SourceTagged {
    Header(String),
    PathPrefix(String),
    Metadata(Vec<String>),
}

const SOURCE_KEYS: &str =
    "`header`, `path_prefix` or `metadata` (docs/reference.md, \"tenantgate.json\")";

impl TryFrom<SourceRepr> for Source {
    type Error = String;
    fn try_from(r: SourceRepr) -> Result<Source, String> {
        match r {
            SourceRepr::Tagged(SourceTagged::Header(h)) => Ok(Source::Header(h)),
            SourceRepr::Tagged(SourceTagged::PathPrefix(p)) => Ok(Source::PathPrefix(p)),
            SourceRepr::Tagged(SourceTagged::Metadata(m)) => Ok(Source::Metadata(m)),
            SourceRepr::Text(t) => {
                let example = if t.starts_with('/') {
                    format!("{{\"path_prefix\": \"{t}\"}}")
                } else {
                    format!("{{\"header\": \"{}\"}}", t.to_ascii_lowercase())
                };
                Err(format!(
                    "a source is an object, not a string: `{example}`; its one key is {SOURCE_KEYS}"
                ))
            }
            SourceRepr::Other(v) => {
                let mut got = v.to_string();
                if got.len() > 60 {
                    got = got.chars().take(57).collect::<String>() + "...";
                }
                Err(format!(
                    "a source is an object with one key, {SOURCE_KEYS}; got `{got}`"
                ))
            }
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

/// When allowed responses carry the RateLimit fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadersOnAllow {
    /// Never (`false`): nothing is added to an allowed response.
    #[default]
    Never,
    /// On every allowed response a limit applies to (`true`).
    Always,
    /// Only when a limit is below `near_limit_ratio` of its burst (`"near_limit"`).
    NearLimit,
}

impl Serialize for HeadersOnAllow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HeadersOnAllow::Never => s.serialize_bool(false),
            HeadersOnAllow::Always => s.serialize_bool(true),
            HeadersOnAllow::NearLimit => s.serialize_str("near_limit"),
        }
    }
}

impl<'de> Deserialize<'de> for HeadersOnAllow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(false) => Ok(HeadersOnAllow::Never),
            Raw::Bool(true) => Ok(HeadersOnAllow::Always),
            Raw::Str(s) if s == "near_limit" => Ok(HeadersOnAllow::NearLimit),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "`ratelimit_headers_on_allow`: expected `true`, `false` or `\"near_limit\"`, found `\"{s}\"`"
            ))),
        }
    }
}

/// A fraction from 0 to 1 (`near_limit_ratio`), compared by value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ratio(pub f64);

impl Eq for Ratio {}

impl Default for Ratio {
    fn default() -> Self {
        Ratio(DEFAULT_NEAR_LIMIT_RATIO)
    }
}

/// `near_limit_ratio` when the bundle does not set it.
pub const DEFAULT_NEAR_LIMIT_RATIO: f64 = 0.2;

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// How gRPC calls (`content-type: application/grpc...`) are judged. Without
/// this setting a gRPC call is a plain `POST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcSettings {
    /// Method patterns (`/package.Service/Method`, `*` matches any run of
    /// characters) judged as `Action::"read"`; every other call is
    /// `Action::"write"`.
    pub read: Vec<String>,
}

impl GrpcSettings {
    /// The Cedar action of a call to `method` (the request's `:path`).
    pub fn action(&self, method: &str) -> &'static str {
        if self.read.iter().any(|p| glob_match(p, method)) {
            "read"
        } else {
            "write"
        }
    }
}

/// How fleet limits (`"scope": "fleet"`) are enforced: through a rate limit
/// service speaking Envoy's RLS v3 API, reached over an HTTP/2 cluster of
/// Envoy's config. See docs/fleet.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitService {
    /// The Envoy cluster of the service (HTTP/2).
    pub cluster: String,
    /// The rate limit domain of every call.
    pub domain: String,
    pub mode: FleetMode,
    /// How long a call may take before `on_error` decides (1 to 10000).
    pub timeout_ms: u32,
    /// `batched`: how often each worker reports its admissions (10 to 60000).
    pub report_interval_ms: u32,
    /// The service unreachable, slow or answering garbage: `allow` (the
    /// default, as Envoy's own rate limit filter) or `deny` (503).
    pub on_error: OnError,
    /// `assigned` only: with no usable assignment (before the first one, or
    /// once one has expired), each client admits a static share, the fleet
    /// limit's rate divided by this number of instances, instead of what
    /// `on_error` says. `None` (the default): `on_error` decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_error_instances: Option<u32>,
}

impl Default for RateLimitService {
    fn default() -> Self {
        RateLimitService {
            cluster: DEFAULT_RLS_CLUSTER.into(),
            domain: DEFAULT_DOMAIN.into(),
            mode: FleetMode::PerRequest,
            timeout_ms: 50,
            report_interval_ms: 100,
            on_error: OnError::Allow,
            on_error_instances: None,
        }
    }
}

/// Largest `rate_limit_service.on_error_instances`.
pub const MAX_ON_ERROR_INSTANCES: u32 = 100_000;

/// The rate limit domain when none is configured.
pub const DEFAULT_DOMAIN: &str = "tenantgate";

/// The cluster name `rate_limit_service.cluster` defaults to (and the one
/// `tenantgate envoy --rls` renders).
pub const DEFAULT_RLS_CLUSTER: &str = "tenantgate_rls";

/// When a fleet limit is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FleetMode {
    /// One call per request, before it goes upstream: exact, one round trip.
    #[default]
    PerRequest,
    /// No call on the request path: admissions are reported every
    /// `report_interval_ms`; an over-limit answer refuses until the window resets.
    Batched,
    /// No call on the request path: every client reports its usage over the
    /// rate limit quota service (RLQS) every `report_interval_ms` and enforces
    /// the token-bucket rate the service assigns it. Fleet limits may then
    /// carry `ceil` and `burst`: the service divides each limit's fleet
    /// capacity down the tenant tree as HTB does (docs/fleet.md).
    Assigned,
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if Some(c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|&c| c == b'*')
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
    pub ratelimit_headers_on_allow: HeadersOnAllow,
    /// With `ratelimit_headers_on_allow: "near_limit"`: the fraction of a
    /// limit's burst under which the fields are sent.
    #[serde(skip_serializing_if = "is_default")]
    pub near_limit_ratio: Ratio,
    pub audit: Audit,
    /// Where `context.claims` comes from: the header Envoy's `jwt_authn`
    /// writes with `forward_payload_header` (the verified token's payload,
    /// base64url JSON). Only `header` is supported.
    pub claims: Option<Source>,
    /// Request headers copied into `context.headers` (names lowercased).
    pub context_headers: Vec<String>,
    /// Token cost per HTTP method; methods not listed cost 1.
    pub costs: BTreeMap<String, u64>,
    /// gRPC calls: which methods read. Absent: a gRPC call is a plain `POST`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcSettings>,
    /// Where fleet limits are counted. Absent: fleet limits are not enforced
    /// by the filter (it logs a warning naming them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_service: Option<RateLimitService>,
    /// Each decision's fields set as Envoy filter state
    /// (`wasm.tenantgate.*`, read by access logs and tracing tags): a few
    /// host calls per request, so off unless asked for.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub filter_state: bool,
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
            ratelimit_headers_on_allow: HeadersOnAllow::Never,
            near_limit_ratio: Ratio::default(),
            audit: Audit::Deny,
            claims: None,
            context_headers: Vec::new(),
            costs: BTreeMap::new(),
            grpc: None,
            rate_limit_service: None,
            filter_state: false,
        }
    }
}

impl Settings {
    /// Token cost of one request with this method.
    pub fn cost(&self, method: &str) -> u64 {
        self.costs.get(method).copied().unwrap_or(1)
    }

    /// Token cost of a request with this method and Cedar action: a gRPC call
    /// judged as `read` costs what a `GET` costs, one judged as `write` what
    /// its method (`POST`) costs.
    pub fn cost_of(&self, method: &str, action: Option<&str>) -> u64 {
        match action {
            Some("read") => self.cost("GET"),
            _ => self.cost(method),
        }
    }

    /// Checks what serde cannot: header names, prefixes, costs.
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let check_source = |what: &str, s: &Source, errors: &mut Vec<String>| match s {
            Source::Header(h) if !is_header_name(h) => {
                let lower = h.to_ascii_lowercase();
                if is_header_name(&lower) {
                    errors.push(format!(
                        "`{what}.header`: `{h}` is not a valid header name: header names are lowercase (`{lower}`), as Envoy stores them"
                    ))
                } else {
                    errors.push(format!("`{what}.header`: `{h}` is not a valid header name"))
                }
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
        if !(0.0..=1.0).contains(&self.near_limit_ratio.0) {
            errors.push(format!(
                "`near_limit_ratio`: {} is not between 0 and 1",
                self.near_limit_ratio.0
            ));
        }
        for p in self.grpc.iter().flat_map(|g| &g.read) {
            let ok = p.starts_with('/')
                && p.len() <= 512
                && p.matches('/').count() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#' && b != b'%');
            if !ok {
                errors.push(format!(
                    "`grpc.read`: `{p}` is not a gRPC method pattern like `/package.Service/Method` (`*` for any characters)"
                ));
            }
        }
        if let Some(r) = &self.rate_limit_service {
            if r.cluster.is_empty()
                || r.cluster.len() > 256
                || !r.cluster.bytes().all(|b| b.is_ascii_graphic())
            {
                errors.push(format!(
                    "`rate_limit_service.cluster`: `{}` is not an Envoy cluster name (1 to 256 printable characters, no spaces)",
                    r.cluster
                ));
            }
            if r.domain.is_empty() || r.domain.len() > 256 {
                errors.push("`rate_limit_service.domain`: must be 1 to 256 characters".into());
            }
            if !(1..=10_000).contains(&r.timeout_ms) {
                errors.push(format!(
                    "`rate_limit_service.timeout_ms`: {} is not between 1 and 10000",
                    r.timeout_ms
                ));
            }
            if !(10..=60_000).contains(&r.report_interval_ms) {
                errors.push(format!(
                    "`rate_limit_service.report_interval_ms`: {} is not between 10 and 60000",
                    r.report_interval_ms
                ));
            }
            match r.on_error_instances {
                Some(n) if r.mode != FleetMode::Assigned => errors.push(format!(
                    "`rate_limit_service.on_error_instances`: {n} only applies to `\"mode\": \"assigned\"` (the static share of a fleet limit's rate when no assignment holds)"
                )),
                Some(n) if !(1..=MAX_ON_ERROR_INSTANCES).contains(&n) => errors.push(format!(
                    "`rate_limit_service.on_error_instances`: {n} is not between 1 and {MAX_ON_ERROR_INSTANCES}"
                )),
                _ => {}
            }
        }
        for (method, cost) in &self.costs {
            if !crate::entities::is_known_method(method) {
                errors.push(format!(
                    "`costs.{method}`: `{method}` is not a method tenantgate judges (GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE; upper case)"
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
    fn ratelimit_headers_on_allow_takes_three_forms() {
        for (json, want) in [
            ("false", HeadersOnAllow::Never),
            ("true", HeadersOnAllow::Always),
            ("\"near_limit\"", HeadersOnAllow::NearLimit),
        ] {
            let s: Settings =
                serde_json::from_str(&format!(r#"{{"ratelimit_headers_on_allow": {json}}}"#))
                    .unwrap();
            assert_eq!(s.ratelimit_headers_on_allow, want);
            let back = serde_json::to_value(&s).unwrap();
            assert_eq!(back["ratelimit_headers_on_allow"].to_string(), json);
        }
        let err = serde_json::from_str::<Settings>(r#"{"ratelimit_headers_on_allow": "yes"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("near_limit"), "{err}");
        let s: Settings = serde_json::from_str(r#"{"near_limit_ratio": 1.5}"#).unwrap();
        assert_eq!(s.check().len(), 1);
    }

    #[test]
    fn grpc_methods_map_to_read_or_write() {
        let s: Settings = serde_json::from_str(
            r#"{"grpc": {"read": ["/acme.orders.v1.Orders/Get*", "/grpc.health.v1.Health/*"]}}"#,
        )
        .unwrap();
        assert!(s.check().is_empty());
        let g = s.grpc.as_ref().unwrap();
        assert_eq!(g.action("/acme.orders.v1.Orders/GetOrder"), "read");
        assert_eq!(g.action("/grpc.health.v1.Health/Check"), "read");
        assert_eq!(g.action("/acme.orders.v1.Orders/CreateOrder"), "write");
        assert_eq!(g.action("/acme.orders.v1.Orders/Get"), "read");
        assert_eq!(g.action("/acme.orders.v1.Orders"), "write");
        assert_eq!(s.cost_of("POST", Some("read")), 1);
        let bad: Settings =
            serde_json::from_str(r#"{"grpc": {"read": ["Orders/Get", "/a/b/c"]}}"#).unwrap();
        assert_eq!(bad.check().len(), 2);
        assert!(glob_match("*", ""));
        assert!(glob_match("/a*c", "/abbbc"));
        assert!(!glob_match("/a*c", "/abbbd"));
    }

    #[test]
    fn rate_limit_service_defaults_and_bounds() {
        let s: Settings = serde_json::from_str(r#"{"rate_limit_service": {}}"#).unwrap();
        let r = s.rate_limit_service.clone().unwrap();
        assert_eq!(
            (
                r.cluster.as_str(),
                r.domain.as_str(),
                r.mode,
                r.timeout_ms,
                r.report_interval_ms,
                r.on_error
            ),
            (
                "tenantgate_rls",
                "tenantgate",
                FleetMode::PerRequest,
                50,
                100,
                OnError::Allow
            )
        );
        assert!(s.check().is_empty());
        let s: Settings = serde_json::from_str(
            r#"{"rate_limit_service": {"cluster": "a b", "timeout_ms": 0, "report_interval_ms": 5, "mode": "batched"}}"#,
        )
        .unwrap();
        let errors = s.check();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("`rate_limit_service.cluster`: `a b`"));
        assert!(errors[1].starts_with("`rate_limit_service.timeout_ms`: 0"));
        assert!(errors[2].starts_with("`rate_limit_service.report_interval_ms`: 5"));
        assert!(serde_json::from_str::<Settings>(
            r#"{"rate_limit_service": {"mode": "sometimes"}}"#
        )
        .is_err());
        let s: Settings = serde_json::from_str(
            r#"{"rate_limit_service": {"mode": "assigned", "report_interval_ms": 500, "on_error_instances": 4}}"#,
        )
        .unwrap();
        let r = s.rate_limit_service.clone().unwrap();
        assert_eq!(
            (r.mode, r.on_error_instances),
            (FleetMode::Assigned, Some(4))
        );
        assert!(s.check().is_empty());
        let errors = |text: &str| serde_json::from_str::<Settings>(text).unwrap().check();
        assert_eq!(
            errors(r#"{"rate_limit_service": {"mode": "batched", "on_error_instances": 4}}"#),
            ["`rate_limit_service.on_error_instances`: 4 only applies to `\"mode\": \"assigned\"` (the static share of a fleet limit's rate when no assignment holds)"]
        );
        assert_eq!(
            errors(r#"{"rate_limit_service": {"mode": "assigned", "on_error_instances": 0}}"#),
            ["`rate_limit_service.on_error_instances`: 0 is not between 1 and 100000"]
        );
        assert!(
            serde_json::from_str::<Settings>(r#"{"rate_limit_service": {"timeout": 5}}"#).is_err()
        );
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
