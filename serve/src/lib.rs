//! `tenantgate serve`: the policy decisions of a bundle as a service, for
//! callers that do not load the filter. Two front ends over one engine:
//!
//! - `http`: `POST /v1/decide` (a request by its parts, as `tenantgate check`
//!   takes it; the answer is `check`'s JSON), `GET /v1/bundle`, `GET /healthz`;
//! - `authz`: Envoy's external authorization API
//!   (`envoy.service.auth.v3.Authorization/Check`), the request mapped by the
//!   filter's own code and answered as the filter would answer it;
//! - `xds` (with `--xds`): the filter's configuration for a fleet of Envoys
//!   over xDS, the source watched, rollouts and rollbacks (`rollout`), their
//!   state at `GET /v1/rollout` and `/metrics`.
//!
//! Policies only: quotas stay in the filter and the rate limit service (a
//! service has no view of a proxy's token buckets). SIGHUP reloads the bundle
//! (a bundle that does not load leaves the previous one serving); SIGTERM or
//! SIGINT stops it gracefully. See `docs/reference.md`.

pub mod authz;
pub mod control;
pub mod http;
pub mod policytest;
pub mod rollout;
pub mod xds;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenantgate_engine::flow::LogLine;
use tenantgate_engine::{Bundle, Engine, Worker};

use crate::xds::Plane;
use tenantgate_daemon::{reload_line, serve_until, Signals, Stop};
use tokio::sync::watch;

/// The largest `POST /v1/decide` body accepted (larger: 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub use tenantgate_daemon::SHUTDOWN_GRACE;

/// The command line of `tenantgate serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// A policy folder or a bundle file; SIGHUP reads it again.
    pub source: PathBuf,
    /// The HTTP JSON API's address.
    pub http: SocketAddr,
    /// The ext_authz gRPC address, if any.
    pub grpc: Option<SocketAddr>,
    /// The control plane (`--xds`), if any.
    pub xds: Option<xds::Options>,
}

pub(crate) fn log(msg: impl std::fmt::Display) {
    eprintln!("tenantgate serve: {msg}");
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Loads a policy folder or a bundle file and compiles it; the error names
/// the file, line and column of every problem (in the Cedar or JSON text a
/// bundle carries: `bundle.json (tenants/acme/a.cedar):3:5`).
/// Its warnings and notes (docs/reference.md, "Warnings and notes") go to
/// the log.
pub fn load(source: &Path) -> Result<Engine, String> {
    load_bundle(source).map(|(_, engine)| engine)
}

/// [`load`], with the bundle.
pub fn load_bundle(source: &Path) -> Result<(Bundle, Engine), String> {
    let loaded = Bundle::load(source).map_err(|d| d.to_string())?;
    for w in &loaded.warnings {
        log(w);
    }
    Ok((loaded.bundle, loaded.engine))
}

/// The last reload that failed, for `/healthz`; cleared by a successful one.
#[derive(Debug, Clone)]
pub struct FailedReload {
    /// Seconds since the Unix epoch.
    pub at_s: u64,
    pub error: String,
}

/// What the control plane pushes: [`load_bundle`] (as `tenantgate bundle`
/// and `validate` do), then, for a policy folder with a `tests` folder, its
/// policy tests (as `tenantgate test` runs them), which must all pass.
pub fn load_checked(source: &Path) -> Result<(Bundle, Arc<Engine>), Vec<String>> {
    let lines = |e: String| e.lines().map(str::to_string).collect::<Vec<_>>();
    let (bundle, engine) = load_bundle(source).map_err(lines)?;
    let engine = Arc::new(engine);
    if source.is_dir() && policytest::has_tests(source) {
        let tests = policytest::load(source).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| format!("{}", source.join(e).display()))
                .collect::<Vec<_>>()
        })?;
        let (_, failures) = policytest::run_all(&engine, &tests);
        if !failures.is_empty() {
            let n = failures.len();
            let mut out: Vec<String> = failures
                .into_iter()
                .map(|f| match f.strip_prefix("FAIL ") {
                    Some(rest) => format!("{}", source.join(rest).display()),
                    None => f,
                })
                .map(|f| f.replacen(": ", ": error: policy test failed: ", 1))
                .collect();
            out.push(format!(
                "{n} policy test{} failed",
                if n == 1 { "" } else { "s" }
            ));
            return Err(out);
        }
    }
    Ok((bundle, engine))
}

/// What both front ends share: the bundle now serving (one worker: its
/// decision cache and decision ids serve every request) and where it came
/// from.
pub struct State {
    source: PathBuf,
    worker: watch::Sender<Arc<Worker>>,
    plane: Option<Arc<Plane>>,
    failed_reload: Mutex<Option<FailedReload>>,
    counters: Counters,
}

/// A worker over `engine` whose decisions get ids.
fn worker(engine: impl Into<Arc<Engine>>) -> Worker {
    let seed = now_ns() ^ u64::from(std::process::id()).rotate_left(32);
    Worker::with_ids(engine.into(), seed)
}

/// What `/metrics` counts.
#[derive(Default)]
struct Counters {
    /// `[api][allowed]`: api 0 http, 1 grpc.
    decisions: [[AtomicU64; 2]; 2],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

/// A front end, for [`State::count_decision`].
#[derive(Debug, Clone, Copy)]
pub enum Api {
    Http,
    Grpc,
}

impl State {
    pub fn new(source: PathBuf, engine: impl Into<Arc<Engine>>) -> State {
        State {
            source,
            worker: watch::Sender::new(Arc::new(worker(engine))),
            plane: None,
            failed_reload: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    /// The control plane, when `--xds` is on.
    pub fn plane(&self) -> Option<&Arc<Plane>> {
        self.plane.as_ref()
    }

    /// The bundle serving now (a reload does not affect decisions under way).
    pub fn engine(&self) -> Arc<Engine> {
        self.worker.borrow().engine_arc()
    }

    /// The worker serving now.
    pub fn worker(&self) -> Arc<Worker> {
        Arc::clone(&self.worker.borrow())
    }

    /// Loads the source again. On success the new bundle serves from the next
    /// request on and its version is returned; on failure the previous one
    /// keeps serving and the error says why.
    ///
    /// With the control plane, the policy tests must pass too, and the new
    /// version goes to the fleet (unless it is the version already loaded);
    /// a refusal is recorded for `GET /v1/rollout`.
    pub fn reload(&self) -> Result<String, String> {
        let result = match &self.plane {
            None => load_bundle(&self.source).map(|(b, e)| (b, Arc::new(e))),
            Some(_) => load_checked(&self.source).map_err(|errors| errors.join("\n")),
        };
        let mut failed = match self.failed_reload.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        match result {
            Ok((bundle, engine)) => {
                let version = engine.version().to_string();
                self.worker.send_replace(Arc::new(worker(engine)));
                *failed = None;
                self.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
                if let Some(plane) = &self.plane {
                    if plane.loaded(&bundle) {
                        plane.notify();
                    }
                }
                Ok(version)
            }
            Err(e) => {
                *failed = Some(FailedReload {
                    at_s: now_ns() / 1_000_000_000,
                    error: e.clone(),
                });
                self.counters.reloads_failed.fetch_add(1, Ordering::Relaxed);
                if let Some(plane) = &self.plane {
                    plane
                        .fleet()
                        .refused(e.lines().map(str::to_string).collect(), now_ns());
                }
                Err(e)
            }
        }
    }

    /// Counts a decision for `/metrics`.
    pub fn count_decision(&self, api: Api, allowed: bool) {
        let a = match api {
            Api::Http => 0,
            Api::Grpc => 1,
        };
        if let Some(c) = self
            .counters
            .decisions
            .get(a)
            .and_then(|row| row.get(usize::from(allowed)))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `/metrics`: Prometheus text exposition (docs/reference.md, `tenantgate serve`).
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let c = &self.counters;
        let _ = writeln!(out, "# HELP tenantgate_serve_decisions_total Decisions answered, by front end and decision.\n# TYPE tenantgate_serve_decisions_total counter");
        for (ai, api) in ["http", "grpc"].iter().enumerate() {
            for (di, decision) in ["deny", "allow"].iter().enumerate() {
                let n = c
                    .decisions
                    .get(ai)
                    .and_then(|row| row.get(di))
                    .map_or(0, |x| x.load(Ordering::Relaxed));
                let _ = writeln!(
                    out,
                    "tenantgate_serve_decisions_total{{api=\"{api}\",decision=\"{decision}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP tenantgate_serve_reloads_total SIGHUP reloads, by result.\n# TYPE tenantgate_serve_reloads_total counter");
        let _ = writeln!(
            out,
            "tenantgate_serve_reloads_total{{result=\"ok\"}} {}\ntenantgate_serve_reloads_total{{result=\"failed\"}} {}",
            c.reloads_ok.load(Ordering::Relaxed),
            c.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP tenantgate_serve_last_reload_failed 1 while the last reload failed (the previous bundle serving).\n# TYPE tenantgate_serve_last_reload_failed gauge");
        let _ = writeln!(
            out,
            "tenantgate_serve_last_reload_failed {}",
            u8::from(self.failed_reload().is_some())
        );
        let engine = self.engine();
        let _ = writeln!(out, "# HELP tenantgate_serve_bundle_info The bundle serving.\n# TYPE tenantgate_serve_bundle_info gauge");
        let _ = writeln!(
            out,
            "tenantgate_serve_bundle_info{{version=\"{}\",tenants=\"{}\",policies=\"{}\"}} 1",
            engine.version(),
            engine.tenants().len(),
            engine.policy_count()
        );
        out
    }

    /// The last reload, when it failed and none succeeded since.
    pub fn failed_reload(&self) -> Option<FailedReload> {
        match self.failed_reload.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Writes a decision's log lines (its audit line, when the bundle's
    /// `audit` setting asks for one) to standard output.
    pub(crate) fn audit(&self, lines: &[LogLine]) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for l in lines {
            let _ = writeln!(out, "{}", l.text);
        }
    }
}

/// The service with its listeners bound, not yet serving.
pub struct Server {
    state: Arc<State>,
    http: tokio::net::TcpListener,
    grpc: Option<tokio::net::TcpListener>,
    xds: Option<tokio::net::TcpListener>,
}

impl Server {
    /// Loads the source and binds the listeners (port 0: any free port).
    pub async fn bind(config: &Config) -> Result<Server, String> {
        let state = match &config.xds {
            None => State::new(config.source.clone(), load(&config.source)?),
            Some(options) => {
                let (bundle, engine) = load_checked(&config.source).map_err(|e| e.join("\n"))?;
                let plane = Plane::new(options);
                plane.loaded(&bundle);
                let mut state = State::new(config.source.clone(), engine);
                state.plane = Some(Arc::new(plane));
                state
            }
        };
        let state = Arc::new(state);
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on `{addr}`: {e}"))
        };
        let http = bind(config.http).await?;
        let grpc = match config.grpc {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let xds = match &config.xds {
            Some(o) => Some(bind(o.addr).await?),
            None => None,
        };
        Ok(Server {
            state,
            http,
            grpc,
            xds,
        })
    }

    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.state)
    }

    /// The HTTP API's bound address.
    pub fn http_addr(&self) -> Result<SocketAddr, String> {
        self.http.local_addr().map_err(|e| e.to_string())
    }

    /// The gRPC address, when there is one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The xDS address, when there is one.
    pub fn xds_addr(&self) -> Option<SocketAddr> {
        self.xds.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then lets open connections finish
    /// for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        let Server {
            state,
            http,
            grpc,
            xds,
        } = self;
        let servers = |stop: Stop| async move {
            let http = axum::serve(http, http::router(Arc::clone(&state)))
                .with_graceful_shutdown(stop.fired());
            let http = async move { http.await.map_err(|e| format!("http: {e}")) };
            let grpc = async {
                let Some(listener) = grpc else {
                    return Ok(());
                };
                tonic::transport::Server::builder()
                    .add_service(authz::server(Arc::clone(&state)))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        stop.fired(),
                    )
                    .await
                    .map_err(|e| format!("grpc: {e}"))
            };
            let xds = async {
                let (Some(listener), Some(plane)) = (xds, state.plane.clone()) else {
                    return Ok(());
                };
                let (ads, ecds) = xds::services(plane, stop.clone());
                tonic::transport::Server::builder()
                    // Envoys keep their streams open; these find dead peers.
                    .http2_keepalive_interval(Some(Duration::from_secs(30)))
                    .add_service(ads)
                    .add_service(ecds)
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        stop.fired(),
                    )
                    .await
                    .map_err(|e| format!("xds: {e}"))
            };
            tokio::try_join!(http, grpc, xds).map(|_| ())
        };
        serve_until(servers, shutdown, SHUTDOWN_GRACE, |m| log(m)).await
    }
}

/// `tenantgate serve`: serves until SIGTERM or SIGINT, reloading on SIGHUP.
/// An error means it could not start (the bundle, a listen address).
pub async fn run(config: Config) -> Result<(), String> {
    let signals = Signals::install()?;
    let server = Server::bind(&config).await?;
    let state = server.state();
    let engine = state.engine();
    log(format!(
        "loaded bundle {} ({} tenants, {} policies; policies only, quotas are not evaluated)",
        engine.version(),
        engine.tenants().len(),
        engine.policy_count()
    ));
    drop(engine);
    let reloading = Arc::clone(&state);
    let shutdown = signals.reload_on_hangup(move || {
        let old = reloading.engine().version().to_string();
        log(reload_line(&old, &reloading.reload()));
    });
    if state.plane().is_some() {
        let watching = Arc::clone(&state);
        tokio::spawn(async move { watch_source(watching).await });
    }
    log(format!("http on {}", server.http_addr()?));
    if let Some(a) = server.grpc_addr() {
        log(format!("ext_authz gRPC on {a}"));
    }
    if let Some(a) = server.xds_addr() {
        log(format!("xds on {a} (watching {})", config.source.display()));
    }
    server.serve(shutdown).await?;
    log("stopped");
    Ok(())
}

/// The files of the source (a folder's, recursively, or the bundle file)
/// with their sizes and modification times: a change of any is a change.
fn fingerprint(source: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    let mut todo = vec![source.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            out.push((p, 0, None));
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                todo.extend(rd.filter_map(Result::ok).map(|e| e.path()));
            }
        } else {
            out.push((p, meta.len(), meta.modified().ok()));
        }
    }
    out.sort();
    out
}

/// With the control plane: loads the source again whenever its files change
/// (looked at every [`xds::POLL`]).
async fn watch_source(state: Arc<State>) {
    let mut seen = fingerprint(&state.source);
    loop {
        tokio::time::sleep(xds::POLL).await;
        let now = fingerprint(&state.source);
        if now == seen {
            continue;
        }
        seen = now;
        let old = state.engine().version().to_string();
        match state.reload() {
            Ok(new) if new == old => log(format!(
                "{} changed; the bundle is the same ({new}), nothing to push",
                state.source.display()
            )),
            Ok(new) => {
                let pushed = state
                    .plane()
                    .is_some_and(|p| p.fleet().target() == Some(new.as_str()));
                log(format!(
                    "{} changed: bundle {new} (was {old}){}",
                    state.source.display(),
                    if pushed {
                        ", pushed"
                    } else {
                        ", kept: `POST /v1/rollout` sends it"
                    }
                ))
            }
            Err(e) => log(format!(
                "{} changed but does not load; not pushed, keeping bundle {old}:\n{e}",
                state.source.display()
            )),
        }
    }
}

/// [`run`] on its own multi-threaded runtime (for the `tenantgate` command).
pub fn run_blocking(config: Config) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(run(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_changes_with_any_file_of_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bundle.json");
        std::fs::write(&file, "{}").unwrap();
        let one = fingerprint(&file);
        assert_eq!(one.len(), 1);
        assert_eq!(fingerprint(&file), one, "nothing changed");
        std::fs::write(&file, "{ }").unwrap();
        assert_ne!(fingerprint(&file), one, "a bundle file rewritten");
        // A folder: a new file deep inside, then its removal.
        let before = fingerprint(dir.path());
        std::fs::create_dir_all(dir.path().join("tenants/acme")).unwrap();
        std::fs::write(dir.path().join("tenants/acme/p.cedar"), "x").unwrap();
        let with = fingerprint(dir.path());
        assert_ne!(with, before);
        assert_eq!(with.len(), 2);
        std::fs::remove_file(dir.path().join("tenants/acme/p.cedar")).unwrap();
        assert_eq!(fingerprint(dir.path()), before);
        // A source that disappears is a change too (and reloading it fails).
        let gone = dir.path().join("nothing");
        assert_eq!(fingerprint(&gone), vec![(gone.clone(), 0, None)]);
    }
}
