//! Unit tests of the quota model: validation with locations, admission,
//! borrowing, multi-window limits, costs, time, the store protocol.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::diag::Diagnostics;

pub(super) const S: u64 = 1_000_000_000;
/// An arbitrary start of time for the tests.
pub(super) const T0: Nanos = 1_700_000_000 * S;

pub(super) fn t(p: &str) -> TenantPath {
    TenantPath::parse(p).unwrap()
}

fn file_of(path: &str) -> String {
    if path == "/" {
        "tenants/tenant.json".into()
    } else {
        format!("tenants{path}/tenant.json")
    }
}

/// Builds a model from `(tenant, tenant.json text)` pairs.
pub(super) fn build(tree: &[(&str, &str)]) -> Result<QuotaModel, Vec<Diagnostic>> {
    let owned: Vec<(
        TenantPath,
        String,
        String,
        BTreeMap<String, serde_json::Value>,
    )> = tree
        .iter()
        .map(|(p, text)| {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let limits = serde_json::from_value(v["limits"].clone()).unwrap_or_default();
            (t(p), file_of(p), text.to_string(), limits)
        })
        .collect();
    let inputs: Vec<LimitsInput<'_>> = owned
        .iter()
        .map(|(tenant, file, text, limits)| LimitsInput {
            tenant,
            file,
            text,
            limits,
        })
        .collect();
    QuotaModel::build(&inputs)
}

pub(super) fn model(tree: &[(&str, &str)]) -> QuotaModel {
    build(tree).unwrap_or_else(|e| panic!("{}", Diagnostics(e)))
}

/// The model's store, pre-created as the filter does at configure time.
pub(super) fn store_for(m: &QuotaModel) -> MemoryStore {
    let s = MemoryStore::new();
    m.create_buckets(&s, T0).unwrap();
    s
}

/// Admits `n` requests of `cost` at `now`, returns how many were admitted.
fn burst(m: &QuotaModel, s: &MemoryStore, tenant: &str, n: usize, cost: u64, now: Nanos) -> usize {
    (0..n)
        .filter(|_| m.admit(&t(tenant), cost, now, s).unwrap().admitted)
        .count()
}

/// One validation case: the tree, and the expected `file:line:col: error: ...`
/// prefix of the single error.
fn check_error(tree: &[(&str, &str)], want: &str) {
    let errors = build(tree)
        .err()
        .unwrap_or_else(|| panic!("expected an error like {want:?}"));
    let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), 1, "expected one error, got {got:#?}");
    assert!(
        got[0].starts_with(want),
        "\n got: {}\nwant: {want}...",
        got[0]
    );
}

#[test]
fn validation_errors_are_located() {
    let one = |limit: &str| format!("{{\n  \"limits\": {{\n    \"rps\": {limit}\n  }}\n}}");
    let root = one(r#"{ "rate": 100, "per": "1s", "ceil": 150 }"#);
    for (limit, want) in [
        (r#"{ "rate": 0 }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be at least 1, got `0`"),
        (r#"{ "rate": -5 }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be positive, got `-5`"),
        (r#"{ "rate": 1.5 }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be a whole number of tokens or a share"),
        (r#"{ "rate": "ten" }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be a whole number of tokens or a share like `\"40%\"`, got `\"ten\"`"),
        (r#"{ "rate": 10000000000000 }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be at most 1000000000000, got `10000000000000`"),
        (r#"{ "rate": 1e30 }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` must be at most 1000000000000"),
        (r#"{ "rate": 1, "per": "10x" }"#, "tenants/tenant.json:3:25: error: limit `rps`: `per` `\"10x\"` does not parse"),
        (r#"{ "rate": 1, "per": "0s" }"#, "tenants/tenant.json:3:25: error: limit `rps`: `per` `\"0s\"` must be at least one second"),
        (r#"{ "rate": 1, "per": "400d" }"#, "tenants/tenant.json:3:25: error: limit `rps`: `per` `\"400d\"` is longer than the maximum `\"365d\"`"),
        (r#"{ "rate": 1, "burst": 0 }"#, "tenants/tenant.json:3:25: error: limit `rps`: `burst` must be at least 1, got `0`"),
        (r#"{ "rate": 1, "burst": "50%" }"#, "tenants/tenant.json:3:25: error: limit `rps`: `burst` must be a whole number of tokens, got `\"50%\"`"),
        (r#"{ "rate": 10, "ceil": 5 }"#, "tenants/tenant.json:3:26: error: limit `rps`: `rate` 10 is larger than `ceil` 5"),
        (r#"{ "rate": 1, "rte": 2 }"#, "tenants/tenant.json:3:25: error: limit `rps`: unknown key `rte` (expected `rate`, `ceil`, `burst`, `per`, `scope`, `key`, `missing` or `max_keys`)"),
        (r#"{ "per": "1s" }"#, "tenants/tenant.json:3:5: error: limit `rps`: `rate` is required"),
        (r#"5"#, "tenants/tenant.json:3:5: error: limit `rps` must be an object"),
        (r#"{ "rate": "40%" }"#, "tenants/tenant.json:3:14: error: limit `rps`: `rate` is a share (`\"40%\"`) but no ancestor of `/` defines limit `rps`"),
    ] {
        check_error(&[("/", &one(limit))], want);
    }
    for (limit, want) in [
        (r#"{ "rate": "150%" }"#, "tenants/acme/tenant.json:3:14: error: limit `rps`: `rate` share `\"150%\"` is over 100%"),
        (r#"{ "rate": "0.5%" }"#, "tenants/acme/tenant.json:3:14: error: limit `rps`: `rate` `\"0.5%\"` of the rate 100 of `/` is less than one token"),
        (r#"{ "rate": 10, "ceil": 200 }"#, "tenants/acme/tenant.json:3:26: error: limit `rps`: `ceil` 200 is larger than the ceil 150 of `/`"),
        (r#"{ "rate": "10%", "ceil": "200%" }"#, "tenants/acme/tenant.json:3:29: error: limit `rps`: `ceil` share `\"200%\"` is over 100%"),
        (r#"{ "rate": 10, "per": "1m" }"#, "tenants/acme/tenant.json:3:26: error: limit `rps`: `per` `1m` differs from the window `1s` of `/`"),
    ] {
        check_error(&[("/", &root), ("/acme", &one(limit))], want);
    }
    // Children's rates over the parent's: reported at the parent's rate.
    check_error(
        &[("/", &root), ("/a", &one(r#"{ "rate": "60%" }"#)), ("/b", &one(r#"{ "rate": 50 }"#))],
        "tenants/tenant.json:3:14: error: limit `rps`: the rates of the children add up to 110 (`/a` 60, `/b` 50), more than this tenant's rate 100",
    );
    // A name that is not a valid token.
    check_error(
        &[("/", "{\"limits\": {\"Req/s\": {\"rate\": 1}}}")],
        "tenants/tenant.json:1:13: error: limit name `Req/s` is not valid",
    );
}

#[test]
fn every_error_is_reported_and_broken_parents_do_not_cascade() {
    let errors = build(&[
        (
            "/",
            r#"{"limits": {"rps": {"rate": 0}, "daily": {"rate": 5, "per": "1x"}}}"#,
        ),
        ("/a", r#"{"limits": {"rps": {"rate": "50%"}}}"#),
        ("/a/b", r#"{"limits": {"rps": {"rate": "50%"}}}"#),
    ])
    .unwrap_err();
    let got: Vec<String> = errors.iter().map(|d| d.message.clone()).collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(got.iter().any(|m| m.contains("`rate` must be at least 1")));
    assert!(got
        .iter()
        .any(|m| m.contains("`per` `\"1x\"` does not parse")));
}

#[test]
fn shares_resolve_against_the_nearest_ancestor_and_inherit_the_window() {
    let m = model(&[
        (
            "/",
            r#"{"limits": {"rpm": {"rate": 1000, "per": "1m", "ceil": 1200, "burst": 50}}}"#,
        ),
        // `/acme` declares nothing: `/acme/eu` takes its share from `/`.
        (
            "/acme/eu",
            r#"{"limits": {"rpm": {"rate": "25%", "ceil": "50%"}}}"#,
        ),
        ("/acme/eu/a", r#"{"limits": {"rpm": {"rate": "12.5%"}}}"#),
    ]);
    let got: Vec<(String, u64, u64, u64, u64)> = m
        .limits()
        .into_iter()
        .map(|l| (l.tenant.to_string(), l.rate, l.ceil, l.burst, l.per_s))
        .collect();
    assert_eq!(
        got,
        [
            ("/".into(), 1000, 1200, 50, 60),
            ("/acme/eu".into(), 250, 500, 250, 60),
            ("/acme/eu/a".into(), 31, 31, 31, 60)
        ]
    );
    assert_eq!(
        policy(&m, &t("/acme/eu/a/x")).as_deref(),
        Some("\"rpm\";q=31;w=60")
    );
    assert_eq!(
        policy(&m, &t("/acme")).as_deref(),
        Some("\"rpm\";q=1000;w=60")
    );
}

#[test]
fn no_limits_admit_everything() {
    let m = QuotaModel::default();
    assert!(m.is_empty());
    let s = MemoryStore::new();
    assert_eq!(
        m.admit(&t("/acme"), 5, T0, &s).unwrap(),
        QuotaDecision::unlimited()
    );
    assert!(s.is_empty());
    assert_eq!(policy(&m, &t("/acme")), None);
    // A sibling branch of a limited tenant has no limits either.
    let m = model(&[("/acme", r#"{"limits": {"rps": {"rate": 1}}}"#)]);
    assert_eq!(
        m.admit(&t("/globex"), 5, T0, &s).unwrap(),
        QuotaDecision::unlimited()
    );
    assert_eq!(policy(&m, &t("/")), None);
}

#[test]
fn admits_up_to_the_burst_then_refuses_with_retry_after() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 10, "burst": 20}}}"#)]);
    let s = store_for(&m);
    assert_eq!(burst(&m, &s, "/acme", 20, 1, T0), 20);
    let d = m.admit(&t("/acme"), 1, T0, &s).unwrap();
    assert_eq!(
        d,
        QuotaDecision {
            admitted: false,
            limit: Some("rps".into()),
            tenant: Some(t("/")),
            remaining: 0,
            retry_after_s: 1,
            admissible_at: Some(T0 + S / 10),
            cost: 1,
            limits: vec![LimitStatus {
                name: "rps".into(),
                rate: 10,
                burst: 20,
                window_s: 1,
                remaining: 0,
                reset_s: 1,
                borrowed: false,
            }],
        }
    );
    assert_eq!(d.ratelimit_policy().as_deref(), Some("\"rps\";q=10;w=1"));
    assert_eq!(d.ratelimit().as_deref(), Some("\"rps\";r=0;t=1"));
    // 10 per second: one more token every 100 ms, exactly.
    assert_eq!(burst(&m, &s, "/acme", 5, 1, T0 + S / 10 - 1), 0);
    assert_eq!(burst(&m, &s, "/acme", 5, 1, T0 + S / 10), 1);
    assert_eq!(
        burst(&m, &s, "/acme", 20, 1, T0 + S / 10 + 3 * S),
        20,
        "refills up to the burst"
    );
    let d = m.admit(&t("/acme"), 1, T0 + 4 * S, &s).unwrap();
    assert!(d.admitted);
    assert_eq!(
        (d.remaining, d.ratelimit().as_deref()),
        (8, Some("\"rps\";r=8;t=1")),
        "t: two more tokens take 200 ms"
    );
}

#[test]
fn multi_window_limits_apply_together() {
    // 10 per second and 25 per hour at once.
    let m = model(&[(
        "/",
        r#"{"limits": {"rps": {"rate": 10}, "hourly": {"rate": 25, "per": "1h"}}}"#,
    )]);
    assert_eq!(
        policy(&m, &t("/a")).as_deref(),
        Some("\"hourly\";q=25;w=3600, \"rps\";q=10;w=1")
    );
    let s = store_for(&m);
    assert_eq!(
        burst(&m, &s, "/a", 20, 1, T0),
        10,
        "the per-second limit holds first"
    );
    assert_eq!(burst(&m, &s, "/a", 20, 1, T0 + S), 10);
    assert_eq!(
        burst(&m, &s, "/a", 20, 1, T0 + 2 * S),
        5,
        "then the hourly one"
    );
    let d = m.admit(&t("/a"), 1, T0 + 2 * S, &s).unwrap();
    assert!(!d.admitted);
    assert_eq!(d.limit.as_deref(), Some("hourly"));
    // One hourly token every 144 s; 2 s already passed since the start.
    assert_eq!(d.retry_after_s, 142);
    assert_eq!(
        d.ratelimit().as_deref(),
        Some("\"hourly\";r=0;t=3598, \"rps\";r=5;t=1"),
        "t: until the whole quota is back (Retry-After says when one request passes)"
    );
    // Hours later the per-second limit is the binding one again.
    assert_eq!(burst(&m, &s, "/a", 20, 1, T0 + 3_600 * S), 10);
}

#[test]
fn refused_by_one_window_charges_no_other() {
    let m = model(&[(
        "/",
        r#"{"limits": {"rps": {"rate": 10}, "hourly": {"rate": 5, "per": "1h"}}}"#,
    )]);
    let s = store_for(&m);
    assert_eq!(burst(&m, &s, "/a", 5, 1, T0), 5);
    let before = s.snapshot();
    assert!(!m.admit(&t("/a"), 1, T0, &s).unwrap().admitted);
    assert_eq!(
        s.snapshot(),
        before,
        "the per-second bucket was not charged"
    );
}

#[test]
fn costs_are_charged_and_zero_is_free() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 10}}}"#)]);
    let s = store_for(&m);
    assert_eq!(burst(&m, &s, "/x", 3, 4, T0), 2, "4 + 4, then 2 left");
    let d = m.admit(&t("/x"), 4, T0, &s).unwrap();
    assert_eq!((d.admitted, d.remaining, d.retry_after_s), (false, 2, 1));
    assert!(m.admit(&t("/x"), 2, T0, &s).unwrap().admitted);
    let before = s.snapshot();
    let d = m.admit(&t("/x"), 0, T0, &s).unwrap();
    assert!(d.admitted);
    assert_eq!(s.snapshot(), before, "cost 0 writes nothing");
    // A cost larger than the bucket can never pass: retry after one window.
    let d = m.admit(&t("/x"), 11, T0 + 60 * S, &s).unwrap();
    assert_eq!((d.admitted, d.retry_after_s), (false, 1));
}

#[test]
fn children_borrow_up_to_their_ceil_and_keep_their_guarantee() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": "40%", "ceil": "80%"}}}"#,
        ),
        ("/b", r#"{"limits": {"rps": {"rate": 6, "ceil": 10}}}"#),
    ]);
    let s = store_for(&m);
    // /a: 4 of its own, 4 borrowed from `/`, then its ceil (burst 4 * 8 / 4 = 8).
    assert_eq!(burst(&m, &s, "/a", 20, 1, T0), 8);
    let d = m.admit(&t("/a"), 1, T0, &s).unwrap();
    assert_eq!(
        (d.limit.as_deref(), d.tenant.clone()),
        (Some("rps"), Some(t("/a")))
    );
    // `/` has 2 tokens left, yet /b gets its own 6: its guarantee.
    assert_eq!(burst(&m, &s, "/b", 20, 1, T0), 6);
    // `/` is now in debt, so /b cannot borrow: refused at the top.
    let d = m.admit(&t("/b"), 1, T0, &s).unwrap();
    assert_eq!(d.tenant, Some(t("/")));
}

#[test]
fn borrowing_runs_up_no_debt_against_the_borrower_s_own_rate() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 4, "ceil": 10}}}"#),
        ("/b", r#"{"limits": {"rps": {"rate": 6, "ceil": 10}}}"#),
    ]);
    let s = store_for(&m);
    // Second 0: /b idle, /a takes everything (4 own, 6 borrowed).
    assert_eq!(burst(&m, &s, "/a", 20, 1, T0), 10);
    // Second 1: /b takes its 6 and borrows the 4 spare; /a still has its
    // own 4. (Charging the borrower's rate bucket too would leave /a 6 tokens
    // in debt here, refused although it is back at its rate.)
    assert_eq!(burst(&m, &s, "/b", 20, 1, T0 + S), 10);
    assert_eq!(burst(&m, &s, "/a", 20, 1, T0 + S), 4);
}

#[test]
fn tenants_without_limits_use_their_nearest_limited_ancestor() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 100}}}"#),
        (
            "/acme",
            r#"{"limits": {"rps": {"rate": 5}, "daily": {"rate": 1000, "per": "1d"}}}"#,
        ),
    ]);
    let s = store_for(&m);
    assert_eq!(burst(&m, &s, "/acme/eu/team-a", 10, 1, T0), 5);
    assert_eq!(
        burst(&m, &s, "/acme", 10, 1, T0),
        0,
        "shares /acme's bucket"
    );
    assert_eq!(burst(&m, &s, "/globex", 200, 1, T0), 95, "the rest of `/`");
}

#[test]
fn a_clock_going_backwards_mints_nothing() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 10}}}"#)]);
    let s = store_for(&m);
    let later = T0 + 10 * S;
    assert_eq!(burst(&m, &s, "/", 20, 1, later), 10);
    assert_eq!(
        burst(&m, &s, "/", 20, 1, T0),
        0,
        "earlier time: no refill, no panic"
    );
    assert_eq!(burst(&m, &s, "/", 20, 1, 0), 0);
    let d = m.admit(&t("/"), 1, T0, &s).unwrap();
    assert_eq!(
        d.retry_after_s, 11,
        "waiting for the clock to catch up counts"
    );
    // Forward again: only time after the latest `last` refills.
    assert_eq!(burst(&m, &s, "/", 20, 1, later + S / 10), 1);
}

#[test]
fn fake_clock_drives_admission() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 2, "burst": 1}}}"#)]);
    let s = store_for(&m);
    let clock = FakeClock::new(T0);
    let mut admitted = 0;
    for _ in 0..100 {
        admitted += usize::from(m.admit(&t("/"), 1, clock.now(), &s).unwrap().admitted);
        clock.advance(std::time::Duration::from_millis(100));
    }
    // 10 s at 2 per second, plus the initial token.
    assert_eq!(admitted, 20);
}

#[test]
fn corrupt_values_are_errors() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 10}}}"#)]);
    let key = m.limits()[0].key.clone();
    // (An empty value is a bucket a reload removed, started afresh: see
    // `an_empty_bucket_is_recreated_by_the_admission_that_finds_it`.)
    for bad in [&b"garbage"[..], &[9u8; 45][..], &[1u8; 41][..]] {
        let s = MemoryStore::new();
        s.set(&key, bad, 0).unwrap();
        match m.admit(&t("/"), 1, T0, &s) {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains(&format!("`{key}`")), "{msg}"),
            other => panic!("expected corrupt, got {other:?}"),
        }
    }
}

#[test]
fn missing_keys_are_created_full() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 3}}}"#),
    ]);
    let s = MemoryStore::new();
    assert_eq!(burst(&m, &s, "/a", 5, 1, T0), 3);
    assert_eq!(s.len(), 2);
    let initial: BTreeMap<String, Vec<u8>> = m.initial_buckets(T0).into_iter().collect();
    assert_eq!(
        initial.keys().collect::<Vec<_>>(),
        s.snapshot().keys().collect::<Vec<_>>()
    );
    for v in initial.values() {
        assert_eq!(v.len(), 45);
    }
}

#[test]
fn unchanged_limits_keep_their_state_across_reloads() {
    let tree = [
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 3}}}"#),
    ];
    let m1 = model(&tree);
    let s = store_for(&m1);
    assert_eq!(burst(&m1, &s, "/a", 5, 1, T0), 3);
    // Same limits, a fresh model (a new bundle version): same keys, same state.
    let m2 = model(&tree);
    assert_eq!(burst(&m2, &s, "/a", 5, 1, T0), 0);
    // /a's limit changes: same key, reset in place to full buckets; `/` is
    // unchanged and keeps its 7. No key is added.
    let m3 = model(&[tree[0], ("/a", r#"{"limits": {"rps": {"rate": 4}}}"#)]);
    assert_eq!(m1.limits()[1].key, m3.limits()[1].key);
    assert_eq!(m1.limits()[0].key, m3.limits()[0].key);
    assert_eq!(burst(&m3, &s, "/a", 10, 1, T0), 4);
    assert_eq!(burst(&m3, &s, "/", 10, 1, T0), 3);
    assert_eq!(s.len(), 2);
    // Back to the first numbers: reset again (the stamp differs from 4's).
    assert_eq!(burst(&m1, &s, "/a", 10, 1, T0), 3);
}

#[test]
fn reloads_that_change_numbers_add_no_key_and_reset_in_place() {
    let tree = |rate: u64| {
        [
            ("/", r#"{"limits": {"rps": {"rate": 1000}}}"#.to_string()),
            (
                "/a",
                format!(
                    r#"{{"limits": {{"rps": {{"rate": {rate}}}, "per_user": {{"rate": {rate}, "key": "principal", "max_keys": 64}}}}}}"#
                ),
            ),
        ]
    };
    let s = MemoryStore::new();
    let mut previous = None;
    for rate in 1..=200u64 {
        let owned = tree(rate);
        let m = model(&[(owned[0].0, &owned[0].1), (owned[1].0, &owned[1].1)]);
        let done = m.reconcile(&s, "p", previous.as_ref(), T0).unwrap();
        assert_eq!(done.emptied, 0);
        // The first configure creates both buckets and the keyed table's 8
        // sets; every later one resets /a's bucket in place (its numbers
        // changed), never `/`'s, and finds the sets.
        assert_eq!(done.created, if rate == 1 { 10 } else { 1 }, "rate {rate}");
        assert_eq!(burst(&m, &s, "/a", 300, 1, T0), rate as usize);
        previous = Some(m.footprint());
    }
    // Two buckets, 8 sets, the footprint record.
    assert_eq!(s.len(), 11, "{:?}", s.snapshot().keys().collect::<Vec<_>>());
}

#[test]
fn a_reload_empties_the_buckets_and_sets_it_removes() {
    let with_b = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": 5}, "per_user": {"rate": 2, "key": "principal", "max_keys": 32}}}"#,
        ),
        ("/b", r#"{"limits": {"rps": {"rate": 5}}}"#),
    ]);
    let s = MemoryStore::new();
    let first = with_b.reconcile(&s, "p", None, T0).unwrap();
    assert_eq!((first.emptied, first.created), (0, 3 + 4));
    assert_eq!(burst(&with_b, &s, "/b", 2, 1, T0), 2);
    // Every set of the keyed table holds something.
    let table = with_b.keyed()[0].table().clone();
    assert_eq!(table.sets, 4);
    for key in table.keys() {
        s.set(&key, b"x", 0).unwrap();
    }
    // /b goes, and /a's keyed table shrinks to 2 sets: 1 bucket and 2 sets
    // emptied, the record rewritten; nothing else touched.
    let without_b = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": 5}, "per_user": {"rate": 2, "key": "principal", "max_keys": 16}}}"#,
        ),
    ]);
    let keys_before = s.len();
    let done = without_b
        .reconcile(&s, "p", Some(&with_b.footprint()), T0)
        .unwrap();
    assert_eq!(
        (done.emptied, done.created, done.unreadable_record),
        (3, 0, false)
    );
    assert_eq!(s.len(), keys_before);
    let b_key = with_b.limits()[2].key.clone();
    assert_eq!(s.get(&b_key).unwrap().unwrap().0, b"");
    let empty: Vec<String> = table
        .keys()
        .filter(|k| s.get(k).unwrap().unwrap().0.is_empty())
        .collect();
    assert_eq!(
        empty,
        vec![format!("{}2", table.prefix), format!("{}3", table.prefix)]
    );
    // Configuring again (another VM, same bundle) finds nothing to empty.
    let again = without_b.reconcile(&s, "p", None, T0).unwrap();
    assert_eq!((again.emptied, again.created), (0, 0));
    // /b comes back: its empty bucket is reset in place, full.
    let back = with_b.reconcile(&s, "p", None, T0).unwrap();
    assert_eq!((back.emptied, back.created), (0, 1));
    assert_eq!(burst(&with_b, &s, "/b", 9, 1, T0), 5);
    // A record that does not decode is replaced; this VM's previous
    // footprint is still emptied.
    s.set("tenantgate:quota:footprint:v1:p", b"garbage", 0)
        .unwrap();
    let done = without_b
        .reconcile(&s, "p", Some(&with_b.footprint()), T0)
        .unwrap();
    assert_eq!((done.emptied, done.unreadable_record), (1, true));
}

#[test]
fn an_empty_bucket_is_recreated_by_the_admission_that_finds_it() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 3}}}"#)]);
    let s = store_for(&m);
    assert_eq!(burst(&m, &s, "/", 5, 1, T0), 3);
    s.set(&m.limits()[0].key, b"", 0).unwrap();
    assert_eq!(burst(&m, &s, "/", 5, 1, T0), 3);
}

/// A store that runs `race` (another worker's admission) just before its
/// `n`-th set, so that set loses the compare-and-swap.
struct Racing<'a> {
    inner: &'a MemoryStore,
    sets: Cell<usize>,
    n: usize,
    race: RefCell<Option<Race<'a>>>,
}

type Race<'a> = Box<dyn FnOnce(&MemoryStore) + 'a>;

impl BucketStore for Racing<'_> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.sets.set(self.sets.get() + 1);
        if self.sets.get() == self.n {
            if let Some(race) = self.race.borrow_mut().take() {
                race(self.inner);
            }
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn a_lost_race_is_refunded_and_retried() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 5}}}"#),
    ]);
    let key = |i: usize| m.limits()[i].key.clone();
    let tokens = |s: &MemoryStore, i: usize| {
        let b = bucket::Bucket::decode(&s.get(&key(i)).unwrap().unwrap().0)
            .unwrap()
            .0;
        (b.tokens / i128::from(S), b.ctokens / i128::from(S))
    };
    let s = store_for(&m);
    // Our admission writes /a first, then `/`; another worker charges `/`
    // (through /b) in between, so our second write fails and the first one
    // must be refunded before the retry.
    let racing = Racing {
        inner: &s,
        sets: Cell::new(0),
        n: 2,
        race: RefCell::new(Some(Box::new(|inner: &MemoryStore| {
            assert!(m.admit(&t("/b"), 3, T0, inner).unwrap().admitted);
        }))),
    };
    let d = m.admit(&t("/a"), 2, T0, &racing).unwrap();
    assert!(d.admitted);
    assert_eq!(tokens(&s, 1), (3, 3), "/a charged once, not twice");
    assert_eq!(
        tokens(&s, 0),
        (10 - 3 - 2, 10 - 3 - 2),
        "`/` charged by both, once each"
    );
    assert!(racing.sets.get() >= 4, "write, lost write, refund, rewrite");
}

/// A store whose sets of one key always lose the race.
struct AlwaysLoses<'a> {
    inner: &'a MemoryStore,
    key: String,
}

impl BucketStore for AlwaysLoses<'_> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if key == self.key {
            return Err(StoreError::CasMismatch);
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn endless_contention_gives_up_and_leaves_nothing_charged() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 5}}}"#),
    ]);
    let s = store_for(&m);
    let tokens_of = |key: &str| {
        bucket::Bucket::decode(&s.get(key).unwrap().unwrap().0)
            .unwrap()
            .0
            .tokens
    };
    let a_key = m.limits()[1].key.clone();
    let before = tokens_of(&a_key);
    let store = AlwaysLoses {
        inner: &s,
        key: m.limits()[0].key.clone(),
    };
    assert_eq!(m.admit(&t("/a"), 1, T0, &store), Err(StoreError::Contended));
    assert_eq!(tokens_of(&a_key), before, "every write to /a was refunded");
}

/// A store that is down.
struct Down;

impl BucketStore for Down {
    fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Err(StoreError::Unavailable("host call failed".into()))
    }
    fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("host call failed".into()))
    }
}

#[test]
fn store_failures_are_errors_not_decisions() {
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 10}}}"#)]);
    let e = m.admit(&t("/"), 1, T0, &Down).unwrap_err();
    assert_eq!(
        e.to_string(),
        "shared data is unavailable: host call failed"
    );
}

/// Runs `per_thread` admissions at one instant from four threads, two to
/// each tenant; returns (admitted per tenant, contended attempts).
fn hammer(
    m: &Arc<QuotaModel>,
    s: &Arc<MemoryStore>,
    tenants: [&str; 2],
    per_thread: usize,
) -> ([u64; 2], u64) {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (m, s) = (Arc::clone(m), Arc::clone(s));
            let tenant = t(tenants[i % 2]);
            std::thread::spawn(move || {
                let (mut admitted, mut contended) = (0u64, 0u64);
                for _ in 0..per_thread {
                    match m.admit(&tenant, 1, T0, &*s) {
                        Ok(d) => admitted += u64::from(d.admitted),
                        Err(StoreError::Contended) => contended += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (i % 2, admitted, contended)
            })
        })
        .collect();
    let mut admitted = [0u64; 2];
    let mut contended = 0;
    for h in handles {
        let (i, a, c) = h.join().unwrap();
        admitted[i] += a;
        contended += c;
    }
    (admitted, contended)
}

fn tokens_in_store(s: &MemoryStore, key: &str) -> (i128, i128) {
    let b = bucket::Bucket::decode(&s.get(key).unwrap().unwrap().0)
        .unwrap()
        .0;
    (b.tokens, b.ctokens)
}

#[test]
fn concurrent_admissions_never_exceed_the_limit() {
    // One limit, four threads, one instant (no refill): at most the burst
    // gets through and every charge lands exactly once.
    let m = Arc::new(model(&[("/", r#"{"limits": {"rps": {"rate": 100}}}"#)]));
    let s = Arc::new(store_for(&m));
    let (admitted, contended) = hammer(&m, &s, ["/a", "/b"], 60);
    let total = admitted[0] + admitted[1];
    assert!(total <= 100, "admitted {total} of a burst of 100");
    assert!(
        total == 100 || contended > 0,
        "admitted {total} without contention"
    );
    let left = i128::from(100 - total) * i128::from(S);
    assert_eq!(tokens_in_store(&s, &m.limits()[0].key), (left, left));
}

#[test]
fn concurrent_admissions_in_a_tree_are_accounted_exactly() {
    let m = Arc::new(model(&[
        ("/", r#"{"limits": {"rps": {"rate": 100}}}"#),
        (
            "/a",
            r#"{"limits": {"rps": {"rate": "50%", "ceil": "100%"}}}"#,
        ),
        (
            "/b",
            r#"{"limits": {"rps": {"rate": "50%", "ceil": "100%"}}}"#,
        ),
    ]));
    let s = Arc::new(store_for(&m));
    let ([a, b], _) = hammer(&m, &s, ["/a", "/b"], 60);
    let units = |n: u64| i128::from(n) * i128::from(S);
    // Each child's ceil bucket (100) saw exactly its own admissions, the
    // root's saw both; at most ceil bucket + the children's bursts in all.
    let limits = m.limits();
    assert_eq!(tokens_in_store(&s, &limits[1].key).1, units(100) - units(a));
    assert_eq!(tokens_in_store(&s, &limits[2].key).1, units(100) - units(b));
    assert_eq!(
        tokens_in_store(&s, &limits[0].key).1,
        units(100) - units(a + b)
    );
    assert!(a <= 100 && b <= 100 && a + b <= 100 + 50 + 50, "{a} + {b}");
}

/// The `RateLimit-Policy` field of a request to `tenant` (none when no
/// limit applies).
fn policy(m: &QuotaModel, tenant: &TenantPath) -> Option<String> {
    m.peek(tenant, T0, &MemoryStore::new())
        .unwrap()
        .ratelimit_policy()
}

#[test]
fn bundle_limits_build_through_the_engine() {
    use crate::bundle::{Bundle, BundleTenant, SourceFile, FORMAT};
    let tenant = |path: &str, text: &str| BundleTenant {
        path: t(path),
        config: Some(SourceFile {
            file: file_of(path),
            text: text.into(),
        }),
        policies: Vec::new(),
    };
    let mut bundle = Bundle {
        format: FORMAT,
        version: String::new(),
        settings: crate::settings::Settings::default(),
        schema: None,
        tenants: vec![
            tenant("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
            tenant("/a", r#"{"attributes": {"x": 1}}"#),
            tenant("/a/b", r#"{"limits": {"rps": {"rate": "30%"}}}"#),
        ],
    };
    let e = crate::Engine::new(&bundle).unwrap();
    assert_eq!(e.quotas().limits().len(), 2);
    bundle.tenants[2] = tenant("/a/b", "{\n  \"limits\": {\"rps\": {\"rate\": \"300%\"}}}");
    let e = crate::Engine::new(&bundle).unwrap_err();
    let first = e.iter().next().unwrap();
    assert_eq!(
        (first.file.as_str(), first.line),
        ("tenants/a/b/tenant.json", 2)
    );
}

#[test]
fn ratelimit_fields_count_requests_of_this_cost_and_r_never_exceeds_q() {
    // rate 100, burst 500: plenty of tokens, but q is the rate.
    let m = model(&[("/", r#"{"limits": {"rps": {"rate": 100, "burst": 500}}}"#)]);
    let s = store_for(&m);
    let d = m.admit(&t("/a"), 1, T0, &s).unwrap();
    assert_eq!(d.remaining, 499);
    assert_eq!(d.ratelimit_policy().as_deref(), Some("\"rps\";q=100;w=1"));
    assert_eq!(d.ratelimit().as_deref(), Some("\"rps\";r=100;t=0"));
    // A request costing 2 tokens: q and r in requests of that cost.
    let d = m.admit(&t("/a"), 2, T0, &s).unwrap();
    assert_eq!(d.remaining, 497);
    assert_eq!(
        d.ratelimit_policy().as_deref(),
        Some("\"rps\";q=50;w=1;tenantgate-cost=2")
    );
    assert_eq!(d.ratelimit().as_deref(), Some("\"rps\";r=50;t=0"));
    // Drain to 3 tokens: one request of cost 2 left, refused after it.
    assert_eq!(burst(&m, &s, "/a", 494, 1, T0), 494);
    let d = m.admit(&t("/a"), 2, T0, &s).unwrap();
    assert!(d.admitted);
    assert_eq!(d.ratelimit().as_deref(), Some("\"rps\";r=0;t=1"));
    let d = m.admit(&t("/a"), 2, T0, &s).unwrap();
    assert!(!d.admitted);
    assert_eq!(d.ratelimit().as_deref(), Some("\"rps\";r=0;t=1"));
    // 1 token left; 99 more for a full quota of 50 requests of 2 take 990 ms.
    assert_eq!(d.limits[0].reset_s, 1);
    assert_eq!(d.retry_after_s, 1);
    assert!(d.near_limit(0.2));
}

#[test]
fn a_borrowing_admission_is_marked() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 2, "ceil": 10}}}"#),
    ]);
    let s = store_for(&m);
    let d = m.admit(&t("/a"), 1, T0, &s).unwrap();
    assert!(!d.limits[0].borrowed);
    assert_eq!(burst(&m, &s, "/a", 1, 1, T0), 1);
    let d = m.admit(&t("/a"), 1, T0, &s).unwrap();
    assert!(d.admitted && d.limits[0].borrowed, "{d:?}");
}

#[test]
fn create_buckets_creates_only_the_missing_ones() {
    let m = model(&[
        ("/", r#"{"limits": {"rps": {"rate": 10}}}"#),
        ("/a", r#"{"limits": {"rps": {"rate": 5}}}"#),
    ]);
    let s = MemoryStore::new();
    assert_eq!(m.create_buckets(&s, T0).unwrap(), 2);
    assert_eq!(burst(&m, &s, "/a", 3, 1, T0), 3);
    let before = s.snapshot();
    assert_eq!(
        m.create_buckets(&s, T0 + S).unwrap(),
        0,
        "existing state is kept"
    );
    assert_eq!(s.snapshot(), before);
}

#[test]
fn ratelimit_numbers_are_written_in_decimal() {
    for n in [0u64, 7, 10, 99, 1_000_000, u64::MAX] {
        let mut out = String::from("r=");
        super::push_u64(&mut out, n);
        assert_eq!(out, format!("r={n}"));
    }
}
