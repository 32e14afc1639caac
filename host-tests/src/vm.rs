//! One VM (an Envoy worker's copy of the module), driven through its
//! lifecycle the way Envoy drives it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Engine, Instance, InstancePre, Store, TypedFunc, WasmParams, WasmResults};

use crate::abi::Action;
use crate::headers::Headers;
use crate::state::{HttpCtx, LocalResponse, Phase, VmState};

struct Exports {
    on_context_create: Option<TypedFunc<(u32, u32), ()>>,
    on_vm_start: Option<TypedFunc<(u32, u32), u32>>,
    on_configure: Option<TypedFunc<(u32, u32), u32>>,
    on_request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    on_response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    on_done: Option<TypedFunc<u32, u32>>,
    on_log: Option<TypedFunc<u32, ()>>,
    on_delete: Option<TypedFunc<u32, ()>>,
    on_tick: Option<TypedFunc<u32, ()>>,
}

fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<VmState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => Ok(Some(f.typed::<P, R>(&*store).with_context(|| {
            format!("the module exports `{name}` with an unexpected signature")
        })?)),
    }
}

/// A running VM. It owns its wasmtime store, so it can move to its own thread.
pub struct Vm {
    store: Store<VmState>,
    exports: Exports,
    root: u32,
    next_context: u32,
    configured: bool,
    trapped: Option<String>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("index", &self.store.data().index)
            .field("root", &self.root)
            .field("configured", &self.configured)
            .field("trapped", &self.trapped)
            .finish_non_exhaustive()
    }
}

impl Vm {
    pub(crate) fn start(engine: &Engine, pre: &InstancePre<VmState>, state: VmState) -> Result<Vm> {
        let mut store = Store::new(engine, state);
        let instance = pre
            .instantiate(&mut store)
            .context("cannot instantiate tenantgate.wasm")?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow!("tenantgate.wasm exports no `memory`"))?;
        let malloc = match typed::<u32, u32>(&instance, &mut store, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<u32, u32>(&instance, &mut store, "malloc")?,
        };
        if malloc.is_none() {
            bail!("tenantgate.wasm exports neither `proxy_on_memory_allocate` nor `malloc`");
        }
        store.data_mut().memory = Some(memory);
        store.data_mut().malloc = malloc;
        let exports = Exports {
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")?,
            on_vm_start: typed(&instance, &mut store, "proxy_on_vm_start")?,
            on_configure: typed(&instance, &mut store, "proxy_on_configure")?,
            on_request_headers: typed(&instance, &mut store, "proxy_on_request_headers")?,
            on_request_trailers: typed(&instance, &mut store, "proxy_on_request_trailers")?,
            on_response_headers: typed(&instance, &mut store, "proxy_on_response_headers")?,
            on_done: typed(&instance, &mut store, "proxy_on_done")?,
            on_log: typed(&instance, &mut store, "proxy_on_log")?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete")?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick")?,
        };
        let initialize = typed::<(), ()>(&instance, &mut store, "_initialize")?;
        let main = typed::<(u32, u32), u32>(&instance, &mut store, "main")?;
        let start = typed::<(), ()>(&instance, &mut store, "_start")?;
        let mut vm = Vm {
            store,
            exports,
            root: 1,
            next_context: 2,
            configured: false,
            trapped: None,
        };
        match (initialize, start) {
            (Some(init), _) => {
                vm.call(&init, (), "_initialize")?;
                if let Some(main) = main {
                    vm.call(&main, (0, 0), "main")?;
                }
            }
            (None, Some(start)) => vm.call(&start, (), "_start")?,
            (None, None) => {}
        }
        vm.create_root(1)?;
        Ok(vm)
    }

    /// Calls an export; a trap poisons the VM (as in Envoy, where a trapped VM is
    /// not used again) and is returned as an error.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        f: &TypedFunc<P, R>,
        args: P,
        what: &str,
    ) -> Result<R> {
        if let Some(t) = &self.trapped {
            bail!("the VM trapped earlier ({t}); not calling `{what}`");
        }
        match f.call(&mut self.store, args) {
            Ok(r) => Ok(r),
            Err(e) => {
                let msg = format!("{e:?}");
                self.trapped = Some(msg.clone());
                self.store.data().host.traps.fetch_add(1, Ordering::Relaxed);
                let tail: String = self
                    .logs_tail()
                    .into_iter()
                    .map(|l| format!("\n  {l}"))
                    .collect();
                Err(anyhow!("tenantgate.wasm trapped in `{what}`: {msg}\nlast lines logged by this VM:{tail}"))
            }
        }
    }

    fn logs_tail(&self) -> Vec<String> {
        let me = self.store.data().index;
        let lines: Vec<String> = self
            .store
            .data()
            .host
            .logs
            .all()
            .into_iter()
            .filter(|l| l.vm == me)
            .map(|l| format!("{:?} {}", l.level, l.message))
            .collect();
        lines.into_iter().rev().take(5).rev().collect()
    }

    /// `proxy_on_context_create(root, 0)` then `proxy_on_vm_start(root, size)`.
    fn create_root(&mut self, id: u32) -> Result<()> {
        self.store.data_mut().active = id;
        if let Some(f) = self.exports.on_context_create.clone() {
            self.call(&f, (id, 0), "proxy_on_context_create")?;
        }
        let size = u32::try_from(self.store.data().host.vm_config.len()).unwrap_or(u32::MAX);
        if let Some(f) = self.exports.on_vm_start.clone() {
            let ok = self.call(&f, (id, size), "proxy_on_vm_start")?;
            if ok == 0 {
                bail!("proxy_on_vm_start returned false");
            }
        }
        Ok(())
    }

    fn configure_root(&mut self, id: u32, config: &[u8]) -> Result<bool> {
        let st = self.store.data_mut();
        st.active = id;
        st.plugin_config = config.to_vec();
        let size = u32::try_from(config.len()).unwrap_or(u32::MAX);
        let ok = match self.exports.on_configure.clone() {
            Some(f) => self.call(&f, (id, size), "proxy_on_configure")? != 0,
            None => true,
        };
        self.store.data_mut().plugin_config.clear();
        Ok(ok)
    }

    /// `proxy_on_configure` on the VM's root context with this plugin
    /// configuration; its answer. A filter must keep serving its previous
    /// configuration when it answers false.
    pub fn configure(&mut self, config: impl AsRef<[u8]>) -> Result<bool> {
        let ok = self.configure_root(self.root, config.as_ref())?;
        self.configured |= ok;
        Ok(ok)
    }

    /// A configuration update the way Envoy applies a new plugin config
    /// (ECDS): a new root context is created, started and configured; if it
    /// accepts, it replaces the old one (which is done and deleted), else it
    /// is deleted and the old one keeps serving. Returns whether it was accepted.
    pub fn reload(&mut self, config: impl AsRef<[u8]>) -> Result<bool> {
        let id = self.next_id();
        self.create_root(id)?;
        let ok = self.configure_root(id, config.as_ref())?;
        let retired = if ok {
            std::mem::replace(&mut self.root, id)
        } else {
            id
        };
        self.finish_context(retired, false)?;
        self.configured |= ok;
        Ok(ok)
    }

    fn next_id(&mut self) -> u32 {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(2);
        id
    }

    /// `proxy_on_done`, `proxy_on_log` (HTTP contexts) and `proxy_on_delete`.
    fn finish_context(&mut self, id: u32, http: bool) -> Result<bool> {
        self.store.data_mut().active = id;
        let done = match self.exports.on_done.clone() {
            Some(f) => self.call(&f, id, "proxy_on_done")? != 0,
            None => true,
        };
        if http {
            if let Some(f) = self.exports.on_log.clone() {
                self.call(&f, id, "proxy_on_log")?;
            }
        }
        if let Some(f) = self.exports.on_delete.clone() {
            self.call(&f, id, "proxy_on_delete")?;
        }
        Ok(done)
    }

    /// `proxy_on_tick` on the root context (Envoy fires it on every VM).
    pub fn tick(&mut self) -> Result<()> {
        let root = self.root;
        self.store.data_mut().active = root;
        if let Some(f) = self.exports.on_tick.clone() {
            self.call(&f, root, "proxy_on_tick")?;
        }
        Ok(())
    }

    /// The tick period the filter asked for (0: none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// Index of this VM in its host (in creation order).
    pub fn index(&self) -> usize {
        self.store.data().index
    }

    /// The root context id serving requests.
    pub fn root_context(&self) -> u32 {
        self.root
    }

    /// True once a configuration was accepted.
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Size of the module's linear memory, in 64 KiB pages.
    pub fn memory_pages(&self) -> u64 {
        self.store
            .data()
            .memory
            .map(|m| m.size(&self.store))
            .unwrap_or(0)
    }

    /// The trap that poisoned this VM, if any.
    pub fn trapped(&self) -> Option<&str> {
        self.trapped.as_deref()
    }

    /// A request to send through the filter (`GET /` with no other header by default).
    pub fn request(&mut self) -> RequestBuilder<'_> {
        RequestBuilder::new(self)
    }

    fn run(&mut self, input: StreamInput) -> Result<Response> {
        let id = self.next_id();
        let root = self.root;
        let StreamInput {
            headers,
            trailers,
            properties,
            metadata,
            end_of_stream,
            upstream_status,
            upstream_headers,
        } = input;
        let num_headers = u32::try_from(headers.len()).unwrap_or(u32::MAX);
        {
            let st = self.store.data_mut();
            st.http.insert(
                id,
                HttpCtx {
                    phase: Phase::RequestHeaders,
                    request_headers: headers,
                    request_trailers: trailers,
                    response_headers: Headers::new(),
                    properties,
                    metadata,
                    local: None,
                    local_count: 0,
                },
            );
            st.active = id;
        }
        let result = self.run_stream(
            id,
            root,
            num_headers,
            end_of_stream,
            upstream_status,
            upstream_headers,
        );
        let ctx = self.store.data_mut().http.remove(&id);
        let mut response = result?;
        if let Some(ctx) = ctx {
            response.local_responses_sent = ctx.local_count;
        }
        Ok(response)
    }

    fn run_stream(
        &mut self,
        id: u32,
        root: u32,
        num_headers: u32,
        end_of_stream: bool,
        upstream_status: u16,
        upstream_headers: Headers,
    ) -> Result<Response> {
        if let Some(f) = self.exports.on_context_create.clone() {
            self.call(&f, (id, root), "proxy_on_context_create")?;
        }
        let action = match self.exports.on_request_headers.clone() {
            Some(f) => Action::from_code(self.call(
                &f,
                (id, num_headers, u32::from(end_of_stream)),
                "proxy_on_request_headers",
            )?),
            None => Action::Continue,
        };
        // Request trailers (after the body) reach the filter only when it let
        // the headers through, as in Envoy.
        let has_trailers = self
            .store
            .data()
            .http
            .get(&id)
            .is_some_and(|c| !c.request_trailers.is_empty() && c.local.is_none());
        if has_trailers && action == Action::Continue {
            let st = self.store.data_mut();
            let mut n = 0;
            if let Some(ctx) = st.http.get_mut(&id) {
                ctx.phase = Phase::RequestTrailers;
                n = u32::try_from(ctx.request_trailers.len()).unwrap_or(u32::MAX);
            }
            st.active = id;
            if let Some(f) = self.exports.on_request_trailers.clone() {
                self.call(&f, (id, n), "proxy_on_request_trailers")?;
            }
        }
        let ctx = self
            .store
            .data()
            .http
            .get(&id)
            .ok_or_else(|| anyhow!("HTTP context {id} vanished"))?;
        let request_headers = ctx.request_headers.clone();
        let request_trailers = ctx.request_trailers.clone();
        let local = ctx.local.clone();

        // The response Envoy sends downstream, through the filter's
        // `proxy_on_response_headers` (Envoy runs encoder filters on local
        // replies too).
        let (status, mut response_headers, body) = match (&local, action) {
            (Some(l), _) => {
                let mut h = Headers::new();
                h.add(":status", l.status.to_string().as_bytes());
                for (k, v) in &l.headers.0 {
                    h.add(k, v);
                }
                if !l.body.is_empty() {
                    h.replace("content-length", l.body.len().to_string().as_bytes());
                    if !h.contains("content-type") {
                        h.add("content-type", b"text/plain");
                    }
                }
                (u16::try_from(l.status).unwrap_or(0), h, l.body.clone())
            }
            (None, Action::Continue) => {
                let mut h = Headers::new();
                h.add(":status", upstream_status.to_string().as_bytes());
                for (k, v) in &upstream_headers.0 {
                    h.add(k, v);
                }
                (upstream_status, h, Vec::new())
            }
            (None, _) => (0, Headers::new(), Vec::new()),
        };
        let mut response_action = None;
        if status != 0 {
            let st = self.store.data_mut();
            if let Some(ctx) = st.http.get_mut(&id) {
                ctx.phase = Phase::ResponseHeaders;
                ctx.response_headers = response_headers.clone();
            }
            st.active = id;
            if let Some(f) = self.exports.on_response_headers.clone() {
                let n = u32::try_from(response_headers.len()).unwrap_or(u32::MAX);
                response_action = Some(Action::from_code(self.call(
                    &f,
                    (id, n, u32::from(body.is_empty())),
                    "proxy_on_response_headers",
                )?));
            }
            if let Some(ctx) = self.store.data().http.get(&id) {
                response_headers = ctx.response_headers.clone();
            }
        }
        if let Some(ctx) = self.store.data_mut().http.get_mut(&id) {
            ctx.phase = Phase::Log;
        }
        let on_done = self.finish_context(id, true)?;
        Ok(Response {
            action,
            request_headers,
            request_trailers,
            local,
            status,
            headers: response_headers,
            body,
            response_action,
            context_id: id,
            on_done,
            local_responses_sent: 0,
        })
    }
}

/// A request to run through the filter: headers (pseudo-headers included, as
/// Envoy passes them), properties and dynamic metadata.
pub struct RequestBuilder<'a> {
    vm: &'a mut Vm,
    input: StreamInput,
}

struct StreamInput {
    headers: Headers,
    trailers: Headers,
    properties: HashMap<Vec<Vec<u8>>, Vec<u8>>,
    metadata: serde_json::Map<String, serde_json::Value>,
    end_of_stream: bool,
    upstream_status: u16,
    upstream_headers: Headers,
}

fn key(path: &[&str]) -> Vec<Vec<u8>> {
    path.iter().map(|s| s.as_bytes().to_vec()).collect()
}

impl<'a> RequestBuilder<'a> {
    fn new(vm: &'a mut Vm) -> Self {
        let now = vm.store.data().host.clock.now_ns();
        let n = vm.next_context;
        let index = vm.index();
        let mut b = RequestBuilder {
            vm,
            input: StreamInput {
                headers: Headers::new(),
                trailers: Headers::new(),
                properties: HashMap::new(),
                metadata: serde_json::Map::new(),
                end_of_stream: true,
                upstream_status: 200,
                upstream_headers: Headers::new(),
            },
        };
        b.input.headers.add(":authority", b"api.example.com");
        b.input.headers.add(":path", b"/");
        b.input.headers.add(":method", b"GET");
        b.input.headers.add(":scheme", b"http");
        b = b.id(&format!("req-{index}-{n}"));
        for (k, v) in [
            (&["request", "path"][..], b"/".to_vec()),
            (&["request", "url_path"], b"/".to_vec()),
            (&["request", "method"], b"GET".to_vec()),
            (&["request", "host"], b"api.example.com".to_vec()),
            (&["request", "scheme"], b"http".to_vec()),
            (&["request", "protocol"], b"HTTP/1.1".to_vec()),
            (
                &["request", "time"],
                i64::try_from(now)
                    .unwrap_or(i64::MAX)
                    .to_le_bytes()
                    .to_vec(),
            ),
            (&["source", "address"], b"10.0.0.7:40000".to_vec()),
            (&["source", "port"], 40000i64.to_le_bytes().to_vec()),
            (&["destination", "address"], b"10.0.0.1:10000".to_vec()),
            (&["destination", "port"], 10000i64.to_le_bytes().to_vec()),
        ] {
            b.input.properties.insert(key(k), v);
        }
        b
    }

    /// Adds a request header (the name is lowercased, as Envoy's codecs do).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.input.headers.add(name, value.as_bytes());
        self
    }

    /// Adds a request trailer (sent after the body, as HTTP/2 and chunked
    /// HTTP/1.1 clients may); the filter sees it in `proxy_on_request_trailers`.
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.input.trailers.add(name, value.as_bytes());
        self.input.end_of_stream = false;
        self
    }

    /// Adds a request header with arbitrary bytes.
    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.input.headers.add(name, value);
        self
    }

    /// Removes every value of a header (pseudo-headers too).
    pub fn without_header(mut self, name: &str) -> Self {
        self.input.headers.remove(name);
        self
    }

    /// Sets `:path` and the `request.path` / `request.url_path` properties,
    /// byte for byte (Envoy does not normalize unless told to).
    pub fn path(mut self, path: &str) -> Self {
        self.input.headers.replace(":path", path.as_bytes());
        let url_path = path.split('?').next().unwrap_or(path);
        self.input
            .properties
            .insert(key(&["request", "path"]), path.as_bytes().to_vec());
        self.input
            .properties
            .insert(key(&["request", "url_path"]), url_path.as_bytes().to_vec());
        self
    }

    /// Sets `:method` and `request.method`.
    pub fn method(mut self, method: &str) -> Self {
        self.input.headers.replace(":method", method.as_bytes());
        self.input
            .properties
            .insert(key(&["request", "method"]), method.as_bytes().to_vec());
        self
    }

    /// Sets `:authority` and `request.host`.
    pub fn host(mut self, host: &str) -> Self {
        self.input.headers.replace(":authority", host.as_bytes());
        self.input
            .properties
            .insert(key(&["request", "host"]), host.as_bytes().to_vec());
        self
    }

    /// Sets `x-request-id` and `request.id`.
    pub fn id(mut self, id: &str) -> Self {
        self.input.headers.replace("x-request-id", id.as_bytes());
        self.input
            .properties
            .insert(key(&["request", "id"]), id.as_bytes().to_vec());
        self
    }

    /// Sets `source.address` (`ip:port`).
    pub fn source(mut self, address: &str) -> Self {
        self.input
            .properties
            .insert(key(&["source", "address"]), address.as_bytes().to_vec());
        self
    }

    /// Sets any property (`["request", "path"]`...) to raw bytes.
    pub fn property(mut self, path: &[&str], value: impl Into<Vec<u8>>) -> Self {
        self.input.properties.insert(key(path), value.into());
        self
    }

    /// Removes a property, so `proxy_get_property` answers `NotFound`.
    pub fn without_property(mut self, path: &[&str]) -> Self {
        self.input.properties.remove(&key(path));
        self
    }

    /// Sets dynamic metadata: `path` starts with the filter name, e.g.
    /// `["envoy.filters.http.jwt_authn", "payload"]` and `value` is JSON; the
    /// filter reads it at `metadata.filter_metadata.<path...>`.
    pub fn metadata(mut self, path: &[&str], value: serde_json::Value) -> Self {
        let Some((filter, rest)) = path.split_first() else {
            return self;
        };
        let mut wrapped = value;
        for seg in rest.iter().rev() {
            let mut m = serde_json::Map::new();
            m.insert((*seg).to_string(), wrapped);
            wrapped = serde_json::Value::Object(m);
        }
        match (self.input.metadata.get_mut(*filter), wrapped) {
            (Some(serde_json::Value::Object(existing)), serde_json::Value::Object(new)) => {
                merge(existing, new)
            }
            (_, w) => {
                self.input.metadata.insert((*filter).to_string(), w);
            }
        }
        self
    }

    /// Whether the request has no body (default true).
    pub fn end_of_stream(mut self, eos: bool) -> Self {
        self.input.end_of_stream = eos;
        self
    }

    /// The upstream's answer when the filter lets the request through.
    pub fn upstream(mut self, status: u16, headers: &[(&str, &str)]) -> Self {
        self.input.upstream_status = status;
        for (k, v) in headers {
            self.input.upstream_headers.add(k, v.as_bytes());
        }
        self
    }

    /// Runs the stream: `proxy_on_context_create`, `proxy_on_request_headers`,
    /// the response through `proxy_on_response_headers` (the upstream's if
    /// the filter continued, its local reply otherwise), then `proxy_on_done`,
    /// `proxy_on_log`, `proxy_on_delete`. An error means the module trapped
    /// (or misbehaved in a way Envoy would not survive).
    pub fn send(self) -> Result<Response> {
        let RequestBuilder { vm, input } = self;
        vm.run(input)
    }
}

fn merge(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(serde_json::Value::Object(a)), serde_json::Value::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// What came out of a stream.
#[derive(Debug, Clone)]
pub struct Response {
    /// What `proxy_on_request_headers` returned.
    pub action: Action,
    /// The request headers after the filter (what the upstream would get).
    pub request_headers: Headers,
    /// The request trailers after the filter.
    pub request_trailers: Headers,
    /// The local response the filter sent, if any.
    pub local: Option<LocalResponse>,
    /// Status sent downstream: the local response's, else the upstream's (0
    /// when the filter paused without answering).
    pub status: u16,
    /// Response headers sent downstream, after `proxy_on_response_headers`.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub response_action: Option<Action>,
    pub context_id: u32,
    /// What `proxy_on_done` returned.
    pub on_done: bool,
    /// How many times the filter called `proxy_send_local_response`.
    pub local_responses_sent: u32,
}

impl Response {
    /// The filter let the request through to the upstream.
    pub fn is_continue(&self) -> bool {
        self.local.is_none() && self.action == Action::Continue
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("the response body is not JSON: {}", self.body_str()))
    }

    /// A request header as the upstream would see it.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.request_headers.get(name)
    }

    /// A response header as the client would see it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name)
    }
}
