//! Loading a bundle (`envoy_dynamic_module_on_http_filter_config_new`): the
//! filter config is the bundle JSON; it becomes one [`Engine`] shared by
//! every worker, with the process's quota store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tenantgate_engine::decision::Counter;
use tenantgate_engine::fleet::{FleetCall, FleetOutcome, REPORT_HEADER, RLS_METHOD, RLS_SERVICE};
use tenantgate_engine::http::DecisionIds;
use tenantgate_engine::metrics::{self as m, names, Layout, Tally, Update};
use tenantgate_engine::quota::footprint::Footprint;
use tenantgate_engine::quota::LEASE_TTL_NS;
use tenantgate_engine::{Bundle, Engine, Worker};

use crate::abi::{self, Config, RawHeader, Ticker};
use crate::host::{grpc_answer, grpc_frame, now_ns, split_tags, LogLevel, Metric, MetricKind};
use crate::store::NativeStore;

/// What every stream of one filter configuration shares.
pub struct Shared {
    pub engine: Worker,
    /// The process's bucket store (one for every configuration and reload,
    /// as shared data is for the Wasm filter).
    pub store: Arc<NativeStore>,
    /// Ids of this configuration's decisions (replies, audit lines).
    pub ids: Mutex<DecisionIds>,
    pub metrics: Metrics,
    /// The bundle's per-tenant and per-limit series, with real labels.
    pub series: Series,
    /// Requests decided (one in [`names::DECISION_TIME_SAMPLE`] is timed).
    pub requests: std::sync::atomic::AtomicU64,
    /// Wakes the config on the main thread: expired leases go back, and
    /// batched fleet reports go out.
    ticker: Mutex<Option<Ticker>>,
    /// Batched reports in flight, by stream id (main thread only).
    reports: Mutex<HashMap<u64, Report>>,
}

/// A batched report waiting for its answer.
struct Report {
    call: FleetCall,
    http_status: Option<String>,
    grpc_status: Option<String>,
    body: Vec<u8>,
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

    pub fn on_report_headers(&self, stream: u64, headers: &[RawHeader<'_>]) {
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

    pub fn on_report_data(&self, stream: u64, data: &[&[u8]]) {
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = reports.get_mut(&stream) {
            for chunk in data {
                r.body.extend_from_slice(chunk);
            }
        }
    }

    /// A report's call ended (`failure`: reset, with why): what the service
    /// said goes to the engine (limits over, for the next requests).
    pub fn on_report_done(&self, c: &Config<'_>, stream: u64, failure: Option<String>) {
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
        let outcome =
            self.engine
                .fleet_answer(&r.call, answer.as_deref().map_err(Clone::clone), now_ns());
        if let FleetOutcome::Failed(why) = outcome {
            if let Some(m) = self.metrics.fleet_errors {
                let _ = c.update(m, &[], 1);
            }
            crate::request::log_fleet_error(&why);
        }
    }
}

/// The tick: expired quota leases go back to the store, and a batched fleet
/// report goes out when one is due.
pub fn on_tick(c: &mut Config<'_>, shared: &Shared) {
    let engine = &shared.engine;
    shared.series.flush(c, engine, &shared.store);
    let now = now_ns();
    if let Err(e) = engine.return_expired_leases(now, &*shared.store) {
        abi::log(
            LogLevel::Error,
            &format!("tenantgate: cannot return expired quota leases: {e}"),
        );
    }
    let (Some(rls), Some(call)) = (engine.rate_limit_service(), engine.fleet_report(now, false))
    else {
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
    match c.start_http_stream(&rls.cluster, &headers, &body, u64::from(rls.timeout_ms)) {
        Ok(stream) => {
            if let Some(m) = shared.metrics.fleet_calls {
                let _ = c.update(m, &[], 1);
            }
            shared
                .reports
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    stream,
                    Report {
                        call,
                        http_status: None,
                        grpc_status: None,
                        body: Vec::new(),
                    },
                );
        }
        Err(e) => {
            if let Some(m) = shared.metrics.fleet_errors {
                let _ = c.update(m, &[], 1);
            }
            crate::request::log_fleet_error(&format!("cannot call cluster `{}`: {e}", rls.cluster));
        }
    }
}

/// The engine's metrics layout (the series a bundle defines), each series
/// defined once per name with its tags as Envoy labels (`tenant`, `parent`,
/// `limit`, `reason`; empty where a series has no such tag, which
/// Prometheus reads as no label).
pub struct Series {
    pub layout: Layout,
    /// For each of `layout.defs`: the Envoy metric and its label values.
    refs: Vec<Option<(Metric, Vec<String>)>>,
    /// Per-limit counts since the last tick (every worker's).
    pub tally: Mutex<Tally>,
}

impl Series {
    fn define(c: &mut Config<'_>, engine: &Engine) -> Series {
        let layout = Layout::new(engine);
        // Each name's label names: every tag any of its series carries, in
        // the order of `names::TAGS`.
        let mut labels: HashMap<&str, (m::MetricKind, Vec<&str>)> = HashMap::new();
        for d in &layout.defs {
            let (base, tags) = split_tags(&d.name);
            let entry = labels.entry(base).or_insert((d.kind, Vec::new()));
            for (t, _) in tags {
                if !entry.1.contains(&t) {
                    entry.1.push(t);
                }
            }
        }
        let mut defined: HashMap<&str, (Metric, Vec<&str>)> = HashMap::new();
        for (base, (kind, mut tags)) in labels {
            tags.sort_by_key(|t| names::TAGS.iter().position(|x| x == t));
            let kind = match kind {
                m::MetricKind::Counter => MetricKind::Counter,
                m::MetricKind::Gauge => MetricKind::Gauge,
                m::MetricKind::Histogram => MetricKind::Histogram,
            };
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
                let (base, tags) = split_tags(&d.name);
                let (metric, names) = defined.get(base)?;
                let values = names
                    .iter()
                    .map(|n| {
                        tags.iter()
                            .find(|(t, _)| t == n)
                            .map_or(String::new(), |(_, v)| (*v).to_string())
                    })
                    .collect();
                Some((*metric, values))
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
        let tally = Mutex::new(layout.tally());
        Series {
            layout,
            refs,
            tally,
        }
    }

    /// The Envoy metric and label values of a layout series.
    pub fn target(&self, r: m::MetricRef) -> Option<(Metric, Vec<&str>)> {
        let (metric, values) = self.refs.get(r)?.as_ref()?;
        Some((*metric, values.iter().map(String::as_str).collect()))
    }

    /// Sends what the tally holds (on the tick).
    fn flush(&self, c: &Config<'_>, engine: &Worker, store: &NativeStore) {
        let updates = {
            let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
            self.layout.flush(&mut tally, engine, now_ns(), store)
        };
        for u in updates {
            let (r, v) = match u {
                Update::Add(r, n) | Update::Set(r, n) => (r, n),
            };
            if let Some((metric, values)) = self.target(r) {
                let _ = c.update(metric, &values, v);
            }
        }
    }
}

/// The outcome counters, defined while the configuration loads (Envoy
/// freezes metric definitions afterwards). Per-tenant and per-limit series
/// with labels are not defined yet (see `docs/reference.md`, "Native build").
pub struct Metrics {
    allowed: Option<Metric>,
    denied_policy: Option<Metric>,
    denied_quota: Option<Metric>,
    bad_request: Option<Metric>,
    shadow_denied: Option<Metric>,
    errors: Option<Metric>,
    /// Calls to the rate limit service, and the ones that failed.
    pub fleet_calls: Option<Metric>,
    pub fleet_errors: Option<Metric>,
    /// Decision time in microseconds (one request in 8, the first always).
    pub decision_us: Option<Metric>,
}

impl Metrics {
    fn define(c: &mut Config<'_>) -> Metrics {
        let mut counter = |name: &str| c.define(MetricKind::Counter, name, &[]).ok();
        Metrics {
            allowed: counter(names::ALLOWED),
            denied_policy: counter(names::DENIED_POLICY),
            denied_quota: counter(names::DENIED_QUOTA),
            bad_request: counter(names::BAD_REQUEST),
            shadow_denied: counter(names::SHADOW_DENIED),
            errors: counter(names::ERRORS),
            fleet_calls: counter(names::FLEET_CALLS),
            fleet_errors: counter(names::FLEET_ERRORS),
            decision_us: c
                .define(MetricKind::Histogram, names::DECISION_US, &[])
                .ok(),
        }
    }

    /// The counter a decision's outcome feeds.
    pub fn outcome(&self, counter: Counter) -> Option<Metric> {
        match counter {
            Counter::Allowed => self.allowed,
            Counter::DeniedPolicy => self.denied_policy,
            Counter::DeniedQuota => self.denied_quota,
            Counter::BadRequest => self.bad_request,
            Counter::ShadowDenied => self.shadow_denied,
            Counter::Error => self.errors,
        }
    }
}

/// [`split_tags`] with owned parts.
fn split_tags_owned(name: &str) -> (String, Vec<(String, String)>) {
    let (base, tags) = split_tags(name);
    (
        base.to_string(),
        tags.into_iter()
            .map(|(t, v)| (t.to_string(), v.to_string()))
            .collect(),
    )
}

/// The process-wide bucket store.
fn store() -> Arc<NativeStore> {
    static STORE: OnceLock<Arc<NativeStore>> = OnceLock::new();
    Arc::clone(STORE.get_or_init(|| Arc::new(NativeStore::new())))
}

/// The quota keys the last bundle of each filter name used, so a reload
/// empties the buckets it removes (as the Wasm filter does per plugin).
fn footprints() -> &'static Mutex<HashMap<String, Footprint>> {
    static F: OnceLock<Mutex<HashMap<String, Footprint>>> = OnceLock::new();
    F.get_or_init(Default::default)
}

/// The bundle version each filter name loaded last.
fn last_versions() -> &'static Mutex<HashMap<String, String>> {
    static V: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    V.get_or_init(Default::default)
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

/// Loads the bundle in `config` for filter `name`; `None` refuses the
/// configuration (Envoy then keeps the previous one, if any).
pub fn new(c: &mut Config<'_>, name: &[u8], config: &[u8]) -> Option<Arc<Shared>> {
    let name = String::from_utf8_lossy(name).into_owned();
    let rejected = c
        .define(MetricKind::Counter, names::CONFIG_REJECTED, &[])
        .ok();
    let loaded = c
        .define(MetricKind::Counter, names::CONFIG_LOADED, &[])
        .ok();
    let text = String::from_utf8_lossy(config);
    let engine = match Bundle::from_json(&text)
        .and_then(|b| Engine::new(&b))
        .map(|e| Worker::new(std::sync::Arc::new(e)))
    {
        Ok(engine) => engine,
        Err(diagnostics) => {
            abi::log(
                LogLevel::Error,
                &format!(
                    "tenantgate: bundle refused ({} errors); the previous bundle, if any, keeps serving:\n{diagnostics}",
                    diagnostics.len()
                ),
            );
            if let Some(m) = rejected {
                let _ = c.update(m, &[], 1);
            }
            return None;
        }
    };
    let store = store();
    let previous = footprints()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.clone(), engine.quotas().footprint());
    match engine
        .quotas()
        .reconcile(&*store, &name, previous.as_ref(), now_ns())
    {
        Ok(done) if done.emptied > 0 => abi::log(
            LogLevel::Info,
            &format!(
                "tenantgate: emptied {} quota keys the new bundle no longer uses",
                done.emptied
            ),
        ),
        Ok(_) => {}
        Err(e) => abi::log(
            LogLevel::Error,
            &format!("tenantgate: cannot create the quota buckets: {e}"),
        ),
    }
    if let Err(e) = engine.load_keyed_seed(&*store) {
        abi::log(
            LogLevel::Error,
            &format!("tenantgate: cannot read the keyed limits' seed: {e}"),
        );
    }
    if !engine.fleet_limits().is_empty() {
        let names: Vec<String> = engine
            .fleet_limits()
            .all()
            .iter()
            .map(|l| format!("`{}` at {}", l.name, l.tenant))
            .collect();
        let (level, why) = match engine.rate_limit_service() {
            // As the Wasm filter says.
            None => (
                LogLevel::Warn,
                "are not enforced: the bundle has no `rate_limit_service` setting (see docs/fleet.md)",
            ),
            Some(_) => (LogLevel::Info, "are enforced with the rate limit service"),
        };
        abi::log(
            level,
            &format!("tenantgate: fleet limits ({}) {why}", names.join(", ")),
        );
    }
    let metrics = Metrics::define(c);
    let series = Series::define(c, &engine);
    if let Some(m) = loaded {
        let _ = c.update(m, &[], 1);
    }
    if let Ok(g) = c.define(MetricKind::Gauge, names::BUNDLE_VERSION, &[]) {
        let _ = c.update(g, &[], names::bundle_version_value(engine.version()));
    }
    // The bundle gauges: this version's read 1, the version this filter
    // name ran before reads 0 (Envoy keeps one stat per name and labels).
    let previous_version = last_versions()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(name.clone(), engine.version().to_string());
    let mut versions = vec![(engine.version().to_string(), 1)];
    if let Some(p) = previous_version.filter(|p| p != engine.version()) {
        versions.push((p, 0));
    }
    for (version, value) in &versions {
        for series in [names::bundle(version), names::bundle_active(version)] {
            let (base, tags) = split_tags_owned(&series);
            let tag_names: Vec<&str> = tags.iter().map(|(t, _)| t.as_str()).collect();
            let tag_values: Vec<&str> = tags.iter().map(|(_, v)| v.as_str()).collect();
            if let Ok(g) = c.define(MetricKind::Gauge, &base, &tag_names) {
                let _ = c.update(g, &tag_values, *value);
            }
        }
    }
    abi::log(
        LogLevel::Info,
        &format!(
            "tenantgate: loaded bundle {} ({} tenants, {} policies, mode {:?}) as native filter `{name}`",
            engine.version(),
            engine.tenants().len(),
            engine.policy_count(),
            engine.settings().mode
        ),
    );
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(now_ns());
        h.write(name.as_bytes());
        h.finish()
    };
    // The tick: as often as leases expire, or reports are due if sooner.
    let lease_ms = LEASE_TTL_NS / 1_000_000;
    let period = engine
        .rate_limit_service()
        .map_or(lease_ms, |r| lease_ms.min(u64::from(r.report_interval_ms)));
    let ticker = c.ticker(period);
    if ticker.is_none() {
        abi::log(
            LogLevel::Error,
            "tenantgate: cannot start the tick thread: expired leases are not returned early and batched fleet reports are not sent",
        );
    }
    Some(Arc::new(Shared {
        engine,
        store,
        ids: Mutex::new(DecisionIds::new(seed)),
        metrics,
        series,
        requests: std::sync::atomic::AtomicU64::new(0),
        ticker: Mutex::new(ticker),
        reports: Mutex::new(HashMap::new()),
    }))
}
