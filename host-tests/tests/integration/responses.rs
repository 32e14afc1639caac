//! The responses and the identity headers (docs/reference.md, "Responses" and
//! "Headers").

use crate::support::*;

#[test]
fn an_allowed_request_goes_upstream_with_the_identity_headers() {
    let (_host, mut vm) = gate(&Tree::standard());
    let resp = get(&mut vm, "/acme/eu", "alice", "/acme", "/orders/1");
    expect_continue(&resp);
    assert_eq!(
        resp.request_headers.get_all("x-tenantgate-tenant"),
        vec!["/acme/eu"]
    );
    assert_eq!(
        resp.request_headers.get_all("x-tenantgate-principal"),
        vec!["alice"]
    );
    // The rest of the request is untouched.
    assert_eq!(resp.upstream_header(":path").as_deref(), Some("/orders/1"));
    assert_eq!(
        resp.upstream_header("x-tenant").as_deref(),
        Some("/acme/eu")
    );
}

#[test]
fn client_sent_tenantgate_headers_are_stripped() {
    let (_host, mut vm) = gate(&Tree::standard());
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .header("x-tenantgate-tenant", "/globex")
        .header("X-TenantGate-Principal", "root")
        .header("x-tenantgate-admin", "true")
        .header("x-tenantgate-tenant", "/")
        .path("/orders")
        .send()
        .unwrap();
    expect_continue(&resp);
    assert_eq!(
        resp.request_headers.get_all("x-tenantgate-tenant"),
        vec!["/acme"]
    );
    assert_eq!(
        resp.request_headers.get_all("x-tenantgate-principal"),
        vec!["alice"]
    );
    assert!(!resp.request_headers.contains("x-tenantgate-admin"));

    // Denied requests are stripped too (nothing forged reaches a log or upstream).
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .header("x-tenantgate-tenant", "/globex")
        .path("/admin")
        .send()
        .unwrap();
    expect_reply(&resp, 403);
    assert!(!resp.request_headers.contains("x-tenantgate-tenant"));
}

#[test]
fn a_policy_deny_is_403_with_a_json_body() {
    let (_host, mut vm) = gate(&Tree::standard());
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .id("rid-403")
        .path("/admin/keys")
        .send()
        .unwrap();
    let body = expect_reply(&resp, 403);
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["tenant"], "/acme");
    assert_eq!(body["request_id"], "rid-403");
    // The bundle sets `expose_reasons`.
    assert_eq!(body["reasons"], serde_json::json!(["no-admin"]));
    // gRPC clients get PERMISSION_DENIED.
    assert_eq!(resp.local.as_ref().unwrap().grpc_status, 7);
    // Default deny: no permit (alice's home is /acme, the request is for /globex).
    let body = expect_reply(&get(&mut vm, "/globex", "alice", "/acme", "/x"), 403);
    assert_eq!(body["tenant"], "/globex");
}

#[test]
fn policy_ids_stay_hidden_unless_exposed() {
    let (_host, mut vm) = gate(&Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" } }"#,
    ));
    let body = expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/admin"), 403);
    assert_eq!(body["error"], "forbidden");
    assert!(body.get("reasons").is_none(), "{body}");
    assert!(!body.to_string().contains("no-admin"));
}

#[test]
fn a_quota_deny_is_429_with_retry_after_and_ratelimit_fields() {
    let (host, mut vm) = gate(&Tree::standard());
    for i in 0..10 {
        let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
        assert!(
            resp.is_continue(),
            "request {i}: {} {}",
            resp.status,
            resp.body_str()
        );
    }
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .id("rid-429")
        .path("/orders")
        .send()
        .unwrap();
    let body = expect_reply(&resp, 429);
    assert_eq!(body["error"], "quota_exceeded");
    assert_eq!(body["tenant"], "/acme");
    assert_eq!(body["limit"], "rps");
    assert_eq!(body["request_id"], "rid-429");
    let retry: u64 = resp.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(body["retry_after_s"], retry);
    let policy = resp.header("ratelimit-policy").unwrap();
    assert!(
        policy.contains(r#""rps";q=10;w=1"#),
        "RateLimit-Policy: {policy}"
    );
    let rl = resp.header("ratelimit").unwrap();
    assert!(rl.starts_with(r#""rps";r=0;t="#), "RateLimit: {rl}");
    assert_eq!(metric(&host, names::DENIED_QUOTA), 1);

    // Retry-After is honest: after that long the request goes through.
    host.clock().advance(std::time::Duration::from_secs(retry));
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
}

#[test]
fn ratelimit_fields_on_allowed_responses_when_asked() {
    let (_host, mut vm) = gate(&Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" }, "ratelimit_headers_on_allow": true }"#,
    ));
    let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
    expect_continue(&resp);
    assert!(resp
        .header("ratelimit-policy")
        .unwrap()
        .contains(r#""rps";q=10;w=1"#));
    let rl = resp.header("ratelimit").unwrap();
    assert!(rl.contains(r#""rps";r=9;"#), "RateLimit: {rl}");

    // Not asked: no fields.
    let (_host, mut vm) = gate(&Tree::standard());
    let resp = get(&mut vm, "/acme", "alice", "/acme", "/orders");
    expect_continue(&resp);
    assert!(resp.header("ratelimit").is_none());
}

#[test]
fn method_costs_come_from_the_bundle() {
    // POST costs 2 in the standard settings: 5 POSTs use /acme's 10 tokens.
    let (_host, mut vm) = gate(&Tree::standard());
    let post = |vm: &mut tenantgate_host_tests::Vm| {
        vm.request()
            .method("POST")
            .header("x-tenant", "/acme")
            .header("x-user", "alice")
            .header("x-user-tenant", "/acme")
            .path("/orders")
            .send()
            .unwrap()
    };
    for _ in 0..5 {
        expect_continue(&post(&mut vm));
    }
    expect_reply(&post(&mut vm), 429);
    expect_reply(&get(&mut vm, "/acme", "alice", "/acme", "/orders"), 429);
}
