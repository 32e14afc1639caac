//! One request's life, and a bundle's, as the engine decides them. A proxy
//! adapter (the Wasm filter, the native module) and the services (`serve`'s
//! HTTP API and ext_authz, `check`) all go through here; they only read what
//! the host gives them, make the calls the engine asks for and carry out its
//! [`Effects`].
//!
//! A request:
//! - [`Worker::begin`] maps and decides it. The answer is [`Step::Done`]
//!   with the effects to carry out, or [`Step::Deferred`] when a fleet check
//!   (`per_request` mode) must be made first: the adapter sends
//!   [`Deferred::call`] to the rate limit service and keeps the
//!   [`Pending`];
//! - [`Worker::resume`] finishes a deferred request with the service's
//!   answer (or why there is none: it could not be sent, it failed);
//! - [`Worker::abandon`] gives back what a deferred request was charged when
//!   its stream ends before the answer.
//!
//! A bundle: [`Worker::activate`] prepares a new bundle's worker (buckets
//! reconciled with the previous bundle's, seeds read, the previous worker's
//! leases and counts handed back); [`Worker::on_tick`] is the periodic work
//! (expired leases, batched fleet reports, mode `assigned`'s RLQS usage
//! reports, per-limit metrics); a batched report's answer goes to
//! [`Worker::report_answer`]; what arrives on the RLQS stream to
//! [`Worker::stream_message`], its end to [`Worker::stream_closed`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::decision::Decision;
use crate::engine::Engine;
use crate::fleet::{FleetCall, FleetOutcome};
use crate::http::{BadRequest, HttpInput, LocalReply, Mapped, MetadataSource};
use crate::metrics::{names, Update};
use crate::quota::{BucketStore, Refund};
use crate::settings::OnError;
use crate::tenant::TenantPath;
use crate::worker::Worker;

/// How important a log line is (the host's levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// A line for the host's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
}

impl LogLine {
    pub(crate) fn new(level: Level, text: impl Into<String>) -> LogLine {
        LogLine {
            level,
            text: text.into(),
        }
    }
}

/// What happens to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It goes upstream.
    Continue {
        /// The `:path` to forward instead of the client's (normalized).
        /// The identity headers to add: [`Effects::request_headers`].
        path: Option<String>,
        /// Headers to add to the response (RateLimit fields).
        response_headers: Vec<(&'static str, String)>,
    },
    /// The proxy answers it with this reply.
    Reply(LocalReply),
}

/// Everything an adapter does once a request is decided.
#[derive(Debug, Clone)]
pub struct Effects {
    pub verdict: Verdict,
    /// Lines to log (the audit line at `Info`; failures of the fleet service).
    pub logs: Vec<LogLine>,
    /// Metrics to update (indices into the worker's [`crate::metrics::Layout`]).
    pub metrics: Vec<Update>,
    /// Record the time since the request began (the second field, in
    /// nanoseconds) in this histogram, in microseconds (one request in
    /// [`names::DECISION_TIME_SAMPLE`]).
    pub sample_time: Option<(crate::metrics::MetricRef, u64)>,
    /// The decision and the mapped request, for `check` and for callers that
    /// report more than the verdict.
    pub decision: Decision,
    pub mapped: Option<Mapped>,
    /// The decision's id, when the worker gives ids and the decision blocks,
    /// is audited or goes to filter state.
    pub decision_id: Option<String>,
    /// Envoy filter state to set (key, value), with the `filter_state`
    /// setting; empty without it. Keys: [`crate::http::filter_state_keys`].
    pub filter_state: Vec<(&'static str, String)>,
}

impl Effects {
    /// The identity headers to add to a request that goes on (none for a
    /// reply, or for a request that could not be mapped), borrowed from the
    /// mapped request: nothing is allocated for them.
    pub fn request_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let goes_on = matches!(self.verdict, Verdict::Continue { .. });
        self.mapped
            .iter()
            .filter(move |_| goes_on)
            .flat_map(Mapped::upstream_headers)
    }
}

/// The outcome of [`Worker::begin`].
#[derive(Debug)]
pub enum Step {
    /// Decided: carry out the effects.
    Done(Effects),
    /// Send the call, then [`Worker::resume`] with the answer.
    Deferred(Deferred),
}

/// A request waiting for its fleet check.
#[derive(Debug)]
pub struct Deferred {
    /// The encoded `RateLimitRequest` to send (gRPC
    /// [`crate::fleet::RLS_SERVICE`] / [`crate::fleet::RLS_METHOD`]).
    pub call: Vec<u8>,
    /// The Envoy cluster of the rate limit service.
    pub cluster: String,
    /// How long the call may take.
    pub timeout_ms: u32,
    /// What finishing the request needs; hand it back to `resume` or `abandon`.
    pub pending: Pending,
}

/// A deferred request's state, opaque to the adapter.
#[derive(Debug)]
pub struct Pending {
    call: FleetCall,
    decision: Decision,
    mapped: Mapped,
    /// What the local limits charged, given back if the fleet refuses.
    refund: Option<Refund>,
    start: u64,
}

/// What the adapter does on a tick.
#[derive(Debug, Default)]
pub struct Tick {
    pub logs: Vec<LogLine>,
    pub metrics: Vec<Update>,
    /// A batched fleet report to send (answer: [`Worker::report_answer`]).
    pub report: Option<FleetCall>,
    /// Mode `assigned`: an encoded RLQS usage report to send on the stream
    /// ([`crate::fleet::RLQS_SERVICE`] / [`crate::fleet::RLQS_METHOD`] on
    /// [`Worker::stream_cluster`]); open the stream first if it is not (then
    /// [`Worker::stream_opened`], or [`Worker::stream_closed`] if that or
    /// the send fails). Messages received go to [`Worker::stream_message`].
    pub stream_report: Option<Vec<u8>>,
}

/// A new bundle's worker, and what the adapter does to put it in force.
#[derive(Debug)]
pub struct Activation {
    pub worker: Worker,
    pub logs: Vec<LogLine>,
    /// Updates of the new worker's metrics (after defining its layout).
    pub metrics: Vec<Update>,
    /// Gauges of the previous bundle that this one no longer has: set them
    /// to 0 (by name: the new layout does not define them).
    pub zero_gauges: Vec<String>,
    /// The previous worker's last counts (its own metric ids).
    pub previous_metrics: Vec<Update>,
    /// The previous worker's last batched report, to send now.
    pub previous_report: Option<FleetCall>,
    /// How often the adapter should tick, in milliseconds.
    pub tick_ms: u32,
}

/// The tick period when nothing asks for a faster one: expired quota leases
/// go back to the shared buckets on it.
pub const TICK_MS: u32 = (crate::quota::LEASE_TTL_NS / 1_000_000) as u32;

/// What to do with a request when no bundle is loaded (fail closed: Envoy
/// creates no HTTP context for a plugin that failed to configure, so this is
/// defensive).
pub fn no_bundle() -> Verdict {
    Verdict::Reply(LocalReply::unavailable(
        Decision::error(OnError::default(), "").status,
    ))
}

impl Worker {
    /// Maps the request and decides it: policies, then (with a `store`) the
    /// local quotas and the fleet limits. Without a store only the policies
    /// decide (the decision service).
    pub fn begin(
        &self,
        input: &HttpInput<'_>,
        metadata: &dyn MetadataSource,
        store: Option<&dyn BucketStore>,
    ) -> Step {
        let mapped = self.engine.map_request(input, metadata);
        self.decide_mapped(mapped, store, input.now_ns)
    }

    /// [`Worker::begin`] once the request is mapped (or found bad).
    pub(crate) fn decide_mapped(
        &self,
        mapped: Result<Mapped, BadRequest>,
        store: Option<&dyn BucketStore>,
        start: u64,
    ) -> Step {
        let m = match mapped {
            Ok(m) => m,
            Err(bad) => return Step::Done(self.bad_request(bad, start)),
        };
        let Some(store) = store else {
            let decision = self.decide_policy_cached(&m.request);
            return Step::Done(self.finish(decision, Some(m), start));
        };
        let (decision, refund) = self.decide_refundable(&m.request, store);
        if decision.is_allowed() {
            let check = self.engine.fleet_check(&m.request);
            if let (Some(mut call), Some(rls)) = (check, self.engine.rate_limit_service()) {
                return Step::Deferred(Deferred {
                    // The answer is read by the limits and cost the call
                    // keeps; its bytes go to the adapter.
                    call: std::mem::take(&mut call.message),
                    cluster: rls.cluster.clone(),
                    timeout_ms: rls.timeout_ms,
                    pending: Pending {
                        call,
                        decision,
                        mapped: m,
                        refund,
                        start,
                    },
                });
            }
        }
        Step::Done(self.finish(decision, Some(m), start))
    }

    /// A request the host could not hand over (its headers unreadable):
    /// `on_error` decides.
    pub fn host_error(&self, message: impl Into<String>, start: u64) -> Effects {
        let decision = Decision::error(self.engine.settings().on_error, message);
        self.effects(decision, None, None, None, None, start)
    }

    /// Finishes a deferred request with the service's answer: the message,
    /// or why there is none (the call could not be sent, a gRPC error, past
    /// the timeout).
    pub fn resume(
        &self,
        p: Pending,
        answer: Result<&[u8], String>,
        now: u64,
        store: &dyn BucketStore,
    ) -> Effects {
        let mut notes = Notes::default();
        let decision = match self.fleet_answer(&p.call, answer, now) {
            FleetOutcome::Admitted => p.decision,
            FleetOutcome::Refused(q) => {
                notes.extend(self.give_back(p.refund.as_ref(), store));
                Decision::over_quota(q)
            }
            FleetOutcome::Failed(why) => {
                notes.fleet_failed(self, &why, now);
                match self.engine.settings().rate_limit_service.as_ref() {
                    Some(r) if r.on_error == OnError::Allow => p.decision,
                    _ => {
                        notes.extend(self.give_back(p.refund.as_ref(), store));
                        Decision::error(OnError::Deny, format!("rate limit service: {why}"))
                    }
                }
            }
        };
        let mut effects = self.finish(decision, Some(p.mapped), p.start);
        notes.into(&mut effects.logs, &mut effects.metrics);
        effects
    }

    /// Finishes a deferred request without its fleet check: the local
    /// decision stands (`check`, which has no service to ask).
    pub(crate) fn finish_locally(&self, p: Pending) -> Effects {
        self.finish(p.decision, Some(p.mapped), p.start)
    }

    /// A deferred request whose stream ended before the answer: the local
    /// tokens it was charged go back. Returns a line to log if that failed.
    pub fn abandon(&self, p: Pending, store: &dyn BucketStore) -> Option<LogLine> {
        self.give_back(p.refund.as_ref(), store)
    }

    /// The answer to a batched report (see [`Tick::report`]).
    pub fn report_answer(&self, call: &FleetCall, answer: Result<&[u8], String>, now: u64) -> Tick {
        let mut notes = Notes::default();
        if let FleetOutcome::Failed(why) = self.fleet_answer(call, answer, now) {
            notes.fleet_failed(self, &why, now);
        }
        let mut tick = Tick::default();
        notes.into(&mut tick.logs, &mut tick.metrics);
        tick
    }

    /// The periodic work: expired leases go back, a batched fleet report
    /// when one is due, the per-limit counts and remaining tokens.
    pub fn on_tick(&self, now: u64, store: &dyn BucketStore) -> Tick {
        let mut tick = Tick::default();
        if let Err(e) = self.return_expired_leases(now, store) {
            tick.logs.push(LogLine::new(
                Level::Error,
                format!("tenantgate: cannot return expired quota leases: {e}"),
            ));
        }
        tick.report = self.fleet_report(now, false);
        tick.stream_report = self.stream_report(now);
        tick.metrics = self.flush_metrics(now, store);
        tick
    }

    /// The per-limit counts since the last flush and the remaining tokens.
    fn flush_metrics(&self, now: u64, store: &dyn BucketStore) -> Vec<Update> {
        match self.tally.lock() {
            Ok(mut tally) => self.layout().flush(&mut tally, self, now, store),
            Err(_) => Vec::new(),
        }
    }

    /// Puts `engine` in force in place of `previous` (this adapter's last
    /// worker, if any): buckets the previous bundle used and this one does
    /// not are emptied, new ones created, changed ones reset in place (the
    /// record is per `scope`, the plugin's name); the keyed limits' seed is
    /// read; the previous worker's leases go back and its last counts and
    /// report come out.
    pub fn activate(
        engine: Arc<Engine>,
        previous: Option<&Worker>,
        scope: &str,
        store: &dyn BucketStore,
        now: u64,
        id_seed: u64,
    ) -> Activation {
        let worker = Worker::with_ids(engine, id_seed);
        let engine = worker.engine();
        let mut logs = reconcile(engine, previous, scope, store, now);
        if let Err(e) = worker.load_keyed_seed(store) {
            logs.push(LogLine::new(
                Level::Error,
                format!("tenantgate: cannot read the keyed limits' seed: {e}"),
            ));
        }
        if let Some(w) = unenforced_fleet_limits(engine) {
            logs.push(w);
        }
        logs.push(LogLine::new(
            Level::Info,
            format!(
                "tenantgate: loaded bundle {} ({} tenants, {} policies, mode {:?})",
                engine.version(),
                engine.tenants().len(),
                engine.policy_count(),
                engine.settings().mode
            ),
        ));
        let metrics = vec![Update::Add(worker.layout().config_loaded, 1)];
        let (mut zero_gauges, mut previous_metrics, mut previous_report) =
            (Vec::new(), Vec::new(), None);
        if let Some(p) = previous {
            previous_metrics = p.flush_metrics(now, store);
            zero_gauges = worker
                .layout()
                .removed_gauges(p.layout())
                .into_iter()
                .map(str::to_owned)
                .collect();
            previous_report = p.fleet_report(now, true);
            worker.inherit_assigned(p);
            if let Err(e) = p.return_all_leases(store) {
                logs.push(LogLine::new(
                    Level::Error,
                    format!("tenantgate: cannot return the previous bundle's quota leases: {e}"),
                ));
            }
        }
        let tick_ms = engine
            .rate_limit_service()
            .map_or(TICK_MS, |r| r.report_interval_ms.min(TICK_MS));
        Activation {
            worker,
            logs,
            metrics,
            zero_gauges,
            previous_metrics,
            previous_report,
            tick_ms,
        }
    }

    /// Counts, audits and carries out a decision about a mapped request.
    fn finish(&self, decision: Decision, mapped: Option<Mapped>, start: u64) -> Effects {
        let tenant = mapped.as_ref().map(|m| &m.request.tenant);
        let request_id = mapped.as_ref().and_then(|m| m.request_id.as_deref());
        let trace_id = mapped.as_ref().and_then(|m| m.trace_id.as_deref());
        let mut effects = self.effects(
            decision,
            mapped.as_ref(),
            tenant,
            request_id,
            trace_id,
            start,
        );
        effects.mapped = mapped;
        effects
    }

    /// A request that could not be mapped: 400 with the reason.
    fn bad_request(&self, bad: BadRequest, start: u64) -> Effects {
        let decision = Decision::bad_request(bad.message);
        self.effects(
            decision,
            None,
            bad.tenant.as_ref(),
            bad.request_id.as_deref(),
            bad.trace_id.as_deref(),
            start,
        )
    }

    /// The effects of a decision: counters, the decision id, the audit line
    /// and the verdict (the identity headers and the judged path when the
    /// request was mapped and goes on).
    fn effects(
        &self,
        decision: Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        trace_id: Option<&str>,
        start: u64,
    ) -> Effects {
        let engine = &*self.engine;
        let mode = engine.settings().mode;
        let mut metrics = Vec::with_capacity(2);
        if let Ok(mut tally) = self.tally.lock() {
            if let Some(r) = self.layout().record(&mut tally, tenant, &decision) {
                metrics.push(Update::Add(r, 1));
            }
        }
        metrics.push(Update::Add(
            self.layout().outcome(decision.counter(mode)),
            1,
        ));
        let blocks = decision.blocks(mode);
        let audits = engine.audits(&decision) && self.logs_info.load(Ordering::Relaxed);
        let filter_state = engine.settings().filter_state;
        let decision_id = if blocks || audits || filter_state {
            self.next_id()
        } else {
            None
        };
        let audit = audits
            .then(|| {
                engine.audit_line_at(
                    &decision,
                    mapped,
                    tenant,
                    crate::http::AuditIds {
                        request_id,
                        trace_id,
                        decision_id: decision_id.as_deref(),
                    },
                    start,
                )
            })
            .flatten();
        let filter_state = if filter_state {
            engine.filter_state(&decision, mapped, tenant, decision_id.as_deref())
        } else {
            Vec::new()
        };
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let sample_time = n
            .is_multiple_of(names::DECISION_TIME_SAMPLE)
            .then_some((self.layout().decision_us, start));
        let verdict = if blocks {
            Verdict::Reply(
                engine
                    .reply(&decision, tenant, request_id, decision_id.as_deref())
                    .unwrap_or_else(|| LocalReply::unavailable(decision.status)),
            )
        } else {
            Verdict::Continue {
                path: mapped.and_then(|m| m.forward_path.clone()),
                response_headers: engine.allow_response_headers(&decision),
            }
        };
        Effects {
            verdict,
            logs: audit
                .map(|text| vec![LogLine::new(Level::Info, text)])
                .unwrap_or_default(),
            metrics,
            sample_time,
            decision,
            mapped: None,
            decision_id,
            filter_state,
        }
    }

    /// Gives back a local charge (the fleet refused, or the stream ended).
    fn give_back(&self, refund: Option<&Refund>, store: &dyn BucketStore) -> Option<LogLine> {
        let r = refund?;
        self.engine.quotas().refund(r, store).err().map(|e| {
            LogLine::new(
                Level::Error,
                format!("tenantgate: cannot give back local quota tokens: {e}"),
            )
        })
    }

    /// True at most once a second: failed fleet calls are each counted, but
    /// logged at most that often per worker.
    pub(crate) fn fleet_log_due(&self, now: u64) -> bool {
        let last = self.last_fleet_log.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 1_000_000_000
            && self
                .last_fleet_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Lines and counts gathered while finishing a request or a report.
#[derive(Default)]
struct Notes {
    logs: Vec<LogLine>,
    metrics: Vec<Update>,
}

impl Notes {
    fn extend(&mut self, line: Option<LogLine>) {
        self.logs.extend(line);
    }

    fn fleet_failed(&mut self, worker: &Worker, why: &str, now: u64) {
        self.metrics
            .push(Update::Add(worker.layout().fleet_errors, 1));
        if worker.fleet_log_due(now) {
            self.logs.push(LogLine::new(
                Level::Warn,
                format!("tenantgate: rate limit service call failed: {why}"),
            ));
        }
    }

    fn into(self, logs: &mut Vec<LogLine>, metrics: &mut Vec<Update>) {
        logs.extend(self.logs);
        metrics.extend(self.metrics);
    }
}

/// Reconciles the buckets in `store` with `engine`'s (see
/// [`Worker::activate`]); the lines to log.
fn reconcile(
    engine: &Engine,
    previous: Option<&Worker>,
    scope: &str,
    store: &dyn BucketStore,
    now: u64,
) -> Vec<LogLine> {
    let mut logs = Vec::new();
    let footprint = previous.map(|p| p.engine().quotas().footprint());
    match engine
        .quotas()
        .reconcile(store, scope, footprint.as_ref(), now)
    {
        Ok(done) => {
            if done.unreadable_record {
                logs.push(LogLine::new(
                    Level::Warn,
                    "tenantgate: the stored record of the previous bundle's quota keys did not decode; it was replaced",
                ));
            }
            if done.emptied > 0 {
                logs.push(LogLine::new(
                    Level::Info,
                    format!(
                        "tenantgate: emptied {} quota keys the new bundle no longer uses",
                        done.emptied
                    ),
                ));
            }
        }
        Err(e) => logs.push(LogLine::new(
            Level::Error,
            format!("tenantgate: cannot create the quota buckets: {e}"),
        )),
    }
    logs
}

/// The warning for fleet limits that this filter does not enforce: the
/// bundle configures no service for them.
fn unenforced_fleet_limits(engine: &Engine) -> Option<LogLine> {
    match engine.rate_limit_service() {
        _ if engine.fleet_limits().is_empty() => None,
        None => Some(unenforced(
            engine,
            "the bundle has no `rate_limit_service` setting",
        )),
        Some(_) => None,
    }
}

fn unenforced(engine: &Engine, why: &str) -> LogLine {
    let names: Vec<String> = engine
        .fleet_limits()
        .all()
        .iter()
        .map(|l| format!("`{}` at {}", l.name, l.tenant))
        .collect();
    LogLine::new(
        Level::Warn,
        format!(
            "tenantgate: fleet limits ({}) are not enforced: {why} (see docs/fleet.md)",
            names.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::MemoryStore;
    use crate::settings::{FleetMode, RateLimitService, Settings};
    use crate::testing::{bundle, file, tenant};

    /// The warnings a bundle with one fleet limit logs when it is activated.
    fn warnings(rls: Option<RateLimitService>) -> Vec<String> {
        let b = bundle(
            Settings {
                rate_limit_service: rls,
                ..Settings::default()
            },
            vec![
                tenant(
                    "/",
                    None,
                    vec![file(
                        "tenants/p.cedar",
                        "permit(principal, action, resource);",
                    )],
                ),
                tenant(
                    "/acme",
                    Some(file(
                        "tenants/acme/tenant.json",
                        r#"{"limits": {"rpm": {"rate": 5, "per": "1m", "scope": "fleet"}}}"#,
                    )),
                    vec![],
                ),
            ],
        );
        let engine = Arc::new(Engine::new(&b).unwrap());
        let act = Worker::activate(engine, None, "t", &MemoryStore::new(), 0, 1);
        act.logs
            .into_iter()
            .filter(|l| l.level == Level::Warn)
            .map(|l| l.text)
            .collect()
    }

    #[test]
    fn fleet_limits_the_filter_does_not_enforce_are_named() {
        assert_eq!(
            warnings(None),
            ["tenantgate: fleet limits (`rpm` at /acme) are not enforced: the bundle has no `rate_limit_service` setting (see docs/fleet.md)"]
        );
        let mode = |mode| {
            Some(RateLimitService {
                mode,
                ..RateLimitService::default()
            })
        };
        assert_eq!(warnings(mode(FleetMode::Assigned)), Vec::<String>::new());
        assert_eq!(warnings(mode(FleetMode::PerRequest)), Vec::<String>::new());
        assert_eq!(warnings(mode(FleetMode::Batched)), Vec::<String>::new());
    }
}
