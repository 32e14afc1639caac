//! `tenantgate-rls --bundle FILE --redis URL --listen ADDR`: see the crate doc.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Envoy's rate limit service for tenantgate's fleet limits, counting in Redis.
#[derive(Parser)]
#[command(name = "tenantgate-rls", version)]
struct Args {
    /// The bundle (`tenantgate bundle` output) whose fleet limits to enforce; SIGHUP reloads it.
    #[arg(long)]
    bundle: PathBuf,
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0`.
    #[arg(long)]
    redis: String,
    /// Address to serve gRPC on, e.g. `0.0.0.0:8081` (port 0: any free port, logged).
    #[arg(long)]
    listen: SocketAddr,
    /// The rate limit domain to answer for (default: the bundle's `rate_limit_service.domain`); other domains get OK with no limit.
    #[arg(long)]
    domain: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = tenantgate_rls::Config {
        bundle: args.bundle,
        redis: args.redis,
        listen: args.listen,
        domain: args.domain,
    };
    match tenantgate_rls::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantgate-rls: error: {e}");
            ExitCode::FAILURE
        }
    }
}
