//! The host itself, checked with the real module.

use crate::support::*;

#[test]
fn every_import_resolves_and_no_unimplemented_one_is_called() {
    let (host, mut vm) = gate(&Tree::standard());
    assert!(host
        .imports()
        .iter()
        .any(|i| i == "env.proxy_get_shared_data"));
    for _ in 0..3 {
        get(&mut vm, "/acme", "alice", "/acme", "/orders");
    }
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    vm.request().header("x-tenant", "bad").send().unwrap();
    vm.tick().unwrap();
    assert!(
        host.unimplemented_calls().is_empty(),
        "the filter called imports this host does not implement: {:?}",
        host.unimplemented_calls()
    );
    assert_eq!(host.traps(), 0);
}

#[test]
fn quota_state_is_compact_binary_in_shared_data() {
    let (host, mut vm) = gate(&Tree::standard());
    let keys = host.shared_data().keys();
    // Created at configure time, before any request: the buckets and the
    // record of which keys this bundle uses (text, one line per bucket).
    assert!(!keys.is_empty());
    // (The host names the plugin `tenantgate`.)
    let record = "tenantgate:quota:footprint:v1:tenantgate".to_string();
    let mut buckets = Vec::new();
    for key in &keys {
        let key = String::from_utf8(key.clone()).unwrap();
        assert!(key.starts_with("tenantgate:"), "{key}");
        let (value, _) = host.shared_data().peek(key.as_bytes()).unwrap();
        if key == record {
            continue;
        }
        assert!(key.starts_with("tenantgate:quota:v3:"), "{key}");
        assert_eq!(value.len(), 45, "{key}");
        buckets.push(format!("b {key}\n"));
    }
    buckets.sort();
    let (value, _) = host.shared_data().peek(record.as_bytes()).unwrap();
    assert_eq!(String::from_utf8(value).unwrap(), buckets.concat());
    let before = host.shared_data().stats();
    for _ in 0..5 {
        get(&mut vm, "/acme", "alice", "/acme", "/orders");
    }
    let after = host.shared_data().stats();
    assert_eq!(after.keys, before.keys, "requests create no keys");
    assert!(after.sets > before.sets);
}

#[test]
fn memory_does_not_grow_with_distinct_principals_and_paths() {
    let (host, mut vm) = gate(&Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" }, "audit": "off" }"#,
    ));
    let keys = host.shared_data().stats().keys;
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for i in 0..3000 {
        host.clock().advance(std::time::Duration::from_millis(1));
        let resp = get(
            &mut vm,
            "/t1",
            &format!("user-{i}"),
            "/t1",
            &format!("/p/{i}"),
        );
        *statuses.entry(resp.status).or_default() += 1;
    }
    // /t1: 50 per second, burst 50, full at configure time (t0). The burst,
    // then one token every 20 ms from the first request (t0 + 1 ms; what
    // refills while the bucket is full is lost) to t0 + 3 s: 50 + 149.
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([(200, 199), (429, 2801)])
    );
    assert_eq!(host.shared_data().stats().keys, keys);
    let pages = vm.memory_pages();
    for i in 3000..6000 {
        host.clock().advance(std::time::Duration::from_millis(1));
        get(
            &mut vm,
            "/t1",
            &format!("user-{i}"),
            "/t1",
            &format!("/p/{i}"),
        );
    }
    assert_eq!(vm.memory_pages(), pages, "linear memory kept growing");
}
