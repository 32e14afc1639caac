//! `tenantgate-rls` end to end: the real binary, a real Redis, a tonic client.
//! The Redis tests are `#[ignore]`d; `scripts/test-rls.sh` runs them.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn admission_is_exact_under_concurrency() {
    let t = format!("/{}", unique("conc"));
    let tree = Tree::new();
    tree.write(&[(&t, &fleet("rpm", "1000", "1m"))]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let left = Arc::new(AtomicUsize::new(3000));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = rls.client().await;
        let left = Arc::clone(&left);
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut over) = (0u32, 0u32);
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let r = call(&mut c, request(vec![check(&t, "rpm")], 1)).await;
                match r.overall_code {
                    OK => ok += 1,
                    OVER => over += 1,
                    other => panic!("overall_code {other}"),
                }
            }
            (ok, over)
        }));
    }
    let (mut ok, mut over) = (0, 0);
    for task in tasks {
        let (o, v) = task.await.unwrap();
        ok += o;
        over += v;
    }
    assert_eq!((ok, over), (1000, 2000));
    let key = format!("tenantgate:rls:v1:{{{}}}:{t}:rpm:60", &t[1..]);
    assert_eq!(redis_get(&redis_url(), &key).await, Some(1000));
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn a_chain_is_charged_all_or_nothing() {
    let top = unique("chain");
    let (p, a, b) = (format!("/{top}"), format!("/{top}/a"), format!("/{top}/b"));
    let tree = Tree::new();
    tree.write(&[
        (&p, &fleet("rpm", "10", "1m")),
        (&a, &fleet("rpm", "6", "")),
        (&b, &fleet("rpm", "\"40%\"", "")),
    ]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    // 8 hits on the parent itself.
    let r = call(&mut c, request(vec![check(&p, "rpm")], 8)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 2)]));
    // 3 hits to `a`: `a` has room (0 + 3 <= 6), the parent does not (8 + 3 > 10).
    let chain = |hits| request(vec![check(&a, "rpm"), check(&p, "rpm")], hits);
    let r = call(&mut c, chain(3)).await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OK, 6), (OVER, 2)])
    );
    // Nothing was charged: `a` still has 6, so 2 more pass and leave it 4.
    let r = call(&mut c, chain(2)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 4), (OK, 0)]));
    let key = |n: &str| format!("tenantgate:rls:v1:{{{top}}}:{n}:rpm:60");
    assert_eq!(redis_get(&redis_url(), &key(&a)).await, Some(2));
    assert_eq!(redis_get(&redis_url(), &key(&p)).await, Some(10));
    assert_eq!(redis_get(&redis_url(), &key(&b)).await, None);
    // `b` (40% = 4) is refused by the parent now, and stays untouched.
    let r = call(&mut c, request(vec![check(&b, "rpm"), check(&p, "rpm")], 1)).await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OK, 4), (OVER, 0)])
    );
    assert_eq!(redis_get(&redis_url(), &key(&b)).await, None);
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn statuses_carry_limit_remaining_and_reset() {
    let t = format!("/{}", unique("status"));
    let u = format!("{t}/odd");
    let tree = Tree::new();
    tree.write(&[
        (&t, &fleet("rpm", "10", "1m")),
        (
            &u,
            r#"{"limits": {"slow": {"rate": 3, "per": "90s", "scope": "fleet"}}}"#,
        ),
    ]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    let started = Instant::now();
    // hits_addend 0 means 1.
    let r = call(
        &mut c,
        request(vec![check(&u, "slow"), check(&t, "rpm")], 0),
    )
    .await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 2), (OK, 9)]));
    let slow = r.statuses[0].current_limit.clone().unwrap();
    assert_eq!(
        (slow.name.as_str(), slow.requests_per_unit, slow.unit),
        ("slow", 3, 0),
        "90s is no API unit: UNKNOWN; the name is the bare limit name"
    );
    let rpm = r.statuses[1].current_limit.clone().unwrap();
    assert_eq!(
        (rpm.name.as_str(), rpm.requests_per_unit, rpm.unit),
        ("rpm", 10, 2),
        "1m is MINUTE"
    );
    let reset =
        |i: usize, r: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse| {
            let d = r.statuses[i].duration_until_reset.unwrap();
            Duration::from_secs(d.seconds as u64) + Duration::from_nanos(d.nanos as u64)
        };
    let (d_slow, d_rpm) = (reset(0, &r), reset(1, &r));
    let elapsed = started.elapsed();
    assert!(
        d_slow <= Duration::from_secs(90) && d_slow + elapsed >= Duration::from_secs(89),
        "{d_slow:?}"
    );
    assert!(
        d_rpm <= Duration::from_secs(60) && d_rpm + elapsed >= Duration::from_secs(59),
        "{d_rpm:?}"
    );
    // A request-level hits_addend, and a per-descriptor one that overrides it.
    let r = call(
        &mut c,
        request(
            vec![
                desc(&[("tenant", &u), ("limit", "slow")], Some(1)),
                check(&t, "rpm"),
            ],
            4,
        ),
    )
    .await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 1), (OK, 5)]));
    // Refused: the status still says when the window resets, and nothing moves.
    let r = call(
        &mut c,
        request(vec![check(&u, "slow"), check(&t, "rpm")], 2),
    )
    .await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 1), (OK, 5)])
    );
    assert!(reset(0, &r) <= Duration::from_secs(90));
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn reports_count_past_the_limit() {
    let top = unique("report");
    let t = format!("/{top}");
    let tree = Tree::new();
    tree.write(&[(&t, &fleet("rpm", "5", "1m"))]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    let key = format!("tenantgate:rls:v1:{{{top}}}:{t}:rpm:60");
    let r = call(&mut c, request(vec![report(&t, "rpm")], 4)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 1)]));
    let r = call(&mut c, request(vec![report(&t, "rpm")], 4)).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    assert_eq!(redis_get(&redis_url(), &key).await, Some(8));
    // A check is refused and not counted; a report still counts.
    let r = call(&mut c, request(vec![check(&t, "rpm")], 1)).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    assert_eq!(redis_get(&redis_url(), &key).await, Some(8));
    let r = call(
        &mut c,
        request(
            vec![desc(
                &[("tenant", &t), ("limit", "rpm"), ("tenantgate_report", "1")],
                Some(3),
            )],
            1,
        ),
    )
    .await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    assert_eq!(redis_get(&redis_url(), &key).await, Some(11));
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn a_call_marked_as_a_report_by_metadata_counts_past_the_limit() {
    let top = unique("reportmd");
    let (p, a) = (format!("/{top}"), format!("/{top}/a"));
    let tree = Tree::new();
    tree.write(&[(&p, &fleet("rpm", "5", "1m")), (&a, &fleet("rpm", "3", ""))]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    let marked = |hits| {
        let mut r = tonic::Request::new(request(vec![check(&a, "rpm"), check(&p, "rpm")], hits));
        r.metadata_mut()
            .insert("x-tenantgate-report", "1".parse().unwrap());
        r
    };
    let r = c.should_rate_limit(marked(4)).await.unwrap().into_inner();
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 0), (OK, 1)])
    );
    let r = c.should_rate_limit(marked(2)).await.unwrap().into_inner();
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 0), (OVER, 0)])
    );
    let key = |n: &str| format!("tenantgate:rls:v1:{{{top}}}:{n}:rpm:60");
    assert_eq!(redis_get(&redis_url(), &key(&a)).await, Some(6));
    assert_eq!(redis_get(&redis_url(), &key(&p)).await, Some(6));
    // Another value of the header is no report: a refused check counts nothing.
    let mut r = tonic::Request::new(request(vec![check(&p, "rpm")], 1));
    r.metadata_mut()
        .insert("x-tenantgate-report", "0".parse().unwrap());
    let r = c.should_rate_limit(r).await.unwrap().into_inner();
    assert_eq!(codes(&r), vec![(OVER, 0)]);
    assert_eq!(redis_get(&redis_url(), &key(&p)).await, Some(6));
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn unknown_descriptors_are_ok_without_a_limit() {
    let t = format!("/{}", unique("unknown"));
    let tree = Tree::new();
    tree.write(&[(&t, &fleet("rpm", "1", "1m"))]);
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    let r = call(
        &mut c,
        request(
            vec![
                check("/nobody", "rpm"),
                check(&t, "rps"),
                desc(&[("limit", "rpm"), ("tenant", &t)], None),
                desc(&[("tenant", &t), ("limit", "rpm"), ("key", "alice")], None),
                desc(&[("generic_key", "x")], None),
                check(&t, "rpm"),
            ],
            1,
        ),
    )
    .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(
        codes(&r),
        vec![(OK, 0), (OK, 0), (OK, 0), (OK, 0), (OK, 0), (OK, 0)]
    );
    for s in &r.statuses[..5] {
        assert_eq!(
            (s.current_limit.clone(), s.duration_until_reset),
            (None, None)
        );
    }
    assert!(r.statuses[5].current_limit.is_some());
    // Another domain: not this service's limits.
    let mut other = request(vec![check(&t, "rpm")], 5);
    other.domain = "other".into();
    let r = call(&mut c, other).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 0)]));
    assert_eq!(r.statuses[0].current_limit, None);
    // No descriptors at all.
    let r = call(&mut c, request(vec![], 1)).await;
    assert_eq!((r.overall_code, r.statuses.len()), (OK, 0));
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn sighup_reloads_and_keeps_the_old_bundle_when_the_new_one_fails() {
    let t = format!("/{}", unique("reload"));
    let tree = Tree::new();
    let v1 = tree.write(&[(&t, &fleet("rpm", "2", "1m"))]);
    let mut rls = Rls::start(&tree.bundle_path(), &redis_url());
    rls.wait_log(
        &format!("loaded bundle {v1} (1 fleet limits)"),
        Duration::from_secs(5),
    );
    let mut c = rls.client().await;
    let one = || request(vec![check(&t, "rpm")], 1);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OK, 1)]);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OK, 0)]);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OVER, 0)]);

    let v2 = tree.write(&[(&t, &fleet("rpm", "4", "1m"))]);
    rls.signal("HUP");
    rls.wait_log(
        &format!("reloaded bundle {v2} (was {v1})"),
        Duration::from_secs(10),
    );
    // Same window, same counter (2 used): the new limit leaves 2.
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OK, 1)]);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OK, 0)]);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OVER, 0)]);

    tree.write_raw("{ not a bundle");
    rls.signal("HUP");
    rls.wait_log(
        &format!("reload failed, keeping bundle {v2}"),
        Duration::from_secs(10),
    );
    let r = call(&mut c, one()).await;
    assert_eq!(codes(&r), vec![(OVER, 0)]);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .clone()
            .unwrap()
            .requests_per_unit,
        4
    );
    // A bundle whose limits do not validate is refused the same way.
    tree.write_raw(
        &std::fs::read_to_string(tree.bundle_path())
            .unwrap()
            .replace("\"version\": \"sha256:", "\"version\": \"sha256:0"),
    );
    rls.signal("HUP");
    let start = Instant::now();
    while rls
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("reload failed"))
        .count()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "second reload not logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OVER, 0)]);
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn sigterm_shuts_down_cleanly() {
    let t = format!("/{}", unique("term"));
    let tree = Tree::new();
    tree.write(&[(&t, &fleet("rpm", "2", "1m"))]);
    let mut rls = Rls::start(&tree.bundle_path(), &redis_url());
    let mut c = rls.client().await;
    assert_eq!(
        codes(&call(&mut c, request(vec![check(&t, "rpm")], 1)).await),
        vec![(OK, 1)]
    );
    // The connection stays open: the server says GOAWAY, the client closes it.
    rls.signal("TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = rls.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    rls.wait_log("shutting down", Duration::from_secs(1));
    rls.wait_log("stopped", Duration::from_secs(1));
    let log = rls.log.lock().unwrap().join("\n");
    assert!(!log.contains("still open"), "{log}");
}

#[tokio::test]
#[ignore = "needs redis-server: run scripts/test-rls.sh"]
async fn redis_down_answers_unavailable_then_recovers() {
    let _ = redis_url();
    let port = free_port();
    let mut redis = RedisServer::start(port);
    let t = format!("/{}", unique("down"));
    let tree = Tree::new();
    tree.write(&[(&t, &fleet("rpm", "100", "1m"))]);
    let rls = Rls::start(&tree.bundle_path(), &redis.url());
    let mut c = rls.client().await;
    let one = || request(vec![check(&t, "rpm")], 1);
    assert_eq!(codes(&call(&mut c, one()).await), vec![(OK, 99)]);

    redis.stop();
    let start = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(5), c.should_rate_limit(one()))
        .await
        .expect("an RPC with Redis down must not hang")
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("redis: "), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // Redis back (empty: no persistence): the service recovers by itself.
    let _redis = RedisServer::start(port);
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.should_rate_limit(one())).await {
            Ok(Ok(r)) => {
                assert_eq!(codes(r.get_ref()), vec![(OK, 99)]);
                break;
            }
            _ => {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "no recovery within 15 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Needs no Redis: nothing listens on the port.
#[test]
fn redis_unreachable_at_start_exits_1_with_a_clear_message() {
    let tree = Tree::new();
    tree.write(&[("/acme", &fleet("rpm", "2", "1m"))]);
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let start = Instant::now();
    let out = std::process::Command::new(bin())
        .args([
            "--bundle",
            tree.bundle_path().to_str().unwrap(),
            "--redis",
            &url,
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "tenantgate-rls: error: cannot reach Redis at `{url}`: "
        )),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(15));
}

/// Needs no Redis: the bundle is checked first.
#[test]
fn a_bad_bundle_at_start_exits_1_naming_the_error() {
    let tree = Tree::new();
    tree.write(&[(
        "/acme",
        r#"{"limits": {"rpm": {"rate": 2, "burst": 4, "scope": "fleet"}}}"#,
    )]);
    let out = std::process::Command::new(bin())
        .args([
            "--bundle",
            tree.bundle_path().to_str().unwrap(),
            "--redis",
            "redis://127.0.0.1:1/",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "bundle.json (tenants/acme/tenant.json):1:32: error: limit `rpm`: `burst` is a local notion"
        ),
        "{stderr}"
    );
}

/// The in-memory store (what `memory.rs` tests the service over) answers as
/// the Lua script does, step for step: a table of steps with checks,
/// reports, refusals, repeated keys and zero hits.
#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn the_memory_store_answers_as_the_script() {
    use tenantgate_rls::counter::{CounterStore, Counters, Hit, MemoryCounters};
    let conn = redis::Client::open(redis_url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let redis = Counters::new(conn, Duration::from_secs(5));
    let memory = MemoryCounters::new();
    let top = unique("same");
    let k = |n: &str| format!("tenantgate:rls:v1:{{{top}}}:{n}");
    let h = |key: &str, limit: u64, hits: u64, report: bool| Hit {
        key: k(key),
        limit,
        window_ms: 60_000,
        hits,
        report,
    };
    let steps: Vec<Vec<Hit>> = vec![
        vec![h("a", 6, 3, false), h("p", 10, 8, false)],
        vec![h("a", 6, 3, false), h("p", 10, 3, false)],
        vec![h("p", 10, 5, true), h("a", 6, 4, false)],
        vec![h("b", 5, 5, false), h("b", 5, 1, true)],
        vec![h("c", 2, 0, false), h("c", 2, 0, true)],
        vec![
            h("a", 6, 2, false),
            h("d", 1, 1, false),
            h("p", 10, 0, false),
        ],
        vec![h("d", 1, 1, true), h("d", 1, 1, false)],
        vec![],
    ];
    for (i, step) in steps.iter().enumerate() {
        let want = redis.apply(step).await.unwrap();
        let got = memory.apply(step).await.unwrap();
        let view = |c: &[tenantgate_rls::counter::Count]| {
            c.iter()
                .map(|c| (c.count, c.over, c.ttl.is_some()))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(&got), view(&want), "step {i}: {step:?}");
        for (g, w) in got.iter().zip(&want) {
            if let (Some(g), Some(w)) = (g.ttl, w.ttl) {
                assert!(
                    g.abs_diff(w) < Duration::from_secs(2),
                    "step {i}: ttl {g:?} vs {w:?}"
                );
            }
        }
    }
}

/// The domain comes from the bundle and follows it across reloads; a
/// `--domain` that differs from the bundle's is logged at start and on
/// each reload (calls of the bundle's domain would get OK with no limit).
#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn the_domain_comes_from_the_bundle_and_a_different_flag_is_logged() {
    let t = format!("/{}", unique("domain"));
    let tree = Tree::new();
    let edge = r#"{"rate_limit_service": {"domain": "edge"}}"#;
    tree.write_with_settings(Some(edge), &[(&t, &fleet("rpm", "5", "1m"))]);
    let mut rls = Rls::start(&tree.bundle_path(), &redis_url());
    rls.wait_log("(domain `edge`, from the bundle)", Duration::from_secs(5));
    let mut c = rls.client().await;
    let mut req = request(vec![check(&t, "rpm")], 1);
    req.domain = "edge".into();
    assert_eq!(codes(&call(&mut c, req).await), vec![(OK, 4)]);
    tree.write_with_settings(None, &[(&t, &fleet("rpm", "5", "1m"))]);
    rls.signal("HUP");
    rls.wait_log(
        "the bundle's domain is now `tenantgate` (was `edge`)",
        Duration::from_secs(10),
    );
    assert_eq!(
        codes(&call(&mut c, request(vec![check(&t, "rpm")], 1)).await),
        vec![(OK, 3)]
    );
    drop(rls);

    tree.write_with_settings(Some(edge), &[(&t, &fleet("rpm", "5", "1m"))]);
    let mut rls = Rls::start_with(
        &tree.bundle_path(),
        &redis_url(),
        &["--domain", "tenantgate"],
    );
    let warning = "warning: `--domain` `tenantgate` differs from the bundle's `rate_limit_service.domain` `edge`";
    rls.wait_log(warning, Duration::from_secs(5));
    rls.wait_log(
        "(domain `tenantgate`, from `--domain`)",
        Duration::from_secs(5),
    );
    let mut c = rls.client().await;
    assert_eq!(
        codes(&call(&mut c, request(vec![check(&t, "rpm")], 1)).await),
        vec![(OK, 2)]
    );
    let n = rls
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(warning))
        .count();
    rls.signal("HUP");
    rls.wait_log("reloaded bundle", Duration::from_secs(10));
    let after = rls
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(warning))
        .count();
    assert_eq!((n, after), (1, 2), "logged at start and on the reload");
}

/// One RLQS stream: sends `usages` as one report, returns the first answer's
/// token-bucket rate per `(tenant, limit)`, keeping the stream open.
#[allow(clippy::unwrap_used, clippy::panic)]
async fn rlqs_report(
    addr: std::net::SocketAddr,
    domain: &str,
    usages: &[(&str, &str, u64)],
) -> (
    Vec<(String, String, u32)>,
    tokio::sync::mpsc::Sender<
        envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports,
    >,
) {
    use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::Strategy;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports;
    let mut c = RateLimitQuotaServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(RateLimitQuotaUsageReports {
        domain: domain.into(),
        bucket_quota_usages: usages
            .iter()
            .map(|(t, l, n)| BucketQuotaUsage {
                bucket_id: Some(tenantgate_rls::quota::bucket_id(t, l)),
                time_elapsed: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                num_requests_allowed: *n,
                num_requests_denied: 0,
            })
            .collect(),
    })
    .await
    .unwrap();
    let mut answers = c
        .stream_rate_limit_quotas(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut out: Vec<(String, String, u32)> = first
        .bucket_action
        .iter()
        .map(|a| {
            let id = a.bucket_id.clone().unwrap();
            let (t, l) = tenantgate_rls::quota::bucket_of(&id).unwrap();
            let rate = match a.bucket_action.unwrap() {
                Action::QuotaAssignmentAction(q) => match q.rate_limit_strategy.unwrap().strategy {
                    Some(Strategy::TokenBucket(b)) => b.tokens_per_fill.unwrap().value,
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            };
            (t.to_owned(), l.to_owned(), rate)
        })
        .collect();
    out.sort();
    (out, tx)
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
async fn rlqs_reports_live_in_redis_and_a_restart_resumes() {
    let domain = unique("rlqs");
    let tree = Tree::new();
    let settings = format!(
        r#"{{"rate_limit_service": {{"mode": "assigned", "domain": "{domain}", "report_interval_ms": 2000}}}}"#
    );
    tree.write_with_settings(
        Some(&settings),
        &[(
            "/",
            r#"{"limits": {"rps": {"rate": 100, "burst": 20, "scope": "fleet"}}}"#,
        )],
    );
    let mut rls = Rls::start(&tree.bundle_path(), &redis_url());
    // Client A asks 80/s, alone: it gets its demand and the rest, 100.
    let (a, _keep_a) = rlqs_report(rls.addr, &domain, &[("/", "rps", 80)]).await;
    assert_eq!(a, [("/".to_string(), "rps".to_string(), 100)]);
    // Client B, another stream, asks 0: max-min of 100 among 80 and 0, then
    // the 20 left equally: B gets 10.
    let (b, _keep_b) = rlqs_report(rls.addr, &domain, &[("/", "rps", 0)]).await;
    assert_eq!(b, [("/".to_string(), "rps".to_string(), 10)]);
    let key = tenantgate_rls::quota::reports_key(&domain);
    let fields: Vec<String> = {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("HKEYS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(fields.len(), 2, "{fields:?}");
    // A restarted service resumes from the reports in Redis (TTL 3
    // intervals, 6 s): C asking 10 shares with A's 80 and B's 0, and the 10
    // left go equally: 13 for C (not the 100 it would get alone).
    rls.signal("KILL");
    let _ = rls.child.wait();
    let rls = Rls::start(&tree.bundle_path(), &redis_url());
    let (c, _keep_c) = rlqs_report(rls.addr, &domain, &[("/", "rps", 10)]).await;
    assert_eq!(c, [("/".to_string(), "rps".to_string(), 13)]);
}

#[tokio::test]
#[ignore = "needs Redis: run scripts/test-rls.sh"]
#[allow(clippy::unwrap_used)]
async fn rlqs_stream_survives_redis_down_and_answers_again() {
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
    use envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports;
    let port = free_port();
    let mut redis = RedisServer::start(port);
    let tree = Tree::new();
    tree.write_with_settings(
        Some(r#"{"rate_limit_service": {"mode": "assigned", "report_interval_ms": 500}}"#),
        &[(
            "/",
            r#"{"limits": {"rps": {"rate": 50, "scope": "fleet"}}}"#,
        )],
    );
    let rls = Rls::start(&tree.bundle_path(), &redis.url());
    let report = || RateLimitQuotaUsageReports {
        domain: "tenantgate".into(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(tenantgate_rls::quota::bucket_id("/", "rps")),
            time_elapsed: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            num_requests_allowed: 10,
            num_requests_denied: 0,
        }],
    };
    let mut c = RateLimitQuotaServiceClient::connect(format!("http://{}", rls.addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(report()).await.unwrap();
    let mut answers = c
        .stream_rate_limit_quotas(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), answers.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.bucket_action.len(), 1);
    // Redis down: a report gets no answer (within 3 s; the Redis timeout is
    // 1 s), and the stream stays open.
    redis.stop();
    tx.send(report()).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(3), answers.message()).await;
    assert!(quiet.is_err(), "an answer with Redis down: {quiet:?}");
    let mut redis = RedisServer::start(port);
    // Redis back: a later report on the same stream is answered.
    let start = Instant::now();
    loop {
        tx.send(report()).await.unwrap();
        if let Ok(Ok(Some(r))) =
            tokio::time::timeout(Duration::from_secs(2), answers.message()).await
        {
            assert_eq!(r.bucket_action.len(), 1);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no answer within 15 s of Redis' return"
        );
    }
    redis.stop();
}
