//! A host: one compiled `tenantgate.wasm`, the state its VMs share (shared data,
//! metrics, logs, clock), and a factory of VMs. Like an Envoy process.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::{anyhow, Context as _, Result};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, OptLevel};

use crate::abi::LogLevel;
use crate::clock::Clock;
use crate::logs::{LogLine, Logs};
use crate::metrics::{Metric, Metrics};
use crate::shared::SharedData;
use crate::state::{HostShared, VmState};
use crate::vm::Vm;

/// The wasmtime engine every host of the process uses (compiled modules are
/// cached per file, so many tests share one compilation).
fn engine() -> Result<Engine> {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let mut config = Config::new();
    config.cranelift_opt_level(OptLevel::Speed);
    // `perf record` can name the module's functions (scripts/profile-wasm.sh).
    if std::env::var_os("TENANTGATE_HOST_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config)?;
    Ok(ENGINE.get_or_init(|| engine).clone())
}

type CacheKey = (PathBuf, u64, Option<SystemTime>);

/// Compiles a module, once per file version in this process, and keeps the
/// machine code on disk (`target/host-tests-cache`) so later test runs skip
/// Cranelift (compiling the 2.6 MB filter takes most of a minute in a debug
/// build of wasmtime).
fn compile(path: &Path) -> Result<Module> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Module>>> = OnceLock::new();
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok());
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = cache.get(&key) {
        return Ok(m.clone());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let engine = engine()?;
    let module = match disk_cache_path(&engine, &bytes) {
        Some(cached) => match load_cached(&engine, &cached) {
            Some(m) => m,
            None => {
                let m = Module::new(&engine, &bytes)
                    .with_context(|| format!("cannot compile `{}`", path.display()))?;
                store_cached(&m, &cached);
                m
            }
        },
        None => Module::new(&engine, &bytes)
            .with_context(|| format!("cannot compile `{}`", path.display()))?,
    };
    cache.insert(key, module.clone());
    Ok(module)
}

/// `target/host-tests-cache/<hash of the module and the engine settings>.cwasm`.
fn disk_cache_path(engine: &Engine, wasm: &[u8]) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    if std::env::var_os("TENANTGATE_HOST_NO_CACHE").is_some() {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    wasm.hash(&mut h);
    engine.precompile_compatibility_hash().hash(&mut h);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join("target")
        .join("host-tests-cache");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join(format!("{:016x}-{}.cwasm", h.finish(), wasm.len())))
}

#[allow(unsafe_code)]
fn load_cached(engine: &Engine, file: &Path) -> Option<Module> {
    if !file.is_file() {
        return None;
    }
    // SAFETY: the file is machine code this host wrote with
    // `Module::serialize` into the build's own target directory, named by a
    // hash of the module and of the engine's compatibility settings; wasmtime
    // checks its version and settings header and refuses a mismatch (then we
    // compile afresh). It is not input from outside the build.
    unsafe { Module::deserialize_file(engine, file) }.ok()
}

fn store_cached(module: &Module, file: &Path) {
    if let Ok(bytes) = module.serialize() {
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, file);
        }
    }
}

/// Settings of a host, with Envoy-like defaults.
#[derive(Debug, Clone)]
pub struct HostBuilder {
    wasm: PathBuf,
    log_level: LogLevel,
    vm_config: Vec<u8>,
    clock: Clock,
    seed: u64,
    properties: Vec<(Vec<String>, Vec<u8>)>,
    log_capacity: usize,
}

impl HostBuilder {
    /// How many log lines the host keeps (the oldest go first; 0 keeps none).
    pub fn log_capacity(mut self, lines: usize) -> Self {
        self.log_capacity = lines;
        self
    }

    /// What `proxy_get_log_level` answers (default `Info`, like Envoy).
    /// Every line is captured whatever the level.
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// The VM configuration `proxy_on_vm_start` sees (default empty).
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.vm_config = config.into();
        self
    }

    /// Starts the clock at this time (nanoseconds since the Unix epoch).
    pub fn clock_at(mut self, now_ns: u64) -> Self {
        self.clock = Clock::at(now_ns);
        self
    }

    /// Seed of `random_get`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A property every context can read (e.g. `["plugin_name"]`).
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.properties
            .push((path.iter().map(|s| s.to_string()).collect(), value.into()));
        self
    }

    pub fn build(self) -> Result<Host> {
        let module = compile(&self.wasm)?;
        let engine = engine()?;
        let mut linker: Linker<VmState> = Linker::new(&engine);
        let stubbed = crate::imports::define_imports(&mut linker, &module)?;
        let pre = linker
            .instantiate_pre(&module)
            .context("cannot link tenantgate.wasm against the host")?;
        let mut vm_properties = HashMap::new();
        for (k, v) in [
            ("plugin_name", "tenantgate"),
            ("plugin_root_id", "tenantgate"),
            ("plugin_vm_id", "tenantgate"),
        ] {
            vm_properties.insert(vec![k.as_bytes().to_vec()], v.as_bytes().to_vec());
        }
        for (path, value) in self.properties {
            vm_properties.insert(path.into_iter().map(String::into_bytes).collect(), value);
        }
        let shared = Arc::new(HostShared {
            shared_data: SharedData::default(),
            metrics: Metrics::default(),
            logs: Logs::with_capacity(self.log_capacity),
            clock: self.clock,
            unimplemented: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(BTreeMap::new()),
            traps: AtomicU64::new(0),
            log_level: AtomicU32::new(self.log_level as u32),
            vm_config: self.vm_config,
            vm_properties,
            seed: self.seed,
        });
        Ok(Host {
            inner: Arc::new(HostInner {
                engine,
                pre,
                shared,
                stubbed,
                imports: module
                    .imports()
                    .map(|i| format!("{}.{}", i.module(), i.name()))
                    .collect(),
                next_vm: AtomicUsize::new(0),
            }),
        })
    }
}

struct HostInner {
    engine: Engine,
    pre: InstancePre<VmState>,
    shared: Arc<HostShared>,
    stubbed: Vec<String>,
    imports: Vec<String>,
    next_vm: AtomicUsize,
}

/// A proxy-wasm host running `tenantgate.wasm`: cheap to clone, shared by its VMs.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("vms", &self.inner.next_vm.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Host {
    /// A host for the module at `wasm` with default settings.
    pub fn new(wasm: impl AsRef<Path>) -> Result<Host> {
        Host::builder(wasm).build()
    }

    pub fn builder(wasm: impl AsRef<Path>) -> HostBuilder {
        HostBuilder {
            wasm: wasm.as_ref().to_path_buf(),
            log_level: LogLevel::Info,
            vm_config: Vec::new(),
            clock: Clock::default(),
            seed: 0x7e4a_47a7_e000_0001,
            properties: Vec::new(),
            log_capacity: crate::logs::DEFAULT_CAPACITY,
        }
    }

    /// Starts a new VM (a worker): instantiates the module, runs
    /// `_initialize` (or `_start`), creates the root context and calls
    /// `proxy_on_vm_start`. Configure it with [`Vm::configure`].
    pub fn vm(&self) -> Result<Vm> {
        let index = self.inner.next_vm.fetch_add(1, Ordering::Relaxed);
        let state = VmState::new(self.inner.shared.clone(), index);
        Vm::start(&self.inner.engine, &self.inner.pre, state)
    }

    /// Every line logged by any VM so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.inner.shared.logs.all()
    }

    pub fn clear_logs(&self) {
        self.inner.shared.logs.clear()
    }

    /// A counter or gauge value by name (histograms: their sample count).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.inner.shared.metrics.by_name(name).map(|m| m.value)
    }

    /// A metric with its samples.
    pub fn metric_details(&self, name: &str) -> Option<Metric> {
        self.inner.shared.metrics.by_name(name)
    }

    pub fn metrics(&self) -> Vec<Metric> {
        self.inner.shared.metrics.all()
    }

    /// The clock every VM of this host reads.
    pub fn clock(&self) -> Clock {
        self.inner.shared.clock.clone()
    }

    pub fn shared_data(&self) -> &SharedData {
        &self.inner.shared.shared_data
    }

    /// Calls to imports the host does not implement, by `module.name`.
    /// How many times each host function was called (every VM), since the
    /// host started or [`Host::reset_calls`].
    pub fn calls(&self) -> BTreeMap<&'static str, u64> {
        self.inner
            .shared
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Starts counting host calls from zero.
    pub fn reset_calls(&self) {
        if let Ok(mut c) = self.inner.shared.calls.lock() {
            c.clear();
        }
    }

    pub fn unimplemented_calls(&self) -> BTreeMap<String, u64> {
        self.inner
            .shared
            .unimplemented
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// The module's imports that got an error-returning stub.
    pub fn stubbed_imports(&self) -> &[String] {
        &self.inner.stubbed
    }

    /// Every import of the module, as `module.name`.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }

    /// How many calls into the module trapped.
    pub fn traps(&self) -> u64 {
        self.inner.shared.traps.load(Ordering::Relaxed)
    }

    pub fn set_log_level(&self, level: LogLevel) {
        self.inner
            .shared
            .log_level
            .store(level as u32, Ordering::Relaxed);
    }
}

/// Where `tenantgate.wasm` is: `$TENANTGATE_WASM`, else `<repo>/dist/tenantgate.wasm`.
pub fn wasm_path() -> PathBuf {
    match std::env::var_os("TENANTGATE_WASM") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("dist")
            .join("tenantgate.wasm"),
    }
}

/// The path of `tenantgate.wasm`, or an error saying how to build it.
pub fn locate_wasm() -> Result<PathBuf> {
    let path = wasm_path();
    if path.is_file() {
        Ok(path)
    } else {
        Err(anyhow!(
            "tenantgate.wasm not found at {}: run scripts/build-wasm.sh (or set TENANTGATE_WASM)",
            path.display()
        ))
    }
}
