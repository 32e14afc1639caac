//! `tenantgate serve`: the policy decisions of a bundle as a service, for
//! callers that do not load the filter. Two front ends over one engine:
//!
//! - `http`: `POST /v1/decide` (a request by its parts, as `tenantgate check`
//!   takes it; the answer is `check`'s JSON), `GET /v1/bundle`, `GET /healthz`;
//! - `authz`: Envoy's external authorization API
//!   (`envoy.service.auth.v3.Authorization/Check`), the request mapped by the
//!   filter's own code and answered as the filter would answer it.
//!
//! Policies only: quotas stay in the filter and the rate limit service (a
//! service has no view of a proxy's token buckets). SIGHUP reloads the bundle
//! (a bundle that does not load leaves the previous one serving); SIGTERM or
//! SIGINT stops it gracefully. See `docs/reference.md`.

pub mod authz;
pub mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tenantgate_engine::flow::LogLine;
use tenantgate_engine::{Bundle, Diagnostics, Engine, Worker};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// The largest `POST /v1/decide` body accepted (larger: 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a graceful shutdown waits for open connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The command line of `tenantgate serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// A policy folder or a bundle file; SIGHUP reads it again.
    pub source: PathBuf,
    /// The HTTP JSON API's address.
    pub http: SocketAddr,
    /// The ext_authz gRPC address, if any.
    pub grpc: Option<SocketAddr>,
}

fn log(msg: impl std::fmt::Display) {
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
/// the file, line and column of every problem.
pub fn load(source: &Path) -> Result<Engine, String> {
    let shown = |d: &Diagnostics| {
        let lines: Vec<String> = d
            .iter()
            .map(|diag| {
                let mut diag = diag.clone();
                diag.file = if source.is_dir() {
                    source.join(&diag.file).display().to_string()
                } else {
                    source.display().to_string()
                };
                diag.to_string()
            })
            .collect();
        lines.join("\n")
    };
    let bundle = if source.is_dir() {
        Bundle::from_dir(source).map_err(|d| shown(&d))?
    } else {
        let text = std::fs::read_to_string(source)
            .map_err(|e| format!("{}: error: cannot read: {e}", source.display()))?;
        Bundle::from_json(&text).map_err(|d| shown(&d))?
    };
    Engine::new(&bundle).map_err(|d| shown(&d))
}

/// What both front ends share: the bundle now serving (one worker: its
/// decision cache and decision ids serve every request) and where it came
/// from.
pub struct State {
    source: PathBuf,
    worker: watch::Sender<Arc<Worker>>,
}

/// A worker over `engine` whose decisions get ids.
fn worker(engine: Engine) -> Worker {
    let seed = now_ns() ^ u64::from(std::process::id()).rotate_left(32);
    Worker::with_ids(Arc::new(engine), seed)
}

impl State {
    pub fn new(source: PathBuf, engine: Engine) -> State {
        State {
            source,
            worker: watch::Sender::new(Arc::new(worker(engine))),
        }
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
    pub fn reload(&self) -> Result<String, String> {
        let engine = load(&self.source)?;
        let version = engine.version().to_string();
        self.worker.send_replace(Arc::new(worker(engine)));
        Ok(version)
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
}

impl Server {
    /// Loads the source and binds the listeners (port 0: any free port).
    pub async fn bind(config: &Config) -> Result<Server, String> {
        let engine = load(&config.source)?;
        let state = Arc::new(State::new(config.source.clone(), engine));
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
        Ok(Server { state, http, grpc })
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

    /// Serves until `shutdown` completes, then lets open connections finish
    /// for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let http = axum::serve(self.http, http::router(Arc::clone(&self.state)))
            .with_graceful_shutdown(stopped(stop_rx.clone()));
        let http = async move { http.await.map_err(|e| format!("http: {e}")) };
        let grpc = {
            let listener = self.grpc;
            let state = Arc::clone(&self.state);
            let until = stopped(stop_rx.clone());
            async move {
                let Some(listener) = listener else {
                    return Ok(());
                };
                tonic::transport::Server::builder()
                    .add_service(authz::server(state))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        until,
                    )
                    .await
                    .map_err(|e| format!("grpc: {e}"))
            }
        };
        let mut deadline_rx = stop_rx;
        tokio::spawn(async move {
            shutdown.await;
            stop_tx.send_replace(true);
            // Keep the sender alive until the servers are gone.
            stop_tx.closed().await;
        });
        let deadline = async move {
            let _ = deadline_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            r = async { tokio::try_join!(http, grpc) } => { r?; }
            () = deadline => log(format!(
                "connections still open {} s after the signal; closing them",
                SHUTDOWN_GRACE.as_secs()
            )),
        }
        Ok(())
    }
}

/// `tenantgate serve`: serves until SIGTERM or SIGINT, reloading on SIGHUP.
/// An error means it could not start (the bundle, a listen address).
pub async fn run(config: Config) -> Result<(), String> {
    let server = Server::bind(&config).await?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
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
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let old = reloading.engine().version().to_string();
            match reloading.reload() {
                Ok(new) => log(format!("reloaded bundle {new} (was {old})")),
                Err(e) => log(format!("reload failed, keeping bundle {old}: {e}")),
            }
        }
    });
    log(format!("http on {}", server.http_addr()?));
    if let Some(a) = server.grpc_addr() {
        log(format!("ext_authz gRPC on {a}"));
    }
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log("shutting down");
    };
    server.serve(shutdown).await?;
    log("stopped");
    Ok(())
}

/// [`run`] on its own multi-threaded runtime (for the `tenantgate` command).
pub fn run_blocking(config: Config) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(run(config))
}
