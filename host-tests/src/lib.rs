//! A native proxy-wasm host, on wasmtime, that runs `tenantgate.wasm` the way
//! Envoy does: the ABI v0.2.1 host functions and the WASI functions
//! the module imports, several worker VMs sharing one shared-data store with
//! Envoy's compare-and-swap semantics, per-process metrics, captured logs and a
//! clock that only moves when a test moves it.
//!
//! Run the integration tests (one binary, `tests/integration`) and the bench:
//!
//! ```text
//! scripts/build-wasm.sh                       # dist/tenantgate.wasm
//! cargo test -p tenantgate-host-tests         # or TENANTGATE_WASM=path/to/module.wasm
//! cargo bench -p tenantgate-host-tests        # wasm in this host vs the native engine
//! ```
//!
//! The first run compiles the module with Cranelift (most of a minute in a
//! debug build) and caches the machine code in `target/host-tests-cache`;
//! `TENANTGATE_HOST_NO_CACHE=1` skips the cache, `TENANTGATE_HOST_ECHO=1`
//! prints every line the filter logs.
//!
//! How it plays Envoy:
//! - one [`Host`] per Envoy process: shared data (one global CAS counter,
//!   Envoy's quirks included, faults injectable with [`SharedDataFault`]),
//!   metrics by name, captured logs, one [`Clock`];
//! - one [`Vm`] per worker, each with its own wasmtime store so it can run on
//!   its own thread: `_initialize`, root context creation and
//!   `proxy_on_vm_start`, then [`Vm::configure`] (`proxy_on_configure` on the
//!   same root) or [`Vm::reload`] (a new root context, as Envoy applies an ECDS
//!   update);
//! - per request ([`Vm::request`]): context creation, `proxy_on_request_headers`
//!   with pseudo-headers, properties (`request.*`, `source.address`, dynamic
//!   metadata) settable per request, the upstream's or the local reply through
//!   `proxy_on_response_headers`, then `proxy_on_done`, `proxy_on_log`,
//!   `proxy_on_delete`;
//! - request headers are writable only during `proxy_on_request_headers`,
//!   response headers only during `proxy_on_response_headers`, as in Envoy
//!   (`BadArgument` otherwise);
//! - every import of the module resolves: the ones not implemented return
//!   `Unimplemented` (12) or WASI `ENOSYS` and are counted
//!   ([`Host::unimplemented_calls`]); a trap poisons the VM and is reported.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use tenantgate_host_tests::Host;
//! let host = Host::new(tenantgate_host_tests::locate_wasm()?)?;
//! let mut vm = host.vm()?;
//! assert!(vm.configure(r#"{"...": "bundle json"}"#)?);
//! let resp = vm.request().header("x-tenant", "/acme").path("/orders/1").send()?;
//! println!("{} {:?}", resp.status, resp.upstream_header("x-tenantgate-tenant"));
//! # Ok(()) }
//! ```

pub mod abi;
pub mod clock;
pub mod headers;
mod host;
mod imports;
pub mod logs;
pub mod metrics;
pub mod shared;
mod state;
mod vm;

pub use abi::{Action, LogLevel, MetricType, Status};
pub use clock::Clock;
pub use headers::Headers;
pub use host::{locate_wasm, wasm_path, Host, HostBuilder};
pub use logs::{LogLine, LogSource};
pub use metrics::Metric;
pub use shared::{SharedData, SharedDataFault, SharedDataStats};
pub use state::LocalResponse;
pub use vm::{RequestBuilder, Response, Vm};
