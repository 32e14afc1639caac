//! Where the tenant and the principal come from (docs/reference.md, "Sources"
//! and "Request mapping").

use serde_json::json;

use crate::support::*;

const JWT: &str = "envoy.filters.http.jwt_authn";

#[test]
fn the_tenant_can_come_from_a_path_prefix() {
    let (host, mut vm) = gate(&Tree::standard_with(
        r#"{ "tenant": { "path_prefix": "/t" }, "principal_tenant": { "header": "x-user-tenant" } }"#,
    ));
    let send = |vm: &mut tenantgate_host_tests::Vm, path: &str| {
        vm.request()
            .header("x-user", "alice")
            .header("x-user-tenant", "/acme")
            .header("x-tenant", "/globex")
            .path(path)
            .send()
            .unwrap()
    };
    // The longest prefix naming a tenant; the header is not a source here.
    let resp = send(&mut vm, "/t/acme/eu/orders/1?x=1");
    expect_continue(&resp);
    assert_eq!(
        resp.upstream_header("x-tenantgate-tenant").as_deref(),
        Some("/acme/eu")
    );
    // The rest of the path is the resource: /t/acme/admin is /admin in /acme.
    assert_eq!(send(&mut vm, "/t/acme/admin").status, 403);
    // Tricks on the path are judged after normalization.
    assert_eq!(send(&mut vm, "/t/acme/eu/../admin").status, 403);
    assert_eq!(
        send(&mut vm, "/t/acme/../globex/x").status,
        403,
        "climbing into /globex"
    );
    assert_eq!(send(&mut vm, "/t/nope/orders").status, 400);
    assert_eq!(send(&mut vm, "/t/acme%2feu/x").status, 400);
    assert_eq!(send(&mut vm, "/orders").status, 400, "outside the prefix");
    assert_eq!(host.traps(), 0);
}

#[test]
fn tenant_and_principal_can_come_from_jwt_claims_in_dynamic_metadata() {
    let (_host, mut vm) = gate(&Tree::standard_with(&format!(
        r#"{{ "tenant": {{ "metadata": ["{JWT}", "payload", "tenant"] }},
              "principal": {{ "metadata": ["{JWT}", "payload", "sub"] }},
              "principal_tenant": {{ "metadata": ["{JWT}", "payload", "home"] }} }}"#
    )));
    let resp = vm
        .request()
        .metadata(
            &[JWT, "payload"],
            json!({ "tenant": "/acme/eu", "sub": "alice", "home": "/acme" }),
        )
        // Headers are not a source: a client cannot pick its tenant or identity.
        .header("x-tenant", "/globex")
        .header("x-user", "root")
        .path("/orders")
        .send()
        .unwrap();
    expect_continue(&resp);
    assert_eq!(
        resp.upstream_header("x-tenantgate-tenant").as_deref(),
        Some("/acme/eu")
    );
    assert_eq!(
        resp.upstream_header("x-tenantgate-principal").as_deref(),
        Some("alice")
    );

    // A claim for another home tenant is held to its own subtree.
    let resp = vm
        .request()
        .metadata(
            &[JWT, "payload"],
            json!({ "tenant": "/acme", "sub": "gus", "home": "/globex" }),
        )
        .path("/orders")
        .send()
        .unwrap();
    expect_reply(&resp, 403);

    // No claim, no tenant: 400, whatever the headers say.
    let resp = vm
        .request()
        .header("x-tenant", "/acme")
        .header("x-user", "alice")
        .send()
        .unwrap();
    expect_reply(&resp, 400);
}

#[test]
fn a_principal_cannot_reach_another_tenant() {
    let (_host, mut vm) = gate(&Tree::standard());
    // Sideways and upwards are denied; downwards is inside the home subtree.
    expect_reply(&get(&mut vm, "/globex", "alice", "/acme", "/orders"), 403);
    expect_reply(&get(&mut vm, "/", "alice", "/acme", "/orders"), 403);
    expect_reply(&get(&mut vm, "/acme", "eve", "/acme/eu", "/orders"), 403);
    expect_continue(&get(&mut vm, "/acme/eu", "alice", "/acme", "/orders"));
    // The home tenant defaults to the request tenant when not given.
    let resp = vm
        .request()
        .header("x-tenant", "/globex/a")
        .header("x-user", "gus")
        .path("/x")
        .send()
        .unwrap();
    expect_continue(&resp);
}
