//! `tenantgate-rls`'s command line and `grpc.health.v1.Health`: the real
//! binary; the Redis test is `#[ignore]`d (`scripts/test-rls.sh` runs it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Needs no Redis: the URL is checked before anything else.
#[test]
fn a_redis_address_without_a_scheme_is_a_usage_error() {
    let (code, stderr) = run(&[
        "--bundle",
        "nope.json",
        "--redis",
        "127.0.0.1:18801",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(
        (code, stderr.as_str()),
        (
            Some(2),
            "tenantgate-rls: error: `--redis 127.0.0.1:18801` is not a Redis URL: write `redis://127.0.0.1:18801` (`redis://[:PASSWORD@]HOST:PORT[/DB]`, or `rediss://` for TLS)\n"
        )
    );
}

/// Needs no Redis: a folder loads as its bundle, so the next step (Redis) is reached.
#[test]
fn a_policy_folder_loads_as_its_bundle() {
    let tree = Tree::new();
    tree.write(&[("/acme", &fleet("rpm", "2", "1m"))]);
    let folder = tree.dir.path().join("src");
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let (code, stderr) = run(&[
        "--bundle",
        folder.to_str().unwrap(),
        "--redis",
        &url,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "tenantgate-rls: error: cannot reach Redis at `{url}`: "
        )),
        "{stderr}"
    );
    // Not JSON: said so, naming the file.
    let readme = folder.join("README.md");
    std::fs::write(&readme, "# notes\n").unwrap();
    let (code, stderr) = run(&[
        "--bundle",
        readme.to_str().unwrap(),
        "--redis",
        &url,
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(
        (code, stderr),
        (
            Some(1),
            format!(
                "tenantgate-rls: error: the bundle does not load:\n{}: error: not a bundle: the file is not JSON (SOURCE is a policy folder or a bundle file, as `tenantgate bundle` writes it)\n",
                readme.display()
            )
        )
    );
}

async fn status(addr: std::net::SocketAddr, service: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    let r = c
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    ServingStatus::try_from(r.get_ref().status).unwrap()
}

#[tokio::test]
#[ignore = "needs redis-server: run scripts/test-rls.sh"]
async fn health_follows_redis_and_the_loss_is_logged() {
    let _ = redis_url();
    let port = free_port();
    let mut redis = RedisServer::start(port);
    let tree = Tree::new();
    tree.write(&[("/acme", &fleet("rpm", "100", "1m"))]);
    let mut rls = Rls::start(&tree.bundle_path(), &redis.url());
    // The bundle sets no `rate_limit_service`: the filters would never call
    // this service, and the log says so.
    let note = rls.wait_log("note: fleet limits", Duration::from_secs(1));
    assert!(
        note.ends_with(" (tenantgate.json): note: fleet limits are not enforced by the filter without `rate_limit_service`: `rpm` on `/acme` (docs/fleet.md)"),
        "{note}"
    );
    let service = "envoy.service.ratelimit.v3.RateLimitService";
    assert_eq!(status(rls.addr, "").await, ServingStatus::Serving);
    assert_eq!(status(rls.addr, service).await, ServingStatus::Serving);

    redis.stop();
    let line = rls.wait_log("lost Redis", Duration::from_secs(10));
    assert!(
        line.starts_with(&format!(
            "tenantgate-rls: lost Redis at `{}`: ",
            redis.url()
        )) && line.ends_with("; rate limit calls fail (UNAVAILABLE) until it is back"),
        "{line}"
    );
    assert_eq!(status(rls.addr, "").await, ServingStatus::NotServing);
    assert_eq!(status(rls.addr, service).await, ServingStatus::NotServing);

    let _redis = RedisServer::start(port);
    let line = rls.wait_log(": Redis at", Duration::from_secs(15));
    assert_eq!(
        line,
        format!("tenantgate-rls: Redis at `{}` is back", redis.url())
    );
    assert_eq!(status(rls.addr, "").await, ServingStatus::Serving);
}
