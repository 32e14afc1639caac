//! Loading a bundle (`envoy_dynamic_module_on_http_filter_config_new`) and
//! the tick, through the engine's flow (`tenantgate_engine::flow`): the
//! filter config is the bundle JSON; it becomes one [`Worker`] shared by
//! every worker thread, over the process's quota store. This file only
//! carries out what the engine says (logs, metrics, reports to send).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tenantgate_engine::fleet::{FleetCall, REPORT_HEADER, RLS_METHOD, RLS_SERVICE};
use tenantgate_engine::flow::{Level, LogLine, Tick};
use tenantgate_engine::metrics::{self as m, names, Layout, MetricRef, Update};
use tenantgate_engine::Worker;

use crate::abi::{self, Config, RawHeader, Ticker};
use crate::host::{
    engine_of, grpc_answer, grpc_frame, now_ns, split_tags, LogLevel, Metric, MetricKind,
};
use tenantgate_engine::quota::ShardedStore;

/// What every stream of one filter configuration shares: one worker for all
/// of Envoy's worker threads (its state is behind locks and atomics, and the
/// quota store is process-wide anyway, so per-thread workers would only
/// split the decision cache and the leases).
pub struct Shared {
    pub worker: Arc<Worker>,
    /// The process's bucket store (one for every configuration and reload,
    /// as shared data is for the Wasm filter).
    pub store: Arc<ShardedStore>,
    /// The Envoy metrics of the worker's layout.
    pub metrics: Metrics,
    /// Wakes the config on the main thread for the worker's tick.
    ticker: Mutex<Option<Ticker>>,
    /// Batched reports in flight, by stream id (main thread only).
    reports: Mutex<HashMap<u64, Report>>,
    /// Mode `assigned`: the RLQS stream, while open (main thread only).
    pub(crate) rlqs: Mutex<Option<crate::rlqs::RlqsStream>>,
}

/// A batched report waiting for its answer, and the worker that made it
/// (the previous bundle's, for its last report).
struct Report {
    worker: Arc<Worker>,
    call: FleetCall,
    http_status: Option<String>,
    grpc_status: Option<String>,
    body: Vec<u8>,
}

/// Writes the engine's log lines.
pub fn write_logs(lines: &[LogLine]) {
    for l in lines {
        let level = match l.level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        abi::log(level, &l.text);
    }
}

impl Shared {
    /// Stops the ticker (from the config's destroy hook, on the main thread).
    pub fn stop_ticker(&self) {
        let t = self
            .ticker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(t);
    }

    /// Carries out `from`'s tick work through this config: its logs, its
    /// metrics (by name when `from` is a previous bundle's worker).
    fn carry_out(&self, c: &Config<'_>, from: &Worker, tick: &Tick) {
        write_logs(&tick.logs);
        let same = std::ptr::eq(from, &*self.worker);
        for u in &tick.metrics {
            let u = if same {
                Some(*u)
            } else {
                translate(from.layout(), self.worker.layout(), *u)
            };
            if let Some(u) = u {
                self.metrics.apply(u, |m, l, v| c.update(m, l, v));
            }
        }
    }

    /// Sends a batched fleet report made by `worker` (gRPC framed here).
    fn send_report(&self, c: &mut Config<'_>, worker: Arc<Worker>, call: FleetCall) {
        let Some(rls) = worker.rate_limit_service() else {
            return;
        };
        let path = format!("/{RLS_SERVICE}/{RLS_METHOD}");
        let headers = [
            (":method", "POST"),
            (":path", path.as_str()),
            ("host", rls.cluster.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            REPORT_HEADER,
        ];
        let body = grpc_frame(&call.message);
        match c.start_http_stream(
            &rls.cluster,
            &headers,
            &body,
            true,
            u64::from(rls.timeout_ms),
        ) {
            Ok(stream) => {
                let calls = Update::Add(self.worker.layout().fleet_calls, 1);
                self.metrics.apply(calls, |m, l, v| c.update(m, l, v));
                let report = Report {
                    worker,
                    call,
                    http_status: None,
                    grpc_status: None,
                    body: Vec::new(),
                };
                self.reports
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(stream, report);
            }
            Err(e) => {
                let why = format!("cannot call cluster `{}`: {e}", rls.cluster);
                let tick = worker.report_answer(&call, Err(why), now_ns());
                self.carry_out(c, &worker, &tick);
            }
        }
    }

    pub fn on_report_headers(&self, stream: u64, headers: &[RawHeader<'_>]) {
        if self.on_rlqs_headers(stream, headers) {
            return;
        }
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = reports.get_mut(&stream) {
            for (k, v) in headers {
                match *k {
                    b":status" => r.http_status = Some(String::from_utf8_lossy(v).into_owned()),
                    b"grpc-status" => r.grpc_status = Some(String::from_utf8_lossy(v).into_owned()),
                    _ => {}
                }
            }
        }
    }

    pub fn on_report_data(&self, c: &Config<'_>, stream: u64, data: &[&[u8]]) {
        if self.on_rlqs_data(c, stream, data) {
            return;
        }
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = reports.get_mut(&stream) {
            for chunk in data {
                r.body.extend_from_slice(chunk);
            }
        }
    }

    /// A report's call ended (`failure`: reset, with why): the answer goes
    /// to the worker that sent it.
    pub fn on_report_done(&self, c: &Config<'_>, stream: u64, failure: Option<String>) {
        if self.on_rlqs_done(c, stream, failure.clone()) {
            return;
        }
        let Some(r) = self
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&stream)
        else {
            return;
        };
        let answer = match failure {
            Some(why) => Err(why),
            None => grpc_answer(r.http_status.as_deref(), r.grpc_status.as_deref(), &r.body),
        };
        let tick =
            r.worker
                .report_answer(&r.call, answer.as_deref().map_err(Clone::clone), now_ns());
        self.carry_out(c, &r.worker, &tick);
    }
}

/// The tick: the worker's periodic work (expired leases, per-limit metrics,
/// a batched fleet report when one is due).
pub fn on_tick(c: &mut Config<'_>, shared: &Shared) {
    let worker = &shared.worker;
    worker.set_logs_info(abi::log_enabled(LogLevel::Info));
    let mut tick = worker.on_tick(now_ns(), &*shared.store);
    let report = tick.report.take();
    let stream_report = tick.stream_report.take();
    shared.carry_out(c, worker, &tick);
    if let Some(call) = report {
        shared.send_report(c, Arc::clone(worker), call);
    }
    if let Some(message) = stream_report {
        shared.send_stream_report(c, worker, &message);
    }
}

/// `u`, made for `from`'s layout, as an update of the series of the same
/// name in `to` (none if `to` has no such series).
fn translate(from: &Layout, to: &Layout, u: Update) -> Option<Update> {
    let find = |r: MetricRef| {
        let name = &from.defs.get(r)?.name;
        to.defs.iter().position(|d| d.name == *name)
    };
    Some(match u {
        Update::Add(r, v) => Update::Add(find(r)?, v),
        Update::Set(r, v) => Update::Set(find(r)?, v),
    })
}

fn kind(k: m::MetricKind) -> MetricKind {
    match k {
        m::MetricKind::Counter => MetricKind::Counter,
        m::MetricKind::Gauge => MetricKind::Gauge,
        m::MetricKind::Histogram => MetricKind::Histogram,
    }
}

/// Each base name of a layout with its kind and label names: every tag any
/// of its series carries, in the order of `names::TAGS`.
fn label_names(layout: &Layout) -> HashMap<&str, (MetricKind, Vec<&str>)> {
    let mut labels: HashMap<&str, (MetricKind, Vec<&str>)> = HashMap::new();
    for d in &layout.defs {
        let (base, tags) = split_tags(&d.name);
        let entry = labels.entry(base).or_insert((kind(d.kind), Vec::new()));
        for (t, _) in tags {
            if !entry.1.contains(&t) {
                entry.1.push(t);
            }
        }
    }
    for (_, tags) in labels.values_mut() {
        tags.sort_by_key(|t| names::TAGS.iter().position(|x| x == t));
    }
    labels
}

/// The label values of series `name` for a metric with labels `label_names`
/// (empty where the series has no such tag, which Prometheus reads as no
/// label).
fn label_values(name: &str, label_names: &[&str]) -> Vec<String> {
    let (_, tags) = split_tags(name);
    label_names
        .iter()
        .map(|n| {
            tags.iter()
                .find(|(t, _)| t == n)
                .map_or(String::new(), |(_, v)| (*v).to_string())
        })
        .collect()
}

/// A layout's series as Envoy metrics: each base name defined once with its
/// tags as Envoy labels (`tenant`, `parent`, `limit`, `reason`, `bundle`),
/// the same names as the Wasm filter's after Prometheus export.
pub struct Metrics {
    /// For each of `layout.defs`: the Envoy metric and its label values.
    refs: Vec<Option<(Metric, Vec<String>)>>,
}

impl Metrics {
    /// Defines every series of `layout` (in `config_new`: Envoy freezes
    /// definitions afterwards) and gives each its first value.
    fn define(c: &mut Config<'_>, layout: &Layout) -> Metrics {
        let mut defined: HashMap<&str, (Metric, Vec<&str>)> = HashMap::new();
        for (base, (kind, tags)) in label_names(layout) {
            match c.define(kind, base, &tags) {
                Ok(metric) => {
                    defined.insert(base, (metric, tags));
                }
                Err(e) => abi::log(
                    LogLevel::Warn,
                    &format!("tenantgate: cannot define metric `{base}`: {e}"),
                ),
            }
        }
        let refs: Vec<Option<(Metric, Vec<String>)>> = layout
            .defs
            .iter()
            .map(|d| {
                let (metric, names) = defined.get(split_tags(&d.name).0)?;
                Some((*metric, label_values(&d.name, names)))
            })
            .collect();
        // Every series exists from the start, as the Wasm filter's (Envoy
        // creates a labelled series on its first update: counters get 0).
        for (d, r) in layout.defs.iter().zip(&refs) {
            let Some((metric, values)) = r else { continue };
            let value = match (metric.kind, d.initial) {
                (_, Some(v)) => v,
                (MetricKind::Counter, None) => 0,
                // Gauges without a configured value wait for the first tick.
                _ => continue,
            };
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = c.update(*metric, &values, value);
        }
        Metrics { refs }
    }

    /// The Envoy metric and label values of a layout series.
    pub fn target(&self, r: MetricRef) -> Option<(Metric, Vec<&str>)> {
        let (metric, values) = self.refs.get(r)?.as_ref()?;
        Some((*metric, values.iter().map(String::as_str).collect()))
    }

    /// Carries out one update with `update` (the hook's handle: a stream's
    /// or the configuration's).
    pub fn apply<E>(&self, u: Update, update: impl FnOnce(Metric, &[&str], u64) -> Result<(), E>) {
        let (Update::Add(r, v) | Update::Set(r, v)) = u;
        if let Some((metric, values)) = self.target(r) {
            let _ = update(metric, &values, v);
        }
    }
}

/// Updates the previous bundle's series by name in `config_new` (where
/// metrics can still be defined), each with the labels its bundle gave it:
/// its last counts, and its gauges this bundle no longer has set to 0.
fn previous_series(c: &mut Config<'_>, previous: &Layout, updates: &[Update], zero: &[String]) {
    let labels = label_names(previous);
    let mut defined: HashMap<&str, Option<Metric>> = HashMap::new();
    let named = updates
        .iter()
        .filter_map(|u| {
            let (Update::Add(r, v) | Update::Set(r, v)) = *u;
            Some((previous.defs.get(r)?.name.as_str(), v))
        })
        .chain(zero.iter().map(|n| (n.as_str(), 0)));
    for (name, value) in named {
        let base = split_tags(name).0;
        let Some((kind, label_names)) = labels.get(base) else {
            continue;
        };
        let metric = *defined
            .entry(base)
            .or_insert_with(|| c.define(*kind, base, label_names).ok());
        if let Some(metric) = metric {
            let values = label_values(name, label_names);
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = c.update(metric, &values, value);
        }
    }
}

/// The process-wide bucket store.
fn store() -> Arc<ShardedStore> {
    static STORE: OnceLock<Arc<ShardedStore>> = OnceLock::new();
    Arc::clone(STORE.get_or_init(|| Arc::new(ShardedStore::new())))
}

/// The worker each filter name loaded last: a reload puts the new bundle in
/// force in its place (as the Wasm filter does per plugin name).
fn current() -> &'static Mutex<HashMap<String, Arc<Worker>>> {
    static C: OnceLock<Mutex<HashMap<String, Arc<Worker>>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// Called once when Envoy loads the module.
pub fn on_program_init() {
    // Release builds abort on panic; a build that unwinds reports it first.
    std::panic::set_hook(Box::new(|info| {
        abi::log(
            LogLevel::Critical,
            &format!("tenantgate: panic (a bug, please report it): {info}"),
        );
    }));
}

/// A seed for decision ids: the operating system's random source (through
/// the standard library's hasher keys), the time and the filter name.
fn id_seed(name: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ns());
    h.write(name.as_bytes());
    h.finish()
}

/// Loads the bundle in `config` for filter `name`; `None` refuses the
/// configuration (Envoy then keeps the previous one, if any).
pub fn new(c: &mut Config<'_>, name: &[u8], config: &[u8]) -> Option<Arc<Shared>> {
    let name = String::from_utf8_lossy(name).into_owned();
    let engine = match engine_of(config) {
        Ok(engine) => engine,
        Err(diagnostics) => {
            abi::log(
                LogLevel::Error,
                &format!(
                    "tenantgate: bundle refused ({} errors); the previous bundle, if any, keeps serving:\n{diagnostics}",
                    diagnostics.len()
                ),
            );
            if let Ok(m) = c.define(MetricKind::Counter, names::CONFIG_REJECTED, &[]) {
                let _ = c.update(m, &[], 1);
            }
            return None;
        }
    };
    let store = store();
    let previous = current()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&name)
        .cloned();
    let act = Worker::activate(
        Arc::new(engine),
        previous.as_deref(),
        &name,
        &*store,
        now_ns(),
        id_seed(&name),
    );
    let worker = Arc::new(act.worker);
    worker.set_logs_info(abi::log_enabled(LogLevel::Info));
    let metrics = Metrics::define(c, worker.layout());
    for u in &act.metrics {
        metrics.apply(*u, |m, l, v| c.update(m, l, v));
    }
    write_logs(&act.logs);
    let shared = Arc::new(Shared {
        worker: Arc::clone(&worker),
        store,
        metrics,
        ticker: Mutex::new(None),
        reports: Mutex::new(HashMap::new()),
        rlqs: Mutex::new(None),
    });
    if let Some(p) = previous {
        previous_series(c, p.layout(), &act.previous_metrics, &act.zero_gauges);
        if let Some(call) = act.previous_report {
            shared.send_report(c, p, call);
        }
    }
    current()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name, worker);
    match c.ticker(u64::from(act.tick_ms)) {
        Some(t) => *shared.ticker.lock().unwrap_or_else(PoisonError::into_inner) = Some(t),
        None => abi::log(
            LogLevel::Error,
            "tenantgate: cannot start the tick thread: expired leases are not returned early and batched fleet reports are not sent",
        ),
    }
    Some(shared)
}
