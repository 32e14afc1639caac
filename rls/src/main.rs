//! `tenantgate-rls --bundle FILE --redis URL --listen ADDR`: see the crate doc.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Envoy's rate limit service for tenantgate's fleet limits, counting in Redis.
#[derive(Parser)]
#[command(
    name = "tenantgate-rls",
    version,
    after_help = "Serves envoy.service.ratelimit.v3.RateLimitService and grpc.health.v1.Health (NOT_SERVING while Redis does not answer); with --metrics, Prometheus text on GET /metrics.\n\nExit status: 0 after SIGTERM or SIGINT, 1 cannot start (the bundle, Redis, the listen address), 2 usage error (an unknown flag, a malformed `--redis` URL).\n\nExample: tenantgate-rls --bundle bundle.json --redis redis://127.0.0.1:6379/0 --listen 127.0.0.1:8081"
)]
struct Args {
    /// The bundle (`tenantgate bundle` output) or the policy folder whose fleet limits to enforce; SIGHUP reloads it.
    #[arg(long, value_name = "FILE|DIR")]
    bundle: PathBuf,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0` (`redis://[:PASSWORD@]HOST:PORT[/DB]`; `rediss://` for TLS).
    #[arg(long)]
    redis: String,
    /// Address to serve gRPC on, e.g. `0.0.0.0:8081` (port 0: any free port, logged).
    #[arg(long)]
    listen: SocketAddr,
    /// The rate limit domain to answer for (default: the bundle's `rate_limit_service.domain`); other domains get OK with no limit.
    #[arg(long)]
    domain: Option<String>,
    /// Serve Prometheus metrics on `GET /metrics` at this address, e.g. `127.0.0.1:9102` (port 0: any free port, logged); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = tenantgate_rls::check_url(&args.redis) {
        eprintln!("tenantgate-rls: error: {e}");
        return ExitCode::from(2);
    }
    let config = tenantgate_rls::Config {
        bundle: args.bundle,
        redis: args.redis,
        listen: args.listen,
        domain: args.domain,
        metrics: args.metrics,
    };
    match tenantgate_rls::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantgate-rls: error: {e}");
            ExitCode::FAILURE
        }
    }
}
