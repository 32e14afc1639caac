//! The filter's metrics (docs/reference.md, "Metrics"): their names, the
//! series a bundle defines, and what each decision feeds.
//!
//! Per-tenant and per-limit series carry their labels in the stat name the
//! way Istio's do: `tenant=.=/acme/eu;.;parent=.=/acme;.;limit=.=rps;.;`
//! before the metric name. Envoy's `stats_config.stats_tags` (rendered by
//! `tenantgate envoy`, or Istio's `extraStatTags`) turn each into a
//! Prometheus label with the regex `(<tag>=\.=(.*?);\.;)`, so
//! `/stats/prometheus` shows
//! `tenantgate_limit_admitted{tenant="/acme/eu",parent="/acme",limit="rps"}`.
//! Every series is defined at configure time from the bundle: the number of
//! series is bounded by the bundle, never by request data.
//!
//! Cost on the hot path: a decision increments the process-wide outcome
//! counter and one per-tenant counter, as before labels existed. The
//! per-limit counts are added up in the VM ([`Tally`]) and flushed on the
//! filter's tick, with the remaining tokens read back from the buckets.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::decision::{Counter, Decision, Kind, TenantCounter};
use crate::quota::{BucketStore, Nanos, QuotaModel};
use crate::tenant::TenantPath;
use crate::{Engine, Worker};

/// Metric names, shared with the filter, the docs and the tests.
pub mod names {
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
    /// Counter: worker leases charged to the shared buckets.
    pub const LEASE_REFILLS: &str = "tenantgate.lease_refills";
    /// Counter: calls to the rate limit service (checks and reports).
    pub const FLEET_CALLS: &str = "tenantgate.fleet_calls";
    /// Counter: calls that got no usable answer (unreachable, past the
    /// timeout, a gRPC error, a message that does not decode).
    pub const FLEET_ERRORS: &str = "tenantgate.fleet_errors";
    /// Counter: mode `assigned`, RLQS streams opened (the first and every
    /// reconnection).
    pub const FLEET_STREAM_OPENS: &str = "tenantgate.fleet_stream_opens";
    /// Counter: mode `assigned`, bucket assignments received.
    pub const FLEET_ASSIGNMENTS: &str = "tenantgate.fleet_assignments";
    /// Gauge: shared-data keys (quota buckets) the loaded bundle uses.
    pub const SHARED_DATA_KEYS: &str = "tenantgate.shared_data_keys";

    /// The Envoy tags (Prometheus labels) of the filter's series, in the
    /// order they appear in a stat name.
    pub const TAGS: [&str; 5] = ["tenant", "parent", "limit", "reason", "bundle"];

    /// The `stats_tags` regex of a tag: the first group is cut out of the
    /// stat name, the second is the label's value.
    pub fn tag_regex(tag: &str) -> String {
        format!(r"({tag}=\.=(.*?);\.;)")
    }

    /// `tag=.=value;.;`
    fn tag(name: &str, value: &str) -> String {
        format!("{name}=.={value};.;")
    }

    /// The tags of a tenant: its path, and its parent's but for the root.
    fn tenant_tags(tenant: &crate::TenantPath) -> String {
        let mut s = tag("tenant", tenant.as_str());
        if let Some(p) = tenant.parent() {
            s.push_str(&tag("parent", p.as_str()));
        }
        s
    }

    /// Gauge set to 1: `tenantgate.bundle.<first 12 hex digits>`.
    pub fn bundle(version: &str) -> String {
        format!("tenantgate.bundle.{}", short_version(version))
    }

    /// Gauge, 1 while loaded, 0 after: `bundle=.=<12 hex>;.;tenantgate.bundle_active`.
    pub fn bundle_active(version: &str) -> String {
        format!(
            "{}tenantgate.bundle_active",
            tag("bundle", short_version(version))
        )
    }

    fn short_version(version: &str) -> &str {
        let hex = version.strip_prefix("sha256:").unwrap_or(version);
        hex.get(..12).unwrap_or(hex)
    }

    /// The value of [`BUNDLE_VERSION`] for a `sha256:<hex>` version.
    pub fn bundle_version_value(version: &str) -> u64 {
        let hex = version.strip_prefix("sha256:").unwrap_or(version);
        hex.get(..8)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or(0)
    }

    /// A per-tenant series: `tenant=.=/acme/eu;.;parent=.=/acme;.;tenantgate.tenant.<what>`.
    pub fn tenant(tenant: &crate::TenantPath, what: &str) -> String {
        format!("{}tenantgate.tenant.{what}", tenant_tags(tenant))
    }

    /// Refusals of a tenant for one reason:
    /// `tenant=.=/acme;.;reason=.=quota;.;tenantgate.tenant.refused`.
    pub fn tenant_refused(tenant: &crate::TenantPath, reason: &str) -> String {
        format!(
            "{}{}tenantgate.tenant.refused",
            tenant_tags(tenant),
            tag("reason", reason)
        )
    }

    /// A per-limit series of the node that declares the limit:
    /// `tenant=.=/acme/eu;.;parent=.=/acme;.;limit=.=rps;.;tenantgate.limit.<what>`.
    pub fn limit(tenant: &crate::TenantPath, limit: &str, what: &str) -> String {
        format!(
            "{}{}tenantgate.limit.{what}",
            tenant_tags(tenant),
            tag("limit", limit)
        )
    }

    /// The refusal reasons, in the order of [`super::Reason`].
    pub const REASONS: [&str; 4] = ["policy", "quota", "bad_request", "error"];
}

/// What kind of metric a definition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One series the filter defines at configure time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricDef {
    pub name: String,
    pub kind: MetricKind,
    /// A gauge's value, set when it is defined (the configured limits).
    pub initial: Option<u64>,
}

/// An index into [`Layout::defs`].
pub type MetricRef = usize;

/// A change the filter makes to a defined metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Add(MetricRef, u64),
    Set(MetricRef, u64),
}

/// Why a tenant's request was refused (a would-be refusal in shadow mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Policy,
    Quota,
    BadRequest,
    Error,
}

impl Reason {
    pub fn of(decision: &Decision) -> Reason {
        match decision.kind {
            Kind::QuotaExceeded => Reason::Quota,
            Kind::BadRequest => Reason::BadRequest,
            Kind::Error => Reason::Error,
            Kind::Forbidden | Kind::Allowed => Reason::Policy,
        }
    }
}

#[derive(Debug)]
struct TenantSeries {
    allowed: MetricRef,
    /// By [`Reason`].
    refused: [MetricRef; 4],
    /// The limit names that apply to its requests, sorted by name, with the
    /// slot of the node whose limit each is.
    limits: Vec<(Arc<str>, usize)>,
}

/// The per-limit counters, in the order of [`LimitSeries::counters`].
const ADMITTED: usize = 0;
const REFUSED: usize = 1;
const BORROWED: usize = 2;
const NEAR: usize = 3;
const CHARGED: usize = 4;
const LIMIT_COUNTERS: [&str; 5] = ["admitted", "refused", "borrowed", "near_limit", "charged"];

#[derive(Debug)]
struct LimitSeries {
    node: TenantPath,
    name: Arc<str>,
    counters: [MetricRef; 5],
    remaining: MetricRef,
    burst: u64,
}

/// The series of one bundle and how decisions map to them.
#[derive(Debug)]
pub struct Layout {
    pub defs: Vec<MetricDef>,
    tenants: HashMap<TenantPath, TenantSeries>,
    limits: Vec<LimitSeries>,
    lease_refills: MetricRef,
    /// The process-wide outcome counters, in the order of [`Counter`].
    outcomes: [MetricRef; 6],
    /// Histogram of decision times in microseconds (sampled).
    pub decision_us: MetricRef,
    /// Calls to the rate limit service, and those that failed.
    pub fleet_calls: MetricRef,
    pub fleet_errors: MetricRef,
    /// Mode `assigned`: streams opened, bucket assignments received.
    pub fleet_stream_opens: MetricRef,
    pub fleet_assignments: MetricRef,
    /// Bundles loaded (incremented on each activation).
    pub config_loaded: MetricRef,
    near_limit_ratio: f64,
}

impl Layout {
    /// Every series of the engine's bundle: per tenant, per declared local
    /// limit (counters, remaining tokens, the configured rate, ceil, burst
    /// and window), and the per-process ones this module feeds.
    pub fn new(engine: &Engine) -> Layout {
        let mut defs = Vec::new();
        let mut def = |name: String, kind: MetricKind, initial: Option<u64>| {
            defs.push(MetricDef {
                name,
                kind,
                initial,
            });
            defs.len() - 1
        };
        let quotas = engine.quotas();
        let mut limits = Vec::new();
        let mut slot_of: HashMap<(TenantPath, Arc<str>), usize> = HashMap::new();
        for l in quotas.limits() {
            let gauge = |what: &str| names::limit(&l.tenant, &l.name, what);
            def(gauge("rate"), MetricKind::Gauge, Some(l.rate));
            def(gauge("ceil"), MetricKind::Gauge, Some(l.ceil));
            def(gauge("burst"), MetricKind::Gauge, Some(l.burst));
            def(gauge("window_seconds"), MetricKind::Gauge, Some(l.per_s));
            let counters = LIMIT_COUNTERS.map(|what| def(gauge(what), MetricKind::Counter, None));
            let remaining = def(gauge("remaining"), MetricKind::Gauge, None);
            let name: Arc<str> = Arc::from(l.name.as_str());
            slot_of.insert((l.tenant.clone(), Arc::clone(&name)), limits.len());
            limits.push(LimitSeries {
                node: l.tenant.clone(),
                name,
                counters,
                remaining,
                burst: l.burst,
            });
        }
        let mut tenants = HashMap::new();
        for t in engine.tenants() {
            let allowed = def(names::tenant(t, "allowed"), MetricKind::Counter, None);
            let refused =
                names::REASONS.map(|r| def(names::tenant_refused(t, r), MetricKind::Counter, None));
            let limits = quotas
                .chain_heads(t)
                .into_iter()
                .filter_map(|(name, node)| {
                    let slot = *slot_of.get(&(node, Arc::clone(&name)))?;
                    Some((name, slot))
                })
                .collect();
            tenants.insert(
                t.clone(),
                TenantSeries {
                    allowed,
                    refused,
                    limits,
                },
            );
        }
        let lease_refills = def(names::LEASE_REFILLS.into(), MetricKind::Counter, None);
        def(
            names::SHARED_DATA_KEYS.into(),
            MetricKind::Gauge,
            Some(quotas.footprint().len() as u64),
        );
        let outcomes = [
            names::ALLOWED,
            names::DENIED_POLICY,
            names::DENIED_QUOTA,
            names::BAD_REQUEST,
            names::SHADOW_DENIED,
            names::ERRORS,
        ]
        .map(|n| def(n.into(), MetricKind::Counter, None));
        let decision_us = def(names::DECISION_US.into(), MetricKind::Histogram, None);
        let fleet_calls = def(names::FLEET_CALLS.into(), MetricKind::Counter, None);
        let fleet_errors = def(names::FLEET_ERRORS.into(), MetricKind::Counter, None);
        let fleet_stream_opens = def(names::FLEET_STREAM_OPENS.into(), MetricKind::Counter, None);
        let fleet_assignments = def(names::FLEET_ASSIGNMENTS.into(), MetricKind::Counter, None);
        let config_loaded = def(names::CONFIG_LOADED.into(), MetricKind::Counter, None);
        // Defined before any rejection, so an alert sees it go from 0 to 1.
        def(names::CONFIG_REJECTED.into(), MetricKind::Counter, None);
        let version = engine.version();
        def(
            names::BUNDLE_VERSION.into(),
            MetricKind::Gauge,
            Some(names::bundle_version_value(version)),
        );
        // 1 while this bundle is loaded; a reload sets the previous
        // bundle's to 0 ([`Layout::removed_gauges`]).
        def(names::bundle(version), MetricKind::Gauge, Some(1));
        def(names::bundle_active(version), MetricKind::Gauge, Some(1));
        Layout {
            defs,
            tenants,
            limits,
            lease_refills,
            outcomes,
            decision_us,
            fleet_calls,
            fleet_errors,
            fleet_stream_opens,
            fleet_assignments,
            config_loaded,
            near_limit_ratio: engine.settings().near_limit_ratio.0,
        }
    }

    /// The process-wide counter of a decision's outcome.
    pub fn outcome(&self, c: Counter) -> MetricRef {
        let i = match c {
            Counter::Allowed => 0,
            Counter::DeniedPolicy => 1,
            Counter::DeniedQuota => 2,
            Counter::BadRequest => 3,
            Counter::ShadowDenied => 4,
            Counter::Error => 5,
        };
        self.outcomes.get(i).copied().unwrap_or(self.decision_us)
    }

    /// The gauges of `previous` this layout no longer has (tenants or limits
    /// a reload removed or changed): the filter sets them to 0.
    pub fn removed_gauges<'a>(&self, previous: &'a Layout) -> Vec<&'a str> {
        let now: HashSet<&str> = self.defs.iter().map(|d| d.name.as_str()).collect();
        previous
            .defs
            .iter()
            .filter(|d| d.kind == MetricKind::Gauge && !now.contains(d.name.as_str()))
            .map(|d| d.name.as_str())
            .collect()
    }

    /// A fresh accumulator for this layout (every limit's remaining tokens
    /// are read on the first flush).
    pub fn tally(&self) -> Tally {
        Tally {
            counts: vec![[0; 5]; self.limits.len()],
            dirty: vec![true; self.limits.len()],
            refills_flushed: 0,
        }
    }

    /// One decision: adds its per-limit counts to `tally` and returns the
    /// per-tenant counter to increment now (`None` for a tenant outside the
    /// bundle). Would-be refusals of shadow mode count as refusals here, as
    /// in the decision's `tenant_counter`.
    pub fn record(
        &self,
        tally: &mut Tally,
        tenant: Option<&TenantPath>,
        decision: &Decision,
    ) -> Option<MetricRef> {
        let series = self.tenants.get(tenant?)?;
        if let Some(q) = &decision.quota {
            let cost = q.cost;
            for (i, status) in q.limits.iter().enumerate() {
                let slot = match series.limits.get(i) {
                    Some((name, slot)) if **name == *status.name => Some(*slot),
                    _ => series
                        .limits
                        .iter()
                        .find(|(name, _)| **name == *status.name)
                        .map(|(_, s)| *s),
                };
                let Some(slot) = slot else { continue };
                if let Some(d) = tally.dirty.get_mut(slot) {
                    *d = true;
                }
                let Some(c) = tally.counts.get_mut(slot) else {
                    continue;
                };
                if q.admitted {
                    add(c, ADMITTED, 1);
                    add(c, CHARGED, cost);
                    if status.borrowed {
                        add(c, BORROWED, 1);
                    }
                    if status.near_limit(self.near_limit_ratio) {
                        add(c, NEAR, 1);
                    }
                } else if q.limit.as_deref() == Some(&*status.name) {
                    add(c, REFUSED, 1);
                }
            }
        }
        Some(match decision.tenant_counter() {
            TenantCounter::Allowed => series.allowed,
            TenantCounter::Denied => {
                let i = Reason::of(decision) as usize;
                series.refused.get(i).copied()?
            }
        })
    }

    /// The updates of one flush: the counts added up since the last one,
    /// the lease refills, and the remaining tokens of every limit used since
    /// its buckets were last seen full, read from the store at `now`.
    pub fn flush(
        &self,
        tally: &mut Tally,
        worker: &Worker,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Vec<Update> {
        let mut out = Vec::new();
        for (series, counts) in self.limits.iter().zip(tally.counts.iter_mut()) {
            for (id, n) in series.counters.iter().zip(counts.iter_mut()) {
                if *n > 0 {
                    out.push(Update::Add(*id, *n));
                    *n = 0;
                }
            }
        }
        let refills = worker.leases().refills();
        if refills > tally.refills_flushed {
            out.push(Update::Add(
                self.lease_refills,
                refills - tally.refills_flushed,
            ));
            tally.refills_flushed = refills;
        }
        self.refresh_remaining(tally, worker.engine().quotas(), now, store, &mut out);
        out
    }

    fn refresh_remaining(
        &self,
        tally: &mut Tally,
        quotas: &QuotaModel,
        now: Nanos,
        store: &dyn BucketStore,
        out: &mut Vec<Update>,
    ) {
        // One read per node: its plan holds the chains of all its limits.
        let mut read: HashMap<&TenantPath, Option<crate::quota::QuotaDecision>> = HashMap::new();
        for (series, dirty) in self.limits.iter().zip(tally.dirty.iter_mut()) {
            if !*dirty {
                continue;
            }
            let peeked = read
                .entry(&series.node)
                .or_insert_with(|| quotas.peek(&series.node, now, store).ok());
            let Some(status) = peeked
                .as_ref()
                .and_then(|d| d.limits.iter().find(|l| *l.name == *series.name))
            else {
                continue;
            };
            out.push(Update::Set(series.remaining, status.remaining));
            // Full again: nothing changes until a request uses it.
            *dirty = status.remaining < series.burst;
        }
    }
}

fn add(counts: &mut [u64; 5], i: usize, n: u64) {
    if let Some(c) = counts.get_mut(i) {
        *c = c.saturating_add(n);
    }
}

/// One VM's per-limit counts since the last flush.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    counts: Vec<[u64; 5]>,
    /// Limits whose remaining tokens may have changed since last read.
    dirty: Vec<bool>,
    /// Lease refills already flushed.
    refills_flushed: u64,
}

#[cfg(test)]
mod tests {
    use super::names;
    use crate::TenantPath;

    #[test]
    fn series_names_carry_their_labels_the_istio_way() {
        let eu = TenantPath::parse("/acme/eu").unwrap();
        assert_eq!(
            names::tenant(&eu, "allowed"),
            "tenant=.=/acme/eu;.;parent=.=/acme;.;tenantgate.tenant.allowed"
        );
        assert_eq!(
            names::tenant(&TenantPath::root(), "allowed"),
            "tenant=.=/;.;tenantgate.tenant.allowed"
        );
        assert_eq!(
            names::tenant_refused(&eu, "quota"),
            "tenant=.=/acme/eu;.;parent=.=/acme;.;reason=.=quota;.;tenantgate.tenant.refused"
        );
        assert_eq!(
            names::limit(&eu, "rps", "admitted"),
            "tenant=.=/acme/eu;.;parent=.=/acme;.;limit=.=rps;.;tenantgate.limit.admitted"
        );
        assert_eq!(names::tag_regex("tenant"), r"(tenant=\.=(.*?);\.;)");
    }

    #[test]
    fn bundle_metrics() {
        let v = "sha256:e313b8cd9b886ad888f5986c92ec36aa3bfa66bf24483053114f5c1af4660a6c";
        assert_eq!(names::bundle(v), "tenantgate.bundle.e313b8cd9b88");
        assert_eq!(
            names::bundle_active(v),
            "bundle=.=e313b8cd9b88;.;tenantgate.bundle_active"
        );
        assert_eq!(names::bundle_version_value(v), 0xe313b8cd);
    }
}
