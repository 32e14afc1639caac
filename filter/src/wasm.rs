//! Root and HTTP contexts: bytes in from Envoy, engine calls, bytes out.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use tenantgate_engine::decision::Counter;
use tenantgate_engine::http::{
    own_headers, DecisionIds, HttpInput, LocalReply, Mapped, MetadataSource,
};
use tenantgate_engine::metrics::{Layout, MetricKind, MetricRef, Tally, Update};
use tenantgate_engine::quota::fleet::REPORT_HEADER;
use tenantgate_engine::quota::{
    BucketStore, FleetCall, FleetOutcome, Refund, StoreError, RLS_METHOD, RLS_SERVICE,
};
use tenantgate_engine::settings::{Mode, OnError, RateLimitService};
use tenantgate_engine::{Bundle, Decision, Engine, TenantPath};

use crate::ffi;
use crate::metric_names as names;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    // The SDK's hook logs and unwraps; ours only logs. Lints deny panics in
    // this crate and the engine, so this is the last line of defence.
    std::panic::set_hook(Box::new(|info| {
        ffi::log(ffi::LOG_CRITICAL, &format!("tenantgate: panic (a bug, please report it): {info}"));
    }));
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { loaded: None, context_id, reports: Default::default() })
    });
}}

/// Counters and the decision-time histogram, defined at configure time;
/// the per-tenant and per-limit series of the engine's metrics layout.
struct Metrics {
    allowed: u32,
    denied_policy: u32,
    denied_quota: u32,
    bad_request: u32,
    shadow_denied: u32,
    errors: u32,
    decision_us: u32,
    fleet_calls: u32,
    fleet_errors: u32,
    layout: Layout,
    /// Host ids of `layout.defs`, aligned with it.
    ids: Vec<u32>,
}

impl Metrics {
    fn define(engine: &Engine) -> Metrics {
        let counter =
            |name: &str| ffi::define_metric(ffi::METRIC_COUNTER, name).unwrap_or(u32::MAX);
        let layout = Layout::new(engine);
        let ids = layout
            .defs
            .iter()
            .map(|d| {
                let kind = match d.kind {
                    MetricKind::Counter => ffi::METRIC_COUNTER,
                    MetricKind::Gauge => ffi::METRIC_GAUGE,
                };
                let id = ffi::define_metric(kind, &d.name).unwrap_or(u32::MAX);
                if let Some(v) = d.initial {
                    ffi::record_metric(id, v);
                }
                id
            })
            .collect();
        Metrics {
            allowed: counter(names::ALLOWED),
            denied_policy: counter(names::DENIED_POLICY),
            denied_quota: counter(names::DENIED_QUOTA),
            bad_request: counter(names::BAD_REQUEST),
            shadow_denied: counter(names::SHADOW_DENIED),
            errors: counter(names::ERRORS),
            decision_us: ffi::define_metric(ffi::METRIC_HISTOGRAM, names::DECISION_US)
                .unwrap_or(u32::MAX),
            fleet_calls: counter(names::FLEET_CALLS),
            fleet_errors: counter(names::FLEET_ERRORS),
            layout,
            ids,
        }
    }

    fn id(&self, r: MetricRef) -> u32 {
        self.ids.get(r).copied().unwrap_or(u32::MAX)
    }

    /// One decision's counters: two host calls (the outcome and the
    /// tenant's); the per-limit counts wait in `tally` for the tick. In
    /// shadow mode a would-be denial counts only in `shadow_denied` (and
    /// the tenant's refusals), since nothing was denied.
    fn count(
        &self,
        tally: &mut Tally,
        decision: &Decision,
        tenant: Option<&TenantPath>,
        mode: Mode,
    ) {
        if let Some(r) = self.layout.record(tally, tenant, decision) {
            ffi::increment_metric(self.id(r), 1);
        }
        let id = match decision.counter(mode) {
            Counter::Allowed => self.allowed,
            Counter::DeniedPolicy => self.denied_policy,
            Counter::DeniedQuota => self.denied_quota,
            Counter::BadRequest => self.bad_request,
            Counter::ShadowDenied => self.shadow_denied,
            Counter::Error => self.errors,
        };
        ffi::increment_metric(id, 1);
    }

    /// Sends what `tally` holds (on the tick, and before a reload).
    fn flush(&self, tally: &mut Tally, engine: &Engine) {
        let now = ffi::now_ns().unwrap_or(0);
        for u in self.layout.flush(tally, engine, now, &SharedData) {
            match u {
                Update::Add(r, n) => {
                    ffi::increment_metric(self.id(r), i64::try_from(n).unwrap_or(i64::MAX))
                }
                Update::Set(r, v) => ffi::record_metric(self.id(r), v),
            }
        }
    }
}

/// A measuring build (`envoy/bench_stages.sh`) stops a request after one
/// stage and lets it through: `early` (before any work), `map` (headers
/// read and mapped) or `decide` (policy and quota decided, nothing sent).
/// Unset in every other build, where the checks fold away.
const BENCH_STAGE: Option<&str> = option_env!("TENANTGATE_BENCH_STAGE");

/// True in a measuring build that stops at `stage`.
fn stops_at(stage: &str) -> bool {
    BENCH_STAGE == Some(stage)
}

/// Reads the host's log level: audit lines are only built when `info` lines are kept.
fn refresh_log_level() {
    if let Ok(level) = ffi::log_level() {
        LOGS_INFO.with(|l| l.set(level <= ffi::LOG_INFO));
    }
}

/// The tick period: expired quota leases go back to shared data on it.
const LEASE_TICK_MS: u32 = (tenantgate_engine::quota::LEASE_TTL_NS / 1_000_000) as u32;

thread_local! {
    /// The bundle version this VM loaded last.
    static LAST_VERSION: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// The engine this VM loaded last (a reload may come in a new root
    /// context): its leases go back to shared data when it is replaced.
    static CURRENT: std::cell::RefCell<Option<Rc<Loaded>>> = const { std::cell::RefCell::new(None) };
    /// Whether the host keeps `info` lines (audit lines): read at configure
    /// time and on every tick, so a request never asks.
    static LOGS_INFO: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    /// When this VM last logged a failed fleet call.
    static LAST_FLEET_LOG: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[derive(Default)]
struct Root {
    loaded: Option<Rc<Loaded>>,
    context_id: u32,
    /// Batched fleet reports in flight, by gRPC token.
    reports: std::collections::HashMap<u32, (Rc<Loaded>, FleetCall)>,
}

impl Root {
    /// Sends a batched fleet report when one is due (`now_anyway`: before
    /// the bundle is replaced).
    fn report_fleet(&mut self, loaded: &Rc<Loaded>, now_anyway: bool) {
        let (Some(rls), Ok(now)) = (loaded.engine.rate_limit_service(), ffi::now_ns()) else {
            return;
        };
        let Some(call) = loaded.engine.fleet_report(now, now_anyway) else {
            return;
        };
        let metadata = vec![(REPORT_HEADER.0, REPORT_HEADER.1.as_bytes())];
        match dispatch(self, rls, metadata, &call.message) {
            Ok(token) => {
                ffi::increment_metric(loaded.metrics.fleet_calls, 1);
                self.reports.insert(token, (Rc::clone(loaded), call));
            }
            Err(why) => {
                ffi::increment_metric(loaded.metrics.fleet_errors, 1);
                log_fleet_error(&why);
            }
        }
    }
}

/// Calls the rate limit service through the SDK, which routes the answer
/// back to `context`'s `on_grpc_call_response`. The SDK panics on a status
/// it does not expect from the host; the arguments are checked first
/// (`rate_limit_service` is validated with the bundle), so only an unknown
/// cluster (`ParseFailure`) or a host failure comes back, as an error.
fn dispatch(
    context: &dyn Context,
    rls: &RateLimitService,
    metadata: Vec<(&str, &[u8])>,
    message: &[u8],
) -> Result<u32, String> {
    if rls.cluster.is_empty() || message.is_empty() {
        return Err("no cluster or empty message".into());
    }
    context
        .dispatch_grpc_call(
            &rls.cluster,
            RLS_SERVICE,
            RLS_METHOD,
            metadata,
            Some(message),
            std::time::Duration::from_millis(u64::from(rls.timeout_ms)),
        )
        .map_err(|s| {
            format!(
                "cannot call cluster `{}`: {s:?} (is it in Envoy's config, over HTTP/2?)",
                rls.cluster
            )
        })
}

/// A gRPC answer's message, or why there is none.
fn grpc_answer(status_code: u32, size: usize) -> Result<Vec<u8>, String> {
    if status_code != 0 {
        return Err(format!(
            "gRPC status {status_code} ({})",
            match status_code {
                4 => "past timeout_ms",
                // Envoy also reports a call past its timeout as UNAVAILABLE.
                14 => "unavailable, or past timeout_ms",
                _ => "see the service's log",
            }
        ));
    }
    ffi::grpc_response(size).map_err(|e| format!("cannot read the answer: {e}"))
}

/// Logs a failed fleet call, at most once a second per worker (each one is
/// counted in the fleet error counter).
fn log_fleet_error(why: &str) {
    let now = ffi::now_ns().unwrap_or(0);
    let due = LAST_FLEET_LOG.with(|t| {
        let due = now.saturating_sub(t.get()) >= 1_000_000_000;
        if due {
            t.set(now);
        }
        due
    });
    if due {
        ffi::log(
            ffi::LOG_WARN,
            &format!("tenantgate: rate limit service call failed: {why}"),
        );
    }
}

struct Loaded {
    engine: Engine,
    metrics: Metrics,
    /// This VM's per-limit counts since the last tick.
    tally: std::cell::RefCell<Tally>,
    /// Requests seen by this VM with this bundle (for sampling the histogram).
    requests: std::cell::Cell<u64>,
    /// Ids of this VM's decisions (in replies and audit lines).
    ids: DecisionIds,
}

/// A per-VM seed for decision ids: the host's random source (WASI
/// `random_get`, through the standard library's hasher keys), the time and
/// the context id.
fn id_seed(context_id: u32) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(ffi::now_ns().unwrap_or(0));
    h.write_u32(context_id);
    h.finish()
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some((loaded, call)) = self.reports.remove(&token_id) else {
            return;
        };
        let answer = grpc_answer(status_code, response_size);
        let now = ffi::now_ns().unwrap_or(0);
        if let FleetOutcome::Failed(why) =
            loaded
                .engine
                .fleet_answer(&call, answer.as_deref().map_err(Clone::clone), now)
        {
            ffi::increment_metric(loaded.metrics.fleet_errors, 1);
            log_fleet_error(&why);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let text = match ffi::plugin_configuration() {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                ffi::log(
                    ffi::LOG_ERROR,
                    &format!("tenantgate: cannot read the plugin configuration: {e}"),
                );
                return false;
            }
        };
        let engine = match Bundle::from_json(&text).and_then(|b| Engine::new(&b)) {
            Ok(engine) => engine,
            Err(diagnostics) => {
                let keeps = if self.loaded.is_some() {
                    "; the previous bundle keeps serving"
                } else {
                    ""
                };
                ffi::log(
                    ffi::LOG_ERROR,
                    &format!(
                        "tenantgate: bundle refused ({} errors){keeps}:\n{diagnostics}",
                        diagnostics.len()
                    ),
                );
                if let Ok(id) = ffi::define_metric(ffi::METRIC_COUNTER, names::CONFIG_REJECTED) {
                    ffi::increment_metric(id, 1);
                }
                return false;
            }
        };
        let now = ffi::now_ns().unwrap_or(0);
        // Buckets the previous bundle used and this one does not are
        // emptied (Envoy never deletes shared data); new ones are created,
        // changed ones reset in place. The record is per plugin name.
        let scope = ffi::property(&["plugin_name"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let previous = CURRENT.with(|c| c.borrow().as_ref().map(|p| p.engine.quotas().footprint()));
        match engine
            .quotas()
            .reconcile(&SharedData, &scope, previous.as_ref(), now)
        {
            Ok(done) => {
                if done.unreadable_record {
                    ffi::log(
                        ffi::LOG_WARN,
                        "tenantgate: the stored record of the previous bundle's quota keys did not decode; it was replaced",
                    );
                }
                if done.emptied > 0 {
                    ffi::log(
                        ffi::LOG_INFO,
                        &format!(
                            "tenantgate: emptied {} quota keys the new bundle no longer uses",
                            done.emptied
                        ),
                    );
                }
            }
            Err(e) => ffi::log(
                ffi::LOG_ERROR,
                &format!("tenantgate: cannot create the quota buckets: {e}"),
            ),
        }
        if let Err(e) = engine.load_keyed_seed(&SharedData) {
            ffi::log(
                ffi::LOG_ERROR,
                &format!("tenantgate: cannot read the keyed limits' seed: {e}"),
            );
        }
        if !engine.fleet_limits().is_empty() && engine.rate_limit_service().is_none() {
            let names: Vec<String> = engine
                .fleet_limits()
                .all()
                .iter()
                .map(|l| format!("`{}` at {}", l.name, l.tenant))
                .collect();
            ffi::log(
                ffi::LOG_WARN,
                &format!(
                    "tenantgate: fleet limits ({}) are not enforced: the bundle has no `rate_limit_service` setting (see docs/fleet.md)",
                    names.join(", ")
                ),
            );
        }
        let metrics = Metrics::define(&engine);
        if let Ok(id) = ffi::define_metric(ffi::METRIC_COUNTER, names::CONFIG_LOADED) {
            ffi::increment_metric(id, 1);
        }
        // Defined before any rejection, so an alert sees it go from 0 to 1.
        let _ = ffi::define_metric(ffi::METRIC_COUNTER, names::CONFIG_REJECTED);
        if let Ok(id) = ffi::define_metric(ffi::METRIC_GAUGE, names::BUNDLE_VERSION) {
            ffi::record_metric(id, names::bundle_version_value(engine.version()));
        }
        // The previous bundle of this VM (this root context's, or another
        // root's when ECDS created a new plugin in the same VM) is no longer
        // in force here.
        let previous = LAST_VERSION.with(|v| v.replace(Some(engine.version().to_string())));
        if let Some(previous) = previous.filter(|p| p != engine.version()) {
            for name in [names::bundle(&previous), names::bundle_active(&previous)] {
                if let Ok(id) = ffi::define_metric(ffi::METRIC_GAUGE, &name) {
                    ffi::record_metric(id, 0);
                }
            }
        }
        for name in [
            names::bundle(engine.version()),
            names::bundle_active(engine.version()),
        ] {
            if let Ok(id) = ffi::define_metric(ffi::METRIC_GAUGE, &name) {
                ffi::record_metric(id, 1);
            }
        }
        ffi::log(
            ffi::LOG_INFO,
            &format!(
                "tenantgate: loaded bundle {} ({} tenants, {} policies, mode {:?})",
                engine.version(),
                engine.tenants().len(),
                engine.policy_count(),
                engine.settings().mode
            ),
        );
        let tally = std::cell::RefCell::new(metrics.layout.tally());
        let loaded = Rc::new(Loaded {
            engine,
            metrics,
            tally,
            requests: std::cell::Cell::new(0),
            ids: DecisionIds::new(id_seed(self.context_id)),
        });
        let previous = CURRENT.with(|c| c.replace(Some(Rc::clone(&loaded))));
        if let Some(previous) = previous {
            // Its last counts, then zero the gauges of series it had and
            // this bundle has not (removed tenants and limits).
            if let Ok(mut tally) = previous.tally.try_borrow_mut() {
                previous.metrics.flush(&mut tally, &previous.engine);
            }
            for name in loaded
                .metrics
                .layout
                .removed_gauges(&previous.metrics.layout)
            {
                if let Ok(id) = ffi::define_metric(ffi::METRIC_GAUGE, name) {
                    ffi::record_metric(id, 0);
                }
            }
            self.report_fleet(&previous, true);
            if let Err(e) = previous.engine.return_all_leases(&SharedData) {
                ffi::log(
                    ffi::LOG_ERROR,
                    &format!("tenantgate: cannot return the previous bundle's quota leases: {e}"),
                );
            }
        }
        self.loaded = Some(loaded);
        refresh_log_level();
        // Expired leases go back, and batched fleet reports go out, on a
        // tick (not on the request path).
        let report_ms = self
            .loaded
            .as_ref()
            .and_then(|l| l.engine.rate_limit_service())
            .map_or(LEASE_TICK_MS, |r| r.report_interval_ms);
        let _ = ffi::set_tick_period_ms(LEASE_TICK_MS.min(report_ms));
        true
    }

    fn on_tick(&mut self) {
        refresh_log_level();
        if let (Some(loaded), Ok(now)) = (&self.loaded, ffi::now_ns()) {
            if let Err(e) = loaded.engine.return_expired_leases(now, &SharedData) {
                ffi::log(
                    ffi::LOG_ERROR,
                    &format!("tenantgate: cannot return expired quota leases: {e}"),
                );
            }
        }
        if let Some(loaded) = self.loaded.clone() {
            self.report_fleet(&loaded, false);
            if let Ok(mut tally) = loaded.tally.try_borrow_mut() {
                loaded.metrics.flush(&mut tally, &loaded.engine);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            loaded: self.loaded.clone(),
            response_headers: Vec::new(),
            pending: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    loaded: Option<Rc<Loaded>>,
    /// Headers to add to the response (RateLimit fields on allowed requests).
    response_headers: Vec<(&'static str, String)>,
    /// The request waits for the rate limit service.
    pending: Option<Pending>,
}

/// A request paused for its fleet check: what finishing it needs.
struct Pending {
    token: u32,
    call: FleetCall,
    decision: Decision,
    mapped: Mapped,
    /// What the local limits charged, given back if the fleet refuses.
    refund: Option<Refund>,
    start: u64,
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let (Some(loaded), Some(p)) = (self.loaded.clone(), self.pending.take()) else {
            return;
        };
        if p.token != token_id {
            self.pending = Some(p);
            return;
        }
        let engine = &loaded.engine;
        let answer = grpc_answer(status_code, response_size);
        let now = ffi::now_ns().unwrap_or(0);
        let decision =
            match engine.fleet_answer(&p.call, answer.as_deref().map_err(Clone::clone), now) {
                FleetOutcome::Admitted => p.decision,
                FleetOutcome::Refused(q) => {
                    give_back(engine, p.refund.as_ref());
                    Decision::over_quota(q)
                }
                FleetOutcome::Failed(why) => {
                    ffi::increment_metric(loaded.metrics.fleet_errors, 1);
                    log_fleet_error(&why);
                    self.fleet_failed(engine, p.decision, p.refund.as_ref(), why)
                }
            };
        let action = self.finish_mapped(&loaded, decision, &p.mapped, p.start);
        if action == Action::Continue {
            if let Err(e) = ffi::continue_request() {
                ffi::log(
                    ffi::LOG_ERROR,
                    &format!("tenantgate: cannot resume the request: {e}"),
                );
            }
        }
    }

    fn on_done(&mut self) -> bool {
        // The stream ended (a client reset) while its fleet check was
        // pending: the local tokens it was charged go back.
        if let (Some(loaded), Some(p)) = (&self.loaded, self.pending.take()) {
            give_back(&loaded.engine, p.refund.as_ref());
        }
        true
    }
}

/// Gives back a local charge (the fleet refused, or the stream ended).
fn give_back(engine: &Engine, refund: Option<&Refund>) {
    if let Some(r) = refund {
        if let Err(e) = engine.refund(r, &SharedData) {
            ffi::log(
                ffi::LOG_ERROR,
                &format!("tenantgate: cannot give back local quota tokens: {e}"),
            );
        }
    }
}

/// Bucket state in proxy-wasm shared data (one VM per worker shares it).
struct SharedData;

impl BucketStore for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        ffi::get_shared_data(key)
            .map_err(|e| StoreError::Unavailable(format!("get_shared_data: {e}")))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        match ffi::set_shared_data(key, value, cas) {
            Ok(()) => Ok(()),
            Err(ffi::HostError::CasMismatch) => Err(StoreError::CasMismatch),
            Err(e) => Err(StoreError::Unavailable(format!("set_shared_data: {e}"))),
        }
    }
}

/// Dynamic metadata through `get_property(["metadata", "filter_metadata", ...])`.
struct HostMetadata;

impl MetadataSource for HostMetadata {
    fn metadata(&self, path: &[String]) -> Option<Vec<u8>> {
        let mut p: Vec<&str> = vec!["metadata", "filter_metadata"];
        p.extend(path.iter().map(String::as_str));
        ffi::property(&p).ok().flatten()
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(loaded) = self.loaded.clone() else {
            // Never configured: nothing can be decided. Envoy does not create
            // HTTP contexts for a plugin that failed to configure, so this is
            // defensive; fail closed.
            let d = Decision::error(Default::default(), "tenantgate has no bundle loaded");
            return self.deny(None, &d, None, None, None);
        };
        let engine = &loaded.engine;
        if stops_at("early") {
            return Action::Continue;
        }
        let start = ffi::now_ns().unwrap_or(0);
        let map = ffi::header_map(ffi::MAP_REQUEST_HEADERS);
        let headers = match map.as_ref().map(ffi::HeaderMap::pairs) {
            Ok(Some(h)) => h,
            Ok(None) => {
                let d = Decision::error(
                    engine.settings().on_error,
                    "cannot read request headers: malformed header map",
                );
                return self.finish(&loaded, d, None, None, None, start);
            }
            Err(e) => {
                let d = Decision::error(
                    engine.settings().on_error,
                    format!("cannot read request headers: {e}"),
                );
                return self.finish(&loaded, d, None, None, None, start);
            }
        };
        for name in own_headers(&headers) {
            let _ = ffi::remove_header(ffi::MAP_REQUEST_HEADERS, name);
        }
        let source = if engine.uses_source_ip() {
            ffi::property(&["source", "address"]).ok().flatten()
        } else {
            None
        };
        let input = HttpInput {
            headers: &headers,
            source_address: source.as_deref().and_then(|b| std::str::from_utf8(b).ok()),
            now_ns: start,
        };
        match engine.map_request(&input, &HostMetadata) {
            Ok(m) => {
                if stops_at("map") {
                    return Action::Continue;
                }
                let (decision, refund) = engine.decide_refundable(&m.request, &SharedData);
                if stops_at("decide") {
                    std::hint::black_box((&decision, &refund));
                    return Action::Continue;
                }
                if decision.is_allowed() {
                    if let Some(call) = engine.fleet_check(&m.request) {
                        return self.check_fleet(&loaded, call, decision, m, refund, start);
                    }
                }
                self.finish_mapped(&loaded, decision, &m, start)
            }
            Err(bad) => {
                let tenantgate_engine::http::BadRequest {
                    tenant,
                    message,
                    request_id,
                } = bad;
                let decision = Decision::bad_request(message);
                self.finish(
                    &loaded,
                    decision,
                    None,
                    tenant.as_ref(),
                    request_id.as_deref(),
                    start,
                )
            }
        }
    }

    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        // While the fleet check is pending the body waits too, or it would
        // release the request upstream.
        if self.pending.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A client may send our headers as trailers (HTTP/2, chunked HTTP/1.1);
        // the upstream must never receive them.
        if let Ok(map) = ffi::header_map(ffi::MAP_REQUEST_TRAILERS) {
            for name in own_headers(&map.pairs().unwrap_or_default()) {
                let _ = ffi::remove_header(ffi::MAP_REQUEST_TRAILERS, name);
            }
        }
        if self.pending.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (k, v) in self.response_headers.drain(..) {
            let _ = ffi::add_header(ffi::MAP_RESPONSE_HEADERS, k, &v);
        }
        Action::Continue
    }
}

impl Http {
    /// Pauses an admitted request and asks the rate limit service; the
    /// answer finishes it (`on_grpc_call_response`).
    fn check_fleet(
        &mut self,
        loaded: &Rc<Loaded>,
        call: FleetCall,
        decision: Decision,
        mapped: Mapped,
        refund: Option<Refund>,
        start: u64,
    ) -> Action {
        let engine = &loaded.engine;
        let Some(rls) = engine.rate_limit_service() else {
            return self.finish_mapped(loaded, decision, &mapped, start);
        };
        match dispatch(self, rls, Vec::new(), &call.message) {
            Ok(token) => {
                ffi::increment_metric(loaded.metrics.fleet_calls, 1);
                self.pending = Some(Pending {
                    token,
                    call,
                    decision,
                    mapped,
                    refund,
                    start,
                });
                Action::Pause
            }
            Err(why) => {
                ffi::increment_metric(loaded.metrics.fleet_errors, 1);
                log_fleet_error(&why);
                let decision = self.fleet_failed(engine, decision, refund.as_ref(), why);
                self.finish_mapped(loaded, decision, &mapped, start)
            }
        }
    }

    /// The decision when the fleet check failed: `rate_limit_service.on_error`.
    fn fleet_failed(
        &self,
        engine: &Engine,
        local: Decision,
        refund: Option<&Refund>,
        why: String,
    ) -> Decision {
        match engine.rate_limit_service().map(|r| r.on_error) {
            Some(OnError::Allow) => local,
            _ => {
                give_back(engine, refund);
                Decision::error(OnError::Deny, format!("rate limit service: {why}"))
            }
        }
    }

    /// [`Http::finish`] of a mapped request.
    fn finish_mapped(
        &mut self,
        loaded: &Loaded,
        decision: Decision,
        m: &Mapped,
        start: u64,
    ) -> Action {
        let (tenant, request_id) = (Some(&m.request.tenant), m.request_id.as_deref());
        self.finish(loaded, decision, Some(m), tenant, request_id, start)
    }

    /// Counts, audits and carries out a decision: continue (adding the
    /// identity headers when the request was mapped) or send the reply.
    fn finish(
        &mut self,
        loaded: &Loaded,
        decision: Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        start: u64,
    ) -> Action {
        let engine = &loaded.engine;
        if let Ok(mut tally) = loaded.tally.try_borrow_mut() {
            loaded
                .metrics
                .count(&mut tally, &decision, tenant, engine.settings().mode);
        }
        let blocks = decision.blocks(engine.settings().mode);
        let audits = engine.audits(&decision) && LOGS_INFO.with(std::cell::Cell::get);
        let decision_id = (blocks || audits).then(|| loaded.ids.next_id());
        if audits {
            let line = engine.audit_line_at(
                &decision,
                mapped,
                tenant,
                request_id,
                decision_id.as_deref(),
                start,
            );
            if let Some(line) = line {
                ffi::log(ffi::LOG_INFO, &line);
            }
        }
        self.record_time(loaded, start);
        if !blocks {
            if let Some(m) = mapped {
                // The upstream sees the path that was judged.
                if let Some(p) = &m.forward_path {
                    let _ = ffi::replace_header(ffi::MAP_REQUEST_HEADERS, ":path", p);
                }
                for (name, value) in m.upstream_headers() {
                    let _ = ffi::add_header(ffi::MAP_REQUEST_HEADERS, name, value);
                }
            }
            self.response_headers = engine.allow_response_headers(&decision);
            return Action::Continue;
        }
        self.deny(
            Some(engine),
            &decision,
            tenant,
            request_id,
            decision_id.as_deref(),
        )
    }

    /// Records the decision time of one request in 8 (the first always): two
    /// host calls saved on the others, and the histogram keeps its shape.
    fn record_time(&self, loaded: &Loaded, start: u64) {
        let n = loaded.requests.get();
        loaded.requests.set(n.wrapping_add(1));
        if !n.is_multiple_of(names::DECISION_TIME_SAMPLE) {
            return;
        }
        if let Ok(end) = ffi::now_ns() {
            ffi::record_metric(
                loaded.metrics.decision_us,
                end.saturating_sub(start) / 1_000,
            );
        }
    }

    fn deny(
        &mut self,
        engine: Option<&Engine>,
        decision: &Decision,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        decision_id: Option<&str>,
    ) -> Action {
        if decision.is_allowed() {
            return Action::Continue;
        }
        let reply = engine
            .and_then(|e| e.reply(decision, tenant, request_id, decision_id))
            .unwrap_or_else(|| LocalReply::unavailable(decision.status));
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (status, grpc_status, body) = (reply.status, reply.grpc_status, reply.body.as_str());
        if let Err(e) = ffi::send_local_response(status, "tenantgate", body, &headers, grpc_status)
        {
            ffi::log(
                ffi::LOG_ERROR,
                &format!("tenantgate: cannot send the {status} reply: {e}"),
            );
        }
        Action::Pause
    }
}
