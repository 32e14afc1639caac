//! Worker leases under W workers sharing one store with Envoy's shared-data
//! semantics (the in-memory store): random admissions, lease refills and
//! expiries, ticks, reloads and a clock that may step back. Properties:
//! - conservation: with the clock still, once every lease is returned each
//!   bucket's `ctokens` went down by exactly what was admitted through it
//!   (charged − returned = admitted, in exact units), and nothing else moved;
//! - no over-admission: the root admits at most `rate × T + burst`;
//! - under-admission is bounded: at every step the tokens held in leases for
//!   one plan are at most `W × B` (B the plan's lease cap), and limits with a
//!   small burst are never leased (exact);
//! - leases and exact admission agree on small limits request by request.

use proptest::prelude::*;

use super::tests::{model, store_for, t, S, T0};
use super::*;

/// `/` 1000/s (burst 1000), `/a` 600/s ceil 1000, `/b` 400/s ceil 1000, and
/// `/c` with a small limit of its own (5/s, never leased).
fn tree() -> QuotaModel {
    model(&[
        ("/", r#"{"limits": {"rps": {"rate": 1000, "burst": 1000}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 600, "ceil": 1000}}}"#),
        ("/b", r#"{"limits": {"rps": {"rate": 400, "ceil": 1000}}}"#),
        ("/c", r#"{"limits": {"small": {"rate": 5, "burst": 5}}}"#),
    ])
}

const TENANTS: [&str; 4] = ["/a", "/b", "/c", "/a/x"];

#[derive(Debug, Clone)]
enum Op {
    Request {
        worker: usize,
        tenant: usize,
        cost: u64,
    },
    Tick {
        worker: usize,
    },
    Reload {
        worker: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..4, 0usize..4, 1u64..=2).prop_map(|(worker, tenant, cost)| Op::Request { worker, tenant, cost }),
        1 => (0usize..4).prop_map(|worker| Op::Tick { worker }),
        1 => (0usize..4).prop_map(|worker| Op::Reload { worker }),
    ]
}

/// `ctokens` of every bucket, by key, in units.
fn ctokens(m: &QuotaModel, s: &MemoryStore) -> BTreeMap<String, i128> {
    m.limits
        .iter()
        .map(|l| {
            let (bytes, _) = s.get(&l.key).unwrap().unwrap();
            (l.key.clone(), Bucket::decode(&bytes).unwrap().0.ctokens)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn tokens_are_conserved_with_the_clock_still(
        workers in 1usize..=4,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let m = tree();
        let s = store_for(&m);
        let before = ctokens(&m, &s);
        let mut leases: Vec<Leases> = (0..workers).map(|_| Leases::default()).collect();
        // Admitted tokens per bucket key.
        let mut admitted: BTreeMap<String, i128> = BTreeMap::new();
        for op in &ops {
            match *op {
                Op::Request { worker, tenant, cost } => {
                    let w = worker % workers;
                    let tenant = t(TENANTS[tenant]);
                    let d = m.admit_leased(&leases[w], &tenant, cost, T0, &s).unwrap();
                    if d.admitted {
                        for l in m.plan_for(&tenant).unwrap().nodes.iter() {
                            *admitted.entry(l.key.clone()).or_default() +=
                                i128::from(cost) * i128::from(l.params.per_ns);
                        }
                    }
                }
                Op::Tick { worker } => {
                    leases[worker % workers].return_expired(&m, T0, &s).unwrap();
                }
                Op::Reload { worker } => {
                    let w = worker % workers;
                    leases[w].return_all(&m, &s).unwrap();
                    leases[w] = Leases::default();
                }
            }
            // Bounded: at most W x B tokens leased per plan, none for small limits.
            for tenant in ["/a", "/b", "/c"] {
                let cap = m.plans.get(tenant).unwrap().lease_cap;
                let held: u64 = leases
                    .iter()
                    .flat_map(|l| l.outstanding())
                    .filter(|(k, _)| k == tenant)
                    .map(|(_, n)| n)
                    .sum();
                prop_assert!(held <= workers as u64 * cap, "{tenant}: {held} leased, cap {cap}");
                if tenant == "/c" {
                    prop_assert_eq!(cap, 0);
                }
            }
        }
        for l in &leases {
            l.return_all(&m, &s).unwrap();
        }
        let after = ctokens(&m, &s);
        for (key, b) in &before {
            let used = b - after[key];
            prop_assert_eq!(used, admitted.get(key).copied().unwrap_or(0), "bucket {}", key);
        }
    }

    #[test]
    fn no_over_admission_with_a_moving_clock(
        workers in 1usize..=4,
        ops in prop::collection::vec((op(), -2_000i64..5_000), 1..400),
    ) {
        let m = tree();
        let s = store_for(&m);
        let leases: Vec<Leases> = (0..workers).map(|_| Leases::default()).collect();
        let mut now = T0;
        let mut latest = T0;
        let mut root_admitted = 0u64;
        for (op, dt_us) in &ops {
            // A clock that may step back (another worker's clock lags).
            now = now.saturating_add_signed(dt_us * 1_000).max(T0);
            latest = latest.max(now);
            match *op {
                Op::Request { worker, tenant, cost } => {
                    let tenant = t(TENANTS[tenant]);
                    let d = m.admit_leased(&leases[worker % workers], &tenant, cost, now, &s).unwrap();
                    if d.admitted && tenant.as_str() != "/c" {
                        root_admitted += cost;
                    }
                }
                Op::Tick { worker } => {
                    leases[worker % workers].return_expired(&m, now, &s).unwrap();
                }
                Op::Reload { worker } => {
                    leases[worker % workers].return_all(&m, &s).unwrap();
                }
            }
        }
        // The root: 1000 per second and a burst of 1000, whatever the leases.
        let elapsed_ns = latest - T0;
        let bound = 1000 + (elapsed_ns as u128 * 1000).div_ceil(S as u128) as u64;
        prop_assert!(root_admitted <= bound, "{root_admitted} admitted, bound {bound}");
    }

    #[test]
    fn small_limits_decide_exactly_as_without_leases(
        ops in prop::collection::vec((1u64..=2, 0u64..300), 1..200),
    ) {
        let m = tree();
        let leased = store_for(&m);
        let exact = store_for(&m);
        let leases = Leases::default();
        let mut now = T0;
        for (cost, dt_ms) in ops {
            now += dt_ms * 1_000_000;
            let a = m.admit_leased(&leases, &t("/c"), cost, now, &leased).unwrap();
            let b = m.admit(&t("/c"), cost, now, &exact).unwrap();
            prop_assert_eq!(a.admitted, b.admitted);
        }
    }
}

#[test]
fn a_lease_serves_requests_without_touching_shared_data() {
    let m = tree();
    let s = store_for(&m);
    let leases = Leases::default();
    // The batch grows while leases are used up before they expire.
    let mut sets = Vec::new();
    for _ in 0..200 {
        let before = s.snapshot();
        assert!(
            m.admit_leased(&leases, &t("/a"), 1, T0, &s)
                .unwrap()
                .admitted
        );
        sets.push(before != s.snapshot());
    }
    let writes = sets.iter().filter(|w| **w).count();
    // Cap for /a: min(600, 1000) / 64 = 9 tokens beyond the request.
    assert_eq!(m.plans.get("/a").unwrap().lease_cap, 9);
    assert!(
        writes <= 200 / 9 + 5,
        "{writes} of 200 requests wrote shared data"
    );
    assert_eq!(leases.refills(), writes as u64);
    // Expired: a tick gives the rest back.
    let held: u64 = leases.outstanding().iter().map(|(_, n)| n).sum();
    assert_eq!(
        leases.return_expired(&m, T0 + LEASE_TTL_NS, &s).unwrap(),
        held
    );
    assert!(leases.outstanding().is_empty());
}

#[test]
fn a_refusal_is_remembered_until_it_could_pass() {
    let m = tree();
    let s = store_for(&m);
    let leases = Leases::default();
    for _ in 0..5 {
        assert!(
            m.admit_leased(&leases, &t("/c"), 1, T0, &s)
                .unwrap()
                .admitted
        );
    }
    let d = m.admit_leased(&leases, &t("/c"), 1, T0, &s).unwrap();
    assert!(!d.admitted);
    assert_eq!(d.admissible_at, Some(T0 + S / 5));
    // Still refused just before, without reading the store (a store that
    // fails would make a read an error).
    struct Failing;
    impl BucketStore for Failing {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Err(StoreError::Unavailable("read".into()))
        }
        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("write".into()))
        }
    }
    let d = m
        .admit_leased(&leases, &t("/c"), 1, T0 + S / 5 - 1, &Failing)
        .unwrap();
    assert!(!d.admitted);
    assert_eq!(d.retry_after_s, 1);
    // At that moment it passes.
    assert!(
        m.admit_leased(&leases, &t("/c"), 1, T0 + S / 5, &s)
            .unwrap()
            .admitted
    );
}

/// Fair borrowing holds through leases: two workers take turns serving two
/// siblings of equal rate that ask 1500 and 1100 a second of a parent whose
/// spare is 1000 a second; each gets its rate plus half the spare, within
/// 10% (the batches are at most 7 tokens here).
#[test]
fn leased_siblings_share_the_spare_by_rate() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 2000, "burst": 600}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 500, "ceil": 2000}}}"#),
        ("/b", r#"{"limits": {"rps": {"rate": 500, "ceil": 2000}}}"#),
    ]);
    assert_eq!(m.plan_for(&t("/a")).unwrap().lease_cap, 7);
    let s = store_for(&m);
    let leases = [Leases::default(), Leases::default()];
    let (from, to) = (3 * S, 11 * S);
    let mut events: Vec<(Nanos, usize)> = Vec::new();
    for (i, rps) in [1500u64, 1100].into_iter().enumerate() {
        events.extend((0..11 * rps).map(|k| (k * S / rps, i)));
    }
    events.sort_unstable();
    let tenants = [t("/a"), t("/b")];
    let mut admitted = [0u64; 2];
    for (k, (at, i)) in events.into_iter().enumerate() {
        let now = T0 + at;
        let worker = &leases[k % 2];
        if k % 50 == 0 {
            worker.return_expired(&m, now, &s).unwrap();
        }
        let d = m.admit_leased(worker, &tenants[i], 1, now, &s).unwrap();
        if d.admitted && (from..to).contains(&at) {
            admitted[i] += 1;
        }
    }
    let span = (to - from) / S;
    for a in admitted {
        let excess = a as f64 - (500 * span) as f64;
        assert!(
            (excess - (500 * span) as f64).abs() <= 0.1 * (500 * span) as f64,
            "admitted {admitted:?} over {span} s; fair: {} each",
            1000 * span
        );
    }
}
