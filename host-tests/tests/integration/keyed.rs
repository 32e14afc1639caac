//! Keyed limits (docs/reference.md, "limits": `key`, `missing`, `max_keys`)
//! through the real filter on several VMs sharing one process's shared data:
//! one budget per key value, exact across workers, in a table whose number of
//! shared-data keys does not grow with the values seen.

use std::sync::{mpsc, Arc, Barrier};
use std::time::Duration;

use tenantgate_host_tests::{Host, Response, Vm};

use crate::support::*;

/// The shared-data key of the process's keyed-hash seed.
const SEED_KEY: &str = "tenantgate:keyed:seed:v1";

/// Members may do anything in their home subtree; `/` declares no limit.
/// `/keys`: 3 a minute per `x-api-key` (skipped without one) next to its own
/// `rps` of 12 a minute (burst 12: never leased, so exact); `/many`: 3 a
/// minute per `x-api-key` with room for 64 values (8 sets).
fn tree() -> Tree {
    Tree::empty()
        .settings(r#"{ "principal_tenant": { "header": "x-user-tenant" } }"#)
        .tenant("/", "{}")
        .policy(
            "/",
            "base.cedar",
            r#"
@id("members")
permit (principal, action, resource) when { resource in principal.tenant };
"#,
        )
        .tenant(
            "/keys",
            r#"{ "limits": { "rps": { "rate": 12, "per": "1m" },
                 "per_key": { "rate": 3, "per": "1m", "key": { "header": "x-api-key" }, "missing": "skip" } } }"#,
        )
        .tenant(
            "/many",
            r#"{ "limits": { "per_key": { "rate": 3, "per": "1m", "key": { "header": "x-api-key" }, "max_keys": 64 } } }"#,
        )
}

/// `GET /x` to `tenant` by a member of it, without a key.
fn keyless(vm: &mut Vm, tenant: &str) -> Response {
    vm.request()
        .header("x-tenant", tenant)
        .header("x-user", "kim")
        .header("x-user-tenant", tenant)
        .path("/x")
        .send()
        .unwrap()
}

/// `GET /x` to `tenant` by a member of it, with `x-api-key: key`.
fn keyed(vm: &mut Vm, tenant: &str, key: &str) -> Response {
    vm.request()
        .header("x-tenant", tenant)
        .header("x-user", "kim")
        .header("x-user-tenant", tenant)
        .header("x-api-key", key)
        .path("/x")
        .send()
        .unwrap()
}

/// Asserts a 429 from the keyed limit of `/keys`.
#[track_caller]
fn expect_keyed_429(resp: &Response) {
    let body = expect_reply(resp, 429);
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(body["limit"], "per_key", "{body}");
    // One token every 20 s.
    assert_eq!(body["retry_after_s"], 20, "{body}");
    assert_eq!(resp.header("retry-after").as_deref(), Some("20"));
    assert_eq!(
        resp.header("ratelimit-policy").as_deref(),
        Some("\"per_key\";q=3;w=60")
    );
}

/// Shared-data keys whose name starts with `prefix`.
fn keys_with(host: &Host, prefix: &str) -> Vec<String> {
    host.shared_data()
        .keys()
        .into_iter()
        .map(|k| String::from_utf8(k).unwrap())
        .filter(|k| k.starts_with(prefix))
        .collect()
}

#[test]
fn one_key_over_three_vms_gets_exactly_its_burst_and_other_keys_their_own() {
    let host = host();
    let bundle = tree().bundle();
    let mut vms: Vec<Vm> = (0..3).map(|_| configured_vm(&host, &bundle)).collect();
    // 12 requests for one key, round robin over the VMs: the burst (3), then
    // 429s naming the keyed limit, whichever VM serves them.
    let mut admitted = 0;
    for i in 0..12 {
        let resp = keyed(&mut vms[i % 3], "/keys", "k-1");
        if resp.is_continue() {
            admitted += 1;
        } else {
            expect_keyed_429(&resp);
        }
    }
    assert_eq!(admitted, 3);
    // Other keys have budgets of their own, on any VM.
    for (key, vm) in [("k-2", 1), ("k-3", 2)] {
        let ok = (0..5)
            .filter(|_| keyed(&mut vms[vm], "/keys", key).is_continue())
            .count();
        assert_eq!(ok, 3, "{key}");
    }
    // No key: the keyed limit skips the request; only `rps` applies.
    expect_continue(&keyless(&mut vms[0], "/keys"));
    // 20 s later k-1 has exactly one token again, served by one VM only.
    host.clock().advance(Duration::from_secs(20));
    let ok: Vec<bool> = (0..3)
        .map(|i| keyed(&mut vms[(i + 2) % 3], "/keys", "k-1").is_continue())
        .collect();
    assert_eq!(ok, [true, false, false]);
    // `rps` was charged for the 11 admitted requests only, none of the 15
    // keyed refusals: of its 12 and the 4 of 20 s, 5 are left.
    let rps: Vec<u16> = (0..7)
        .map(|i| keyless(&mut vms[i % 3], "/keys").status)
        .collect();
    assert_eq!(rps, [200, 200, 200, 200, 200, 429, 429]);
    let body = expect_reply(&keyless(&mut vms[1], "/keys"), 429);
    assert_eq!(body["limit"], "rps", "{body}");
    assert_eq!(host.traps(), 0);
}

#[test]
fn one_key_hammered_by_three_vms_at_once_is_exact() {
    let host = host();
    let bundle = tree().bundle();
    let mut vms: Vec<Vm> = (0..3).map(|_| configured_vm(&host, &bundle)).collect();
    // Each VM's first keyed request reads (or creates) the process's seed,
    // and the first request for `hot` creates its set: done one at a time,
    // so the race below is only over the set's compare-and-swap.
    for (i, vm) in vms.iter_mut().enumerate() {
        expect_continue(&keyed(vm, "/keys", &format!("warm-{i}")));
    }
    expect_continue(&keyed(&mut vms[0], "/keys", "hot"));
    let barrier = Arc::new(Barrier::new(3));
    let (tx, rx) = mpsc::channel();
    for mut vm in vms {
        let (barrier, tx) = (barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            barrier.wait();
            let (mut ok, mut refused) = (0u32, 0u32);
            for _ in 0..40 {
                let resp = keyed(&mut vm, "/keys", "hot");
                if resp.is_continue() {
                    ok += 1;
                } else if resp.status == 429 {
                    refused += 1;
                }
            }
            let _ = tx.send((ok, refused));
        });
    }
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..3 {
        let (o, r) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("deadlock or starvation");
        ok += o;
        refused += r;
    }
    // The burst of 3, one already spent before the race.
    assert_eq!((ok, refused), (2, 118));
    assert_eq!(host.traps(), 0);
}

#[test]
fn the_keyed_table_keeps_a_fixed_number_of_shared_data_keys() {
    let host = host();
    let bundle = tree().bundle();
    let mut vms: Vec<Vm> = (0..2).map(|_| configured_vm(&host, &bundle)).collect();
    let prefix = "tenantgate:keyed:v1:/many:per_key:";
    let all_before = host.shared_data().keys().len();
    // Configure created the table's 8 sets (empty) and the seed (and the
    // sets of the tree's other keyed limits).
    assert_eq!(keys_with(&host, prefix).len(), 8);
    assert!(host.shared_data().peek(SEED_KEY.as_bytes()).is_some());
    let keyed_before = keys_with(&host, "tenantgate:keyed:").len();
    assert_eq!(
        host.shared_data()
            .peek(format!("{prefix}0").as_bytes())
            .unwrap()
            .0,
        b""
    );
    // 1000 distinct values over two VMs, for a table of 64 (8 sets of 8).
    let mut admitted = 0;
    for i in 0..1000 {
        let resp = keyed(&mut vms[i % 2], "/many", &format!("v-{i}"));
        if resp.is_continue() {
            admitted += 1;
        }
        if i == 63 {
            assert_eq!(keys_with(&host, prefix).len(), 8);
        }
    }
    // Every value is new (or reclaimed, then full again): its first request passes.
    assert_eq!(admitted, 1000);
    let sets = keys_with(&host, prefix);
    assert_eq!(
        sets,
        (0..8).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>()
    );
    // The table's 8 sets and the seed, no key more.
    assert_eq!(keys_with(&host, "tenantgate:keyed:").len(), keyed_before);
    assert!(host.shared_data().peek(SEED_KEY.as_bytes()).is_some());
    assert_eq!(host.shared_data().keys().len(), all_before);
    // A value that keeps its entry still has its own budget: 3, then 429.
    let ok = (0..5)
        .filter(|_| keyed(&mut vms[0], "/many", "v-999").is_continue())
        .count();
    assert_eq!(ok, 2, "v-999 spent one of its 3 above");
    assert_eq!(host.traps(), 0);
}
