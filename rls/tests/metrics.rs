//! `tenantgate-rls --metrics ADDR`: the counters over the in-memory store and
//! the HTTP endpoint (plain `cargo test`), and the real binary's flag against
//! a real Redis (`#[ignore]`d: `scripts/test-rls.sh` runs it).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use tenantgate_rls::counter::{Count, CounterError, CounterStore, Hit, MemoryCounters};
use tenantgate_rls::limits::Limits;
use tenantgate_rls::metrics::{self, Metrics};
use tenantgate_rls::service::Service;
use tokio::sync::watch;

/// What `/metrics` shows for these figures.
fn exposition(
    (ok, over, error): (u64, u64, u64),
    redis_up: u8,
    (version, domain): (&str, &str),
    (reloads_ok, reloads_failed): (u64, u64),
) -> String {
    format!(
        "# HELP tenantgate_rls_calls_total Rate limit calls, by answer (error: UNAVAILABLE, Redis did not answer).
# TYPE tenantgate_rls_calls_total counter
tenantgate_rls_calls_total{{result=\"ok\"}} {ok}
tenantgate_rls_calls_total{{result=\"over_limit\"}} {over}
tenantgate_rls_calls_total{{result=\"error\"}} {error}
# HELP tenantgate_rls_redis_up 1 while Redis answers the health PING.
# TYPE tenantgate_rls_redis_up gauge
tenantgate_rls_redis_up {redis_up}
# HELP tenantgate_rls_bundle_info The bundle serving and the domain answered.
# TYPE tenantgate_rls_bundle_info gauge
tenantgate_rls_bundle_info{{version=\"{version}\",domain=\"{domain}\"}} 1
# HELP tenantgate_rls_reloads_total SIGHUP reloads, by result.
# TYPE tenantgate_rls_reloads_total counter
tenantgate_rls_reloads_total{{result=\"ok\"}} {reloads_ok}
tenantgate_rls_reloads_total{{result=\"failed\"}} {reloads_failed}
"
    )
}

/// One HTTP/1.1 request over a plain socket: `(status line, content type, body)`.
fn http(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_owned();
    (status, ctype, body.to_owned())
}

/// A store whose every step fails, as Redis does when it does not answer.
struct Down;

impl CounterStore for Down {
    async fn apply(&self, _hits: &[Hit]) -> Result<Vec<Count>, CounterError> {
        Err(CounterError::Timeout(Duration::from_millis(1000)))
    }
}

#[tokio::test]
async fn calls_reloads_and_redis_are_counted_and_served() {
    let tree = Tree::new();
    let version = tree.write(&[("/acme", &fleet("rpm", "2", "1m"))]);
    let limits = Arc::new(Limits::load(&tree.bundle_path()).unwrap());
    let (_tx, rx) = watch::channel(Arc::clone(&limits));
    let m = Arc::new(Metrics::new(&version, &limits.domain));
    let service =
        Service::new(rx.clone(), MemoryCounters::new(), None).with_metrics(Arc::clone(&m));
    let down = Service::new(rx, Down, None).with_metrics(Arc::clone(&m));
    assert_eq!(
        m.text(),
        exposition((0, 0, 0), 1, (&version, "tenantgate"), (0, 0))
    );

    // Through the gRPC method, as Envoy calls it: 2 admitted, then over.
    for _ in 0..3 {
        let req = tonic::Request::new(request(vec![check("/acme", "rpm")], 1));
        service.should_rate_limit(req).await.unwrap();
    }
    // A call of another domain is answered OK (no limit) and counted so.
    let mut other = request(vec![check("/acme", "rpm")], 1);
    other.domain = "elsewhere".into();
    service
        .should_rate_limit(tonic::Request::new(other))
        .await
        .unwrap();
    let req = tonic::Request::new(request(vec![check("/acme", "rpm")], 1));
    let status = down.should_rate_limit(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    // `decide` is the logic without the RPC: not counted.
    service
        .decide(&request(vec![check("/acme", "rpm")], 1), false)
        .await
        .unwrap();
    m.reloaded(None);
    m.reloaded(Some(("v2\"x", "shop")));
    m.reloaded(None);
    m.set_redis_up(false);
    let want = exposition((3, 1, 1), 0, ("v2\\\"x", "shop"), (1, 2));
    assert_eq!(m.text(), want);

    // The endpoint, on loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(metrics::serve(listener, Arc::clone(&m)));
    let got = tokio::task::spawn_blocking(move || {
        [
            http(addr, "GET", "/metrics"),
            http(addr, "POST", "/metrics"),
            http(addr, "GET", "/"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(
        got,
        [
            (
                "HTTP/1.1 200 OK".to_owned(),
                "text/plain; version=0.0.4; charset=utf-8".to_owned(),
                want
            ),
            (
                "HTTP/1.1 405 Method Not Allowed".to_owned(),
                "text/plain; charset=utf-8".to_owned(),
                "method not allowed: GET /metrics\n".to_owned()
            ),
            (
                "HTTP/1.1 404 Not Found".to_owned(),
                "text/plain; charset=utf-8".to_owned(),
                "not found: GET /metrics\n".to_owned()
            ),
        ]
    );
}

/// Needs no Redis: the address is checked with the other flags.
#[test]
fn a_metrics_flag_that_is_not_an_address_is_a_usage_error() {
    let out = std::process::Command::new(bin())
        .args([
            "--bundle",
            "nope.json",
            "--redis",
            "redis://127.0.0.1:1/",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "9102",
        ])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stderr).as_ref()),
        (
            Some(2),
            "error: invalid value '9102' for '--metrics <ADDR>': invalid socket address syntax\n\nFor more information, try '--help'.\n"
        )
    );
}

/// Waits until `/metrics` at `addr` shows `want`; fails with the last text.
fn scrape_until(addr: SocketAddr, want: &str) {
    let start = Instant::now();
    loop {
        let (_, _, body) = http(addr, "GET", "/metrics");
        if body == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "/metrics never showed\n{want}\nlast:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server: run scripts/test-rls.sh"]
async fn the_binary_serves_metrics_on_its_flag() {
    let _ = redis_url();
    let mut redis = RedisServer::start(free_port());
    let tree = Tree::new();
    let v1 = tree.write(&[("/acme", &fleet("rpm", "1", "1m"))]);
    let mut rls = Rls::start_with(
        &tree.bundle_path(),
        &redis.url(),
        &["--metrics", "127.0.0.1:0"],
    );
    let line = rls.wait_log("metrics on ", Duration::from_secs(5));
    let addr: SocketAddr = line
        .strip_prefix("tenantgate-rls: metrics on http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let mut c = rls.client().await;
    call(&mut c, request(vec![check("/acme", "rpm")], 1)).await;
    call(&mut c, request(vec![check("/acme", "rpm")], 1)).await;
    let scraped = tokio::task::spawn_blocking(move || http(addr, "GET", "/metrics"))
        .await
        .unwrap();
    assert_eq!(
        scraped,
        (
            "HTTP/1.1 200 OK".to_owned(),
            "text/plain; version=0.0.4; charset=utf-8".to_owned(),
            exposition((1, 1, 0), 1, (&v1, "tenantgate"), (0, 0))
        )
    );

    let v2 = tree.write(&[("/acme", &fleet("rpm", "5", "1m"))]);
    rls.signal("HUP");
    rls.wait_log("reloaded bundle", Duration::from_secs(10));
    tree.write_raw("{");
    rls.signal("HUP");
    rls.wait_log("reload failed", Duration::from_secs(10));
    redis.stop();
    rls.wait_log("lost Redis", Duration::from_secs(10));
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.should_rate_limit(request(vec![check("/acme", "rpm")], 1)),
    )
    .await
    .unwrap();
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
    let want = exposition((1, 1, 1), 0, (&v2, "tenantgate"), (1, 1));
    tokio::task::spawn_blocking(move || scrape_until(addr, &want))
        .await
        .unwrap();
}
