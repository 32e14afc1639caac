//! What the host keeps: per host (shared by its VMs) and per VM (one wasmtime
//! store each).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

use wasmtime::{Memory, TypedFunc};

use crate::clock::Clock;
use crate::headers::Headers;
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::shared::SharedData;

/// A property path: its segments.
pub(crate) type PropertyPath = Vec<Vec<u8>>;

/// State shared by every VM of a host, like an Envoy process.
#[derive(Debug)]
pub(crate) struct HostShared {
    pub shared_data: SharedData,
    pub metrics: Metrics,
    pub logs: Logs,
    pub clock: Clock,
    /// Calls to imports the host does not implement, by `module.name`.
    pub unimplemented: Mutex<BTreeMap<String, u64>>,
    /// Calls of each host function, by name.
    pub calls: Mutex<BTreeMap<&'static str, u64>>,
    pub traps: AtomicU64,
    /// What `proxy_get_log_level` answers; lines below it are still captured.
    pub log_level: AtomicU32,
    pub vm_config: Vec<u8>,
    pub vm_properties: HashMap<PropertyPath, Vec<u8>>,
    pub seed: u64,
}

/// Where an HTTP context is in its life, which decides what it may touch
/// (as Envoy: request headers are writable only while they are processed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    Log,
}

/// A response the filter sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
    pub grpc_status: i32,
}

#[derive(Debug)]
pub(crate) struct HttpCtx {
    pub phase: Phase,
    pub request_headers: Headers,
    pub request_trailers: Headers,
    pub response_headers: Headers,
    pub properties: HashMap<PropertyPath, Vec<u8>>,
    /// `metadata.filter_metadata`: filter name -> value.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub local: Option<LocalResponse>,
    pub local_count: u32,
}

/// One VM's state, the data of its wasmtime store.
pub(crate) struct VmState {
    pub host: Arc<HostShared>,
    pub index: usize,
    pub memory: Option<Memory>,
    pub malloc: Option<TypedFunc<u32, u32>>,
    /// The configuration `PLUGIN_CONFIGURATION` serves (set before `proxy_on_configure`).
    pub plugin_config: Vec<u8>,
    /// The context the current callback runs for.
    pub active: u32,
    pub http: HashMap<u32, HttpCtx>,
    pub tick_period_ms: u32,
    /// Root-context properties set with `proxy_set_property`.
    pub root_properties: HashMap<PropertyPath, Vec<u8>>,
    pub rng: u64,
}

impl VmState {
    pub fn new(host: Arc<HostShared>, index: usize) -> VmState {
        let rng = host.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        VmState {
            host,
            index,
            memory: None,
            malloc: None,
            plugin_config: Vec::new(),
            active: 0,
            http: HashMap::new(),
            tick_period_ms: 0,
            root_properties: HashMap::new(),
            rng,
        }
    }

    /// The HTTP context of the running callback, if it is one.
    pub fn http(&self) -> Option<&HttpCtx> {
        self.http.get(&self.active)
    }

    pub fn http_mut(&mut self) -> Option<&mut HttpCtx> {
        self.http.get_mut(&self.active)
    }

    /// splitmix64, for `random_get`: deterministic per host seed and VM.
    pub fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
