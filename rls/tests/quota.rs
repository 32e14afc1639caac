//! The RLQS service (mode `assigned`) over the in-memory report store:
//! bucket matching, assignments from the allocator, TTLs, unknown buckets,
//! abandon after a reload, and a real gRPC stream. No Redis: these run in
//! plain `cargo test`. `rlqs_reports_live_in_redis` (in `rls.rs`) checks the
//! Redis store and the binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use envoy_types::pb::envoy::service::rate_limit_quota::v3::{
    RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tenantgate_rls::limits::Limits;
use tenantgate_rls::quota::{bucket_id, bucket_of, Client, MemoryReports, QuotaService};
use tokio::sync::watch;

const ASSIGNED: &str =
    r#"{"rate_limit_service": {"mode": "assigned", "domain": "tg", "report_interval_ms": 500}}"#;

/// `/` 300/s; `/a` rate 200, ceil 300, burst 60; `/b` rate 100, ceil 300, burst 30.
fn siblings() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "/",
            r#"{"limits": {"rps": {"rate": 300, "scope": "fleet"}}}"#,
        ),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": 200, "ceil": 300, "burst": 60, "scope": "fleet"}}}"#,
        ),
        (
            "/b",
            r#"{"limits": {"rps": {"rate": 100, "ceil": 300, "burst": 30, "scope": "fleet"}}}"#,
        ),
    ]
}

struct Fixture {
    service: Arc<QuotaService<MemoryReports>>,
    now: Arc<AtomicU64>,
    limits: watch::Sender<Arc<Limits>>,
    tree: Tree,
}

impl Fixture {
    fn new(tenants: &[(&str, &str)]) -> Fixture {
        let tree = Tree::new();
        tree.write_with_settings(Some(ASSIGNED), tenants);
        let limits = Limits::load(&tree.bundle_path()).unwrap();
        let (tx, rx) = watch::channel(Arc::new(limits));
        let now = Arc::new(AtomicU64::new(1_000_000));
        let clock = Arc::clone(&now);
        let service = QuotaService::new(
            rx,
            MemoryReports::default(),
            None,
            Arc::new(move || clock.load(Ordering::SeqCst)),
        );
        Fixture {
            service: Arc::new(service),
            now,
            limits: tx,
            tree,
        }
    }

    fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    async fn report(&self, c: &mut Client, usages: &[(&str, &str, u64, u64)]) -> Vec<Got> {
        let msg = reports("tg", usages, 500);
        let r = self.service.on_report(c, &msg).await.unwrap();
        got(&r)
    }
}

/// One usage per `(tenant, limit, allowed, denied)` over `elapsed_ms`.
fn reports(
    domain: &str,
    usages: &[(&str, &str, u64, u64)],
    elapsed_ms: i32,
) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: domain.into(),
        bucket_quota_usages: usages
            .iter()
            .map(|(t, l, a, d)| BucketQuotaUsage {
                bucket_id: Some(bucket_id(t, l)),
                time_elapsed: Some(PbDuration {
                    seconds: i64::from(elapsed_ms / 1000),
                    nanos: elapsed_ms % 1000 * 1_000_000,
                }),
                num_requests_allowed: *a,
                num_requests_denied: *d,
            })
            .collect(),
    }
}

/// An action as `(tenant, limit, what)`: `what` is `tokens_per_fill/max_tokens
/// per fill_interval ms, ttl ms`, `allow-all`, `deny-all` or `abandon`.
type Got = (String, String, String);

fn got(r: &RateLimitQuotaResponse) -> Vec<Got> {
    let mut out: Vec<Got> = r
        .bucket_action
        .iter()
        .map(|a| {
            let id = a.bucket_id.clone().unwrap();
            let (t, l) = bucket_of(&id)
                .map(|(t, l)| (t.to_owned(), l.to_owned()))
                .unwrap_or_else(|| (format!("{:?}", id.bucket), String::new()));
            let what = match a.bucket_action.unwrap() {
                Action::AbandonAction(_) => "abandon".to_owned(),
                Action::QuotaAssignmentAction(q) => {
                    let ttl = q.assignment_time_to_live.unwrap();
                    let ttl = ttl.seconds * 1000 + i64::from(ttl.nanos) / 1_000_000;
                    match q.rate_limit_strategy.unwrap().strategy.unwrap() {
                        Strategy::TokenBucket(b) => {
                            let f = b.fill_interval.unwrap();
                            format!(
                                "{}/{} per {} ms, ttl {ttl}",
                                b.tokens_per_fill.unwrap().value,
                                b.max_tokens,
                                f.seconds * 1000 + i64::from(f.nanos) / 1_000_000
                            )
                        }
                        Strategy::BlanketRule(r) if r == BlanketRule::AllowAll as i32 => {
                            format!("allow-all, ttl {ttl}")
                        }
                        Strategy::BlanketRule(_) => format!("deny-all, ttl {ttl}"),
                        Strategy::RequestsPerTimeUnit(_) => "per-time-unit".to_owned(),
                    }
                }
            };
            (t, l, what)
        })
        .collect();
    out.sort();
    out
}

fn g(t: &str, l: &str, what: &str) -> Got {
    (t.to_owned(), l.to_owned(), what.to_owned())
}

#[tokio::test]
async fn assignments_follow_the_fleet_demand() {
    let f = Fixture::new(&siblings());
    let (mut i1, mut i2, mut i3) = (Client::new("i1"), Client::new("i2"), Client::new("i3"));
    // Half-second reports: `/a` asks about 350/s spread 70/20/10 over three
    // clients, each charging `/a` and `/`.
    let _ = f
        .report(&mut i1, &[("/a", "rps", 100, 23), ("/", "rps", 130, 23)])
        .await;
    let _ = f
        .report(&mut i2, &[("/a", "rps", 35, 0), ("/", "rps", 35, 0)])
        .await;
    let _ = f
        .report(&mut i3, &[("/a", "rps", 17, 0), ("/", "rps", 17, 0)])
        .await;
    f.advance(500);
    // `/b` asks 60/s (under its rate 100): it gets its demand.
    let mut b = Client::new("i1b");
    let got_b = f
        .report(&mut b, &[("/b", "rps", 30, 0), ("/", "rps", 30, 0)])
        .await;
    assert_eq!(
        got_b,
        [
            g("/", "rps", "60/60 per 1000 ms, ttl 1500"),
            g("/b", "rps", "60/30 per 1000 ms, ttl 1500"),
        ]
    );
    let got1 = f
        .report(&mut i1, &[("/a", "rps", 100, 22), ("/", "rps", 100, 22)])
        .await;
    // `/a` gets its rate 200 and the 40 `/b` leaves: 240, shared max-min
    // among 244, 70 and 34 per second: 136, 70, 34.
    assert_eq!(
        got1,
        [
            g("/", "rps", "136/136 per 1000 ms, ttl 1500"),
            g("/a", "rps", "136/34 per 1000 ms, ttl 1500"),
        ]
    );
    let got3 = f
        .report(&mut i3, &[("/a", "rps", 17, 0), ("/", "rps", 17, 0)])
        .await;
    assert_eq!(
        got3,
        [
            g("/", "rps", "34/34 per 1000 ms, ttl 1500"),
            g("/a", "rps", "34/8 per 1000 ms, ttl 1500"),
        ]
    );
    // i2 and i3 go quiet: after the TTL (3 intervals) their reports are
    // dropped and i1 gets `/a`'s whole allotment (240 of 300: `/b` keeps 60).
    f.advance(1501);
    let _ = f
        .report(&mut b, &[("/b", "rps", 30, 0), ("/", "rps", 30, 0)])
        .await;
    let got1 = f
        .report(&mut i1, &[("/a", "rps", 150, 0), ("/", "rps", 150, 0)])
        .await;
    assert_eq!(
        got1,
        [
            g("/", "rps", "240/240 per 1000 ms, ttl 1500"),
            g("/a", "rps", "240/60 per 1000 ms, ttl 1500"),
        ]
    );
}

#[tokio::test]
async fn the_ttl_follows_the_latest_report_not_the_longest_gap() {
    let f = Fixture::new(&siblings());
    let mut c = Client::new("c");
    // The first report of a stream reopened after a 6 s outage covers it all.
    let after_gap = reports("tg", &[("/b", "rps", 30, 0)], 6_000);
    let r = f.service.on_report(&mut c, &after_gap).await.unwrap();
    assert_eq!(ttls(&got(&r)), [("/b", 18_000)]);
    // Back to half-second reports: so are the TTLs, or an assignment would
    // outlive a lost service by 18 s.
    f.advance(500);
    let got_next = f.report(&mut c, &[("/b", "rps", 30, 0)]).await;
    assert_eq!(ttls(&got_next), [("/b", 1_500)]);
}

/// Each answer's tenant and assignment TTL in milliseconds.
fn ttls(got: &[Got]) -> Vec<(&str, u64)> {
    got.iter()
        .map(|(t, _, what)| {
            let ttl = what.rsplit("ttl ").next().and_then(|n| n.parse().ok());
            (t.as_str(), ttl.unwrap_or(0))
        })
        .collect()
}

#[tokio::test]
async fn unknown_buckets_are_allowed_and_removed_ones_abandoned() {
    let f = Fixture::new(&siblings());
    let mut c = Client::new("c");
    let got = f
        .report(
            &mut c,
            &[
                ("/b", "rps", 0, 0),
                ("/nope", "rps", 5, 0),
                ("/a", "rpm", 1, 0),
            ],
        )
        .await;
    assert_eq!(
        got,
        [
            g("/a", "rpm", "allow-all, ttl 1500"),
            // Nobody asks: the 300 go as headroom by rate, 200 to `/a` and
            // 100 to `/b`, all of it to `/b`'s only client.
            g("/b", "rps", "100/30 per 1000 ms, ttl 1500"),
            g("/nope", "rps", "allow-all, ttl 1500"),
        ]
    );
    // Another domain: nothing of this bundle.
    let other = reports("other", &[("/b", "rps", 1, 0)], 500);
    let r = f.service.on_report(&mut c, &other).await.unwrap();
    assert_eq!(got_of(&r), [g("/b", "rps", "allow-all, ttl 1500")]);
    // A reload removes `/b`'s limit: the next answer abandons it, once.
    f.tree.write_with_settings(Some(ASSIGNED), &siblings()[..2]);
    f.limits
        .send(Arc::new(Limits::load(&f.tree.bundle_path()).unwrap()))
        .unwrap();
    // The client still reports it: abandoned (not allow-all as well).
    let got = f
        .report(&mut c, &[("/a", "rps", 10, 0), ("/b", "rps", 3, 0)])
        .await;
    assert_eq!(
        got,
        [
            g("/a", "rps", "300/60 per 1000 ms, ttl 1500"),
            g("/b", "rps", "abandon"),
        ]
    );
    // Once: a later report of it gets what any unknown bucket gets.
    let got = f
        .report(&mut c, &[("/a", "rps", 10, 0), ("/b", "rps", 3, 0)])
        .await;
    assert_eq!(
        got,
        [
            g("/a", "rps", "300/60 per 1000 ms, ttl 1500"),
            g("/b", "rps", "allow-all, ttl 1500"),
        ]
    );
}

fn got_of(r: &RateLimitQuotaResponse) -> Vec<Got> {
    got(r)
}

#[tokio::test]
async fn a_zero_assignment_is_deny_all() {
    // `/a` borrows up to its ceil, the whole 10; `/b` asks nothing
    // meanwhile, so its client gets 0: deny-all (a token bucket must hold a
    // token).
    let f = Fixture::new(&[
        (
            "/",
            r#"{"limits": {"rps": {"rate": 10, "scope": "fleet"}}}"#,
        ),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": 9, "ceil": 10, "scope": "fleet"}}}"#,
        ),
        (
            "/b",
            r#"{"limits": {"rps": {"rate": 1, "scope": "fleet"}}}"#,
        ),
    ]);
    let (mut x, mut y) = (Client::new("x"), Client::new("y"));
    let _ = f.report(&mut y, &[("/b", "rps", 0, 0)]).await;
    let got = f.report(&mut x, &[("/a", "rps", 500, 500)]).await;
    assert_eq!(got, [g("/a", "rps", "10/9 per 1000 ms, ttl 1500")]);
    let got = f.report(&mut y, &[("/b", "rps", 0, 0)]).await;
    assert_eq!(got, [g("/b", "rps", "deny-all, ttl 1500")]);
}

#[tokio::test]
async fn a_slow_client_gets_ttls_of_its_own_interval() {
    // Envoy's own RLQS filter reports every 5 s: its reports and assignments
    // live 3 of its intervals (15 s), not 3 of the bundle's 500 ms. `/a`
    // asks 200/s, its rate: it gets it and 66 of headroom (2:1 with `/b`).
    let f = Fixture::new(&siblings());
    let mut slow = Client::new("slow");
    let msg = RateLimitQuotaUsageReports {
        domain: "tg".into(),
        bucket_quota_usages: vec![BucketQuotaUsage {
            bucket_id: Some(bucket_id("/a", "rps")),
            time_elapsed: Some(PbDuration {
                seconds: 5,
                nanos: 0,
            }),
            num_requests_allowed: 500,
            num_requests_denied: 500,
        }],
    };
    let r = f.service.on_report(&mut slow, &msg).await.unwrap();
    assert_eq!(got(&r), [g("/a", "rps", "266/60 per 1000 ms, ttl 15000")]);
    // 10 s later a fast client still shares with it: `/a` asks 200/s from
    // the slow one, 10/s from the fast one: `/a` gets 210 and 60 of headroom
    // (2:1 with `/b`), its clients their demands and 30 each.
    f.advance(10_000);
    let mut fast = Client::new("fast");
    let got_fast = f.report(&mut fast, &[("/a", "rps", 5, 0)]).await;
    assert_eq!(got_fast, [g("/a", "rps", "40/8 per 1000 ms, ttl 1500")]);
}

#[test]
fn ceil_on_a_fleet_limit_needs_mode_assigned() {
    let tree = Tree::new();
    let tenants = [(
        "/",
        r#"{"limits": {"rps": {"rate": 10, "ceil": 20, "scope": "fleet"}}}"#,
    )];
    tree.write_with_settings(Some(ASSIGNED), &tenants);
    let l = Limits::load(&tree.bundle_path()).unwrap();
    assert_eq!(
        l.fleet.get("/", "rps").map(|x| (x.rate, x.ceil)),
        Some((10, 20))
    );
    assert_eq!(l.report_interval_ms, 500);
    let batched = r#"{"rate_limit_service": {"mode": "batched"}}"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
    std::fs::write(dir.path().join("tenantgate.json"), batched).unwrap();
    std::fs::write(dir.path().join("tenants/tenant.json"), tenants[0].1).unwrap();
    let err = tenantgate_engine::Bundle::from_dir(dir.path())
        .map_err(|d| d.to_string())
        .and_then(|b| {
            tenantgate_engine::Engine::new(&b)
                .map(|_| ())
                .map_err(|d| d.to_string())
        })
        .unwrap_err();
    assert!(
        err.contains("tenants/tenant.json:1:33: error: limit `rps`: `ceil` is a local notion and cannot be set on a fleet limit"),
        "{err}"
    );
}

/// One exchange of the filter's client on the stream at `now` (its clock):
/// its report, encoded by hand, read by the service; the service's answer,
/// encoded by prost, applied by the client. Returns how many actions came.
async fn exchange(
    f: &Fixture,
    fleet: &tenantgate_engine::fleet::FleetLimits,
    filter: &mut tenantgate_engine::fleet::assigned::Client,
    c: &mut Client,
    now: u64,
) -> usize {
    use prost::Message;
    use tenantgate_engine::fleet::rlqs_wire;
    let usage = filter.take_report(now);
    let wire: Vec<rlqs_wire::WireUsage<'_>> = usage
        .iter()
        .map(|u| {
            let l = &fleet.all()[u.limit];
            rlqs_wire::WireUsage {
                tenant: l.tenant.as_str(),
                limit: &l.name,
                allowed: u.allowed,
                denied: u.denied,
                elapsed_ns: u.elapsed_ns,
            }
        })
        .collect();
    let msg = RateLimitQuotaUsageReports::decode(rlqs_wire::encode_reports("tg", &wire).as_slice())
        .unwrap();
    let answer = f.service.on_report(c, &msg).await.unwrap();
    let actions = rlqs_wire::decode_response(&answer.encode_to_vec()).unwrap();
    for action in &actions {
        let (t, l) = action.tenant_limit().unwrap();
        filter.apply(fleet.index_of(t, l).unwrap(), &action.action, now);
    }
    actions.len()
}

/// The filter's client (`tenantgate_engine::fleet::assigned`) against the
/// service: the assignments it gets, and enforces.
#[tokio::test]
async fn the_filters_client_gets_and_enforces_assignments() {
    use tenantgate_engine::fleet::assigned::{Admission, Client as Filter, Fallback, Holding};
    use tenantgate_engine::TenantPath;

    const S: u64 = 1_000_000_000;
    let f = Fixture::new(&siblings());
    let limits = Limits::load(&f.tree.bundle_path()).unwrap();
    let fleet = &limits.fleet;
    let chain: Vec<usize> = fleet
        .indices_for(&TenantPath::parse("/a").unwrap())
        .collect();
    let (a, root) = (chain[0], chain[1]);
    let mut filter = Filter::new(fleet.all(), S / 2, Fallback::Allow);
    let mut c = f.service.new_client();
    // A first request; the first report asks for a starting share.
    assert_eq!(filter.admit(&chain, 1, 0), Admission::Admitted);
    assert_eq!(exchange(&f, fleet, &mut filter, &mut c, 0).await, 2);
    assert!(matches!(filter.holding(a, 0), Some(Holding::Bucket { .. })));
    // 349 more within the second: `/a` asks 349/s, more than its ceil and
    // the root's 300: it gets the whole 300, burst 60 (the worked example
    // of docs/fleet.md without `/b`).
    for _ in 0..349 {
        filter.admit(&chain, 1, S / 2);
    }
    f.advance(1000);
    assert_eq!(exchange(&f, fleet, &mut filter, &mut c, S).await, 2);
    assert_eq!(
        filter.holding(a, 2 * S),
        Some(Holding::Bucket {
            rate: 300.0,
            max: 60.0,
            tokens: 60.0
        })
    );
    assert!(matches!(
        filter.holding(root, 2 * S),
        Some(Holding::Bucket { rate, max, .. }) if rate == 300.0 && max == 300.0
    ));
    // Enforced: the 60 tokens of `/a`, then refused there.
    for _ in 0..60 {
        assert_eq!(filter.admit(&chain, 1, 2 * S), Admission::Admitted);
    }
    assert!(matches!(
        filter.admit(&chain, 1, 2 * S),
        Admission::Refused { limit, remaining: 0, .. } if limit == a
    ));
    // The assignments live 3 of the client's intervals from their receipt:
    // its longest `time_elapsed` (1 s here) beats the bundle's 500 ms.
    assert!(matches!(
        filter.holding(a, 4 * S - 1),
        Some(Holding::Bucket { .. })
    ));
    assert_eq!(filter.holding(a, 4 * S), Some(Holding::Fallback));
}
