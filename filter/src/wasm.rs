//! Root and HTTP contexts: bytes in from Envoy, the engine's flow
//! (`tenantgate_engine::flow`), its effects carried out with host calls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use tenantgate_engine::fleet::{
    FleetCall, REPORT_HEADER, RLQS_METHOD, RLQS_SERVICE, RLS_METHOD, RLS_SERVICE,
};
use tenantgate_engine::flow::{self, Effects, Level, LogLine, Pending, Step, Verdict};
use tenantgate_engine::http::{own_headers, HttpInput, LocalReply, MetadataSource};
use tenantgate_engine::metrics::{MetricKind, MetricRef, Update};
use tenantgate_engine::quota::{BucketStore, StoreError};
use tenantgate_engine::{Bundle, Engine, Worker};

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
        Box::new(Root { loaded: None, context_id, reports: HashMap::new(), stream: None })
    });
}}

/// A measuring build (`envoy/bench_stages.sh`) stops a request after one
/// stage and lets it through: `early` (before any work), `map` (headers
/// read and mapped) or `decide` (policy and quota decided, nothing sent).
/// Unset in every other build, where the checks fold away.
const BENCH_STAGE: Option<&str> = option_env!("TENANTGATE_BENCH_STAGE");

/// True in a measuring build that stops at `stage`.
fn stops_at(stage: &str) -> bool {
    BENCH_STAGE == Some(stage)
}

thread_local! {
    /// The bundle this VM loaded last (a reload may come in a new root
    /// context): its leases go back to shared data when it is replaced.
    static CURRENT: RefCell<Option<Rc<Loaded>>> = const { RefCell::new(None) };
}

/// A bundle's worker in this VM and the host ids of its metrics.
struct Loaded {
    worker: Worker,
    /// Host ids of `worker.layout().defs`, aligned with it.
    ids: Vec<u32>,
}

impl Loaded {
    /// Defines every series of the worker's layout (gauges get their value).
    fn define(worker: Worker) -> Loaded {
        let ids = worker
            .layout()
            .defs
            .iter()
            .map(|d| {
                let kind = match d.kind {
                    MetricKind::Counter => ffi::METRIC_COUNTER,
                    MetricKind::Gauge => ffi::METRIC_GAUGE,
                    MetricKind::Histogram => ffi::METRIC_HISTOGRAM,
                };
                let id = ffi::define_metric(kind, &d.name).unwrap_or(u32::MAX);
                if let Some(v) = d.initial {
                    ffi::record_metric(id, v);
                }
                id
            })
            .collect();
        Loaded { worker, ids }
    }

    fn id(&self, r: MetricRef) -> u32 {
        self.ids.get(r).copied().unwrap_or(u32::MAX)
    }

    fn apply(&self, updates: &[Update]) {
        for u in updates {
            match *u {
                Update::Add(r, n) => {
                    ffi::increment_metric(self.id(r), i64::try_from(n).unwrap_or(i64::MAX))
                }
                Update::Set(r, v) => ffi::record_metric(self.id(r), v),
            }
        }
    }
}

fn write_logs(lines: &[LogLine]) {
    for l in lines {
        let level = match l.level {
            Level::Info => ffi::LOG_INFO,
            Level::Warn => ffi::LOG_WARN,
            Level::Error => ffi::LOG_ERROR,
        };
        ffi::log(level, &l.text);
    }
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

/// Calls the rate limit service through the SDK, which routes the answer
/// back to `context`'s `on_grpc_call_response`. The SDK panics on a status
/// it does not expect from the host; the arguments are checked first
/// (`rate_limit_service` is validated with the bundle), so only an unknown
/// cluster (`ParseFailure`) or a host failure comes back, as an error.
fn dispatch(
    context: &dyn Context,
    cluster: &str,
    timeout_ms: u32,
    metadata: Vec<(&str, &[u8])>,
    message: &[u8],
) -> Result<u32, String> {
    if cluster.is_empty() || message.is_empty() {
        return Err("no cluster or empty message".into());
    }
    context
        .dispatch_grpc_call(
            cluster,
            RLS_SERVICE,
            RLS_METHOD,
            metadata,
            Some(message),
            std::time::Duration::from_millis(u64::from(timeout_ms)),
        )
        .map_err(|s| {
            format!(
                "cannot call cluster `{cluster}`: {s:?} (is it in Envoy's config, over HTTP/2?)"
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

fn now() -> u64 {
    ffi::now_ns().unwrap_or(0)
}

struct Root {
    loaded: Option<Rc<Loaded>>,
    context_id: u32,
    /// Batched fleet reports in flight, by gRPC token.
    reports: HashMap<u32, (Rc<Loaded>, FleetCall)>,
    /// Mode `assigned`: the RLQS stream's token, while it is open.
    stream: Option<u32>,
}

impl Root {
    /// Sends a batched fleet report.
    fn send_report(&mut self, loaded: &Rc<Loaded>, call: FleetCall) {
        let Some(rls) = loaded.worker.engine().rate_limit_service() else {
            return;
        };
        let metadata = vec![(REPORT_HEADER.0, REPORT_HEADER.1.as_bytes())];
        match dispatch(self, &rls.cluster, rls.timeout_ms, metadata, &call.message) {
            Ok(token) => {
                loaded.apply(&[Update::Add(loaded.worker.layout().fleet_calls, 1)]);
                self.reports.insert(token, (Rc::clone(loaded), call));
            }
            Err(why) => {
                let tick = loaded.worker.report_answer(&call, Err(why), now());
                write_logs(&tick.logs);
                loaded.apply(&tick.metrics);
            }
        }
    }

    /// Sends an RLQS usage report on the stream, opening it first if needed.
    fn send_stream_report(&mut self, loaded: &Loaded, message: &[u8]) {
        let worker = &loaded.worker;
        if self.stream.is_none() {
            let Some(cluster) = worker.stream_cluster() else {
                return;
            };
            match self.open_grpc_stream(cluster, RLQS_SERVICE, RLQS_METHOD, Vec::new()) {
                Ok(token) => {
                    self.stream = Some(token);
                    loaded.apply(&worker.stream_opened());
                }
                Err(s) => {
                    let why = format!(
                        "cannot open a stream to cluster `{cluster}`: {s:?} (is it in Envoy's config, over HTTP/2?)"
                    );
                    let tick = worker.stream_closed(&why, now());
                    write_logs(&tick.logs);
                    loaded.apply(&tick.metrics);
                    return;
                }
            }
        }
        let Some(token) = self.stream else {
            return;
        };
        match ffi::grpc_send(token, message) {
            Ok(()) => loaded.apply(&[Update::Add(worker.layout().fleet_calls, 1)]),
            Err(e) => {
                self.stream = None;
                let _ = ffi::grpc_cancel(token);
                let tick = worker.stream_closed(&format!("cannot send a report: {e}"), now());
                write_logs(&tick.logs);
                loaded.apply(&tick.metrics);
            }
        }
    }

    /// Reads the host's log level: audit lines are only built when `info`
    /// lines are kept (on configure and on every tick, never per request).
    fn refresh_log_level(&self) {
        if let (Some(loaded), Ok(level)) = (&self.loaded, ffi::log_level()) {
            loaded.worker.set_logs_info(level <= ffi::LOG_INFO);
        }
    }
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let Some(loaded) = self
            .loaded
            .clone()
            .filter(|_| self.stream == Some(token_id))
        else {
            return;
        };
        let tick = match ffi::grpc_response(message_size) {
            Ok(bytes) => loaded.worker.stream_message(&bytes, now()),
            Err(e) => {
                self.stream = None;
                let _ = ffi::grpc_cancel(token_id);
                let why = format!("cannot read a message: {e}");
                loaded.worker.stream_closed(&why, now())
            }
        };
        write_logs(&tick.logs);
        loaded.apply(&tick.metrics);
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        if self.stream != Some(token_id) {
            return;
        }
        self.stream = None;
        if let Some(loaded) = self.loaded.clone() {
            let why = match status_code {
                0 => "closed by the service".to_string(),
                14 => "gRPC status 14 (unavailable)".to_string(),
                s => format!("gRPC status {s}"),
            };
            let tick = loaded.worker.stream_closed(&why, now());
            write_logs(&tick.logs);
            loaded.apply(&tick.metrics);
        }
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some((loaded, call)) = self.reports.remove(&token_id) else {
            return;
        };
        let answer = grpc_answer(status_code, response_size);
        let tick =
            loaded
                .worker
                .report_answer(&call, answer.as_deref().map_err(Clone::clone), now());
        write_logs(&tick.logs);
        loaded.apply(&tick.metrics);
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
        // The record of the buckets a bundle uses is per plugin name.
        let scope = ffi::property(&["plugin_name"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let previous = CURRENT.with(|c| c.borrow().clone());
        let act = Worker::activate(
            Arc::new(engine),
            previous.as_ref().map(|p| &p.worker),
            &scope,
            &SharedData,
            now(),
            id_seed(self.context_id),
        );
        let loaded = Rc::new(Loaded::define(act.worker));
        loaded.apply(&act.metrics);
        write_logs(&act.logs);
        if let Some(previous) = previous {
            previous.apply(&act.previous_metrics);
            for name in &act.zero_gauges {
                if let Ok(id) = ffi::define_metric(ffi::METRIC_GAUGE, name) {
                    ffi::record_metric(id, 0);
                }
            }
            if let Some(call) = act.previous_report {
                self.send_report(&previous, call);
            }
        }
        CURRENT.with(|c| c.replace(Some(Rc::clone(&loaded))));
        self.loaded = Some(loaded);
        self.refresh_log_level();
        let _ = ffi::set_tick_period_ms(act.tick_ms);
        true
    }

    fn on_tick(&mut self) {
        self.refresh_log_level();
        let Some(loaded) = self.loaded.clone() else {
            return;
        };
        let tick = loaded.worker.on_tick(now(), &SharedData);
        write_logs(&tick.logs);
        loaded.apply(&tick.metrics);
        if let Some(call) = tick.report {
            self.send_report(&loaded, call);
        }
        // A root context whose bundle a newer one replaced (in a new root
        // context) leaves the stream to it.
        let current = CURRENT.with(|c| c.borrow().as_ref().is_some_and(|c| Rc::ptr_eq(c, &loaded)));
        if !current {
            if let Some(token) = self.stream.take() {
                let _ = ffi::grpc_cancel(token);
            }
            return;
        }
        if let Some(message) = tick.stream_report {
            self.send_stream_report(&loaded, &message);
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
        ffi::property(&tenantgate_engine::settings::metadata_property(path))
            .ok()
            .flatten()
    }
}

struct Http {
    loaded: Option<Rc<Loaded>>,
    /// Headers to add to the response (RateLimit fields on allowed requests).
    response_headers: Vec<(&'static str, String)>,
    /// The request waits for the rate limit service (the call's token).
    pending: Option<(u32, Pending)>,
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(loaded) = self.loaded.clone() else {
            return;
        };
        let Some((_, pending)) = self.pending.take_if(|(t, _)| *t == token_id) else {
            return;
        };
        let answer = grpc_answer(status_code, response_size);
        let effects = loaded.worker.resume(
            pending,
            answer.as_deref().map_err(Clone::clone),
            now(),
            &SharedData,
        );
        if self.carry_out(&loaded, effects) == Action::Continue {
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
        if let (Some(loaded), Some((_, p))) = (&self.loaded, self.pending.take()) {
            write_logs(loaded.worker.abandon(p, &SharedData).as_slice());
        }
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(loaded) = self.loaded.clone() else {
            return reply(flow::no_bundle());
        };
        if stops_at("early") {
            return Action::Continue;
        }
        let start = now();
        let map = ffi::header_map(ffi::MAP_REQUEST_HEADERS);
        let headers = match map.as_ref().map(ffi::HeaderMap::pairs) {
            Ok(Some(h)) => h,
            Ok(None) => {
                let msg = "cannot read request headers: malformed header map";
                return self.carry_out(&loaded, loaded.worker.host_error(msg, start));
            }
            Err(e) => {
                let msg = format!("cannot read request headers: {e}");
                return self.carry_out(&loaded, loaded.worker.host_error(msg, start));
            }
        };
        for name in own_headers(&headers) {
            let _ = ffi::remove_header(ffi::MAP_REQUEST_HEADERS, name);
        }
        let worker = &loaded.worker;
        let source = if worker.engine().uses_source_ip() {
            ffi::property(&["source", "address"]).ok().flatten()
        } else {
            None
        };
        let input = HttpInput {
            headers: &headers,
            source_address: source.as_deref().and_then(|b| std::str::from_utf8(b).ok()),
            now_ns: start,
        };
        if BENCH_STAGE.is_some() {
            return bench_stage(worker, &input);
        }
        match worker.begin(&input, &HostMetadata, Some(&SharedData)) {
            Step::Done(effects) => self.carry_out(&loaded, effects),
            Step::Deferred(d) => {
                match dispatch(self, &d.cluster, d.timeout_ms, Vec::new(), &d.call) {
                    Ok(token) => {
                        loaded.apply(&[Update::Add(worker.layout().fleet_calls, 1)]);
                        self.pending = Some((token, d.pending));
                        Action::Pause
                    }
                    Err(why) => {
                        let effects = worker.resume(d.pending, Err(why), now(), &SharedData);
                        self.carry_out(&loaded, effects)
                    }
                }
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
    /// Carries out a decided request's effects: logs, metrics, then the
    /// verdict (continue with the engine's headers and path, or reply).
    fn carry_out(&mut self, loaded: &Loaded, effects: Effects) -> Action {
        write_logs(&effects.logs);
        for (key, value) in &effects.filter_state {
            let _ = ffi::set_property(key, value);
        }
        loaded.apply(&effects.metrics);
        if let Some((r, start)) = effects.sample_time {
            if let Ok(end) = ffi::now_ns() {
                ffi::record_metric(loaded.id(r), end.saturating_sub(start) / 1_000);
            }
        }
        for (name, value) in effects.request_headers() {
            let _ = ffi::add_header(ffi::MAP_REQUEST_HEADERS, name, value);
        }
        match effects.verdict {
            Verdict::Continue {
                path,
                response_headers,
            } => {
                if let Some(p) = path {
                    let _ = ffi::replace_header(ffi::MAP_REQUEST_HEADERS, ":path", &p);
                }
                self.response_headers = response_headers;
                Action::Continue
            }
            Verdict::Reply(r) => send_reply(&r),
        }
    }
}

/// Carries out a verdict made without a worker.
fn reply(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Reply(r) => send_reply(&r),
        Verdict::Continue { .. } => Action::Continue,
    }
}

/// Sends a local reply; the request stops here.
fn send_reply(reply: &LocalReply) -> Action {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (status, grpc_status, body) = (reply.status, reply.grpc_status, reply.body.as_str());
    if let Err(e) = ffi::send_local_response(status, "tenantgate", body, &headers, grpc_status) {
        ffi::log(
            ffi::LOG_ERROR,
            &format!("tenantgate: cannot send the {status} reply: {e}"),
        );
    }
    Action::Pause
}

/// A measuring build's stop after mapping or deciding.
fn bench_stage(worker: &Worker, input: &HttpInput<'_>) -> Action {
    let mapped = worker.engine().map_request(input, &HostMetadata);
    if stops_at("decide") {
        if let Ok(m) = &mapped {
            std::hint::black_box(worker.decide_refundable(&m.request, &SharedData));
        }
    }
    std::hint::black_box(&mapped);
    Action::Continue
}
