//! Loading a bundle (`envoy_dynamic_module_on_http_filter_config_new`): the
//! filter config is the bundle JSON; it becomes one [`Engine`] shared by
//! every worker, with the process's quota store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tenantgate_engine::decision::Counter;
use tenantgate_engine::http::DecisionIds;
use tenantgate_engine::metrics::names;
use tenantgate_engine::quota::footprint::Footprint;
use tenantgate_engine::{Bundle, Engine};

use crate::abi::{self, Config};
use crate::host::{now_ns, LogLevel, Metric, MetricKind};
use crate::store::NativeStore;

/// What every stream of one filter configuration shares.
pub struct Shared {
    pub engine: Engine,
    /// The process's bucket store (one for every configuration and reload,
    /// as shared data is for the Wasm filter).
    pub store: Arc<NativeStore>,
    /// Ids of this configuration's decisions (replies, audit lines).
    pub ids: Mutex<DecisionIds>,
    pub metrics: Metrics,
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
    let engine = match Bundle::from_json(&text).and_then(|b| Engine::new(&b)) {
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
            Some(_) => (
                LogLevel::Error,
                "cannot be checked by the native build yet: requests they apply to get `rate_limit_service.on_error` (see docs/reference.md, \"Native build\")",
            ),
        };
        abi::log(
            level,
            &format!("tenantgate: fleet limits ({}) {why}", names.join(", ")),
        );
    }
    let metrics = Metrics::define(c);
    if let Some(m) = loaded {
        let _ = c.update(m, &[], 1);
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
    Some(Arc::new(Shared {
        engine,
        store,
        ids: Mutex::new(DecisionIds::new(seed)),
        metrics,
    }))
}
