//! Hierarchical quotas (docs/reference.md, limits): the token buckets of Linux HTB
//! (`tc-htb`) over the tenant tree.
//!
//! # Model
//!
//! A tenant may declare named limits (`rps`, `daily`, ...), each with `rate`
//! (guaranteed tokens per `per`), `ceil` (the most it may use, borrowing
//! included), `burst` and `per`. For one name, the tenants on a request's
//! lineage that define it form a *chain*, deepest first. Every node of a chain
//! holds two buckets, refilled continuously: `tokens` (refilled at `rate`, at
//! most `burst`) and `ctokens` (refilled at `ceil`, at most
//! `burst * ceil / rate`).
//!
//! # Validation
//!
//! `rate` is required; `ceil` and `burst` default to the rate; `per` is
//! `<n><s|m|h|d>` (at most `365d`), default `1s` at the top of a chain. A
//! child may write `rate` or `ceil` as a share of its nearest ancestor's rate
//! for the same name (`"40%"`, up to two decimals, rounded down to whole
//! tokens; less than one token is an error), and inherits `per`. Amounts are
//! whole numbers from 1 to 10^12. Errors, each located at its key in
//! `tenant.json`: bad or unknown keys, a share over 100% or with no ancestor
//! to take it from, `rate > ceil`, a child `ceil` above its parent's, a
//! child's rates summing above its parent's rate (reported at the parent), and
//! a child `per` different from its parent's: one name keeps one window along
//! a branch (mixed windows would make borrowing compare unlike units; write
//! a second limit name for a second window, as `rps` and `daily`). Limit names
//! are lowercase tokens like tenant segments, so they are safe in headers.
//!
//! # Admission
//!
//! For a request costing `cost` tokens, every chain is walked from its deepest
//! node up:
//! - a node whose `ctokens < cost` is at its ceil: the request is refused;
//! - a node whose `tokens >= cost` *lends*: the walk stops;
//! - otherwise the node borrows from the next node up; the top node of a chain
//!   cannot borrow, so it refuses.
//!
//! When the request borrows, the walk also applies *fair borrowing* at every
//! node it borrows through (the `fair` module): a child that is ahead of a
//! sibling there, in tokens borrowed per unit of rate, must leave the
//! sibling's last borrow in the buckets they share, else it *yields*
//! (refused like a node at its ceil). So siblings borrowing at the same time
//! share the spare in proportion to their rates, and what one leaves goes to
//! the others.
//!
//! If every chain admits, the request is charged, as in tc-htb's
//! `htb_charge_class`: `ctokens` of every node of every chain, `tokens` of the
//! lender and the nodes above it. The borrowers below the lender keep their
//! `tokens`, because the tokens came from the lender: a tenant that borrowed
//! runs up no debt against its own guarantee, so it has its rate again as soon
//! as it slows down to it. If any chain refuses, nothing is charged anywhere
//! (all-or-nothing across names and levels). A cost of 0 is admitted without
//! touching the buckets. A cost above a bucket's size can never pass (refused,
//! `Retry-After` one window).
//!
//! The decision carries the IETF fields (draft-ietf-httpapi-ratelimit-headers):
//! `RateLimit-Policy: "rps";q=<rate of the deepest node>;w=<window s>` and
//! `RateLimit: "rps";r=<remaining>;t=<s>` per name, where `r` is the most one
//! lender could still give (its `tokens`, bounded by the `ctokens` of every
//! node up to it) and `t` the seconds until a request of this cost would pass
//! again (0 when it would now). `Retry-After` is the longest `t` of a refusing
//! name, at least 1; `limit` and `tenant` name that chain and the node where
//! its walk stopped.
//!
//! # Arithmetic
//!
//! Amounts are `i128` in units of `1 / per_ns` token (`per_ns` being the
//! window in nanoseconds, shared along a chain), so a refill over `dt`
//! nanoseconds adds exactly `rate * dt` units: integers only, no rounding, no
//! drift. A clock that goes backwards refills nothing and never moves a
//! bucket's `last` back. Amounts above the lender may go negative (a parent is
//! charged for what its children lend themselves); validation bounds that debt
//! by the descendants' bursts (children's rates add up to at most the parent's
//! rate), and arithmetic saturates at a floor far below it.
//!
//! # Store layout
//!
//! One shared-data key per (node, limit name):
//! `tenantgate:quota:v3:<tenant>:<name>`, whatever the limit's numbers. The
//! value is 45 bytes while no child borrows through the node: a version tag
//! (`1`), the *stamp* (`u32`, 32 bits of SHA-256 over the limit's `rate`,
//! `ceil`, `burst` and `per`), `tokens` and `ctokens` as little-endian
//! `i128`, `last` as little-endian `u64` nanoseconds. A reload that leaves a
//! node's limit unchanged finds its stamp and keeps its state; a changed
//! limit finds another stamp and starts from full buckets in the same key
//! (reset with compare-and-swap at configure time, or by the first admission
//! that reads it); a limit the reload removes is set to an empty value (the
//! `footprint` module), which reads as missing. So reloads never leave keys
//! behind (Envoy never deletes shared data). With
//! borrowing children the tag is `2` and the 45 bytes are followed by a count
//! `n` (1 to 8) and `n` slots of 28 bytes (little-endian): the child's id
//! (`u32`, 32 bits of SHA-256 over its path, stable across reloads), its
//! virtual time (`u64`), its last borrow (`u64` nanoseconds) and that
//! borrow's tokens (`u64`). A value that does not decode is
//! [`StoreError::Corrupt`].
//!
//! An admission reads every bucket of every chain with its CAS token, decides
//! with a pure function ([`QuotaModel::admit`] calls `decide`), then writes
//! each changed bucket with its CAS token. When a write loses a race
//! (`CasMismatch`), the writes this attempt already made are refunded (each
//! refund is its own CAS loop: add back exactly what was charged) and the whole
//! admission is retried, at most [`MAX_ATTEMPTS`] times, then
//! [`StoreError::Contended`]. A missing key is first created with full buckets
//! and the attempt starts over, so a charge is never written without CAS.
//!
//! # Accuracy
//!
//! Within one Envoy process the buckets are exact: every charge is a CAS on
//! the value it was computed from, so concurrent workers cannot over-admit
//! (in steady state the over-admission is zero, not just under 1%). The
//! documented slack:
//! - *key creation*: a set on a missing key ignores CAS (an Envoy quirk), so
//!   two VMs that both find a key missing both create it, full; charges made
//!   between the first and the last creation are lost (a window of
//!   microseconds, once per key's life). The filter pre-creates every key at
//!   configure time ([`QuotaModel::create_buckets`], set only where `get`
//!   finds nothing), so in practice only VMs configuring at the same instant
//!   race, before any traffic;
//! - *new limits*: a changed limit starts with full buckets (one extra burst);
//!   while a rollout runs VMs with both bundles (milliseconds in one Envoy),
//!   each one resets the stamp the other wrote, one extra burst per flip;
//! - *fair borrowing* refuses, never admits: a child ahead of a sibling
//!   leaves the sibling's reserve in the shared buckets (a few tokens held
//!   back, not a rate; bounds in docs/reference.md, "Fair borrowing");
//! - failures only ever err towards refusing: a refund that cannot complete
//!   leaves a charge behind, and a VM whose clock lags another's refills
//!   nothing until it catches up.
//!
//! *Worker leases* (the `lease` module) change none of this: a worker charges
//! a batch through this same admission and spends it locally, so tokens are
//! always charged before they are spent (no over-admission). The price is
//! under-admission: at most `W x B` tokens per bucket wait in the leases of
//! `W` workers (`B` at most a plan's smallest burst / 64, and at most 64;
//! limits with a burst under 128 are never leased and stay exact), returned
//! within the lease TTL (100 ms) or on a tick or reload.
//!
//! So a subtree admits at most `ceil * window + ceil bucket + the bursts of
//! its descendants` over any window (`rate * window + burst + ...` at the top
//! of a chain, which cannot borrow): the *cap* invariant the property tests
//! check. The descendants' bursts appear because a child lending its own
//! tokens is, as in tc-htb, not held back by its parent's ceil; that is what
//! makes the guarantee hold (a tenant within its rate is never refused,
//! whatever its siblings do).

mod bucket;
mod clock;
mod fair;
pub mod footprint;
pub mod keyed;
mod lease;
mod series;
mod sharded;
pub(crate) mod spec;
mod store;

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use serde::Serialize;

use crate::diag::Diagnostic;
use crate::tenant::TenantPath;
use bucket::{ceil_seconds, Bucket, FLOOR};
use spec::Limit;

pub(crate) use bucket::ceil_seconds as whole_seconds;
pub use clock::{Clock, FakeClock, SystemClock};
pub use lease::{Leases, Taken, LEASE_DIVISOR, LEASE_TTL_NS, MAX_BATCH};
pub use sharded::ShardedStore;
pub use spec::Scope;
pub(crate) use store::KeyHasher;
pub use store::{BucketStore, MemoryStore, StoreError};

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

/// Admission attempts before giving up with [`StoreError::Contended`].
pub const MAX_ATTEMPTS: usize = 16;
/// Attempts to refund one bucket after a lost race.
const REFUND_ATTEMPTS: usize = 64;

/// How long after its last borrow a child still counts as borrowing from
/// its parent (for fair borrowing): half the limit's window.
pub(crate) fn fair_window(per_ns: u64) -> u64 {
    per_ns / 2
}

/// How far a sibling that borrows less than its share may fall behind the
/// one furthest ahead, in virtual nanoseconds: the fair window, plus twice
/// the borrow being recorded (so the siblings that want more than their
/// share, which stay within about one borrow of each other, are never
/// held back by it).
pub(crate) fn fair_lag(per_ns: u64, inc: u64) -> u64 {
    fair_window(per_ns).saturating_add(inc.saturating_mul(2))
}

/// The limits one tenant declares, as read from its `tenant.json`.
pub struct LimitsInput<'a> {
    pub tenant: &'a TenantPath,
    /// `tenant.json` path relative to the policy folder, for diagnostics.
    pub file: &'a str,
    /// `tenant.json` text, to locate errors (line, column).
    pub text: &'a str,
    pub limits: &'a BTreeMap<String, serde_json::Value>,
}

/// Compiled quota configuration of a whole bundle. Empty (the default) means
/// no limits: every request is admitted.
#[derive(Debug, Clone, Default)]
pub struct QuotaModel {
    /// Every node's local limits, parents first.
    limits: Vec<Arc<Limit>>,
    /// For each tenant that declares limits: the chains of a request to it or
    /// to a descendant that declares none.
    plans: HashMap<Box<str>, Arc<Plan>, BuildHasherDefault<store::KeyHasher>>,
    /// The keyed limits (one bucket per key value), parents first.
    keyed: Vec<keyed::Keyed>,
    /// The headers keyed limits read, for the request mapping.
    keyed_headers: Vec<String>,
}

/// The chains that apply to requests to one tenant. Bucket state during an
/// admission is one flat slice aligned with `nodes`.
#[derive(Debug)]
struct Plan {
    /// The nodes of every chain, chain after chain, each chain deepest first.
    nodes: Vec<Arc<Limit>>,
    /// One per limit name, sorted by name.
    chains: Vec<Chain>,
    /// The most tokens a worker lease may take beyond a request's cost (0:
    /// never leased; see the `lease` module).
    lease_cap: u64,
}

#[derive(Debug)]
struct Chain {
    name: Arc<str>,
    /// Its nodes: `Plan::nodes[range]`. Never empty.
    range: std::ops::Range<usize>,
    /// The chain's window (validation makes it the same on every node).
    per_ns: u64,
}

impl Chain {
    fn of<'a, T>(&self, all: &'a [T]) -> &'a [T] {
        all.get(self.range.clone()).unwrap_or_default()
    }

    fn of_mut<'a, T>(&self, all: &'a mut [T]) -> &'a mut [T] {
        all.get_mut(self.range.clone()).unwrap_or_default()
    }

    /// `n` tokens in this chain's units.
    fn units(&self, n: u64) -> i128 {
        i128::from(n).saturating_mul(i128::from(self.per_ns))
    }
}

/// One declared limit, as compiled (shares resolved, defaults applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitInfo {
    pub tenant: TenantPath,
    pub name: String,
    pub rate: u64,
    pub ceil: u64,
    pub burst: u64,
    /// Window in seconds.
    pub per_s: u64,
    /// Shared-data key of its buckets.
    pub key: String,
}

/// One limit name's state for a request, after its charge when admitted.
/// Amounts are in tokens; [`QuotaDecision::ratelimit`] turns them into the
/// requests a client can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitStatus {
    pub name: Arc<str>,
    /// Guaranteed tokens per window of the deepest node that declares it.
    pub rate: u64,
    /// Bucket size in tokens of that node.
    pub burst: u64,
    /// The window in seconds.
    pub window_s: u64,
    /// Whole tokens one lender on the chain could still give (borrowing
    /// included, bounded by every ceil on the way).
    pub remaining: u64,
    /// Seconds until `remaining` is back to `rate` (rounded to whole
    /// requests of this request's cost) with no other traffic; 0 when it is.
    pub reset_s: u64,
    /// True when the request was admitted with tokens borrowed from an ancestor.
    pub borrowed: bool,
}

/// The quota part of a decision. Being refused is a value, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaDecision {
    pub admitted: bool,
    /// Name of the limit that refused (the one with the longest wait).
    pub limit: Option<String>,
    /// The node that refused: the one at its ceil, or the top of the chain.
    pub tenant: Option<TenantPath>,
    /// Whole tokens left for the most constrained limit (after this request's
    /// charge when admitted); 0 when no limit applies.
    pub remaining: u64,
    /// Whole seconds until this request would be admitted (at least 1 when
    /// refused), for `Retry-After`; 0 when admitted.
    pub retry_after_s: u64,
    /// When refused: the instant a request of this cost could pass with no
    /// other traffic (`None`: never, or admitted).
    #[serde(skip)]
    pub admissible_at: Option<Nanos>,
    /// What this request costs in tokens.
    pub cost: u64,
    /// Every limit name that applies, sorted by name.
    pub limits: Vec<LimitStatus>,
}

impl QuotaDecision {
    /// No limit applies.
    pub fn unlimited() -> Self {
        QuotaDecision {
            admitted: true,
            limit: None,
            tenant: None,
            remaining: 0,
            retry_after_s: 0,
            admissible_at: None,
            cost: 0,
            limits: Vec::new(),
        }
    }

    /// The `RateLimit-Policy` field (draft-ietf-httpapi-ratelimit-headers):
    /// `"rps";q=100;w=1` per limit name, `q` in requests of this request's
    /// cost; a cost above 1 is given as `tenantgate-cost`. `None` when no
    /// limit applies.
    pub fn ratelimit_policy(&self) -> Option<String> {
        if self.limits.is_empty() {
            return None;
        }
        let cost = self.cost.max(1);
        let mut out = String::with_capacity(24 * self.limits.len());
        for l in &self.limits {
            if !out.is_empty() {
                out.push_str(", ");
            }
            push_name(&mut out, &l.name);
            out.push_str(";q=");
            push_u64(&mut out, l.rate / cost);
            out.push_str(";w=");
            push_u64(&mut out, l.window_s);
            if cost > 1 {
                out.push_str(";tenantgate-cost=");
                push_u64(&mut out, cost);
            }
        }
        Some(out)
    }

    /// The `RateLimit` field: `"rps";r=3;t=1` per limit name, `r` the
    /// requests of this cost that could pass now (never above `q`) and `t` the
    /// seconds until `r` is back to `q`. `None` when no limit applies.
    pub fn ratelimit(&self) -> Option<String> {
        if self.limits.is_empty() {
            return None;
        }
        let cost = self.cost.max(1);
        let mut out = String::with_capacity(20 * self.limits.len());
        for l in &self.limits {
            if !out.is_empty() {
                out.push_str(", ");
            }
            let q = l.rate / cost;
            push_name(&mut out, &l.name);
            out.push_str(";r=");
            push_u64(&mut out, (l.remaining / cost).min(q));
            out.push_str(";t=");
            push_u64(&mut out, l.reset_s);
        }
        Some(out)
    }

    /// True when some limit has fewer tokens left than `ratio` of its burst
    /// (after this request's charge).
    pub fn near_limit(&self, ratio: f64) -> bool {
        self.limits.iter().any(|l| l.near_limit(ratio))
    }
}

/// A limit name as an RFC 8941 string item: `"rps"` (names are validated
/// to plain tokens, so nothing needs escaping).
fn push_name(out: &mut String, name: &str) {
    out.push('"');
    out.push_str(name);
    out.push('"');
}

/// Appends `n` in decimal. The RateLimit fields are built for every allowed
/// request that asks for them; this skips the formatting machinery, which
/// costs several times more in the Wasm build.
fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut len = 0;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always valid UTF-8.
    if let Some(Ok(digits)) = buf.get(buf.len() - len..).map(std::str::from_utf8) {
        out.push_str(digits);
    }
}

impl LimitStatus {
    /// Fewer tokens left than `ratio` of the burst (`near_limit_ratio`).
    pub fn near_limit(&self, ratio: f64) -> bool {
        (self.remaining as f64) < ratio * (self.burst as f64)
    }
}

impl QuotaModel {
    /// Builds and validates the limits of every tenant. `inputs` come parents
    /// first; tenants without limits may be absent.
    pub fn build(inputs: &[LimitsInput<'_>]) -> Result<QuotaModel, Vec<Diagnostic>> {
        Ok(Self::new(&spec::compile(inputs)?))
    }

    /// The model of the local limits among `compiled` (fleet limits are the
    /// `fleet` module's).
    pub(crate) fn new(compiled: &[Arc<Limit>]) -> QuotaModel {
        let (keyed, limits): (Vec<Arc<Limit>>, Vec<Arc<Limit>>) = compiled
            .iter()
            .filter(|l| l.scope == Scope::Local)
            .cloned()
            .partition(|l| l.keyed.is_some());
        let keyed: Vec<keyed::Keyed> = keyed.into_iter().filter_map(keyed::Keyed::new).collect();
        let mut keyed_headers: Vec<String> = keyed
            .iter()
            .filter_map(|k| match &k.spec().source {
                spec::KeySource::Header(h) => Some(h.clone()),
                spec::KeySource::Principal => None,
            })
            .collect();
        keyed_headers.sort();
        keyed_headers.dedup();
        let mut at_node: HashMap<&str, Vec<&Arc<Limit>>> = HashMap::new();
        for l in &limits {
            at_node.entry(l.node.as_str()).or_default().push(l);
        }
        let mut plans = HashMap::default();
        for node in at_node.keys() {
            let Ok(node) = TenantPath::parse(node) else {
                continue;
            };
            // Chains root first, then reversed to deepest first.
            let mut chains: BTreeMap<Arc<str>, Vec<Arc<Limit>>> = BTreeMap::new();
            for n in node.lineage() {
                for l in at_node.get(n.as_str()).into_iter().flatten() {
                    chains
                        .entry(l.name.clone())
                        .or_default()
                        .push(Arc::clone(l));
                }
            }
            let mut flat = Vec::new();
            let chains: Vec<Chain> = chains
                .into_iter()
                .filter_map(|(name, mut nodes)| {
                    nodes.reverse();
                    let deepest = nodes.first()?.params.clone();
                    let start = flat.len();
                    flat.extend(nodes);
                    Some(Chain {
                        name,
                        range: start..flat.len(),
                        per_ns: deepest.per_ns,
                    })
                })
                .collect();
            let min_burst = flat.iter().map(|l| l.params.burst).min().unwrap_or(0);
            let cap = (min_burst / LEASE_DIVISOR).min(MAX_BATCH);
            let plan = Plan {
                nodes: flat,
                chains,
                lease_cap: if cap >= 2 { cap } else { 0 },
            };
            plans.insert(Box::from(node.as_str()), Arc::new(plan));
        }
        QuotaModel {
            limits,
            plans,
            keyed,
            keyed_headers,
        }
    }

    /// The store keys this model's local limits use (see [`footprint`]).
    pub fn footprint(&self) -> footprint::Footprint {
        footprint::Footprint::new(
            self.limits.iter().map(|l| l.key.clone()),
            self.keyed
                .iter()
                .map(|k| (k.table().prefix.clone(), k.table().sets)),
        )
    }

    /// The configure-time housekeeping of a reload (see [`footprint`]): sets
    /// to empty every non-empty key that `previous` (the bundle this VM ran before) or
    /// the footprint recorded under `scope` uses and this model does not,
    /// records this model's footprint under `scope`, then creates or resets
    /// this model's buckets ([`Self::create_buckets`]).
    pub fn reconcile(
        &self,
        store: &dyn BucketStore,
        scope: &str,
        previous: Option<&footprint::Footprint>,
        now: Nanos,
    ) -> Result<footprint::Reconciled, StoreError> {
        let record_key = format!("{}{scope}", footprint::FOOTPRINT_KEY_PREFIX);
        let mut done = footprint::Reconciled::default();
        let mut old = match store.get(&record_key)? {
            Some((bytes, _)) => footprint::Footprint::decode(&bytes).unwrap_or_else(|_| {
                done.unreadable_record = true;
                footprint::Footprint::default()
            }),
            None => footprint::Footprint::default(),
        };
        if let Some(p) = previous {
            old.union(p);
        }
        let next = self.footprint();
        for key in old.removed_in(&next) {
            // Only keys that hold something: a set would create a missing one.
            if store.get(&key)?.is_some_and(|(v, _)| !v.is_empty()) {
                store.set(&key, b"", 0)?;
                done.emptied += 1;
            }
        }
        store.set(&record_key, &next.encode(), 0)?;
        done.created = self.create_buckets(store, now)?;
        Ok(done)
    }

    /// True if no tenant declares a local limit (keyed ones included).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.keyed.is_empty()
    }

    /// Every declared limit, parents first.
    pub fn limits(&self) -> Vec<LimitInfo> {
        self.limits
            .iter()
            .map(|l| LimitInfo {
                tenant: l.node.clone(),
                name: l.name.to_string(),
                rate: l.params.rate,
                ceil: l.params.ceil,
                burst: l.params.burst,
                per_s: l.params.per_ns / 1_000_000_000,
                key: l.key.clone(),
            })
            .collect()
    }

    /// The chains for a request to `tenant`: those of its deepest ancestor (or
    /// itself) that declares limits.
    fn plan_for(&self, tenant: &TenantPath) -> Option<&Plan> {
        self.plan_entry(tenant).map(|(_, p)| p)
    }

    /// [`QuotaModel::plan_for`] with the tenant that declares the plan.
    /// The most tokens a worker's lease of `tenant`'s plan takes (0: never
    /// leased).
    #[cfg(test)]
    pub(crate) fn lease_cap_for(&self, tenant: &TenantPath) -> u64 {
        self.plan_entry(tenant).map_or(0, |(_, p)| p.lease_cap)
    }

    fn plan_entry(&self, tenant: &TenantPath) -> Option<(&str, &Plan)> {
        tenant
            .ancestors_or_self()
            .find_map(|s| self.plans.get_key_value(s))
            .map(|(k, p)| (&**k, &**p))
    }

    /// Every shared-data key the model may touch, with full buckets at `now`.
    /// The filter sets each one that does not exist yet at configure time.
    pub fn initial_buckets(&self, now: Nanos) -> Vec<(String, Vec<u8>)> {
        self.limits
            .iter()
            .map(|l| {
                let full = l.params.full(now).encode(l.params.stamp);
                (l.key.clone(), full.to_vec())
            })
            .collect()
    }

    /// Creates every bucket (and keyed set, empty) that does not exist yet,
    /// and resets in place those that are empty or were written for other
    /// numbers, full at `now`
    /// (the filter does it at configure time, before traffic, so the "set on
    /// a missing key ignores CAS" quirk cannot lose a charge under load).
    /// Returns how many it created or reset.
    pub fn create_buckets(&self, store: &dyn BucketStore, now: Nanos) -> Result<usize, StoreError> {
        let mut created = 0;
        for l in &self.limits {
            if reset_stale(l, store, now)? {
                created += 1;
            }
        }
        // Keyed tables' sets, empty: every later write to them is then a
        // compare-and-swap (a first write to a missing key is not).
        for k in &self.keyed {
            for key in k.table().keys() {
                if store.get(&key)?.is_none() {
                    store.set(&key, b"", 0)?;
                    created += 1;
                }
            }
        }
        Ok(created)
    }

    /// Admission of one request to `tenant` costing `cost` tokens at `now`:
    /// read, decide, compare-and-swap, retried on conflict (see the module doc).
    pub fn admit(
        &self,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<QuotaDecision, StoreError> {
        let Some(plan) = self.plan_for(tenant) else {
            return Ok(QuotaDecision::unlimited());
        };
        self.admit_with_charges(plan, cost, cost, now, store)
            .map(|(d, _)| d)
    }

    /// Exact admission (no lease) that can be undone: what it charged, to
    /// give back with [`QuotaModel::refund`] (fleet limits refuse after the
    /// local ones admitted).
    pub fn admit_refundable(
        &self,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<(QuotaDecision, Option<Refund>), StoreError> {
        let Some(plan) = self
            .plan_entry(tenant)
            .and_then(|(key, _)| self.plans.get(key))
            .cloned()
        else {
            return Ok((QuotaDecision::unlimited(), None));
        };
        let (d, charges) = self.admit_with_charges(&plan, cost, cost, now, store)?;
        let refund = (d.admitted && !charges.is_empty()).then(|| Refund {
            htb: Some((plan, charges)),
            keyed: keyed::KeyedCharges::default(),
        });
        Ok((d, refund))
    }

    /// Gives back what an admission charged (each node exactly its charge).
    pub fn refund(&self, r: &Refund, store: &dyn BucketStore) -> Result<(), StoreError> {
        if let Some((plan, charges)) = &r.htb {
            for (l, c) in plan.nodes.iter().zip(charges) {
                if *c != Charge::default() {
                    refund(l, *c, store)?;
                }
            }
        }
        self.refund_keyed(&r.keyed, store)
    }

    /// The admission loop of one plan; also returns what it charged each
    /// node (empty when nothing was charged).
    /// Charges `cost` tokens; the decision returned is the one a request of
    /// `shown` tokens gets (a lease charges its batch with the request, and
    /// the request's RateLimit fields are those of the request alone: the
    /// same buckets read, only `shown` charged).
    fn admit_with_charges(
        &self,
        plan: &Plan,
        cost: u64,
        shown: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<(QuotaDecision, Vec<Charge>), StoreError> {
        let mut old = Vec::with_capacity(plan.nodes.len());
        let mut cas = Vec::with_capacity(plan.nodes.len());
        for _ in 0..MAX_ATTEMPTS {
            old.clear();
            cas.clear();
            let mut missing = false;
            for l in &plan.nodes {
                let (b, c) = read_one(l, store)?;
                missing |= b.is_none();
                old.push(b.unwrap_or_else(|| l.params.full(now)));
                cas.push(c);
            }
            if missing && cost > 0 {
                create_missing(plan, store, now)?;
                continue;
            }
            let read = (shown != cost).then(|| old.clone());
            let step = decide(plan, old.drain(..), cost, now);
            let Some(new) = step.new else {
                return Ok((step.decision, Vec::new()));
            };
            match write(plan, &cas, &new, &step.charges, store) {
                Ok(()) => {
                    let decision = match read {
                        Some(read) if step.decision.admitted => QuotaDecision {
                            admitted: true,
                            ..decide(plan, read, shown, now).decision
                        },
                        _ => step.decision,
                    };
                    return Ok((decision, step.charges));
                }
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Contended)
    }
}

/// Reads one bucket: its value and CAS token. The value is `None` when the
/// key is missing, empty (a reload removed the limit) or stamped by other
/// numbers (a reload changed the limit): [`reset_stale`] starts it afresh.
fn read_one(limit: &Limit, store: &dyn BucketStore) -> Result<(Option<Bucket>, u32), StoreError> {
    match store.get(&limit.key)? {
        None => Ok((None, 0)),
        Some((bytes, cas)) if bytes.is_empty() => Ok((None, cas)),
        Some((bytes, cas)) => {
            let (b, stamp) = Bucket::decode(&bytes)
                .map_err(|why| StoreError::Corrupt(format!("`{}`: {why}", limit.key)))?;
            if stamp != limit.params.stamp {
                return Ok((None, cas));
            }
            Ok((Some(limit.params.clamp(b)), cas))
        }
    }
}

/// Starts a bucket afresh (full at `now`) if its key is missing, empty or
/// stamped by other numbers; `true` if it did. Existing keys are reset with
/// compare-and-swap (a worker that wrote first wins; its value is current),
/// missing ones are created (a set on a missing key ignores CAS, so two
/// workers may both create one, both full: no charge is lost unless one
/// lands in between).
fn reset_stale(l: &Limit, store: &dyn BucketStore, now: Nanos) -> Result<bool, StoreError> {
    let (current, cas) = read_one(l, store)?;
    if current.is_some() {
        return Ok(false);
    }
    match store.set(&l.key, &l.params.full(now).encode(l.params.stamp), cas) {
        Ok(()) => Ok(true),
        Err(StoreError::CasMismatch) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Starts the plan's missing or stale buckets afresh (see [`reset_stale`]).
fn create_missing(plan: &Plan, store: &dyn BucketStore, now: Nanos) -> Result<(), StoreError> {
    for l in &plan.nodes {
        reset_stale(l, store, now)?;
    }
    Ok(())
}

/// What an admission charged, to undo it ([`QuotaModel::refund`]): the
/// hierarchical buckets' charges and the keyed ones.
#[derive(Debug)]
pub struct Refund {
    htb: Option<(Arc<Plan>, Vec<Charge>)>,
    keyed: keyed::KeyedCharges,
}

impl Refund {
    /// What charging `plan`'s nodes `charges` took.
    fn of(plan: Arc<Plan>, charges: Vec<Charge>) -> Refund {
        Refund {
            htb: (!charges.is_empty()).then_some((plan, charges)),
            keyed: keyed::KeyedCharges::default(),
        }
    }

    /// `htb` (from [`QuotaModel::admit_refundable`]) with keyed charges;
    /// `None` when nothing was charged.
    pub fn join(htb: Option<Refund>, keyed: keyed::KeyedCharges) -> Option<Refund> {
        let htb = htb.and_then(|r| r.htb);
        (htb.is_some() || !keyed.is_empty()).then_some(Refund { htb, keyed })
    }
}

/// What one admission charged a bucket, to refund it exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Charge {
    tokens: i128,
    ctokens: i128,
    /// The child (its slot id) whose virtual time at this node advanced by
    /// `vt` (0: none).
    slot: u32,
    vt: u64,
}

/// Writes every new bucket with the CAS token it was read with. On a failure,
/// refunds the writes already made, then returns the failure.
fn write(
    plan: &Plan,
    cas: &[u32],
    new: &[Bucket],
    charges: &[Charge],
    store: &dyn BucketStore,
) -> Result<(), StoreError> {
    for (i, ((l, b), c)) in plan.nodes.iter().zip(new).zip(cas).enumerate() {
        if let Err(e) = store.set(&l.key, &b.encode(l.params.stamp), *c) {
            for (l, charge) in plan.nodes.iter().zip(charges).take(i) {
                refund(l, *charge, store)?;
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Adds back what an abandoned attempt charged, on whatever the bucket holds now.
fn refund(limit: &Limit, charge: Charge, store: &dyn BucketStore) -> Result<(), StoreError> {
    for _ in 0..REFUND_ATTEMPTS {
        let (Some(b), cas) = read_one(limit, store)? else {
            return Ok(());
        };
        let mut back = Bucket {
            tokens: b.tokens.saturating_add(charge.tokens).min(limit.params.cap),
            ctokens: b
                .ctokens
                .saturating_add(charge.ctokens)
                .min(limit.params.ccap),
            ..b
        };
        if charge.vt > 0 {
            back.fair.unrecord(charge.slot, charge.vt);
        }
        match store.set(&limit.key, &back.encode(limit.params.stamp), cas) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Contended)
}

/// The result of the pure admission step.
#[derive(Debug)]
struct Step {
    decision: QuotaDecision,
    /// Every bucket's new value (aligned with `Plan::nodes`) when the request
    /// was admitted with a cost, or refused and noted as asking to borrow
    /// (`charges` all zero); `None` means write nothing.
    new: Option<Vec<Bucket>>,
    /// What the new values charged, aligned with `new`.
    charges: Vec<Charge>,
}

/// How the walk up one chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Node `by` lends; those below it borrow.
    Lent { by: usize },
    /// Node `at` refused (at its ceil, or the top without tokens).
    Refused { at: usize },
    /// The buckets could lend, but the child below node `at` is ahead of a
    /// sibling there and the shared buckets hold less than `want` units (the
    /// request and the sibling's reserve): it yields (see `fair`).
    Yielded { at: usize, want: i128 },
}

impl Walk {
    fn refused(&self) -> bool {
        !matches!(self, Walk::Lent { .. })
    }
}

/// Walks one chain (`nodes` and their refilled `buckets`, deepest first)
/// for `need` units at `now`: HTB's walk, then the fair-borrowing rule at
/// every node the request borrows through.
fn walk(nodes: &[Arc<Limit>], buckets: &[Bucket], need: i128, now: Nanos) -> Walk {
    let mut lender = None;
    for (i, b) in buckets.iter().enumerate() {
        if b.ctokens < need {
            return Walk::Refused { at: i };
        }
        if b.tokens >= need {
            lender = Some(i);
            break;
        }
    }
    let Some(by) = lender else {
        return Walk::Refused {
            at: buckets.len().saturating_sub(1),
        };
    };
    // The lowest node where the borrowing child is ahead of a sibling, and
    // the largest reserve asked for on the way up.
    let mut ahead: Option<(usize, u64)> = None;
    for at in 1..=by {
        let (Some(child), Some(b)) = (nodes.get(at - 1), buckets.get(at)) else {
            continue;
        };
        let Some(slot) = child.slot else { continue };
        let window = fair_window(child.params.per_ns);
        if let Some(r) = b.fair.reserve_for(slot, now, window) {
            let (from, most) = ahead.unwrap_or((at, 0));
            ahead = Some((from, most.max(r)));
        }
    }
    let Some((from, reserve)) = ahead else {
        return Walk::Lent { by };
    };
    let per = nodes.first().map(|l| l.params.per_ns).unwrap_or(1);
    let want = need.saturating_add(i128::from(reserve).saturating_mul(i128::from(per)));
    for m in from..=by {
        let (Some(l), Some(b)) = (nodes.get(m), buckets.get(m)) else {
            continue;
        };
        // Never more than a bucket can hold, never less than the request.
        let short = b.ctokens < want.min(l.params.ccap).max(need)
            || (m == by && b.tokens < want.min(l.params.cap).max(need));
        if short {
            return Walk::Yielded { at: from, want };
        }
    }
    Walk::Lent { by }
}

/// The admission decision as a pure function of the buckets read (`old`,
/// aligned with `plan.nodes`, taken by value: the children's slots are moved,
/// not copied): refill to `now`, walk, charge. Touches nothing.
fn decide(plan: &Plan, old: impl IntoIterator<Item = Bucket>, cost: u64, now: Nanos) -> Step {
    let mut state: Vec<Bucket> = plan
        .nodes
        .iter()
        .zip(old)
        .map(|(l, b)| l.params.refill(b, now))
        .collect();
    let walks: Vec<Walk> = plan
        .chains
        .iter()
        .map(|c| walk(c.of(&plan.nodes), c.of(&state), c.units(cost), now))
        .collect();
    let admitted = cost == 0 || walks.iter().all(|w| matches!(w, Walk::Lent { .. }));
    let charges = if admitted && cost > 0 {
        charge(plan, &mut state, &walks, cost, now)
    } else {
        Vec::new()
    };
    // Statuses and waits, on the state after the charge (or as refused).
    let decision = statuses(plan, &state, &walks, admitted, cost, now);
    let asked =
        !admitted && cost > 0 && note_refused_borrowers(plan, &mut state, &walks, cost, now);
    let new = ((admitted && cost > 0) || asked).then_some(state);
    Step {
        decision,
        new,
        charges,
    }
}

/// Charges an admitted request to `state`, as in tc-htb: `ctokens` of every
/// node of every chain, `tokens` from each chain's lender up; the children
/// that borrowed through a node advance their virtual time there. What each
/// node was charged, aligned with `state`.
fn charge(plan: &Plan, state: &mut [Bucket], walks: &[Walk], cost: u64, now: Nanos) -> Vec<Charge> {
    let mut charges = vec![Charge::default(); state.len()];
    for (c, w) in plan.chains.iter().zip(walks) {
        let need = c.units(cost);
        let lender = match w {
            Walk::Lent { by } => *by,
            Walk::Refused { .. } | Walk::Yielded { .. } => 0,
        };
        let nodes = c.of(&plan.nodes);
        for (i, (b, ch)) in c
            .of_mut(state)
            .iter_mut()
            .zip(c.of_mut(&mut charges))
            .enumerate()
        {
            // tc-htb: `ctokens` everywhere, `tokens` from the lender up.
            let t = if i >= lender { need } else { 0 };
            b.tokens = b.tokens.saturating_sub(t).max(FLOOR);
            b.ctokens = b.ctokens.saturating_sub(need).max(FLOOR);
            *ch = Charge {
                tokens: t,
                ctokens: need,
                ..Charge::default()
            };
            // The child below borrowed through this node: its virtual
            // time here advances by the time its own rate takes to earn
            // `need` (see `fair`).
            if !(1..=lender).contains(&i) {
                continue;
            }
            let child = nodes.get(i - 1);
            if let Some((child, slot)) = child.and_then(|l| l.slot.map(|s| (l, s))) {
                let per = child.params.per_ns;
                let inc = need.div_euclid(i128::from(child.params.rate.max(1))).max(1);
                let inc = u64::try_from(inc).unwrap_or(u64::MAX);
                b.fair
                    .record(slot, inc, cost, now, fair_window(per), fair_lag(per, inc));
                ch.slot = slot;
                ch.vt = inc;
            }
        }
    }
    charges
}

/// One chain's status after the decision, and how long a request of this
/// cost waits on it (`None`: forever).
fn chain_status(
    c: &Chain,
    plan: &Plan,
    state: &[Bucket],
    w: &Walk,
    admitted: bool,
    cost: u64,
    now: Nanos,
) -> (LimitStatus, Option<u64>) {
    let nodes = c.of(&plan.nodes);
    let bs = c.of(state);
    let per_request = cost.max(1);
    let r = available(bs, c.per_ns);
    let window_s = (c.per_ns / 1_000_000_000).max(1);
    // A request that yields waits for the reserve as well.
    let extra = match w {
        Walk::Yielded { want, .. } => want.saturating_sub(c.units(cost)).max(0),
        _ => 0,
    };
    let wait = wait_for(nodes, bs, c.units(per_request).saturating_add(extra), now);
    let (rate, burst) = nodes
        .first()
        .map(|l| (l.params.rate, l.params.burst))
        .unwrap_or((0, 0));
    // Back to a full quota: `q` whole requests of this cost.
    let full = rate - rate % per_request;
    let reset_s = if full == 0 || r >= full {
        0
    } else {
        wait_for(nodes, bs, c.units(full), now)
            .map(ceil_seconds)
            .unwrap_or(window_s)
    };
    let status = LimitStatus {
        name: Arc::clone(&c.name),
        rate,
        burst,
        window_s,
        remaining: r,
        reset_s,
        borrowed: admitted && matches!(w, Walk::Lent { by } if *by > 0),
    };
    (status, wait)
}

/// The quota decision: every chain's status, and for a refusal the chain
/// that waits longest (its name, the node where its walk stopped, when a
/// request could pass).
fn statuses(
    plan: &Plan,
    state: &[Bucket],
    walks: &[Walk],
    admitted: bool,
    cost: u64,
    now: Nanos,
) -> QuotaDecision {
    let mut remaining = u64::MAX;
    let mut limits = Vec::with_capacity(plan.chains.len());
    // (wait, chain index) of the refusal with the longest wait; `None` waits forever.
    let mut worst: Option<(Option<u64>, usize)> = None;
    let mut retry_s = 0;
    for (ci, (c, w)) in plan.chains.iter().zip(walks).enumerate() {
        let (status, wait) = chain_status(c, plan, state, w, admitted, cost, now);
        remaining = remaining.min(status.remaining);
        if w.refused() {
            let t = wait.map(ceil_seconds).unwrap_or(status.window_s);
            retry_s = retry_s.max(t.max(1));
            if worst.is_none_or(|(longest, _)| waits_longer(wait, longest)) {
                worst = Some((wait, ci));
            }
        }
        limits.push(status);
    }
    let (limit, tenant) = match worst {
        Some((_, ci)) if !admitted => refusing_node(plan, walks, ci),
        _ => (None, None),
    };
    QuotaDecision {
        admitted,
        limit,
        tenant,
        remaining: if remaining == u64::MAX { 0 } else { remaining },
        retry_after_s: if admitted { 0 } else { retry_s },
        admissible_at: match worst {
            Some((Some(wait), _)) if !admitted => Some(now.saturating_add(wait)),
            _ => None,
        },
        cost,
        limits,
    }
}

/// True when waiting `a` is longer than waiting `b` (`None`: forever).
fn waits_longer(a: Option<u64>, b: Option<u64>) -> bool {
    match (a, b) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

/// The name of refusing chain `ci` and the node where its walk stopped.
fn refusing_node(plan: &Plan, walks: &[Walk], ci: usize) -> (Option<String>, Option<TenantPath>) {
    let chain = plan.chains.get(ci);
    let node = match (chain, walks.get(ci)) {
        (Some(c), Some(Walk::Refused { at } | Walk::Yielded { at, .. })) => {
            c.of(&plan.nodes).get(*at).map(|l| l.node.clone())
        }
        _ => None,
    };
    (chain.map(|c| c.name.to_string()), node)
}

/// A refused request that wanted to borrow notes its child as asking at the
/// nodes it tried to borrow through (see `Fair::ask`). True when that
/// changed something (the state is then written).
fn note_refused_borrowers(
    plan: &Plan,
    state: &mut [Bucket],
    walks: &[Walk],
    cost: u64,
    now: Nanos,
) -> bool {
    let mut asked = false;
    for (c, w) in plan.chains.iter().zip(walks) {
        let Walk::Refused { at } = *w else { continue };
        // Node `i` (1..=at) was asked to lend to its child, node `i - 1`.
        let (nodes, buckets) = (c.of(&plan.nodes), c.of_mut(state));
        for (child, b) in nodes.iter().zip(buckets.iter_mut().skip(1)).take(at) {
            if let Some(slot) = child.slot {
                asked |= b
                    .fair
                    .ask(slot, cost, now, fair_window(child.params.per_ns));
            }
        }
    }
    asked
}

/// Whole tokens one lender could still give: the best, over the nodes of a
/// chain, of its `tokens` bounded by the `ctokens` of every node up to it.
fn available(bs: &[Bucket], per_ns: u64) -> u64 {
    let mut ceil_room = i128::MAX;
    let mut best = i128::MIN;
    for b in bs {
        ceil_room = ceil_room.min(b.ctokens);
        best = best.max(ceil_room.min(b.tokens));
    }
    if best <= 0 {
        return 0;
    }
    u64::try_from(best / i128::from(per_ns.max(1))).unwrap_or(u64::MAX)
}

/// Nanoseconds until the walk would admit `need` units with no other traffic,
/// `None` if it never can (the cost exceeds a bucket).
fn wait_for(nodes: &[Arc<Limit>], bs: &[Bucket], need: i128, now: Nanos) -> Option<u64> {
    let mut ceil_wait = Some(0u64);
    let mut best: Option<u64> = None;
    for (l, b) in nodes.iter().zip(bs) {
        ceil_wait = match (ceil_wait, l.params.wait_ctokens(b, need, now)) {
            (Some(a), Some(w)) => Some(a.max(w)),
            _ => None,
        };
        let lend = match (ceil_wait, l.params.wait_tokens(b, need, now)) {
            (Some(a), Some(w)) => Some(a.max(w)),
            _ => None,
        };
        best = match (best, lend) {
            (Some(a), Some(w)) => Some(a.min(w)),
            (a, w) => a.or(w),
        };
    }
    best
}
