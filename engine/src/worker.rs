//! One worker's view of a compiled bundle: the [`Engine`] (shared, immutable)
//! and what changes as the worker decides (its decision cache, quota leases,
//! batched fleet state, the keyed limits' fingerprint seed, decision ids and
//! per-limit metric counts). A proxy adapter keeps one `Worker` per worker
//! thread or VM and per bundle; `serve` and `check` keep one for all their
//! requests (every part is safe to share between threads).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::cache::DecisionCache;
use crate::decision::Decision;
use crate::engine::Engine;
use crate::fleet::FleetState;
use crate::http::DecisionIds;
use crate::metrics::{Layout, Tally};
use crate::quota::keyed::{Fingerprint, KeyedOutcome};
use crate::quota::{BucketStore, Leases};
use crate::request::Request;
use crate::settings::FleetMode;

/// A compiled bundle and one worker's mutable state over it.
#[derive(Debug)]
pub struct Worker {
    pub(crate) engine: Arc<Engine>,
    cache: DecisionCache,
    /// This worker's quota leases (see `quota::Leases`).
    leases: Leases,
    /// This worker's batched fleet-limit state (see `quota::FleetState`).
    pub(crate) fleet: FleetState,
    /// The process's secret for keyed limits' fingerprints, read from (or
    /// put in) the store at the first keyed admission.
    fingerprint: OnceLock<Fingerprint>,
    /// Ids for decisions that block or are audited; `None`: no ids (`check`,
    /// whose output must not change from run to run).
    pub(crate) ids: Option<DecisionIds>,
    /// This worker's per-limit counts since the last flush (of the series
    /// of [`Engine::layout`]).
    pub(crate) tally: Mutex<Tally>,
    /// Requests decided (the decision-time histogram samples one in
    /// [`crate::metrics::names::DECISION_TIME_SAMPLE`]).
    pub(crate) requests: AtomicU64,
    /// Whether the host keeps `info` lines: audit lines are built only then.
    pub(crate) logs_info: AtomicBool,
    /// When this worker last logged a failed fleet call (at most one a second).
    pub(crate) last_fleet_log: AtomicU64,
}

/// A worker reads as its bundle: `worker.settings()`, `worker.map_request(..)`.
impl std::ops::Deref for Worker {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Worker {
    /// A worker over `engine`, without decision ids.
    pub fn new(engine: Arc<Engine>) -> Worker {
        Worker {
            cache: DecisionCache::new(engine.cache_shape),
            tally: Mutex::new(engine.layout().tally()),
            engine,
            leases: Leases::default(),
            fleet: FleetState::default(),
            fingerprint: OnceLock::new(),
            ids: None,
            requests: AtomicU64::new(0),
            logs_info: AtomicBool::new(true),
            last_fleet_log: AtomicU64::new(0),
        }
    }

    /// A worker that gives its decisions ids; `seed` should be random per
    /// worker (see [`DecisionIds::new`]).
    pub fn with_ids(engine: Arc<Engine>, seed: u64) -> Worker {
        let mut w = Worker::new(engine);
        w.ids = Some(DecisionIds::new(seed));
        w
    }

    /// The compiled bundle.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A shared handle on the compiled bundle.
    pub fn engine_arc(&self) -> Arc<Engine> {
        Arc::clone(&self.engine)
    }

    /// The series this worker's effects refer to.
    pub fn layout(&self) -> &Layout {
        self.engine.layout()
    }

    /// Tells the worker whether the host keeps `info` lines (audit lines are
    /// built only when it does).
    pub fn set_logs_info(&self, keeps: bool) {
        self.logs_info.store(keeps, Ordering::Relaxed);
    }

    /// The next decision id, when this worker gives ids.
    pub(crate) fn next_id(&self) -> Option<String> {
        self.ids.as_ref().map(DecisionIds::next_id)
    }

    /// The batched fleet-limit state.
    pub(crate) fn fleet_state(&self) -> &FleetState {
        &self.fleet
    }

    /// This worker's quota leases.
    pub fn leases(&self) -> &crate::quota::Leases {
        &self.leases
    }

    /// Gives back the unspent tokens of expired leases (on a tick).
    pub fn return_expired_leases(
        &self,
        now_ns: u64,
        store: &dyn BucketStore,
    ) -> Result<u64, crate::quota::StoreError> {
        self.leases
            .return_expired(&self.engine.quotas, now_ns, store)
    }

    /// Gives back the unspent tokens of every lease (before this engine is
    /// replaced by a new bundle's).
    pub fn return_all_leases(
        &self,
        store: &dyn BucketStore,
    ) -> Result<u64, crate::quota::StoreError> {
        self.leases.return_all(&self.engine.quotas, store)
    }

    /// The whole decision: policies first; only a request they allow is
    /// charged against the quotas (a request denied by policy costs nothing).
    /// A store failure gives the `on_error` decision. Fleet limits in
    /// `batched` mode refuse here when the service said they are over, and
    /// count what is admitted; in `per_request` mode see
    /// [`Worker::decide_refundable`].
    pub fn decide(&self, req: &Request, store: &dyn BucketStore) -> Decision {
        self.decide_refundable(req, store).0
    }

    /// [`Worker::decide`], and, when a `per_request` fleet check is still to
    /// come for this request ([`Engine::fleet_check`]), what its local
    /// admission charged, so a fleet refusal can give it back
    /// ([`Worker::refund`]). Such requests are admitted exactly, without a
    /// worker lease.
    pub fn decide_refundable(
        &self,
        req: &Request,
        store: &dyn BucketStore,
    ) -> (Decision, Option<crate::quota::Refund>) {
        let decision = self.decide_policy_cached(req);
        if !decision.is_allowed() {
            return (decision, None);
        }
        let cost = self.engine.settings.cost_of(&req.method, req.action);
        let fleet = self.engine.rate_limit_service().filter(|_| {
            self.engine
                .fleet_limits()
                .indices_for(&req.tenant)
                .next()
                .is_some()
        });
        let per_request = fleet.is_some_and(|r| r.mode == FleetMode::PerRequest);
        let batched = fleet.is_some_and(|r| r.mode == FleetMode::Batched);
        let assigned = fleet.is_some_and(|r| r.mode == FleetMode::Assigned);
        if batched {
            if let Some(q) = self.fleet_refusal(&req.tenant, cost, req.time_ns) {
                return (Decision::over_quota(q), None);
            }
        }
        if self.engine.quotas.is_empty() {
            if batched {
                self.fleet_count(&req.tenant, cost);
            }
            if assigned {
                if let Some(refused) = self.assigned_admit(&req.tenant, cost, req.time_ns) {
                    return (refused, None);
                }
            }
            return (decision, None);
        }
        // A fleet check still to come (per_request): the local admission is
        // exact, so a fleet refusal can give back what it charged. Mode
        // assigned decides at once, in this worker: its local admission keeps
        // the leases, and a fleet refusal gives the tokens back to the lease
        // they came from (or exactly, when charged alone).
        let charging = match (per_request, assigned) {
            _ if cost == 0 => Charging::Leased,
            (true, _) => Charging::Exact,
            (false, true) => Charging::LeasedRefundable,
            (false, false) => Charging::Leased,
        };
        match self.admit_local(req, cost, charging, store) {
            Local::Admitted(q, refund, from_lease) => {
                if batched {
                    self.fleet_count(&req.tenant, cost);
                }
                if assigned {
                    if let Some(refused) = self.assigned_admit(&req.tenant, cost, req.time_ns) {
                        // Best effort, as for a per_request refusal (flow's
                        // give_back): the decision stands.
                        if let Some(r) = &refund {
                            let _ = self.engine.quotas.refund(r, store);
                        }
                        if from_lease {
                            self.engine.quotas.unspend_leased(
                                &self.leases,
                                &req.tenant,
                                cost,
                                req.time_ns,
                            );
                        }
                        return (refused, None);
                    }
                }
                let refund = if per_request { refund } else { None };
                (
                    Decision {
                        quota: Some(q),
                        ..decision
                    },
                    refund,
                )
            }
            Local::Refused(refused) => (refused, None),
        }
    }

    /// The quotas alone, for a request counted as allowed by policy: keyed
    /// limits first, then the hierarchical buckets, as in [`Worker::decide`],
    /// but admitted exactly (no worker lease); then, in mode `assigned`, the
    /// fleet buckets of this worker's assignments (the local charge given
    /// back when they refuse, as on the request path). The other fleet modes
    /// need a service and are left out. What `tenantgate simulate` replays.
    pub fn decide_quotas(&self, req: &Request, store: &dyn BucketStore) -> Decision {
        let allow = Decision::allow(Vec::new(), Vec::new());
        let cost = self.engine.settings.cost_of(&req.method, req.action);
        let (decision, refund) = if self.engine.quotas.is_empty() {
            (allow, None)
        } else {
            match self.admit_local(req, cost, Charging::Exact, store) {
                Local::Admitted(q, refund, _) => (
                    Decision {
                        quota: Some(q),
                        ..allow
                    },
                    refund,
                ),
                Local::Refused(refused) => return refused,
            }
        };
        if let Some(refused) = self.assigned_admit(&req.tenant, cost, req.time_ns) {
            if let Some(r) = &refund {
                let _ = self.engine.quotas.refund(r, store);
            }
            return refused;
        }
        decision
    }

    /// Admission against the local limits: the keyed ones first (a refusal
    /// there charges nothing anywhere), then the hierarchical buckets, exactly
    /// or through this worker's lease; the keyed charges are given back when
    /// those refuse.
    fn admit_local(
        &self,
        req: &Request,
        cost: u64,
        charging: Charging,
        store: &dyn BucketStore,
    ) -> Local {
        let store_error = |e: crate::quota::StoreError| {
            Decision::error(self.engine.settings.on_error, format!("quota store: {e}"))
        };
        let (keyed, keyed_charges) = match self.admit_keyed(req, cost, store) {
            Ok(KeyedOutcome::Admitted(statuses, charges)) => (statuses, charges),
            Ok(KeyedOutcome::Refused(q)) => return Local::Refused(Decision::over_quota(q)),
            Ok(KeyedOutcome::Missing(message)) => {
                return Local::Refused(Decision::bad_request(message))
            }
            Err(e) => return Local::Refused(store_error(e)),
        };
        let quotas = &self.engine.quotas;
        let (tenant, now) = (&req.tenant, req.time_ns);
        // (decision, what to refund exactly, whether tokens came from a lease)
        let admitted = match charging {
            Charging::Exact => quotas
                .admit_refundable(tenant, cost, now, store)
                .map(|(q, r)| (q, r, false)),
            Charging::Leased => quotas
                .admit_leased(&self.leases, tenant, cost, now, store)
                .map(|q| (q, None, false)),
            Charging::LeasedRefundable => quotas
                .admit_leased_taking(&self.leases, tenant, cost, now, store)
                .map(|(q, taken)| match taken {
                    crate::quota::Taken::Lease => (q, None, true),
                    crate::quota::Taken::Alone(r) => (q, r, false),
                    crate::quota::Taken::Nothing => (q, None, false),
                }),
        };
        let give_back = || {
            // Best effort: the decision stands whatever the store says.
            let _ = self.engine.quotas.refund_keyed(&keyed_charges, store);
        };
        match admitted {
            Ok((q, refund, from_lease)) if q.admitted => {
                let refund = match charging {
                    Charging::Leased => None,
                    _ => crate::quota::Refund::join(refund, keyed_charges),
                };
                Local::Admitted(q.with_keyed(keyed, cost), refund, from_lease)
            }
            Ok((q, _, _)) => {
                give_back();
                Local::Refused(Decision::over_quota(q))
            }
            Err(e) => {
                give_back();
                Local::Refused(store_error(e))
            }
        }
    }

    /// Reads (or creates) the process's keyed-limit seed now, so that no
    /// request pays for it; does nothing without keyed limits. The filter
    /// calls it at configure time.
    pub fn load_keyed_seed(&self, store: &dyn BucketStore) -> Result<(), crate::quota::StoreError> {
        if self.engine.quotas.keyed().is_empty() || self.fingerprint.get().is_some() {
            return Ok(());
        }
        let f = Fingerprint::from_store(store, fresh_seed())?;
        let _ = self.fingerprint.get_or_init(|| f);
        Ok(())
    }

    /// The keyed limits' part of a decision.
    fn admit_keyed(
        &self,
        req: &Request,
        cost: u64,
        store: &dyn BucketStore,
    ) -> Result<KeyedOutcome, crate::quota::StoreError> {
        // No keyed limit on the request's lineage: no seed to read, no host call.
        if !self
            .engine
            .quotas
            .keyed()
            .iter()
            .any(|k| k.applies_to(&req.tenant))
        {
            return Ok(KeyedOutcome::Admitted(Vec::new(), Default::default()));
        }
        let fingerprint = match self.fingerprint.get() {
            Some(f) => *f,
            None => {
                let f = Fingerprint::from_store(store, fresh_seed())?;
                *self.fingerprint.get_or_init(|| f)
            }
        };
        let principal = req.principal.as_ref().map(|p| p.id.as_str());
        self.engine.quotas.admit_keyed(
            &fingerprint,
            &req.tenant,
            principal,
            &req.key_headers,
            cost,
            req.time_ns,
            store,
        )
    }

    /// Gives back what a local admission charged (a fleet refusal, or a
    /// request that ended while its fleet check was pending).
    pub fn refund(
        &self,
        refund: &crate::quota::Refund,
        store: &dyn BucketStore,
    ) -> Result<(), crate::quota::StoreError> {
        self.engine.quotas.refund(refund, store)
    }

    /// [`Engine::decide_policy`] through the bounded decision cache.
    pub fn decide_policy_cached(&self, req: &Request) -> Decision {
        let Some(key) = self.cache.key(req) else {
            return self.engine.decide_policy(req);
        };
        if let Some(d) = self.cache.get(&key) {
            return d;
        }
        let d = self.engine.decide_policy(req);
        // Only decisions about declared tenants are kept, so a flood of
        // made-up tenants cannot push real entries out.
        if self.engine.tenants.contains_key(&req.tenant)
            && d.kind != crate::decision::Kind::BadRequest
        {
            self.cache.put(key, &d);
        }
        d
    }
}

/// What the local limits say about a request ([`Engine::admit_local`]).
/// How a local admission charges the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charging {
    /// Exactly, refundable (a fleet check to come, and `simulate`).
    Exact,
    /// Through this worker's leases.
    Leased,
    /// Through the leases, saying where the tokens came from (mode
    /// `assigned`: its refusal comes after the local admission).
    LeasedRefundable,
}

enum Local {
    /// The quota decision (keyed statuses included); for a refundable
    /// admission what to refund exactly, and whether its tokens came from
    /// this worker's lease (to give back with `unspend_leased`).
    Admitted(
        crate::quota::QuotaDecision,
        Option<crate::quota::Refund>,
        bool,
    ),
    /// The decision to answer: 429, 400 for a missing key, or `on_error`'s.
    Refused(Decision),
}

/// 16 random bytes from the host (WASI `random_get` in the filter, the
/// operating system natively), through the standard library's hasher keys.
fn fresh_seed() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let word = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            .to_le_bytes();
        half.copy_from_slice(&word);
    }
    out
}
