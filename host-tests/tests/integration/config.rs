//! Configuration: accepted, refused, and a refused update keeps the old bundle.

use crate::support::*;

#[test]
fn example_bundle_is_accepted_and_its_version_logged() {
    let host = host();
    let bundle = example_bundle();
    let version = serde_json::from_str::<serde_json::Value>(&bundle).unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(version.starts_with("sha256:"));
    let _vm = configured_vm(&host, &bundle);
    assert!(
        host.logs().iter().any(|l| l.message.contains(&version)),
        "no log line names the loaded version {version}:\n{}",
        dump_logs(&host)
    );
    assert_eq!(metric(&host, names::CONFIG_LOADED), 1);
}

#[test]
fn invalid_bundles_are_refused_with_a_readable_error() {
    let host = host();
    let mut vm = host.vm().unwrap();
    assert!(!vm.configure("{ not json").unwrap());
    assert!(!vm.configure("").unwrap());
    // A bundle whose policy does not parse (the CLI would refuse to build it,
    // so edit a good one and recompute its version).
    let good = Tree::empty().policy("/", "ok.cedar", "permit (principal, action, resource);");
    let mut bundle = tenantgate_engine::Bundle::from_json(&good.bundle()).unwrap();
    bundle.tenants[0].policies[0].text =
        "permit (principal, action, resource) when { nope };".into();
    bundle.version = bundle.compute_version();
    assert!(!vm.configure(bundle.to_json()).unwrap());
    assert_eq!(metric(&host, names::CONFIG_REJECTED), 3);
    let errors: Vec<_> = host
        .logs()
        .into_iter()
        .filter(|l| l.level >= tenantgate_host_tests::LogLevel::Error)
        .collect();
    assert!(errors.len() >= 3, "{}", dump_logs(&host));
    assert!(
        errors.iter().any(|l| l.message.contains("ok.cedar")),
        "the policy error names no file:\n{}",
        dump_logs(&host)
    );
    assert!(!vm.is_configured());
    assert!(vm.trapped().is_none());
}

#[test]
fn a_refused_configure_keeps_the_previous_bundle() {
    let (host, mut vm) = gate(&Tree::standard());
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/admin/x"), 403);

    assert!(!vm.configure("{\"version\": 1").unwrap());
    // Still the first bundle: same decisions.
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/admin/x"), 403);
    assert!(
        host.logs()
            .iter()
            .any(|l| l.message.contains("previous bundle keeps serving")),
        "{}",
        dump_logs(&host)
    );
}

#[test]
fn an_update_applies_like_ecds_or_is_rejected() {
    let host = host();
    let mut vm = configured_vm(&host, &Tree::standard().bundle());
    let first_root = vm.root_context();
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));

    // Rejected: the old root context keeps serving.
    assert!(!vm.reload("[]").unwrap());
    assert_eq!(vm.root_context(), first_root);
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));

    // Accepted: a new root context with a bundle that forbids /orders.
    let stricter = Tree::standard().policy(
        "/",
        "orders.cedar",
        r#"@id("no-orders") forbid (principal, action, resource) when { resource.path like "/orders*" };"#,
    );
    assert!(vm.reload(stricter.bundle()).unwrap());
    assert_ne!(vm.root_context(), first_root);
    let body = expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 403);
    assert_eq!(body["reasons"], serde_json::json!(["no-orders"]));
}

#[test]
fn a_vm_without_a_bundle_fails_closed() {
    let host = host();
    let mut vm = host.vm().unwrap();
    let resp = vm.request().header("x-tenant", "/acme").send().unwrap();
    assert!(!resp.is_continue());
    assert!(resp.status >= 500, "{resp:?}");
}

#[test]
fn a_reload_keeps_quota_state_unless_the_limit_changed() {
    let host = host();
    let mut vm = configured_vm(&host, &Tree::standard().bundle());
    for _ in 0..10 {
        expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    }
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 429);
    // Same limits, another policy: the buckets carry over (no free burst).
    let same_limits = Tree::standard().policy(
        "/",
        "extra.cedar",
        "@id(\"extra\") forbid (principal, action, resource) when { resource.path == \"/x\" };",
    );
    assert!(vm.reload(same_limits.bundle()).unwrap());
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 429);
    // A changed limit starts from full buckets.
    let changed = Tree::standard().tenant(
        "/acme",
        r#"{ "limits": { "rps": { "rate": 5, "per": "1s", "burst": 5, "ceil": 5 } } }"#,
    );
    assert!(vm.reload(changed.bundle()).unwrap());
    let admitted = (0..10)
        .filter(|_| get(&mut vm, "/acme", "alice", "/acme", "/orders").is_continue())
        .count();
    assert_eq!(admitted, 5);
}

/// Bytes held in shared data: every key and value.
fn shared_bytes(host: &tenantgate_host_tests::Host) -> usize {
    let shared = host.shared_data();
    shared
        .keys()
        .iter()
        .map(|k| k.len() + shared.peek(k).map_or(0, |(v, _)| v.len()))
        .sum()
}

#[test]
fn reloads_that_change_a_limit_grow_no_shared_data_and_removed_limits_are_emptied() {
    let host = host();
    let with_rate = |rate: u32| {
        Tree::standard().tenant(
            "/acme",
            &format!(r#"{{ "limits": {{ "rps": {{ "rate": {rate}, "per": "1s" }} }} }}"#),
        )
    };
    // Two VMs (two workers) on one shared data, both reloaded every time.
    let mut a = configured_vm(&host, &with_rate(1).bundle());
    let mut b = configured_vm(&host, &with_rate(1).bundle());
    let keys = host.shared_data().keys().len();
    let bytes = shared_bytes(&host);
    for rate in 2..=200 {
        let bundle = with_rate(rate).bundle();
        assert!(a.reload(bundle.clone()).unwrap());
        assert!(b.reload(bundle).unwrap());
        // The changed limit starts from full buckets in place: `rate`
        // admitted, then 429. (One VM sends: with two, a worker lease may
        // hold the last tokens on the other.)
        let admitted = (0..rate + 2)
            .filter(|_| get(&mut a, "/acme", "alice", "/acme", "/orders").is_continue())
            .count();
        assert_eq!(admitted, rate as usize, "rate {rate}");
        expect_reply(&get(&mut b, "/acme", "alice", "/acme", "/orders"), 429);
    }
    assert_eq!(host.shared_data().keys().len(), keys);
    assert_eq!(shared_bytes(&host), bytes, "200 reloads, not a byte more");
    // A reload that removes /acme's limit empties its bucket.
    let acme = "tenantgate:quota:v3:/acme:rps";
    assert_eq!(
        host.shared_data().peek(acme.as_bytes()).unwrap().0.len(),
        45
    );
    let without = Tree::standard().tenant("/acme", "{}");
    assert!(a.reload(without.bundle()).unwrap());
    assert!(b.reload(without.bundle()).unwrap());
    assert_eq!(host.shared_data().peek(acme.as_bytes()).unwrap().0, b"");
    assert_eq!(shared_bytes(&host), bytes - 45 - "b \n".len() - acme.len());
}
