//! Worker leases: a worker (one Wasm VM) charges a batch of tokens to the
//! shared buckets in one admission and spends them locally, so most requests
//! touch no shared data.
//!
//! - A lease belongs to one plan (the chains of requests to one tenant). It is
//!   charged through the ordinary admission (the same CAS, the same HTB walk)
//!   with cost `cost + B`: the request that took it and `B` tokens more.
//!   Requests to that tenant then spend from it while it holds enough tokens
//!   and has not expired.
//! - If the batch cannot be admitted, the request is admitted alone (cost
//!   `cost`, no lease): batching never refuses what exact admission admits.
//! - `B` adapts: it starts at 1 and doubles each time a lease is used up
//!   before it expires, halves when one expires with tokens left, and never
//!   exceeds the plan's cap: `min(burst) / LEASE_DIVISOR` over the plan's
//!   nodes, at most [`MAX_BATCH`]. Limits with a burst under
//!   `2 * LEASE_DIVISOR` tokens are never leased (`B` = 0): they stay exact.
//! - Unspent tokens go back to the buckets they were charged to (exactly:
//!   the same units on the same nodes) when the lease expires
//!   ([`LEASE_TTL_NS`]), when a request needs more than it holds, on a tick
//!   ([`Leases::return_expired`]) and on reload ([`Leases::return_all`]).
//! - A refusal is remembered until the moment it could pass (nanoseconds, not
//!   the rounded `Retry-After`): requests to that tenant in between are
//!   refused without reading shared data.
//!
//! Accounting, per bucket: charged − returned = admitted + outstanding, in
//! exact units. No over-admission: a token is charged before it is spent.
//! Under-admission: at most `W × B` tokens per bucket sit in the leases of `W`
//! workers, and go back within the lease TTL; a remembered refusal may refuse
//! a request that tokens returned by another worker in the meantime would
//! have admitted.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

use super::store::KeyHasher;
use super::{BucketStore, Plan};
use super::{Charge, Nanos, QuotaDecision, QuotaModel, Refund, StoreError};
use crate::tenant::TenantPath;

/// Largest batch a lease takes.
pub const MAX_BATCH: u64 = 64;
/// A plan's batch is at most its smallest burst divided by this.
pub const LEASE_DIVISOR: u64 = 64;
/// A lease's life.
pub const LEASE_TTL_NS: Nanos = 100_000_000;

/// One worker's leases and remembered refusals. Lives with the engine of
/// one VM; the mutex is never contended in Envoy (one thread per VM).
#[derive(Debug, Default)]
pub struct Leases {
    /// By plan key (tenant paths of the bundle, not client input: the fast
    /// hasher of the store).
    state: Mutex<HashMap<Box<str>, PlanState, BuildHasherDefault<KeyHasher>>>,
    /// Leases charged so far.
    refills: std::sync::atomic::AtomicU64,
}

impl PlanState {
    /// The answer without touching the store: a remembered refusal (still
    /// refused until it could pass), or tokens spent from a live lease.
    fn local(&mut self, cost: u64, now: Nanos) -> Option<QuotaDecision> {
        if let Some((c, until, d)) = &self.refused {
            if *c == cost && now < *until {
                let mut d = d.clone();
                d.retry_after_s = super::bucket::ceil_seconds(until - now).max(1);
                return Some(d);
            }
            self.refused = None;
        }
        let l = self.lease.as_mut()?;
        if now < l.expires && l.tokens >= cost {
            l.tokens -= cost;
            return Some(spent(&l.snapshot, l.batch - l.tokens, cost));
        }
        None
    }
}

/// Where a leased admission took its tokens from
/// ([`QuotaModel::admit_leased_taking`]).
#[derive(Debug)]
pub enum Taken {
    /// From this worker's lease of the plan.
    Lease,
    /// Charged to the buckets for this request alone (what to refund, when
    /// anything was charged).
    Alone(Option<Refund>),
    /// Nothing: refused, free, or no limit.
    Nothing,
}

#[derive(Debug, Default)]
struct PlanState {
    /// The batch the next lease takes (0: this plan is never leased).
    batch: u64,
    lease: Option<Lease>,
    /// A refusal and the moment a request of its cost could pass.
    refused: Option<(u64, Nanos, QuotaDecision)>,
}

#[derive(Debug)]
struct Lease {
    /// Unspent tokens.
    tokens: u64,
    expires: Nanos,
    /// What one token of this lease charged each node (aligned with
    /// `Plan::nodes`): returned `tokens` times when the lease ends.
    per_token: Vec<Charge>,
    /// The tokens the lease took beyond its first request.
    batch: u64,
    /// The decision of the lease's first request (as if only it had been
    /// charged), for the RateLimit fields of the requests it serves.
    snapshot: QuotaDecision,
}

impl QuotaModel {
    /// Admission of one request through this worker's leases: spends from a
    /// lease when it can (no shared-data access), else charges a new batch
    /// (see the module docs). The decision is the one exact admission would
    /// give, except for the documented under-admission.
    pub fn admit_leased(
        &self,
        leases: &Leases,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<QuotaDecision, StoreError> {
        self.admit_leased_taking(leases, tenant, cost, now, store)
            .map(|(d, _)| d)
    }

    /// [`QuotaModel::admit_leased`], saying where an admitted request's
    /// tokens came from, so that a later refusal (mode `assigned`'s fleet
    /// buckets) can give them back: [`Taken::Lease`] to this worker's lease
    /// ([`QuotaModel::unspend_leased`]), [`Taken::Alone`] exactly to the
    /// buckets ([`QuotaModel::refund`]).
    pub fn admit_leased_taking(
        &self,
        leases: &Leases,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<(QuotaDecision, Taken), StoreError> {
        let Some((key, plan)) = self.plan_entry(tenant) else {
            return Ok((QuotaDecision::unlimited(), Taken::Nothing));
        };
        let alone = |(d, refund): (QuotaDecision, Option<Refund>)| (d, Taken::Alone(refund));
        if cost == 0 {
            return self
                .admit(tenant, 0, now, store)
                .map(|d| (d, Taken::Nothing));
        }
        let Ok(mut all) = leases.state.lock() else {
            return self.admit_refundable(tenant, cost, now, store).map(alone);
        };
        // Look up first: `entry` would allocate the key on every request.
        if !all.contains_key(key) {
            all.insert(
                Box::from(key),
                PlanState {
                    batch: u64::from(plan.lease_cap > 0),
                    ..PlanState::default()
                },
            );
        }
        let Some(st) = all.get_mut(key) else {
            return self.admit_refundable(tenant, cost, now, store).map(alone);
        };
        match st.local(cost, now) {
            Some(d) => {
                // A remembered refusal, or tokens spent from the lease.
                let taken = if d.admitted {
                    Taken::Lease
                } else {
                    Taken::Nothing
                };
                Ok((d, taken))
            }
            None => {
                let (d, charges) = self.recharge(plan, st, &leases.refills, cost, now, store)?;
                let taken = match charges {
                    Some(charges) => Taken::Alone(
                        self.plans
                            .get(key)
                            .map(|p| Refund::of(std::sync::Arc::clone(p), charges)),
                    ),
                    None if d.admitted => Taken::Lease,
                    None => Taken::Nothing,
                };
                Ok((d, taken))
            }
        }
    }

    /// Gives `cost` tokens back to the live lease of `tenant`'s plan (a
    /// request served by it that a later check refused); `false` when there
    /// is none (nothing to give back to).
    pub fn unspend_leased(
        &self,
        leases: &Leases,
        tenant: &TenantPath,
        cost: u64,
        now: Nanos,
    ) -> bool {
        let Some((key, _)) = self.plan_entry(tenant) else {
            return false;
        };
        let Ok(mut all) = leases.state.lock() else {
            return false;
        };
        match all
            .get_mut(key)
            .and_then(|st| st.lease.as_mut())
            .filter(|l| now < l.expires)
        {
            Some(l) => {
                l.tokens = l.tokens.saturating_add(cost);
                true
            }
            None => false,
        }
    }

    /// A request the worker's plan state cannot answer alone: what is left
    /// of the lease goes back, the batch adapts (halved after a lease
    /// expired unspent, doubled after one was spent before expiring), and a
    /// new lease is charged with the request; when the batch does not fit,
    /// the request alone.
    fn recharge(
        &self,
        plan: &Plan,
        st: &mut PlanState,
        refills: &std::sync::atomic::AtomicU64,
        cost: u64,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<(QuotaDecision, Option<Vec<Charge>>), StoreError> {
        if let Some(l) = st.lease.take() {
            if l.tokens > 0 {
                self.return_tokens(plan, &l, store)?;
                if now >= l.expires {
                    st.batch = (st.batch / 2).max(1);
                }
            } else if now < l.expires {
                st.batch = (st.batch * 2).min(plan.lease_cap).max(1);
            }
        }
        let extra = if plan.lease_cap == 0 { 0 } else { st.batch };
        if extra > 0 {
            let (d, charges) = self.admit_with_charges(plan, cost + extra, cost, now, store)?;
            if d.admitted {
                let per_token = charges
                    .iter()
                    .map(|c| Charge {
                        tokens: c.tokens / i128::from(cost + extra),
                        ctokens: c.ctokens / i128::from(cost + extra),
                        slot: c.slot,
                        vt: c.vt / (cost + extra),
                    })
                    .collect();
                refills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.lease = Some(Lease {
                    tokens: extra,
                    expires: now.saturating_add(LEASE_TTL_NS),
                    per_token,
                    batch: extra,
                    snapshot: d.clone(),
                });
                return Ok((d, None));
            }
            // The batch did not fit: admit this request alone.
            st.batch = 1;
        }
        let (d, charges) = self.admit_with_charges(plan, cost, cost, now, store)?;
        if !d.admitted {
            if let Some(until) = d.admissible_at {
                st.refused = Some((cost, until, d.clone()));
            }
            return Ok((d, None));
        }
        Ok((d, Some(charges)))
    }

    /// Gives a lease's unspent tokens back to the nodes they were charged to.
    fn return_tokens(
        &self,
        plan: &Plan,
        lease: &Lease,
        store: &dyn BucketStore,
    ) -> Result<(), StoreError> {
        let n = i128::from(lease.tokens);
        for (l, c) in plan.nodes.iter().zip(&lease.per_token) {
            let back = Charge {
                tokens: c.tokens.saturating_mul(n),
                ctokens: c.ctokens.saturating_mul(n),
                slot: c.slot,
                vt: c.vt.saturating_mul(lease.tokens),
            };
            if back != Charge::default() {
                super::refund(l, back, store)?;
            }
        }
        Ok(())
    }
}

/// The decision of a request served from a lease: the decision of the
/// lease's first request, less the tokens spent from the lease since
/// (`used`): what an exact admission of each request would have shown, the
/// buckets' refill since the lease was charged aside.
fn spent(snapshot: &QuotaDecision, used: u64, cost: u64) -> QuotaDecision {
    let mut d = snapshot.clone();
    d.cost = cost;
    d.admitted = true;
    d.remaining = d.remaining.saturating_sub(used);
    for l in &mut d.limits {
        l.remaining = l.remaining.saturating_sub(used);
    }
    d
}

impl Leases {
    /// Returns the unspent tokens of every expired lease (the filter calls it
    /// on its tick). Returns how many tokens went back.
    pub fn return_expired(
        &self,
        model: &QuotaModel,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<u64, StoreError> {
        self.return_where(model, store, |l| now >= l.expires)
    }

    /// Returns the unspent tokens of every lease (on reload).
    pub fn return_all(
        &self,
        model: &QuotaModel,
        store: &dyn BucketStore,
    ) -> Result<u64, StoreError> {
        self.return_where(model, store, |_| true)
    }

    fn return_where(
        &self,
        model: &QuotaModel,
        store: &dyn BucketStore,
        due: impl Fn(&Lease) -> bool,
    ) -> Result<u64, StoreError> {
        let Ok(mut all) = self.state.lock() else {
            return Ok(0);
        };
        let mut returned = 0;
        for (key, st) in all.iter_mut() {
            let Some(plan) = model.plans.get(key) else {
                st.lease = None;
                continue;
            };
            if st.lease.as_ref().is_some_and(&due) {
                if let Some(l) = st.lease.take() {
                    returned += l.tokens;
                    model.return_tokens(plan, &l, store)?;
                    if l.tokens > 0 {
                        st.batch = (st.batch / 2).max(1);
                    }
                }
            }
        }
        Ok(returned)
    }

    /// How many leases this worker has charged.
    pub fn refills(&self) -> u64 {
        self.refills.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unspent tokens per plan (tenant key): for tests and metrics.
    pub fn outstanding(&self) -> Vec<(String, u64)> {
        self.state
            .lock()
            .map(|all| {
                all.iter()
                    .filter_map(|(k, st)| st.lease.as_ref().map(|l| (k.to_string(), l.tokens)))
                    .collect()
            })
            .unwrap_or_default()
    }
}
