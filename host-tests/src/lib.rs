//! A native proxy-wasm host, on wasmtime, that runs `tenantgate.wasm` the way
//! Envoy does (issue 5): the ABI v0.2.1 host functions and the WASI functions
//! the module imports, several worker VMs sharing one shared-data store with
//! Envoy's compare-and-swap semantics, per-process metrics, captured logs and a
//! clock that only moves when a test moves it.
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
