//! Helpers for the integration tests: policy trees written to a temp folder
//! and bundled, the real `tenantgate-rls` binary, a tonic client, and
//! `redis-server` processes.
//!
//! The tests that need Redis are `#[ignore]`d: `scripts/test-rls.sh` starts a
//! Redis, sets `TENANTGATE_TEST_REDIS` and runs them with `--ignored`. Run
//! alone without it, they fail with a message saying so.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor::Entry, RateLimitDescriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tenantgate_engine::Bundle;
use tonic::transport::Channel;

pub const OK: i32 = 1;
pub const OVER: i32 = 2;

/// The Redis the tests use, from `TENANTGATE_TEST_REDIS`.
pub fn redis_url() -> String {
    match std::env::var("TENANTGATE_TEST_REDIS") {
        Ok(u) if !u.is_empty() => u,
        _ => panic!(
            "TENANTGATE_TEST_REDIS is not set: these tests need a Redis; run `scripts/test-rls.sh`, \
             which starts one and runs them (`cargo test -p tenantgate-rls -- --ignored`)"
        ),
    }
}

/// A top-level tenant name no other test (or earlier run on the same Redis) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A policy tree: `(tenant path, tenant.json)` pairs, bundled into `bundle.json`.
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.dir.path().join("bundle.json")
    }

    /// Writes the tree (replacing the previous one) and its bundle; returns the version.
    pub fn write(&self, tenants: &[(&str, &str)]) -> String {
        self.write_with_settings(None, tenants)
    }

    /// [`Tree::write`] with a `tenantgate.json`.
    pub fn write_with_settings(&self, settings: Option<&str>, tenants: &[(&str, &str)]) -> String {
        let src = self.dir.path().join("src");
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(src.join("tenants")).unwrap();
        if let Some(s) = settings {
            std::fs::write(src.join("tenantgate.json"), s).unwrap();
        }
        for (path, json) in tenants {
            let d = src.join("tenants").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("tenant.json"), json).unwrap();
        }
        let b = Bundle::from_dir(&src).unwrap_or_else(|e| panic!("{e}"));
        // Written whole, then renamed: a reload never reads half a file.
        let tmp = self.dir.path().join("bundle.json.tmp");
        std::fs::write(&tmp, b.to_json()).unwrap();
        std::fs::rename(&tmp, self.bundle_path()).unwrap();
        b.version
    }

    pub fn write_raw(&self, text: &str) {
        std::fs::write(self.bundle_path(), text).unwrap();
    }
}

/// `{"limits": {"<name>": {"rate": <rate>, "per": "<per>", "scope": "fleet"}}}`.
pub fn fleet(name: &str, rate: &str, per: &str) -> String {
    let per = if per.is_empty() {
        String::new()
    } else {
        format!(", \"per\": \"{per}\"")
    };
    format!("{{\"limits\": {{\"{name}\": {{\"rate\": {rate}{per}, \"scope\": \"fleet\"}}}}}}")
}

/// The real binary, with its standard error collected line by line.
pub struct Rls {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tenantgate-rls")
}

/// Collects a child's standard error into a shared list of lines.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    log
}

impl Rls {
    pub fn start(bundle: &Path, redis: &str) -> Rls {
        Self::start_with(bundle, redis, &[])
    }

    /// [`Rls::start`] with more flags.
    pub fn start_with(bundle: &Path, redis: &str, extra: &[&str]) -> Rls {
        let mut child = Command::new(bin())
            .args([
                "--bundle",
                bundle.to_str().unwrap(),
                "--redis",
                redis,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = collect_stderr(&mut child);
        let mut rls = Rls {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = rls.wait_log("listening on ", Duration::from_secs(20));
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap();
        rls.addr = addr.parse().unwrap();
        rls
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let mut exited: Option<Instant> = None;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            // After an exit, the reader thread may still hold the last lines.
            if let (None, Ok(Some(_))) = (exited, self.child.try_wait()) {
                exited = Some(Instant::now());
            }
            if let Some(status) = exited
                .filter(|t| t.elapsed() > Duration::from_secs(1))
                .and_then(|_| self.child.try_wait().ok().flatten())
            {
                panic!(
                    "tenantgate-rls exited ({status}) before logging `{needle}`:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "tenantgate-rls did not log `{needle}` within {timeout:?}:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }
}

impl Drop for Rls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A descriptor from its entries, with an optional per-descriptor `hits_addend`.
pub fn desc(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        hits_addend: hits.map(|value| envoy_types::pb::google::protobuf::UInt64Value { value }),
        ..Default::default()
    }
}

/// The check descriptor of limit `name` on `tenant`.
pub fn check(tenant: &str, name: &str) -> RateLimitDescriptor {
    desc(&[("tenant", tenant), ("limit", name)], None)
}

/// The report descriptor of limit `name` on `tenant`.
pub fn report(tenant: &str, name: &str) -> RateLimitDescriptor {
    desc(
        &[
            ("tenant", tenant),
            ("limit", name),
            ("tenantgate_report", "1"),
        ],
        None,
    )
}

pub fn request(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "tenantgate".into(),
        descriptors,
        hits_addend: hits,
    }
}

/// One call, failing the test on a gRPC error or after 5 s.
pub async fn call(
    c: &mut RateLimitServiceClient<Channel>,
    req: RateLimitRequest,
) -> RateLimitResponse {
    tokio::time::timeout(Duration::from_secs(5), c.should_rate_limit(req))
        .await
        .expect("no answer within 5 s")
        .unwrap_or_else(|s| panic!("gRPC error: {s:?}"))
        .into_inner()
}

/// `(code, remaining)` of every status.
pub fn codes(r: &RateLimitResponse) -> Vec<(i32, u32)> {
    r.statuses
        .iter()
        .map(|s| (s.code, s.limit_remaining))
        .collect()
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` of the test's own, in a temp folder, no persistence.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run scripts/test-rls.sh, which installs it");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one key from the test Redis.
pub async fn redis_get(url: &str, key: &str) -> Option<i64> {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}
