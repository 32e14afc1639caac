//! The service's logic over the in-memory counters: descriptor matching,
//! all-or-nothing checks, reports, statuses, domains. No Redis and no
//! process: `Service::decide` and the gRPC method are called directly, so
//! these run in plain `cargo test`. The Redis tests (`rls.rs`) check the
//! script and the binary; `store_matches_redis` in `rls.rs` checks that both
//! stores answer alike.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tenantgate_rls::counter::MemoryCounters;
use tenantgate_rls::limits::Limits;
use tenantgate_rls::service::Service;
use tokio::sync::watch;

/// A service over `tenants` (and `settings`, a `tenantgate.json`), counting
/// in memory on a clock the test moves.
struct Fixture {
    service: Arc<Service<MemoryCounters>>,
    now: Arc<Mutex<Instant>>,
    limits: watch::Sender<Arc<Limits>>,
    tree: Tree,
}

impl Fixture {
    fn new(settings: Option<&str>, tenants: &[(&str, &str)], domain: Option<&str>) -> Fixture {
        let tree = Tree::new();
        tree.write_with_settings(settings, tenants);
        let limits = Limits::load(&tree.bundle_path()).unwrap();
        let (tx, rx) = watch::channel(Arc::new(limits));
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock = Arc::clone(&now);
        let counters = MemoryCounters::with_clock(Arc::new(move || *clock.lock().unwrap()));
        Fixture {
            service: Arc::new(Service::new(rx, counters, domain.map(str::to_owned))),
            now,
            limits: tx,
            tree,
        }
    }

    fn tenants(tenants: &[(&str, &str)]) -> Fixture {
        Self::new(None, tenants, None)
    }

    async fn call(&self, req: RateLimitRequest) -> RateLimitResponse {
        self.service.decide(&req, false).await.unwrap()
    }

    fn advance(&self, d: Duration) {
        *self.now.lock().unwrap() += d;
    }

    /// Replaces the bundle, as a SIGHUP does.
    fn reload(&self, settings: Option<&str>, tenants: &[(&str, &str)]) {
        self.tree.write_with_settings(settings, tenants);
        let limits = Limits::load(&self.tree.bundle_path()).unwrap();
        self.limits.send_replace(Arc::new(limits));
    }
}

fn reset(r: &RateLimitResponse, i: usize) -> Duration {
    let d = r.statuses[i].duration_until_reset.unwrap();
    Duration::from_secs(d.seconds as u64) + Duration::from_nanos(d.nanos as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_is_exact_under_concurrency() {
    let f = Fixture::tenants(&[("/conc", &fleet("rpm", "1000", "1m"))]);
    let left = Arc::new(AtomicUsize::new(3000));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (service, left) = (Arc::clone(&f.service), Arc::clone(&left));
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut over) = (0u32, 0u32);
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let r = service
                    .decide(&request(vec![check("/conc", "rpm")], 1), false)
                    .await
                    .unwrap();
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
    assert_eq!(f.service.counters().len(), 1);
}

#[tokio::test]
async fn a_chain_is_charged_all_or_nothing() {
    let f = Fixture::tenants(&[
        ("/p", &fleet("rpm", "10", "1m")),
        ("/p/a", &fleet("rpm", "6", "")),
        ("/p/b", &fleet("rpm", "\"40%\"", "")),
    ]);
    let r = f.call(request(vec![check("/p", "rpm")], 8)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 2)]));
    // `a` has room (0 + 3 <= 6), the parent does not (8 + 3 > 10): nothing is charged.
    let chain = |hits| request(vec![check("/p/a", "rpm"), check("/p", "rpm")], hits);
    let r = f.call(chain(3)).await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OK, 6), (OVER, 2)])
    );
    let r = f.call(chain(2)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 4), (OK, 0)]));
    // `b` (40% = 4) is refused by the parent, and stays untouched.
    let r = f
        .call(request(vec![check("/p/b", "rpm"), check("/p", "rpm")], 1))
        .await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OK, 4), (OVER, 0)])
    );
    assert_eq!(f.service.counters().len(), 2, "`/p` and `/p/a` only");
}

#[tokio::test]
async fn statuses_carry_the_limit_remaining_and_reset() {
    let f = Fixture::tenants(&[
        ("/t", &fleet("rpm", "10", "1m")),
        (
            "/t/odd",
            r#"{"limits": {"slow": {"rate": 3, "per": "90s", "scope": "fleet"}}}"#,
        ),
        (
            "/t/odd/wk",
            r#"{"limits": {"week": {"rate": 7, "per": "7d", "scope": "fleet"}}}"#,
        ),
    ]);
    // hits_addend 0 means 1.
    let r = f
        .call(request(
            vec![
                check("/t/odd/wk", "week"),
                check("/t/odd", "slow"),
                check("/t", "rpm"),
            ],
            0,
        ))
        .await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OK, vec![(OK, 6), (OK, 2), (OK, 9)])
    );
    let limits: Vec<(String, u32, i32)> = r
        .statuses
        .iter()
        .map(|s| {
            let l = s.current_limit.clone().unwrap();
            (l.name, l.requests_per_unit, l.unit)
        })
        .collect();
    // The bare limit name (Envoy quotes it in `x-ratelimit-limit`); 90 s is no unit.
    assert_eq!(
        limits,
        vec![
            ("week".into(), 7, 7),
            ("slow".into(), 3, 0),
            ("rpm".into(), 10, 2)
        ]
    );
    assert_eq!(
        (reset(&r, 0), reset(&r, 1), reset(&r, 2)),
        (
            Duration::from_secs(604_800),
            Duration::from_secs(90),
            Duration::from_secs(60)
        )
    );
    f.advance(Duration::from_millis(30_500));
    // A descriptor's own hits_addend overrides the request's.
    let r = f
        .call(request(
            vec![
                desc(&[("tenant", "/t/odd"), ("limit", "slow")], Some(1)),
                check("/t", "rpm"),
            ],
            4,
        ))
        .await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 1), (OK, 5)]));
    assert_eq!(
        (reset(&r, 0), reset(&r, 1)),
        (Duration::from_millis(59_500), Duration::from_millis(29_500))
    );
    // Refused: the status still says when the window resets, and nothing moves.
    let r = f
        .call(request(
            vec![check("/t/odd", "slow"), check("/t", "rpm")],
            2,
        ))
        .await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 1), (OK, 5)])
    );
    // The minute is over: `rpm` starts again, `slow` keeps its window.
    f.advance(Duration::from_secs(30));
    let r = f
        .call(request(
            vec![check("/t/odd", "slow"), check("/t", "rpm")],
            1,
        ))
        .await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 0), (OK, 9)]));
    assert_eq!(
        (reset(&r, 0), reset(&r, 1)),
        (Duration::from_millis(29_500), Duration::from_secs(60))
    );
}

#[tokio::test]
async fn reports_count_past_the_limit_and_checks_do_not() {
    let f = Fixture::tenants(&[
        ("/r", &fleet("rpm", "5", "1m")),
        ("/r/a", &fleet("rpm", "3", "")),
    ]);
    let r = f.call(request(vec![report("/r", "rpm")], 4)).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 1)]));
    let r = f.call(request(vec![report("/r", "rpm")], 4)).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    // A check is refused and not counted; a report still counts.
    let r = f.call(request(vec![check("/r", "rpm")], 1)).await;
    assert_eq!((r.overall_code, codes(&r)), (OVER, vec![(OVER, 0)]));
    // A call marked by metadata is a report for every descriptor.
    let mut marked =
        tonic::Request::new(request(vec![check("/r/a", "rpm"), check("/r", "rpm")], 4));
    marked
        .metadata_mut()
        .insert("x-tenantgate-report", "1".parse().unwrap());
    let r = f
        .service
        .should_rate_limit(marked)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 0), (OVER, 0)])
    );
    // Another value of the header is no report.
    let mut other = tonic::Request::new(request(vec![check("/r/a", "rpm")], 1));
    other
        .metadata_mut()
        .insert("x-tenantgate-report", "0".parse().unwrap());
    let r = f
        .service
        .should_rate_limit(other)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(codes(&r), vec![(OVER, 0)]);
    // One more report each (hits_addend 0 means 1): `/r` at 13, `/r/a` at 5.
    f.advance(Duration::from_secs(59));
    let r = f
        .call(request(vec![report("/r/a", "rpm"), report("/r", "rpm")], 0))
        .await;
    assert_eq!(codes(&r), vec![(OVER, 0), (OVER, 0)]);
    f.advance(Duration::from_secs(1));
    let r = f
        .call(request(vec![check("/r/a", "rpm"), check("/r", "rpm")], 3))
        .await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![(OK, 0), (OK, 2)]));
}

#[tokio::test]
async fn the_same_counter_twice_is_counted_once_with_the_hits_summed() {
    let f = Fixture::tenants(&[("/d", &fleet("rpm", "5", "1m"))]);
    let r = f
        .call(request(vec![check("/d", "rpm"), check("/d", "rpm")], 2))
        .await;
    assert_eq!(codes(&r), vec![(OK, 1), (OK, 1)]);
    let r = f
        .call(request(vec![check("/d", "rpm"), check("/d", "rpm")], 1))
        .await;
    assert_eq!(
        (r.overall_code, codes(&r)),
        (OVER, vec![(OVER, 1), (OVER, 1)])
    );
}

#[tokio::test]
async fn unknown_descriptors_are_ok_without_a_limit() {
    let f = Fixture::tenants(&[("/u", &fleet("rpm", "1", "1m"))]);
    let r = f
        .call(request(
            vec![
                check("/nobody", "rpm"),
                check("/u", "rps"),
                desc(&[("limit", "rpm"), ("tenant", "/u")], None),
                desc(
                    &[("tenant", "/u"), ("limit", "rpm"), ("key", "alice")],
                    None,
                ),
                desc(&[("generic_key", "x")], None),
                check("/u", "rpm"),
            ],
            1,
        ))
        .await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(codes(&r), vec![(OK, 0); 6]);
    for s in &r.statuses[..5] {
        assert_eq!(
            (s.current_limit.clone(), s.duration_until_reset),
            (None, None)
        );
    }
    assert!(r.statuses[5].current_limit.is_some());
    let mut negative = check("/u", "rpm");
    negative.is_negative_hits = true;
    let r = f.call(request(vec![negative], 1)).await;
    assert_eq!(
        (codes(&r), r.statuses[0].current_limit.clone()),
        (vec![(OK, 0)], None)
    );
    let r = f.call(request(vec![], 1)).await;
    assert_eq!((r.overall_code, r.statuses.len()), (OK, 0));
}

#[tokio::test]
async fn the_domain_is_the_bundles_unless_the_flag_overrides_it() {
    let edge = Some(r#"{"rate_limit_service": {"domain": "edge"}}"#);
    let tenants = [("/dom", fleet("rpm", "1", "1m"))];
    let tenants: Vec<(&str, &str)> = tenants.iter().map(|(t, j)| (*t, j.as_str())).collect();
    let in_domain = |d: &str| RateLimitRequest {
        domain: d.into(),
        ..request(vec![check("/dom", "rpm")], 1)
    };
    // No flag: the bundle's domain, followed across reloads.
    let f = Fixture::new(edge, &tenants, None);
    let r = f.call(in_domain("tenantgate")).await;
    assert_eq!(
        (codes(&r), r.statuses[0].current_limit.is_none()),
        (vec![(OK, 0)], true)
    );
    let r = f.call(in_domain("edge")).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.is_some()),
        (OK, true)
    );
    let r = f.call(in_domain("edge")).await;
    assert_eq!(r.overall_code, OVER);
    f.reload(None, &tenants);
    let r = f.call(in_domain("edge")).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.is_none()),
        (OK, true)
    );
    let r = f.call(in_domain("tenantgate")).await;
    assert_eq!(
        r.overall_code, OVER,
        "the same counter, now under `tenantgate`"
    );
    // The flag wins over the bundle, and a mismatch is worded for the log.
    let f = Fixture::new(edge, &tenants, Some("tenantgate"));
    let r = f.call(in_domain("tenantgate")).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.is_some()),
        (OK, true)
    );
    let r = f.call(in_domain("edge")).await;
    assert_eq!(r.statuses[0].current_limit, None);
    let limits = Limits::load(&f.tree.bundle_path()).unwrap();
    assert_eq!(limits.domain, "edge");
    assert_eq!(
        tenantgate_rls::domain_mismatch(Some("tenantgate"), &limits).as_deref(),
        Some(
            "warning: `--domain` `tenantgate` differs from the bundle's `rate_limit_service.domain` `edge`: \
             calls for `edge` (what the bundle's filters send) get OK with no limit"
        )
    );
    assert_eq!(tenantgate_rls::domain_mismatch(Some("edge"), &limits), None);
    assert_eq!(tenantgate_rls::domain_mismatch(None, &limits), None);
}
