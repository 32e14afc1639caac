//! Hierarchical quotas (SPEC section 4): the token buckets of Linux HTB
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
//! # Admission
//!
//! For a request costing `cost` tokens, every chain is walked from its deepest
//! node up:
//! - a node whose `ctokens < cost` is at its ceil: the request is refused;
//! - a node whose `tokens >= cost` *lends*: the walk stops;
//! - otherwise the node borrows from the next node up; the top node of a chain
//!   cannot borrow, so it refuses.
//!
//! If every chain admits, the request is charged, as in tc-htb's
//! `htb_charge_class`: `ctokens` of every node of every chain, `tokens` of the
//! lender and the nodes above it. The borrowers below the lender keep their
//! `tokens`, because the tokens came from the lender: a tenant that borrowed
//! runs up no debt against its own guarantee, so it has its rate again as soon
//! as it slows down to it. If any chain refuses, nothing is charged anywhere
//! (all-or-nothing across names and levels). A cost of 0 is admitted without
//! touching the buckets.
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
//! `tenantgate:quota:v1:<tenant>:<name>:<hash>`, where `<hash>` is 8 hex
//! digits of SHA-256 over the limit's `rate`, `ceil`, `burst` and `per`. A
//! reload that leaves a node's limit unchanged keeps its key and so its state;
//! a changed limit starts from full buckets under a new key (old keys stay:
//! Envoy never deletes shared data). The value is 41 bytes: a version tag
//! (`1`), `tokens` and `ctokens` as little-endian `i128`, `last` as
//! little-endian `u64` nanoseconds. A value that does not decode is
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
//! the value it was computed from, so concurrent workers cannot over-admit.
//! The documented slack:
//! - *key creation*: a set on a missing key ignores CAS (an Envoy quirk), so
//!   two VMs that both find a key missing both create it, full; a charge made
//!   between the two creations is lost. At most `(VMs - 1) * cost` per key,
//!   once per key's life; the filter pre-creates every key at configure time
//!   ([`QuotaModel::initial_buckets`], set only where `get` finds nothing),
//!   which makes it vanish in steady state;
//! - *new limits*: a changed limit starts with full buckets (one extra burst);
//! - failures only ever err towards refusing: a refund that cannot complete
//!   leaves a charge behind, and a VM whose clock lags another's refills
//!   nothing until it catches up.
//!
//! So a subtree admits at most `ceil * window + ceil bucket + the bursts of
//! its descendants` over any window (the *cap* invariant the property tests
//! check); the descendants' bursts appear because a child lending its own
//! tokens is, as in tc-htb, not held back by its parent's ceil (that is what
//! makes the guarantee hold).

mod bucket;
mod clock;
mod spec;
mod store;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::diag::Diagnostic;
use crate::tenant::TenantPath;
use bucket::{ceil_seconds, Bucket, FLOOR};
use spec::Limit;

pub use clock::{Clock, FakeClock, SystemClock};
pub use store::{BucketStore, MemoryStore, StoreError};

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

/// Admission attempts before giving up with [`StoreError::Contended`].
pub const MAX_ATTEMPTS: usize = 16;
/// Attempts to refund one bucket after a lost race.
const REFUND_ATTEMPTS: usize = 64;

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
    /// Every node's limits, parents first.
    limits: Vec<Arc<Limit>>,
    /// For each tenant that declares limits: the chains of a request to it or
    /// to a descendant that declares none.
    plans: HashMap<Box<str>, Arc<Plan>>,
}

/// The chains that apply to requests to one tenant.
#[derive(Debug)]
struct Plan {
    /// One per limit name, sorted by name.
    chains: Vec<Chain>,
    /// `RateLimit-Policy` value.
    policy: String,
}

#[derive(Debug)]
struct Chain {
    name: Arc<str>,
    /// Deepest first. Never empty.
    nodes: Vec<Arc<Limit>>,
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
    /// `RateLimit-Policy` field: `"rps";q=100;w=1` per limit name.
    pub ratelimit_policy: Option<String>,
    /// `RateLimit` field: `"rps";r=0;t=1` per limit name.
    pub ratelimit: Option<String>,
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
            ratelimit_policy: None,
            ratelimit: None,
        }
    }
}

impl QuotaModel {
    /// Builds and validates the limits of every tenant. `inputs` come parents
    /// first; tenants without limits may be absent.
    pub fn build(inputs: &[LimitsInput<'_>]) -> Result<QuotaModel, Vec<Diagnostic>> {
        let limits = spec::compile(inputs)?;
        let mut at_node: HashMap<&str, Vec<&Arc<Limit>>> = HashMap::new();
        for l in &limits {
            at_node.entry(l.node.as_str()).or_default().push(l);
        }
        let mut plans = HashMap::new();
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
            let chains: Vec<Chain> = chains
                .into_iter()
                .map(|(name, mut nodes)| {
                    nodes.reverse();
                    Chain { name, nodes }
                })
                .collect();
            let policy = chains
                .iter()
                .filter_map(|c| {
                    c.nodes.first().map(|l| {
                        format!(
                            "\"{}\";q={};w={}",
                            c.name,
                            l.params.rate,
                            l.params.per_ns / 1_000_000_000
                        )
                    })
                })
                .collect::<Vec<_>>()
                .join(", ");
            plans.insert(Box::from(node.as_str()), Arc::new(Plan { chains, policy }));
        }
        Ok(QuotaModel { limits, plans })
    }

    /// Builds the model from the `tenant.json` files of a bundle (the quota
    /// part of what `Engine::new` validates).
    pub fn from_bundle(bundle: &crate::Bundle) -> Result<QuotaModel, Vec<Diagnostic>> {
        let mut errors = Vec::new();
        let mut configs = Vec::new();
        for t in &bundle.tenants {
            if let Some(src) = &t.config {
                match serde_json::from_str::<crate::bundle::TenantConfig>(&src.text) {
                    Ok(c) => configs.push((&t.path, src, c.limits)),
                    Err(e) => errors.push(crate::bundle::json_error(&src.file, &e)),
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let inputs: Vec<LimitsInput<'_>> = configs
            .iter()
            .filter(|(_, _, limits)| !limits.is_empty())
            .map(|(tenant, src, limits)| LimitsInput {
                tenant,
                file: &src.file,
                text: &src.text,
                limits,
            })
            .collect();
        Self::build(&inputs)
    }

    /// True if no tenant declares a limit.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
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
        let mut s = tenant.as_str();
        loop {
            if let Some(p) = self.plans.get(s) {
                return Some(p);
            }
            s = match s.rfind('/') {
                _ if s == "/" => return None,
                Some(0) => "/",
                Some(i) => s.get(..i)?,
                None => return None,
            };
        }
    }

    /// The `RateLimit-Policy` value for requests to `tenant`, `None` if no
    /// limit applies.
    pub fn policy_header(&self, tenant: &TenantPath) -> Option<String> {
        self.plan_for(tenant).map(|p| p.policy.clone())
    }

    /// Every shared-data key the model may touch, with full buckets at `now`.
    /// The filter sets each one that does not exist yet at configure time.
    pub fn initial_buckets(&self, now: Nanos) -> Vec<(String, Vec<u8>)> {
        self.limits
            .iter()
            .map(|l| (l.key.clone(), l.params.full(now).encode().to_vec()))
            .collect()
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
        for _ in 0..MAX_ATTEMPTS {
            let read = read(plan, store)?;
            let missing = read.iter().flatten().any(|(b, _)| b.is_none());
            if missing && cost > 0 {
                create_missing(plan, &read, now, store)?;
                continue;
            }
            let old: Vec<Vec<Bucket>> = plan
                .chains
                .iter()
                .zip(&read)
                .map(|(c, r)| {
                    c.nodes
                        .iter()
                        .zip(r)
                        .map(|(l, (b, _))| b.unwrap_or_else(|| l.params.full(now)))
                        .collect()
                })
                .collect();
            let step = decide(plan, &old, cost, now);
            let Some(new) = step.new else {
                return Ok(step.decision);
            };
            match write(plan, &read, &new, &step.charges, store) {
                Ok(()) => return Ok(step.decision),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Contended)
    }
}

/// A bucket as read: its value (`None` if the key is missing) and CAS token.
type Read = (Option<Bucket>, u32);

fn read(plan: &Plan, store: &dyn BucketStore) -> Result<Vec<Vec<Read>>, StoreError> {
    plan.chains
        .iter()
        .map(|c| c.nodes.iter().map(|l| read_one(l, store)).collect())
        .collect()
}

fn read_one(limit: &Limit, store: &dyn BucketStore) -> Result<Read, StoreError> {
    match store.get(&limit.key)? {
        None => Ok((None, 0)),
        Some((bytes, cas)) => {
            let b = Bucket::decode(&bytes)
                .map_err(|why| StoreError::Corrupt(format!("`{}`: {why}", limit.key)))?;
            Ok((Some(limit.params.clamp(b)), cas))
        }
    }
}

fn create_missing(
    plan: &Plan,
    read: &[Vec<Read>],
    now: Nanos,
    store: &dyn BucketStore,
) -> Result<(), StoreError> {
    for (c, r) in plan.chains.iter().zip(read) {
        for (l, (b, _)) in c.nodes.iter().zip(r) {
            if b.is_none() {
                store.set(&l.key, &l.params.full(now).encode(), 0)?;
            }
        }
    }
    Ok(())
}

/// What one admission charged a bucket, to refund it exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Charge {
    tokens: i128,
    ctokens: i128,
}

fn write(
    plan: &Plan,
    read: &[Vec<Read>],
    new: &[Vec<Bucket>],
    charges: &[Vec<Charge>],
    store: &dyn BucketStore,
) -> Result<(), StoreError> {
    let mut written: Vec<(&Limit, Charge)> = Vec::new();
    for (((c, r), n), ch) in plan.chains.iter().zip(read).zip(new).zip(charges) {
        for (((l, (_, cas)), b), charge) in c.nodes.iter().zip(r).zip(n).zip(ch) {
            if let Err(e) = store.set(&l.key, &b.encode(), *cas) {
                for (l, charge) in written {
                    refund(l, charge, store)?;
                }
                return Err(e);
            }
            written.push((l, *charge));
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
        let back = Bucket {
            tokens: b.tokens.saturating_add(charge.tokens).min(limit.params.cap),
            ctokens: b
                .ctokens
                .saturating_add(charge.ctokens)
                .min(limit.params.ccap),
            last: b.last,
        };
        match store.set(&limit.key, &back.encode(), cas) {
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
    /// Every bucket's new value (chain-major, like the input), when the
    /// request was admitted with a cost; `None` means write nothing.
    new: Option<Vec<Vec<Bucket>>>,
    /// What the new values charged, aligned with `new`.
    charges: Vec<Vec<Charge>>,
}

/// How the walk up one chain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Node `by` lends; those below it borrow.
    Lent { by: usize },
    /// Node `at` refused (at its ceil, or the top without tokens).
    Refused { at: usize },
}

fn walk(buckets: &[Bucket], need: i128) -> Walk {
    let mut at = 0;
    for (i, b) in buckets.iter().enumerate() {
        at = i;
        if b.ctokens < need {
            return Walk::Refused { at: i };
        }
        if b.tokens >= need {
            return Walk::Lent { by: i };
        }
    }
    Walk::Refused { at }
}

/// The admission decision as a pure function of the buckets read (`old`,
/// aligned with `plan.chains`): refill to `now`, walk, charge. Touches nothing.
fn decide(plan: &Plan, old: &[Vec<Bucket>], cost: u64, now: Nanos) -> Step {
    let mut state: Vec<Vec<Bucket>> = plan
        .chains
        .iter()
        .zip(old)
        .map(|(c, bs)| {
            c.nodes
                .iter()
                .zip(bs)
                .map(|(l, b)| l.params.refill(*b, now))
                .collect()
        })
        .collect();
    let needs: Vec<i128> = plan
        .chains
        .iter()
        .map(|c| c.nodes.first().map(|l| l.params.units(cost)).unwrap_or(0))
        .collect();
    let walks: Vec<Walk> = state
        .iter()
        .zip(&needs)
        .map(|(bs, need)| walk(bs, *need))
        .collect();
    let admitted = cost == 0 || walks.iter().all(|w| matches!(w, Walk::Lent { .. }));
    let mut charges = Vec::new();
    let mut changed = false;
    if admitted && cost > 0 {
        for ((bs, need), w) in state.iter_mut().zip(&needs).zip(&walks) {
            let lender = match w {
                Walk::Lent { by } => *by,
                Walk::Refused { .. } => 0,
            };
            let mut ch = Vec::with_capacity(bs.len());
            for (i, b) in bs.iter_mut().enumerate() {
                let t = if i >= lender { *need } else { 0 };
                b.tokens = b.tokens.saturating_sub(t).max(FLOOR);
                b.ctokens = b.ctokens.saturating_sub(*need).max(FLOOR);
                ch.push(Charge {
                    tokens: t,
                    ctokens: *need,
                });
            }
            charges.push(ch);
        }
        changed = true;
    }

    // Headers and waits, on the state after the charge (or as refused).
    let mut remaining = u64::MAX;
    let mut ratelimit = Vec::with_capacity(plan.chains.len());
    let mut worst: Option<(Option<u64>, usize)> = None; // (wait, chain) of the longest refusal
    let mut retry_s = 0;
    for (ci, ((chain, bs), need)) in plan.chains.iter().zip(&state).zip(&needs).enumerate() {
        let window_s = chain
            .nodes
            .first()
            .map(|l| l.params.per_ns / 1_000_000_000)
            .unwrap_or(1)
            .max(1);
        let r = available(chain, bs);
        let need = if cost == 0 {
            chain.nodes.first().map(|l| l.params.units(1)).unwrap_or(1)
        } else {
            *need
        };
        let wait = wait_for(chain, bs, need, now);
        let t = wait.map(ceil_seconds).unwrap_or(window_s);
        remaining = remaining.min(r);
        ratelimit.push(format!("\"{}\";r={r};t={t}", chain.name));
        if let Some(Walk::Refused { .. }) = walks.get(ci) {
            retry_s = retry_s.max(t.max(1));
            let longer = match worst {
                None => true,
                Some((w, _)) => match (wait, w) {
                    (None, Some(_)) => true,
                    (Some(a), Some(b)) => a > b,
                    _ => false,
                },
            };
            if longer {
                worst = Some((wait, ci));
            }
        }
    }
    let (limit, tenant) = match worst {
        Some((_, ci)) if !admitted => {
            let chain = plan.chains.get(ci);
            let node = match (chain, walks.get(ci)) {
                (Some(c), Some(Walk::Refused { at })) => c.nodes.get(*at).map(|l| l.node.clone()),
                _ => None,
            };
            (chain.map(|c| c.name.to_string()), node)
        }
        _ => (None, None),
    };
    let decision = QuotaDecision {
        admitted,
        limit,
        tenant,
        remaining: if remaining == u64::MAX { 0 } else { remaining },
        retry_after_s: if admitted { 0 } else { retry_s },
        ratelimit_policy: Some(plan.policy.clone()),
        ratelimit: Some(ratelimit.join(", ")),
    };
    Step {
        decision,
        new: changed.then_some(state),
        charges,
    }
}

/// Whole tokens one lender could still give: the best, over the nodes of the
/// chain, of its `tokens` bounded by the `ctokens` of every node up to it.
fn available(chain: &Chain, bs: &[Bucket]) -> u64 {
    let mut ceil_room = i128::MAX;
    let mut best = i128::MIN;
    for b in bs {
        ceil_room = ceil_room.min(b.ctokens);
        best = best.max(ceil_room.min(b.tokens));
    }
    chain
        .nodes
        .first()
        .map(|l| l.params.whole_tokens(best))
        .unwrap_or(0)
}

/// Nanoseconds until the walk would admit `need` units with no other traffic,
/// `None` if it never can (the cost exceeds a bucket).
fn wait_for(chain: &Chain, bs: &[Bucket], need: i128, now: Nanos) -> Option<u64> {
    let mut ceil_wait = Some(0u64);
    let mut best: Option<u64> = None;
    for (l, b) in chain.nodes.iter().zip(bs) {
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
