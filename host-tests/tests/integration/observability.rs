//! Audit lines, metrics and shadow mode (docs/reference.md, "Audit lines" and
//! "Metrics").

use crate::support::*;

#[test]
fn shadow_mode_decides_logs_and_counts_but_never_blocks() {
    let (host, mut vm) = gate(&Tree::standard_with(
        r#"{ "mode": "shadow", "principal_tenant": { "header": "x-user-tenant" }, "audit": "all" }"#,
    ));
    // Forbidden by policy, over quota, and bad input: all go through.
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/admin"));
    for _ in 0..12 {
        expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    }
    let resp = vm.request().header("x-user", "alice").send().unwrap();
    expect_continue(&resp);
    // Nothing was denied: would-be denials count in `shadow_denied` only
    // (and in the tenant's refusals, by reason).
    assert_eq!(metric(&host, names::SHADOW_DENIED), 4);
    assert_eq!(metric(&host, names::ALLOWED), 10);
    assert_eq!(metric(&host, names::DENIED_POLICY), 0);
    assert_eq!(metric(&host, names::DENIED_QUOTA), 0);
    assert_eq!(metric(&host, names::BAD_REQUEST), 0);
    assert_eq!(tenant_refused_all(&host, "/acme"), 3);
    assert_eq!(tenant_refused(&host, "/acme", "policy"), 1);
    assert_eq!(tenant_refused(&host, "/acme", "quota"), 2);
    let audit = audit_lines(&host);
    let denies: Vec<_> = audit.iter().filter(|a| a["decision"] == "deny").collect();
    assert_eq!(denies.len(), 4, "{audit:?}");
    assert!(denies.iter().all(|a| a["mode"] == "shadow"));
    // The identity headers are still set for the upstream.
    let resp = get(&mut vm, "/acme", "alice", "/acme", "/admin");
    assert_eq!(
        resp.upstream_header("x-tenantgate-tenant").as_deref(),
        Some("/acme")
    );
}

#[test]
fn audit_lines_are_json_with_the_decision_fields() {
    let (host, mut vm) = gate(&Tree::standard());
    let version = serde_json::from_str::<serde_json::Value>(&Tree::standard().bundle()).unwrap()
        ["version"]
        .clone();
    vm.request()
        .header("x-tenant", "/acme/eu")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .id("rid-audit")
        .method("DELETE")
        .path("/orders/7?force=1")
        .send()
        .unwrap();
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    let audit = audit_lines(&host);
    assert_eq!(audit.len(), 2, "{}", dump_logs(&host));
    let a = &audit[0];
    assert_eq!(a["request_id"], "rid-audit");
    assert_eq!(a["tenant"], "/acme/eu");
    assert_eq!(a["principal"], "alice");
    assert_eq!(a["action"], "DELETE");
    assert_eq!(a["resource"], "/orders/7");
    assert_eq!(a["decision"], "allow");
    assert_eq!(a["policies"], serde_json::json!(["members"]));
    assert_eq!(a["bundle"], version);
    assert_eq!(a["mode"], "enforce");
    assert_eq!(a["time"], host.clock().now_ns() / 1_000_000_000);
    assert!(a.get("limit").is_some());
    let d = &audit[1];
    assert_eq!(d["decision"], "deny");
    assert_eq!(d["policies"], serde_json::json!(["no-admin"]));
}

#[test]
fn audit_can_log_denies_only_or_nothing() {
    let deny_only = Tree::standard_with(r#"{ "principal_tenant": { "header": "x-user-tenant" } }"#);
    let (host, mut vm) = gate(&deny_only);
    get(&mut vm, "/acme", "alice", "/acme", "/orders");
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    let audit = audit_lines(&host);
    assert_eq!(audit.len(), 1, "audit defaults to deny only");
    assert_eq!(audit[0]["decision"], "deny");

    let off = Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" }, "audit": "off" }"#,
    );
    let (host, mut vm) = gate(&off);
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    assert!(audit_lines(&host).is_empty());
}

#[test]
fn metrics_count_every_outcome_and_tenant() {
    let (host, mut vm) = gate(&Tree::standard());
    for _ in 0..10 {
        get(&mut vm, "/acme", "alice", "/acme", "/orders");
    }
    get(&mut vm, "/acme", "alice", "/acme", "/orders"); // 429
    get(&mut vm, "/acme/eu", "alice", "/acme", "/admin"); // 403
    vm.request().header("x-tenant", "/NOPE").send().unwrap(); // 400
    assert_eq!(metric(&host, names::ALLOWED), 10);
    assert_eq!(metric(&host, names::DENIED_QUOTA), 1);
    assert_eq!(metric(&host, names::DENIED_POLICY), 1);
    assert_eq!(metric(&host, names::BAD_REQUEST), 1);
    assert_eq!(metric(&host, names::ERRORS), 0);
    assert_eq!(tenant_metric(&host, "/acme", "allowed"), 10);
    assert_eq!(tenant_refused(&host, "/acme", "quota"), 1);
    assert_eq!(tenant_refused_all(&host, "/acme"), 1);
    assert_eq!(tenant_refused(&host, "/acme/eu", "policy"), 1);
    assert_eq!(tenant_refused_all(&host, "/acme/eu"), 1);
    // Per-tenant counters exist for every tenant of the bundle, from the start.
    for t in ["/", "/globex/a", "/t8"] {
        let t = tenantgate_engine::TenantPath::parse(t).unwrap();
        assert!(host.metric(&names::tenant(&t, "allowed")).is_some(), "{t}");
    }
    // The decision time histogram samples one decision in
    // DECISION_TIME_SAMPLE, the first always: 13 decisions give 2 samples.
    let h = host.metric_details(names::DECISION_US).unwrap();
    assert_eq!(h.kind, tenantgate_host_tests::MetricType::Histogram);
    assert_eq!(h.value, 13_u64.div_ceil(names::DECISION_TIME_SAMPLE));
}

#[test]
fn metrics_are_per_process_across_vms() {
    let host = host();
    let bundle = Tree::standard().bundle();
    let mut a = configured_vm(&host, &bundle);
    let mut b = configured_vm(&host, &bundle);
    get(&mut a, "/globex/a", "gus", "/globex/a", "/x");
    get(&mut b, "/globex/a", "gus", "/globex/a", "/x");
    assert_eq!(metric(&host, names::ALLOWED), 2);
    assert_eq!(metric(&host, names::CONFIG_LOADED), 2);
}

/// A gate that cannot decide is a health problem whatever the mode: a shadow
/// rollout must still show shared-store failures in `tenantgate.errors`.
#[test]
fn shadow_mode_still_counts_store_errors() {
    let (host, mut vm) = gate(&Tree::standard_with(
        r#"{ "mode": "shadow", "principal_tenant": { "header": "x-user-tenant" } }"#,
    ));
    host.shared_data()
        .set_fault(tenantgate_host_tests::SharedDataFault::CasAlwaysMismatches);
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    assert_eq!(metric(&host, names::ERRORS), 1);
}

#[test]
fn audit_lines_are_not_built_when_the_host_drops_info_lines() {
    let host = tenantgate_host_tests::Host::builder(wasm())
        .log_level(tenantgate_host_tests::LogLevel::Warn)
        .build()
        .unwrap();
    let bundle = Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" }, "audit": "all" }"#,
    )
    .bundle();
    let mut vm = configured_vm(&host, &bundle);
    host.reset_calls();
    get(&mut vm, "/acme", "alice", "/acme", "/orders");
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    assert!(audit_lines(&host).is_empty(), "{}", dump_logs(&host));
    let calls = host.calls();
    assert_eq!(calls.get("proxy_log"), None, "{calls:?}");
    assert_eq!(
        calls.get("proxy_get_log_level"),
        None,
        "read on ticks, not per request"
    );
    // Back to info: the next tick notices, and lines come back.
    host.set_log_level(tenantgate_host_tests::LogLevel::Info);
    vm.tick().unwrap();
    get(&mut vm, "/acme", "alice", "/acme", "/admin");
    assert_eq!(audit_lines(&host).len(), 1);
}

/// Per-limit series: the configured limits as gauges from the start; the
/// counts added up in the VM and sent on the tick; the remaining tokens read
/// back from the buckets.
#[test]
fn limit_metrics_are_flushed_on_the_tick() {
    let (host, mut vm) = gate(&Tree::standard());
    // Configured values, labelled by the node that declares the limit.
    assert_eq!(limit_metric(&host, "/acme", "rps", "rate"), 10);
    assert_eq!(limit_metric(&host, "/acme", "rps", "ceil"), 10);
    assert_eq!(limit_metric(&host, "/acme", "rps", "burst"), 10);
    assert_eq!(limit_metric(&host, "/acme", "rps", "window_seconds"), 1);
    assert_eq!(limit_metric(&host, "/globex/a", "rps", "ceil"), 40);
    assert_eq!(limit_metric(&host, "/", "rps", "rate"), 1000);
    // 14 buckets: /, /acme, /globex, /globex/a, /globex/b, /hammer, /t1../t8.
    assert_eq!(metric(&host, names::SHARED_DATA_KEYS), 14);
    // /acme admits 10 (burst 10, no borrowing: ceil = rate); the 11th is refused.
    for _ in 0..10 {
        expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    }
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 429);
    // /acme/eu declares no limit: its requests count in /acme's series.
    expect_reply(&get(&mut vm, "/acme/eu", "alice", "/acme", "/orders"), 429);
    // Nothing per limit before the tick: no host call was spent on it.
    assert_eq!(limit_metric(&host, "/acme", "rps", "admitted"), 0);
    assert_eq!(tenant_metric(&host, "/acme", "allowed"), 10);
    vm.tick().unwrap();
    assert_eq!(limit_metric(&host, "/acme", "rps", "admitted"), 10);
    assert_eq!(limit_metric(&host, "/acme", "rps", "charged"), 10);
    assert_eq!(limit_metric(&host, "/acme", "rps", "refused"), 2);
    assert_eq!(limit_metric(&host, "/acme", "rps", "borrowed"), 0);
    // Below 0.2 of the burst (2 tokens) after the charge: remaining 1 and 0.
    assert_eq!(limit_metric(&host, "/acme", "rps", "near_limit"), 2);
    assert_eq!(limit_metric(&host, "/acme", "rps", "remaining"), 0);
    assert_eq!(tenant_refused(&host, "/acme/eu", "quota"), 1);
    // A second tick sends nothing twice.
    vm.tick().unwrap();
    assert_eq!(limit_metric(&host, "/acme", "rps", "admitted"), 10);
    // After a second the bucket is full again, and the gauge says so.
    host.clock().advance(std::time::Duration::from_secs(1));
    vm.tick().unwrap();
    assert_eq!(limit_metric(&host, "/acme", "rps", "remaining"), 10);
    // /globex/a (rate 10, ceil 40) borrows from /globex beyond its 10;
    // POST costs 2 tokens.
    for _ in 0..15 {
        expect_continue(&get(&mut vm, "/globex/a", "gus", "/globex/a", "/x"));
    }
    let post = vm
        .request()
        .method("POST")
        .header("x-tenant", "/globex/a")
        .header("x-user", "gus")
        .header("x-user-tenant", "/globex/a")
        .path("/x")
        .send()
        .unwrap();
    expect_continue(&post);
    vm.tick().unwrap();
    assert_eq!(limit_metric(&host, "/globex/a", "rps", "admitted"), 16);
    assert_eq!(limit_metric(&host, "/globex/a", "rps", "charged"), 17);
    assert_eq!(limit_metric(&host, "/globex/a", "rps", "borrowed"), 6);
    assert_eq!(limit_metric(&host, "/globex", "rps", "admitted"), 0);
    // The root lends too: 1000 - 17 left under /globex/a's ceil of 40.
    assert_eq!(
        limit_metric(&host, "/globex/a", "rps", "remaining"),
        40 - 17
    );
}

/// A reload zeroes the gauges of the limits and tenants it removed, and
/// sets the changed ones.
#[test]
fn a_reload_zeroes_the_gauges_of_removed_limits() {
    let (host, mut vm) = gate(&Tree::standard());
    assert_eq!(limit_metric(&host, "/t8", "rps", "rate"), 50);
    let changed = Tree::standard().tenant("/t8", "{}").tenant(
        "/acme",
        r#"{ "limits": { "rps": { "rate": 5, "burst": 6, "ceil": 8 } } }"#,
    );
    assert!(vm.reload(changed.bundle()).unwrap(), "{}", dump_logs(&host));
    for what in ["rate", "ceil", "burst", "window_seconds", "remaining"] {
        assert_eq!(limit_metric(&host, "/t8", "rps", what), 0, "{what}");
    }
    assert_eq!(limit_metric(&host, "/acme", "rps", "rate"), 5);
    assert_eq!(limit_metric(&host, "/acme", "rps", "ceil"), 8);
    assert_eq!(limit_metric(&host, "/acme", "rps", "burst"), 6);
    assert_eq!(limit_metric(&host, "/acme", "rps", "window_seconds"), 1);
    assert_eq!(metric(&host, names::SHARED_DATA_KEYS), 13);
}

/// Lease refills are counted per process, on the tick.
#[test]
fn lease_refills_are_counted() {
    let (host, mut vm) = gate(&Tree::standard());
    assert_eq!(metric(&host, names::LEASE_REFILLS), 0);
    // A root limit with a burst of 100000 is leased (batches up to 64).
    let tree = Tree::empty()
        .settings(r#"{ "principal_tenant": { "header": "x-user-tenant" } }"#)
        .tenant(
            "/",
            r#"{ "limits": { "rps": { "rate": 100000, "burst": 100000 } } }"#,
        )
        .policy("/", "p.cedar", "permit (principal, action, resource);");
    assert!(vm.reload(tree.bundle()).unwrap(), "{}", dump_logs(&host));
    for _ in 0..10 {
        expect_continue(&get(&mut vm, "/", "u", "/", "/x"));
    }
    vm.tick().unwrap();
    // Batches of 1, then 2, then 4 (each doubles when used up before it
    // expires; the clock stands still): request 1 charges 1 + 1, request 3
    // charges 1 + 2, request 6 charges 1 + 4, which last to request 10.
    assert_eq!(metric(&host, names::LEASE_REFILLS), 3);
}
