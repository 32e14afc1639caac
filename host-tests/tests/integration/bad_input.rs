//! Bad input (docs/reference.md, "Request mapping" and "Responses"): a clear 4xx, a counter
//! incremented, never a trap.

use crate::support::*;

#[track_caller]
fn expect_400(resp: &tenantgate_host_tests::Response, what: &str) -> serde_json::Value {
    assert_eq!(
        resp.status,
        400,
        "{what}: got {} {}",
        resp.status,
        resp.body_str()
    );
    let body = expect_reply(resp, 400);
    assert_eq!(body["error"], "bad_request", "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: the body does not say what was wrong: {body}"
    );
    body
}

#[test]
fn a_missing_tenant_is_400() {
    let (host, mut vm) = gate(&Tree::standard());
    let resp = vm
        .request()
        .header("x-user", "alice")
        .path("/orders")
        .send()
        .unwrap();
    let body = expect_400(&resp, "no x-tenant");
    assert!(
        body["message"].as_str().unwrap().contains("x-tenant"),
        "{body}"
    );
    // An empty value is missing too.
    expect_400(
        &vm.request().header("x-tenant", "").send().unwrap(),
        "empty x-tenant",
    );
    assert_eq!(metric(&host, names::BAD_REQUEST), 2);
}

#[test]
fn a_default_tenant_replaces_a_missing_one() {
    let (_host, mut vm) = gate(&Tree::standard_with(
        r#"{ "default_tenant": "/acme/eu", "principal_tenant": { "header": "x-user-tenant" } }"#,
    ));
    let resp = vm
        .request()
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .path("/orders")
        .send()
        .unwrap();
    expect_continue(&resp);
    assert_eq!(
        resp.upstream_header("x-tenantgate-tenant").as_deref(),
        Some("/acme/eu")
    );
}

#[test]
fn malformed_tenants_are_400() {
    let (host, mut vm) = gate(&Tree::standard());
    let long = format!("/{}", "a/".repeat(300));
    let cases = [
        "acme",
        "/ACME",
        "//acme",
        "/acme/../globex",
        "/acme/./eu",
        "/ac me",
        "/-acme",
        "/acme%2Feu",
        "/\u{0430}cme",
        long.as_str(),
    ];
    for t in cases {
        let resp = vm
            .request()
            .header("x-tenant", t)
            .header("x-user", "alice")
            .header("x-user-tenant", "/acme")
            .send()
            .unwrap();
        expect_400(&resp, &format!("tenant `{t}`"));
        assert!(
            !resp.request_headers.contains("x-tenantgate-tenant"),
            "tenant `{t}`"
        );
    }
    assert_eq!(metric(&host, names::BAD_REQUEST), cases.len() as u64);
    // One trailing slash is accepted (the engine documents it) and normalized.
    let resp = get(&mut vm, "/acme/", "alice", "/acme", "/orders");
    expect_continue(&resp);
    assert_eq!(
        resp.upstream_header("x-tenantgate-tenant").as_deref(),
        Some("/acme")
    );
}

#[test]
fn encoded_slashes_and_climbing_paths_are_400() {
    let (_host, mut vm) = gate(&Tree::standard());
    for path in [
        "/orders%2F1",
        "/orders%2f1",
        "/../etc/passwd",
        "/orders/../../etc",
        "/%2e%2e/admin",
    ] {
        let resp = get(&mut vm, "/acme", "alice", "/acme", path);
        expect_400(&resp, &format!("path `{path}`"));
    }
    // Normalization happens before the policy: these reach /admin and are forbidden.
    for path in ["/orders/../admin", "//admin", "/%61dmin", "/./admin/./x"] {
        let resp = get(&mut vm, "/acme", "alice", "/acme", path);
        assert_eq!(resp.status, 403, "path `{path}`: {}", resp.body_str());
    }
}

#[test]
fn hostile_header_values_get_a_4xx_never_a_trap() {
    let (host, mut vm) = gate(&Tree::standard());
    let big = "a".repeat(50 * 1024);
    let send = |vm: &mut tenantgate_host_tests::Vm, name: &str, value: &[u8]| {
        vm.request()
            .header("x-tenant", "/acme")
            .header("x-user-tenant", "/acme")
            .header_bytes(name, value)
            .path("/orders")
            .send()
            .unwrap()
    };
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("non-UTF-8 principal", "x-user", b"al\xffice".to_vec()),
        ("non-UTF-8 tenant", "x-tenant", b"/ac\xc3me".to_vec()),
        (
            "control character in the principal",
            "x-user",
            b"ali\x01ce".to_vec(),
        ),
        (
            "newline in the principal",
            "x-user",
            b"alice\nroot".to_vec(),
        ),
        ("50 KB principal", "x-user", big.as_bytes().to_vec()),
        ("50 KB tenant", "x-tenant", format!("/{big}").into_bytes()),
        ("a second tenant header", "x-tenant", b"/globex".to_vec()),
    ];
    for (what, name, value) in &cases {
        let resp = send(&mut vm, name, value);
        assert!(
            (400..500).contains(&resp.status),
            "{what}: got {} {}",
            resp.status,
            resp.body_str()
        );
        assert!(
            !resp.request_headers.contains("x-tenantgate-principal"),
            "{what}"
        );
    }
    // A quote or a backslash is data, not syntax: a valid principal.
    let resp = send(&mut vm, "x-user", br#"x"y\z"#);
    expect_continue(&resp);
    assert_eq!(
        resp.upstream_header("x-tenantgate-principal").as_deref(),
        Some(r#"x"y\z"#)
    );
    // The VM still serves.
    expect_continue(&get(&mut vm, "/acme", "alice", "/acme", "/orders"));
    assert_eq!(host.traps(), 0);
}

#[test]
fn a_bad_method_is_400() {
    let (_host, mut vm) = gate(&Tree::standard());
    let resp = vm
        .request()
        .method("get")
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .send()
        .unwrap();
    expect_400(&resp, "lowercase method");
}

#[test]
fn odd_bytes_in_the_path_the_request_id_and_claims_never_trap() {
    let tree = Tree::standard_with(
        r#"{ "principal_tenant": { "header": "x-user-tenant" }, "audit": "all",
             "context_headers": ["x-api-key"] }"#,
    );
    let (host, mut vm) = gate(&tree);
    // A path that is not UTF-8, and one longer than the engine accepts.
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header_bytes(":path", b"/orders/\xff")
        .send()
        .unwrap();
    assert_eq!(resp.status, 400, "{}", resp.body_str());
    let long = "/a".repeat(6000);
    assert_eq!(get(&mut vm, "/acme", "alice", "/acme", &long).status, 400);
    // A request id with quotes, a backslash and a newline: the reply and the
    // audit line stay valid JSON.
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .id("r\"1\\\n<x>")
        .path("/admin")
        .send()
        .unwrap();
    let body = expect_reply(&resp, 403);
    assert!(body["request_id"].is_string());
    assert!(audit_lines(&host).last().unwrap()["request_id"].is_string());
    // A context header with odd bytes.
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .header("x-user-tenant", "/acme")
        .header_bytes("x-api-key", b"k\xfe\x00y")
        .path("/orders")
        .send()
        .unwrap();
    let body = expect_reply(&resp, 400);
    assert_eq!(body["message"], "header `x-api-key` is not valid UTF-8");
    assert_eq!(host.traps(), 0);
}

#[test]
fn claims_that_are_not_strings_are_refused_not_trusted() {
    const JWT: &str = "envoy.filters.http.jwt_authn";
    let (host, mut vm) = gate(&Tree::standard_with(&format!(
        r#"{{ "tenant": {{ "metadata": ["{JWT}", "payload", "tenant"] }},
              "principal": {{ "metadata": ["{JWT}", "payload", "sub"] }} }}"#
    )));
    for claim in [
        serde_json::json!(42),
        serde_json::json!(true),
        serde_json::json!({ "path": "/acme" }),
        serde_json::json!(["/acme"]),
        serde_json::json!(null),
    ] {
        let resp = vm
            .request()
            .metadata(
                &[JWT, "payload"],
                serde_json::json!({ "tenant": claim.clone(), "sub": "alice" }),
            )
            .send()
            .unwrap();
        assert_eq!(
            resp.status,
            400,
            "tenant claim {claim}: {}",
            resp.body_str()
        );
    }
    assert_eq!(host.traps(), 0);
}

/// The request id in a reply and an audit line must be the client's
/// `x-request-id` verbatim (it is what correlates them with the access log).
#[test]
fn request_ids_are_carried_verbatim() {
    let (host, mut vm) = gate(&Tree::standard());
    for rid in ["r\"1\\\n<x>", &"a".repeat(120)] {
        let resp = vm
            .request()
            .header("x-tenant", "/acme")
            .header("x-user", "alice")
            .header("x-user-tenant", "/acme")
            .id(rid)
            .path("/admin")
            .send()
            .unwrap();
        assert_eq!(expect_reply(&resp, 403)["request_id"], rid);
        assert_eq!(audit_lines(&host).last().unwrap()["request_id"], rid);
    }
}
