//! Fleet-wide limits: limits that hold across every Envoy loading the bundle,
//! counted by a rate limit service that speaks Envoy's RLS v3 API
//! (`tenantgate-rls`, Limitador, envoyproxy/ratelimit).
//!
//! # Model
//!
//! A limit with `"scope": "fleet"` in `tenant.json` is a cap per fixed window:
//! at most `rate` hits per `per` window, counted by the service, never by the
//! local token buckets ([`super::QuotaModel`] leaves it out). It is validated
//! like a local limit (same names, amounts, shares and windows; shares resolve
//! to whole numbers here, at bundle time), with two differences:
//! - `ceil` and `burst` are local notions (borrowing, bucket size) and are an
//!   error on a fleet limit, located at the key, unless
//!   `rate_limit_service.mode` is `"assigned"`: the service then divides each
//!   limit's fleet capacity down the tree by HTB's rules ([`allocate`]), so
//!   `ceil` and `burst` mean there what they mean locally;
//! - one limit name keeps one scope along a branch: a share of a fleet limit
//!   is a share of the nearest ancestor's *fleet* limit of that name, and a
//!   child that declares the same name with the other scope is an error. So the
//!   sum rule (children's rates add up to at most the parent's rate) applies
//!   within each scope: fleet children against their fleet parent, local ones
//!   against their local parent.
//!
//! # Descriptors
//!
//! A request to tenant `T` carries, for each fleet limit `N` declared on an
//! ancestor-or-self `A` of `T`, one descriptor `[("tenant", A), ("limit", N)]`,
//! deepest `A` first, then by name ([`FleetLimits::descriptors_for`]). A
//! report of requests already admitted (the filter's batched mode) carries
//! the same descriptors and the gRPC metadata [`REPORT_HEADER`] (or, per
//! descriptor, the trailing entry [`REPORT_ENTRY`]).
//!
//! # Mode `assigned`
//!
//! The service divides each limit's capacity among its clients
//! ([`allocate`], in `tenantgate-rls`); each worker is one client of the
//! rate limit quota service (RLQS) and enforces its assignments in memory
//! ([`assigned`], pure; `stream`, a worker's stream; [`rlqs_wire`], the
//! messages). A bucket is `{"tenant": A, "limit": N}`, as a descriptor.

pub mod allocate;
pub mod assigned;
mod client;
pub mod rlqs_wire;
pub mod rls_wire;
mod stream;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::quota::spec::{Limit, Scope};
use crate::quota::{whole_seconds, LimitStatus, Nanos, QuotaDecision};
use crate::tenant::TenantPath;
use rls_wire::WireDescriptor;

pub use crate::settings::DEFAULT_DOMAIN;
pub use client::{FleetCall, FleetOutcome, FleetState, RLS_METHOD, RLS_SERVICE};
pub use rlqs_wire::{RLQS_METHOD, RLQS_SERVICE};
/// Descriptor entry key naming the tenant that declares the limit.
pub const TENANT_KEY: &str = "tenant";
/// Descriptor entry key naming the limit.
pub const LIMIT_KEY: &str = "limit";
/// gRPC request metadata marking a whole `ShouldRateLimit` call as a
/// *report*: hits already admitted, which the service counts even past the
/// limit. The preferred marker: servers that do not know it (Limitador,
/// envoyproxy/ratelimit) ignore it and count the hits on the same counters.
pub const REPORT_HEADER: (&str, &str) = ("x-tenantgate-report", "1");
/// The same marker for one descriptor, as its last entry. `tenantgate-rls`
/// only: envoyproxy/ratelimit matches a descriptor by all its entries, so
/// it would not count such a descriptor at all.
pub const REPORT_ENTRY: (&str, &str) = ("tenantgate_report", "1");

/// One fleet limit, as compiled: at most `rate` hits per `per_s` seconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FleetLimit {
    /// The tenant that declares it.
    pub tenant: TenantPath,
    pub name: String,
    /// Hits per window (shares resolved), at least 1.
    pub rate: u64,
    /// Most hits per window, borrowing included (`assigned` mode; `rate`
    /// otherwise).
    pub ceil: u64,
    /// Bucket size in tokens (`assigned` mode; `rate` otherwise).
    pub burst: u64,
    /// Window in seconds, at least 1.
    pub per_s: u64,
    /// Index in [`FleetLimits::all`] of the nearest ancestor's limit of the
    /// same name, if any.
    pub parent: Option<usize>,
}

impl FleetLimit {
    /// This limit's RLS descriptor, `[("tenant", A), ("limit", N)]`, with
    /// its own `hits_addend` when given (a report).
    pub fn descriptor(&self, hits: Option<u64>) -> WireDescriptor<'_> {
        WireDescriptor {
            entries: vec![
                (TENANT_KEY, self.tenant.as_str()),
                (LIMIT_KEY, self.name.as_str()),
            ],
            hits,
        }
    }

    /// The quota fields of a request this limit refused: `remaining` tokens
    /// and a wait of `wait_ns` until a request of `cost` could pass, for a
    /// limit of `rate` per `window_s` holding `burst` (the service's answer
    /// when it has them, else the limit's own).
    pub(crate) fn refusal(
        &self,
        shape: Shape,
        remaining: u64,
        wait_ns: Nanos,
        cost: u64,
        now: Nanos,
    ) -> QuotaDecision {
        let reset_s = whole_seconds(wait_ns).max(1);
        QuotaDecision {
            admitted: false,
            limit: Some(self.name.clone()),
            tenant: Some(self.tenant.clone()),
            remaining,
            retry_after_s: reset_s,
            admissible_at: Some(now.saturating_add(wait_ns)),
            cost,
            limits: vec![LimitStatus {
                name: Arc::from(self.name.as_str()),
                rate: shape.rate,
                burst: shape.burst,
                window_s: shape.window_s,
                remaining,
                reset_s,
                borrowed: false,
            }],
        }
    }
}

/// What a refusal's RateLimit fields say the limit is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub rate: u64,
    pub burst: u64,
    pub window_s: u64,
}

/// Every fleet limit of a bundle. Empty (the default) means none.
#[derive(Debug, Clone, Default)]
pub struct FleetLimits {
    /// Parents before children; at one node, by name.
    limits: Vec<FleetLimit>,
    /// Tenant path -> name -> index in `limits`.
    index: HashMap<Box<str>, BTreeMap<String, usize>>,
}

impl FleetLimits {
    /// From compiled limits (parents first); local ones are skipped.
    pub(crate) fn new(compiled: &[Arc<Limit>]) -> FleetLimits {
        let mut out = FleetLimits::default();
        for l in compiled.iter().filter(|l| l.scope == Scope::Fleet) {
            // Parents come first, so the nearest one is already indexed.
            let parent = l
                .node
                .ancestors_or_self()
                .skip(1)
                .find_map(|a| out.index.get(a).and_then(|names| names.get(&*l.name)))
                .copied();
            out.index
                .entry(Box::from(l.node.as_str()))
                .or_default()
                .insert(l.name.to_string(), out.limits.len());
            out.limits.push(FleetLimit {
                tenant: l.node.clone(),
                name: l.name.to_string(),
                rate: l.params.rate,
                ceil: l.params.ceil,
                burst: l.params.burst,
                per_s: l.params.per_ns / 1_000_000_000,
                parent,
            });
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Every fleet limit, parents before children.
    pub fn all(&self) -> &[FleetLimit] {
        &self.limits
    }

    /// The index in [`FleetLimits::all`] of the limit `name` declared on
    /// `tenant`, if any.
    pub fn index_of(&self, tenant: &str, name: &str) -> Option<usize> {
        self.index.get(tenant)?.get(name).copied()
    }

    /// The limit `name` declared on `tenant` (a path as written in a
    /// descriptor), if any.
    pub fn get(&self, tenant: &str, name: &str) -> Option<&FleetLimit> {
        let i = self.index.get(tenant)?.get(name)?;
        self.limits.get(*i)
    }

    /// The fleet limits that apply to a request to `tenant`: those declared on
    /// it or an ancestor, deepest first, then by name.
    pub fn applying_to(&self, tenant: &TenantPath) -> Vec<&FleetLimit> {
        let mut out = Vec::new();
        if self.limits.is_empty() {
            return out;
        }
        for node in tenant.lineage().iter().rev() {
            if let Some(names) = self.index.get(node.as_str()) {
                out.extend(names.values().filter_map(|i| self.limits.get(*i)));
            }
        }
        out
    }

    /// [`FleetLimits::applying_to`] as indices into [`FleetLimits::all`],
    /// without allocating.
    pub fn indices_for<'a>(&'a self, tenant: &'a TenantPath) -> impl Iterator<Item = usize> + 'a {
        let nodes = (!self.limits.is_empty()).then(|| tenant.ancestors_or_self());
        nodes
            .into_iter()
            .flatten()
            .filter_map(|node| self.index.get(node))
            .flat_map(|names| names.values().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::spec::FleetRules;
    use crate::quota::{LimitsInput, MemoryStore, QuotaModel};

    /// `(tenant, name)` of each descriptor entry pair of a request to `t`.
    fn descriptors(f: &FleetLimits, t: &TenantPath) -> Vec<Vec<(String, String)>> {
        f.indices_for(t)
            .filter_map(|i| f.all().get(i))
            .map(|l| {
                l.descriptor(None)
                    .entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    fn tp(s: &str) -> TenantPath {
        TenantPath::parse(s).unwrap()
    }

    /// Builds a model from `(tenant, tenant.json text)` pairs.
    fn build(files: &[(&str, &str)]) -> Result<(QuotaModel, FleetLimits), Vec<String>> {
        build_with(files, FleetRules::FlatCaps)
    }

    /// [`build`] under the given rules for fleet limits.
    fn build_with(
        files: &[(&str, &str)],
        rules: FleetRules,
    ) -> Result<(QuotaModel, FleetLimits), Vec<String>> {
        let parsed: Vec<(TenantPath, String, BTreeMap<String, serde_json::Value>)> = files
            .iter()
            .map(|(t, text)| {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                let limits = serde_json::from_value(v["limits"].clone()).unwrap();
                let dir = if *t == "/" { "" } else { t };
                (tp(t), format!("tenants{dir}/tenant.json"), limits)
            })
            .collect();
        let inputs: Vec<LimitsInput<'_>> = parsed
            .iter()
            .zip(files)
            .map(|((tenant, file, limits), (_, text))| LimitsInput {
                tenant,
                file,
                text,
                limits,
            })
            .collect();
        crate::quota::spec::compile_with(&inputs, rules)
            .map(|c| (QuotaModel::new(&c), FleetLimits::new(&c)))
            .map_err(|ds| ds.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn fleet_limits_resolve_shares_and_windows() {
        let m = build(&[
            ("/", r#"{"limits": {"rpm": {"rate": 6000, "per": "1m", "scope": "fleet"}, "rps": {"rate": 10}}}"#),
            ("/acme", r#"{"limits": {"rpm": {"rate": "40%", "scope": "fleet"}}}"#),
            ("/acme/eu", r#"{"limits": {"rpm": {"rate": "12.5%", "scope": "fleet"}, "day": {"rate": 5, "per": "1d", "scope": "fleet"}}}"#),
        ])
        .unwrap();
        let (m, f) = (m.0, m.1);
        let got: Vec<(String, String, u64, u64)> = f
            .all()
            .iter()
            .map(|l| (l.tenant.to_string(), l.name.clone(), l.rate, l.per_s))
            .collect();
        assert_eq!(
            got,
            [
                ("/".into(), "rpm".into(), 6000, 60),
                ("/acme".into(), "rpm".into(), 2400, 60),
                ("/acme/eu".into(), "day".into(), 5, 86_400),
                ("/acme/eu".into(), "rpm".into(), 300, 60),
            ]
        );
        // The local model holds only the local limit.
        let local: Vec<String> = m.limits().iter().map(|l| l.name.clone()).collect();
        assert_eq!(local, ["rps"]);
        assert_eq!(f.get("/acme", "rpm").map(|l| l.rate), Some(2400));
        assert_eq!(f.get("/acme", "day"), None);
        assert_eq!(f.get("/nope", "rpm"), None);
    }

    #[test]
    fn descriptors_deepest_first_then_by_name() {
        let m = build(&[
            ("/", r#"{"limits": {"rpm": {"rate": 100, "per": "1m", "scope": "fleet"}}}"#),
            ("/acme", r#"{"limits": {"rpm": {"rate": 50, "scope": "fleet"}}}"#),
            ("/acme/eu", r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}, "day": {"rate": 5, "per": "1d", "scope": "fleet"}}}"#),
        ])
        .unwrap();
        let d = |t: &str| descriptors(&m.1, &tp(t));
        let e = |t: &str, n: &str| {
            vec![
                ("tenant".to_string(), t.to_string()),
                ("limit".to_string(), n.to_string()),
            ]
        };
        assert_eq!(
            d("/acme/eu/team-a"),
            [
                e("/acme/eu", "day"),
                e("/acme/eu", "rpm"),
                e("/acme", "rpm"),
                e("/", "rpm")
            ]
        );
        assert_eq!(d("/acme/us"), [e("/acme", "rpm"), e("/", "rpm")]);
        assert_eq!(d("/"), [e("/", "rpm")]);
    }

    #[test]
    fn fleet_limits_take_no_part_in_local_admission() {
        let m = build(&[(
            "/",
            r#"{"limits": {"rpm": {"rate": 1, "per": "1m", "scope": "fleet"}}}"#,
        )])
        .unwrap()
        .0;
        assert!(m.is_empty());
        let store = MemoryStore::default();
        for _ in 0..5 {
            let q = m.admit(&tp("/acme"), 1, 0, &store).unwrap();
            assert!(q.admitted);
            assert_eq!(q.ratelimit_policy(), None);
        }
    }

    #[test]
    fn fleet_errors_are_located() {
        let text = "{\"limits\": {\"rpm\": {\"rate\": 10,\n  \"ceil\": 20, \"burst\": 5, \"scope\": \"fleet\"}}}";
        assert_eq!(
            build(&[("/", text)]).unwrap_err(),
            [
                "tenants/tenant.json:2:3: error: limit `rpm`: `ceil` is a local notion and cannot be set on a fleet limit (`\"scope\": \"fleet\"`): a fleet limit is at most `rate` per `per` window, unless `rate_limit_service.mode` is `\"assigned\"`",
                "tenants/tenant.json:2:15: error: limit `rpm`: `burst` is a local notion and cannot be set on a fleet limit (`\"scope\": \"fleet\"`): a fleet limit is at most `rate` per `per` window, unless `rate_limit_service.mode` is `\"assigned\"`",
            ]
        );
        let bad_scope = r#"{"limits": {"rpm": {"rate": 10, "scope": "global"}}}"#;
        assert_eq!(
            build(&[("/", bad_scope)]).unwrap_err(),
            ["tenants/tenant.json:1:33: error: limit `rpm`: `scope` must be `\"local\"` or `\"fleet\"`, got `\"global\"`"]
        );
    }

    #[test]
    fn assigned_mode_takes_ceil_and_burst_validated_as_local_limits() {
        let ok = build_with(
            &[
                ("/", r#"{"limits": {"rps": {"rate": 300, "scope": "fleet"}}}"#),
                ("/a", r#"{"limits": {"rps": {"rate": 200, "ceil": 300, "burst": 60, "scope": "fleet"}}}"#),
                ("/b", r#"{"limits": {"rps": {"rate": "33.4%", "ceil": "100%", "scope": "fleet"}}}"#),
                ("/a/x", r#"{"limits": {"rps": {"rate": 50, "scope": "fleet"}}}"#),
            ],
            FleetRules::Hierarchical,
        )
        .unwrap()
        .1;
        let got: Vec<(&str, u64, u64, u64, Option<usize>)> = ok
            .all()
            .iter()
            .map(|l| (l.tenant.as_str(), l.rate, l.ceil, l.burst, l.parent))
            .collect();
        assert_eq!(
            got,
            [
                ("/", 300, 300, 300, None),
                ("/a", 200, 300, 60, Some(0)),
                ("/b", 100, 300, 100, Some(0)),
                ("/a/x", 50, 50, 50, Some(1)),
            ]
        );
        // The rules of local limits, located at the key.
        let err = build_with(
            &[
                (
                    "/",
                    r#"{"limits": {"rps": {"rate": 300, "ceil": 400, "scope": "fleet"}}}"#,
                ),
                (
                    "/a",
                    r#"{"limits": {"rps": {"rate": 200, "ceil": 500, "scope": "fleet"}}}"#,
                ),
                (
                    "/b",
                    r#"{"limits": {"rps": {"rate": 150, "ceil": 100, "scope": "fleet"}}}"#,
                ),
            ],
            FleetRules::Hierarchical,
        )
        .unwrap_err();
        assert_eq!(
            err,
            [
                "tenants/a/tenant.json:1:34: error: limit `rps`: `ceil` 500 is larger than the ceil 400 of `/` (a tenant cannot borrow more than its parent may use)",
                "tenants/b/tenant.json:1:34: error: limit `rps`: `rate` 150 is larger than `ceil` 100",
            ]
        );
        let err = build_with(
            &[
                (
                    "/",
                    r#"{"limits": {"rps": {"rate": 300, "scope": "fleet"}}}"#,
                ),
                (
                    "/a",
                    r#"{"limits": {"rps": {"rate": 200, "ceil": 300, "scope": "fleet"}}}"#,
                ),
                (
                    "/b",
                    r#"{"limits": {"rps": {"rate": 200, "scope": "fleet"}}}"#,
                ),
            ],
            FleetRules::Hierarchical,
        )
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(
            err[0].starts_with("tenants/tenant.json:1:21: error: limit `rps`: the rates of the children add up to 400"),
            "{err:?}"
        );
        // Keyed fleet limits stay unsupported.
        let err = build_with(
            &[(
                "/",
                r#"{"limits": {"rps": {"rate": 3, "key": "principal", "scope": "fleet"}}}"#,
            )],
            FleetRules::Hierarchical,
        )
        .unwrap_err();
        assert_eq!(err, ["tenants/tenant.json:1:32: error: limit `rps`: keyed fleet limits are not supported; make it local (the default) or remove `key`"]);
    }

    #[test]
    fn one_scope_per_name_along_a_branch_and_sums_per_scope() {
        let err = build(&[
            (
                "/",
                r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}}}"#,
            ),
            (
                "/acme",
                r#"{"limits": {"rpm": {"rate": 5, "scope": "local"}}}"#,
            ),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            ["tenants/acme/tenant.json:1:32: error: limit `rpm`: scope `local` differs from the scope `fleet` of `/`; one limit name keeps one scope along a branch (use another name)"]
        );
        // Children's fleet rates are summed against the parent's fleet rate.
        let err = build(&[
            (
                "/",
                r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}}}"#,
            ),
            (
                "/a",
                r#"{"limits": {"rpm": {"rate": "60%", "scope": "fleet"}}}"#,
            ),
            (
                "/b",
                r#"{"limits": {"rpm": {"rate": "60%", "scope": "fleet"}}}"#,
            ),
        ])
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(
            err[0].starts_with("tenants/tenant.json:1:21: error: limit `rpm`: the rates of the children add up to 12"),
            "{err:?}"
        );
        // Local and fleet limits of different names on one branch are independent.
        build(&[
            (
                "/",
                r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}, "rps": {"rate": 10}}}"#,
            ),
            (
                "/a",
                r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}, "rps": {"rate": 10}}}"#,
            ),
        ])
        .unwrap();
    }
}
