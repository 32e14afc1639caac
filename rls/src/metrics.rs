//! `--metrics ADDR`: the service's counters as Prometheus text on
//! `GET /metrics` (docs/reference.md, `tenantgate-rls`). Off by default.
//!
//! - `tenantgate_rls_calls_total{result="ok"|"over_limit"|"error"}`: rate
//!   limit calls answered OK, OVER_LIMIT, or failed (UNAVAILABLE: Redis did
//!   not answer);
//! - `tenantgate_rls_redis_up`: 1 while Redis answers the health PING, 0 from
//!   a lost PING until one is answered again;
//! - `tenantgate_rls_bundle_info{version,domain}` 1: the bundle serving and
//!   the domain answered;
//! - `tenantgate_rls_reloads_total{result="ok"|"failed"}`: SIGHUP reloads.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use tonic::Status;

/// The counters `/metrics` shows. Shared by the service, the reload task and
/// the Redis watch.
#[derive(Debug)]
pub struct Metrics {
    /// `[ok, over_limit, error]`.
    calls: [AtomicU64; 3],
    redis_up: AtomicBool,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// `(version, domain)` of the bundle serving.
    bundle: Mutex<(String, String)>,
}

impl Metrics {
    /// Redis up, no call or reload yet, `version` and `domain` serving.
    pub fn new(version: &str, domain: &str) -> Metrics {
        Metrics {
            calls: Default::default(),
            redis_up: AtomicBool::new(true),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            bundle: Mutex::new((version.to_owned(), domain.to_owned())),
        }
    }

    /// Counts one rate limit call by its answer.
    pub fn count_call(&self, answer: &Result<RateLimitResponse, Status>) {
        let i = match answer {
            Ok(r) if r.overall_code == Code::OverLimit as i32 => 1,
            Ok(_) => 0,
            Err(_) => 2,
        };
        if let Some(c) = self.calls.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets `tenantgate_rls_redis_up`.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.store(up, Ordering::Relaxed);
    }

    /// Counts a reload: `Some((version, domain))` of the new bundle when it
    /// loaded, `None` when it failed (the previous one keeps serving).
    pub fn reloaded(&self, loaded: Option<(&str, &str)>) {
        match loaded {
            Some((version, domain)) => {
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                *self.bundle_lock() = (version.to_owned(), domain.to_owned());
            }
            None => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn bundle_lock(&self) -> std::sync::MutexGuard<'_, (String, String)> {
        match self.bundle.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The Prometheus text exposition.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.push_str(
            "# HELP tenantgate_rls_calls_total Rate limit calls, by answer (error: UNAVAILABLE, Redis did not answer).\n\
             # TYPE tenantgate_rls_calls_total counter\n",
        );
        for (c, result) in self.calls.iter().zip(["ok", "over_limit", "error"]) {
            let _ = writeln!(
                out,
                "tenantgate_rls_calls_total{{result=\"{result}\"}} {}",
                n(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP tenantgate_rls_redis_up 1 while Redis answers the health PING.\n\
             # TYPE tenantgate_rls_redis_up gauge\n\
             tenantgate_rls_redis_up {}",
            u8::from(self.redis_up.load(Ordering::Relaxed))
        );
        let (version, domain) = self.bundle_lock().clone();
        let _ = writeln!(
            out,
            "# HELP tenantgate_rls_bundle_info The bundle serving and the domain answered.\n\
             # TYPE tenantgate_rls_bundle_info gauge\n\
             tenantgate_rls_bundle_info{{version=\"{}\",domain=\"{}\"}} 1",
            label(&version),
            label(&domain)
        );
        let _ = writeln!(
            out,
            "# HELP tenantgate_rls_reloads_total SIGHUP reloads, by result.\n\
             # TYPE tenantgate_rls_reloads_total counter\n\
             tenantgate_rls_reloads_total{{result=\"ok\"}} {}\n\
             tenantgate_rls_reloads_total{{result=\"failed\"}} {}",
            n(&self.reloads_ok),
            n(&self.reloads_failed)
        );
        out
    }
}

/// A label value escaped for the text format (`\`, `"` and newlines).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` (HTTP/1.1) until the process ends;
/// other paths answer 404, other methods 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&metrics);
                async move { text_response(&m) }
            })
            .fallback(|| async {
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    [(header::ALLOW, "GET,HEAD")],
                    "method not allowed: GET /metrics\n",
                )
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: GET /metrics\n") });
    axum::serve(listener, app).await
}

fn text_response(m: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.text(),
    )
        .into_response()
}
