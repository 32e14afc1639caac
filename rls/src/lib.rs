//! `tenantgate-rls`: Envoy's rate limit service (RLS v3) for tenantgate's
//! fleet limits. The limits come from the bundle the filters load; the counts
//! live in Redis, updated by one atomic Lua script per request
//! ([`counter::SCRIPT`]). The process holds no counter state, so any number of
//! replicas can serve one Redis. The same listener serves the rate limit
//! quota service (RLQS) of mode `assigned` ([`quota`]). See `docs/fleet.md`.

pub mod counter;
pub mod limits;
pub mod metrics;
pub mod quota;
pub mod service;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tenantgate_daemon::{reload_line, serve_until, Reloadable, Signals, Stop};
use tonic_health::ServingStatus;

use counter::Counters;
use limits::Limits;
use metrics::Metrics;
use service::Service;

/// How long one Redis step may take before the RPC answers UNAVAILABLE.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);

pub use tenantgate_daemon::SHUTDOWN_GRACE;

/// The command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub bundle: PathBuf,
    pub redis: String,
    pub listen: SocketAddr,
    /// The RLS domain this service answers for; other domains get OK, no
    /// limit. `None`: the bundle's `rate_limit_service.domain`.
    pub domain: Option<String>,
    /// `--metrics`: where to serve `GET /metrics` ([`metrics`]); `None`: off.
    pub metrics: Option<SocketAddr>,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("tenantgate-rls: {msg}");
}

/// The warning for a `--domain` that is not the bundle's: the bundle's
/// filters send the bundle's domain, which this service would answer OK
/// with no limit.
pub fn domain_mismatch(flag: Option<&str>, limits: &Limits) -> Option<String> {
    let flag = flag?;
    (flag != limits.domain).then(|| {
        format!(
            "warning: `--domain` `{flag}` differs from the bundle's `rate_limit_service.domain` `{}`: \
             calls for `{}` (what the bundle's filters send) get OK with no limit",
            limits.domain, limits.domain
        )
    })
}

/// A Redis URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            format!(
                "{}://***@{}",
                url.get(..s).unwrap_or(""),
                url.get(at + 1..).unwrap_or("")
            )
        }
        _ => url.to_owned(),
    }
}

/// Checks `--redis` is a Redis URL (before anything is loaded: a usage error).
pub fn check_url(url: &str) -> Result<(), String> {
    if !url.contains("://") {
        return Err(format!(
            "`--redis {}` is not a Redis URL: write `redis://{}` (`redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for TLS)",
            redact(url),
            redact(url)
        ));
    }
    redis::Client::open(url).map(|_| ()).map_err(|e| {
        format!(
            "`--redis {}` is not a Redis URL (`redis://[:PASSWORD@]HOST:PORT[/DB]`): {e}",
            redact(url)
        )
    })
}

/// How often the health watch PINGs Redis.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// The gRPC service name the health service reports besides `""`.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// Connects to Redis and checks it answers.
async fn connect(url: &str) -> Result<ConnectionManager, String> {
    check_url(url)?;
    let fail = |e: &dyn std::fmt::Display| format!("cannot reach Redis at `{}`: {e}", redact(url));
    // TCP_NODELAY: one connection carries every call's script, pipelined;
    // with Nagle a small write can wait for the previous one's ACK (up to
    // the peer's delayed-ACK time, 40 ms on Linux).
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| fail(&e))?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).map_err(|e| fail(&e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let mut conn = tokio::time::timeout(
        REDIS_TIMEOUT * 5,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .map_err(|_| fail(&"no answer within 5 s"))?
    .map_err(|e| fail(&e))?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| fail(&e))?;
    if pong != "PONG" {
        return Err(fail(&format!("PING answered `{pong}`")));
    }
    Ok(conn)
}

/// PINGs Redis every [`HEALTH_INTERVAL`]: logs one line when it is lost and
/// one when it is back, and reports NOT_SERVING on `grpc.health.v1.Health`
/// meanwhile (the rate limit calls then answer per the filter's `on_error`).
async fn watch_redis(
    mut conn: ConnectionManager,
    shown: String,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
) {
    let mut up = true;
    loop {
        tokio::time::sleep(HEALTH_INTERVAL).await;
        let ping = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        let error = match ping {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {} ms", REDIS_TIMEOUT.as_millis())),
        };
        metrics.set_redis_up(error.is_none());
        match (up, error) {
            (true, Some(e)) => {
                log(format!(
                    "lost Redis at `{shown}`: {e}; rate limit calls fail (UNAVAILABLE) until it is back"
                ));
                for name in ["", SERVICE_NAME] {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
                up = false;
            }
            (false, None) => {
                log(format!("Redis at `{shown}` is back"));
                for name in ["", SERVICE_NAME] {
                    health
                        .set_service_status(name, ServingStatus::Serving)
                        .await;
                }
                up = true;
            }
            _ => {}
        }
    }
}

/// Loads the bundle again (on SIGHUP): on success its limits serve from the
/// next call on; on failure the previous ones keep serving.
fn reload(limits: &Reloadable<Limits>, bundle: &Path, flag: Option<&str>, metrics: &Metrics) {
    let old = limits.current();
    let result = Limits::load(bundle).map(|new| {
        if let Some(w) = domain_mismatch(flag, &new) {
            log(w);
        } else if flag.is_none() && new.domain != old.domain {
            log(format!(
                "the bundle's domain is now `{}` (was `{}`)",
                new.domain, old.domain
            ));
        }
        for w in &new.warnings {
            log(w);
        }
        metrics.reloaded(Some((&new.version, flag.unwrap_or(&new.domain))));
        log(format!(
            "bundle {}: {} fleet limits",
            new.version,
            new.fleet.all().len()
        ));
        let version = new.version.clone();
        limits.replace(new);
        version
    });
    if result.is_err() {
        metrics.reloaded(None);
    }
    log(reload_line(&old.version, &result));
}

/// Runs the service until SIGTERM or SIGINT. An error means it could not
/// start (the bundle, Redis, the listen address).
pub async fn run(config: Config) -> Result<(), String> {
    let signals = Signals::install()?;
    let first = Limits::load(&config.bundle)?;
    let conn = connect(&config.redis).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on `{}`: {e}", config.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on `{}`: {e}", config.listen))?;
    let metrics_listener = match config.metrics {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| format!("cannot listen on `{a}` (`--metrics`): {e}"))?,
        ),
        None => None,
    };

    log(format!(
        "loaded bundle {} ({} fleet limits)",
        first.version,
        first.fleet.all().len()
    ));
    if let Some(w) = domain_mismatch(config.domain.as_deref(), &first) {
        log(w);
    }
    let domain = match &config.domain {
        Some(d) => format!("domain `{d}`, from `--domain`"),
        None => format!("domain `{}`, from the bundle", first.domain),
    };
    for w in &first.warnings {
        log(w);
    }
    let metrics = Arc::new(Metrics::new(
        &first.version,
        config.domain.as_deref().unwrap_or(&first.domain),
    ));
    let limits = Arc::new(Reloadable::new(first));
    let rx = limits.subscribe();
    let shutdown = {
        let metrics = Arc::clone(&metrics);
        let (bundle, flag) = (config.bundle.clone(), config.domain.clone());
        signals.reload_on_hangup(move || reload(&limits, &bundle, flag.as_deref(), &metrics))
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    tokio::spawn(watch_redis(
        conn.clone(),
        redact(&config.redis),
        health,
        Arc::clone(&metrics),
    ));
    let counters = Counters::new(conn.clone(), REDIS_TIMEOUT);
    // Loaded before the first call: otherwise the first burst of calls each
    // meets NOSCRIPT and loads it again (two more round trips each).
    counters
        .load()
        .await
        .map_err(|e| format!("cannot load the counter script: {e}"))?;
    let quotas = quota::Rlqs(Arc::new(quota::QuotaService::new(
        rx.clone(),
        quota::RedisReports::new(conn.clone(), REDIS_TIMEOUT),
        config.domain.clone(),
        Arc::new(quota::wall_clock_ms),
    )));
    let service =
        Service::new(rx, counters, config.domain.clone()).with_metrics(Arc::clone(&metrics));
    if let Some(l) = metrics_listener {
        let shown = l
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        log(format!("metrics on http://{shown}/metrics"));
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(l, metrics).await {
                log(format!("the metrics endpoint stopped: {e}"));
            }
        });
    }
    log(format!("listening on {addr} ({domain})"));
    let servers = |stop: Stop| async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(RateLimitServiceServer::new(service))
            .add_service(RateLimitQuotaServiceServer::new(quotas))
            .serve_with_incoming_shutdown(
                // TCP_NODELAY: without it an answer can wait for the ACK of the
                // previous one (Nagle), 40 ms with Envoy's delayed ACKs: past
                // the callers' timeouts (Envoy's rate limit filter: 20 ms by
                // default), so a call fails.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                stop.fired(),
            )
            .await
            .map_err(|e| format!("server: {e}"))
    };
    serve_until(servers, shutdown, SHUTDOWN_GRACE, |m| log(m)).await?;
    log("stopped");
    Ok(())
}
