//! `tenantgate limits`: the example tree's fleet limits rendered for
//! Limitador and envoyproxy/ratelimit, exactly, and the limits a format
//! cannot express.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

const LIMITADOR: &str = r#"---
- namespace: "tenantgate"
  name: "/acme rpm"
  max_value: 6000
  seconds: 60
  conditions:
    - "descriptors.exists(d, d.tenant == '/acme' && d.limit == 'rpm')"
  variables: []
- namespace: "tenantgate"
  name: "/acme/eu rpm"
  max_value: 2400
  seconds: 60
  conditions:
    - "descriptors.exists(d, d.tenant == '/acme/eu' && d.limit == 'rpm')"
  variables: []
"#;

const RATELIMIT: &str = r#"domain: "tenantgate"
descriptors:
  - key: tenant
    value: "/acme"
    descriptors:
      - key: limit
        value: "rpm"
        rate_limit:
          unit: minute
          requests_per_unit: 6000
  - key: tenant
    value: "/acme/eu"
    descriptors:
      - key: limit
        value: "rpm"
        rate_limit:
          unit: minute
          requests_per_unit: 2400
"#;

#[test]
fn renders_the_example_tree_for_limitador() {
    let r = tenantgate(&["limits", "policies", "--format", "limitador"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(r.stdout, LIMITADOR);
}

#[test]
fn renders_the_example_tree_for_envoyproxy_ratelimit() {
    let r = tenantgate(&["limits", "policies", "--format", "ratelimit"]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(r.stdout, RATELIMIT);
}

#[test]
fn reads_a_bundle_and_takes_a_domain() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.json");
    let b = tenantgate(&["bundle", "policies", "-o", bundle.to_str().unwrap()]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let r = tenantgate(&[
        "limits",
        bundle.to_str().unwrap(),
        "--format",
        "ratelimit",
        "--domain",
        "edge",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        RATELIMIT.replace("domain: \"tenantgate\"", "domain: \"edge\"")
    );
}

/// A tree with the given `tenant.json` of `/acme`.
fn tree(acme: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tenants/acme")).unwrap();
    std::fs::write(dir.path().join("tenants/acme/tenant.json"), acme).unwrap();
    dir
}

#[test]
fn envoyproxy_ratelimit_refuses_what_it_cannot_express() {
    let dir = tree(
        r#"{"limits": {
  "slow": {"rate": 3, "per": "90s", "scope": "fleet"},
  "huge": {"rate": 5000000000, "per": "1d", "scope": "fleet"},
  "fine": {"rate": 7, "per": "1h", "scope": "fleet"},
  "local": {"rate": 1, "per": "90s"}
}}"#,
    );
    let src = dir.path().to_str().unwrap();
    let r = tenantgate(&["limits", src, "--format", "ratelimit"]);
    assert_eq!((r.code, r.stdout.as_str()), (1, ""));
    assert_eq!(
        r.stderr,
        format!(
            "{src}: error: limit `huge` of `/acme`: its rate 5000000000 does not fit envoyproxy/ratelimit's 32-bit `requests_per_unit` (at most 4294967295)\n\
             {src}: error: limit `slow` of `/acme`: its window of 90 s is not one second, minute, hour or day, the only units of envoyproxy/ratelimit\n\
             2 errors\n"
        )
    );
    // Limitador counts any number of seconds and 64-bit values.
    let r = tenantgate(&["limits", src, "--format", "limitador"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "---\n\
- namespace: \"tenantgate\"\n  name: \"/acme fine\"\n  max_value: 7\n  seconds: 3600\n  conditions:\n    - \"descriptors.exists(d, d.tenant == '/acme' && d.limit == 'fine')\"\n  variables: []\n\
- namespace: \"tenantgate\"\n  name: \"/acme huge\"\n  max_value: 5000000000\n  seconds: 86400\n  conditions:\n    - \"descriptors.exists(d, d.tenant == '/acme' && d.limit == 'huge')\"\n  variables: []\n\
- namespace: \"tenantgate\"\n  name: \"/acme slow\"\n  max_value: 3\n  seconds: 90\n  conditions:\n    - \"descriptors.exists(d, d.tenant == '/acme' && d.limit == 'slow')\"\n  variables: []\n"
    );
}

#[test]
fn no_fleet_limits_render_empty_and_invalid_trees_fail() {
    let dir = tree(r#"{"limits": {"rps": {"rate": 5}}}"#);
    let src = dir.path().to_str().unwrap();
    let r = tenantgate(&["limits", src, "--format", "limitador"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "---\n[]\n"));
    let r = tenantgate(&["limits", src, "--format", "ratelimit"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "domain: \"tenantgate\"\ndescriptors: []\n")
    );
    let dir = tree(r#"{"limits": {"rpm": {"rate": 5, "ceil": 9, "scope": "fleet"}}}"#);
    let src = dir.path().to_str().unwrap();
    let r = tenantgate(&["limits", src, "--format", "limitador"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with(&format!(
            "{src}/tenants/acme/tenant.json:1:32: error: limit `rpm`: `ceil` is a local notion"
        )),
        "{}",
        r.stderr
    );
}

/// One `rate_limits` entry of `--format envoy`: `("tenant", tenant)` when the
/// header matchers `headers` match, then `("limit", limit)`.
fn entry(tenant: &str, limit: &str, headers: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "actions": [
        { "header_value_match": {
            "descriptor_key": "tenant", "descriptor_value": tenant,
            "expect_match": true, "headers": headers } },
        { "generic_key": { "descriptor_key": "limit", "descriptor_value": limit } }
    ] })
}

fn envoy_json(args: &[&str]) -> (serde_json::Value, String) {
    let mut all = vec!["limits"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "envoy"]);
    let r = tenantgate(&all);
    assert_eq!(r.code, 0, "{}", r.stderr);
    (serde_json::from_str(&r.stdout).unwrap(), r.stderr)
}

#[test]
fn renders_the_example_tree_for_plain_envoy() {
    let (doc, stderr) = envoy_json(&["policies"]);
    assert_eq!(stderr, "");
    let x = |v: &str| serde_json::json!([{ "name": "x-tenant", "string_match": { "exact": v } }]);
    let p = |v: &str| serde_json::json!([{ "name": "x-tenant", "string_match": { "prefix": v } }]);
    assert_eq!(
        doc,
        serde_json::json!({
            "http_filters": [{
                // `costs: {"POST": 2}`: a POST's call has `hits_addend` 2.
                "name": "tenantgate.costs",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                    "extension_config": {
                        "name": "composite",
                        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite" }
                    },
                    "xds_matcher": { "matcher_tree": {
                        "input": {
                            "name": "method",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                                "header_name": ":method"
                            }
                        },
                        "exact_match_map": { "map": { "POST": { "action": {
                            "name": "cost-2",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                                "typed_config": {
                                    "name": "envoy.filters.http.set_filter_state",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                                        "on_request_headers": [{
                                            "object_key": "envoy.ratelimit.hits_addend",
                                            "format_string": { "text_format_source": { "inline_string": "2" } }
                                        }]
                                    }
                                }
                            }
                        } } } }
                    } }
                }
            }, {
                "name": "envoy.filters.http.ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                    "domain": "tenantgate",
                    "timeout": "0.050s",
                    "failure_mode_deny": false,
                    "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
                    "rate_limit_service": {
                        "transport_api_version": "V3",
                        "grpc_service": { "envoy_grpc": { "cluster_name": "tenantgate_rls" } }
                    }
                }
            }],
            // Deepest first: `/acme/eu` itself or below it, then `/acme`.
            "rate_limits": [
                entry("/acme/eu", "rpm", x("/acme/eu")),
                entry("/acme/eu", "rpm", p("/acme/eu/")),
                entry("/acme", "rpm", x("/acme")),
                entry("/acme", "rpm", p("/acme/")),
            ],
            "clusters": [{
                "name": "tenantgate_rls",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "tenantgate_rls",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": "127.0.0.1", "port_value": 8081 }
                    } } }] }]
                },
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} }
                    }
                }
            }]
        })
    );
}

/// A tree with `tenantgate.json` and a fleet limit on `/` and on `/acme`.
fn tree_with(settings: &str) -> tempfile::TempDir {
    let dir = tree(r#"{"limits": {"rpm": {"rate": 10, "scope": "fleet"}}}"#);
    std::fs::write(
        dir.path().join("tenants/tenant.json"),
        r#"{"limits": {"rpm": {"rate": 100, "per": "1m", "scope": "fleet"}}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("tenantgate.json"), settings).unwrap();
    dir
}

#[test]
fn plain_envoy_takes_the_bundles_service_settings() {
    let dir = tree_with(
        r#"{"rate_limit_service": {"cluster": "rls", "domain": "edge", "timeout_ms": 1250, "on_error": "deny"}}"#,
    );
    let src = dir.path().to_str().unwrap();
    let (doc, stderr) = envoy_json(&[src, "--rls", "rls.internal:9000"]);
    assert_eq!(stderr, "");
    assert_eq!(
        doc["http_filters"].as_array().unwrap().len(),
        1,
        "no costs, no cost filter"
    );
    let f = &doc["http_filters"][0]["typed_config"];
    assert_eq!(
        (&f["domain"], &f["timeout"], &f["failure_mode_deny"]),
        (&"edge".into(), &"1.250s".into(), &true.into())
    );
    assert_eq!(
        f["status_on_error"],
        serde_json::json!({ "code": "ServiceUnavailable" })
    );
    assert_eq!(
        f["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"],
        "rls"
    );
    let c = &doc["clusters"][0];
    assert_eq!(
        (&c["name"], &c["type"]),
        (&"rls".into(), &"STRICT_DNS".into())
    );
    // The other formats take the bundle's domain too; `--domain` overrides it.
    let r = tenantgate(&["limits", src, "--format", "ratelimit"]);
    assert!(r.stdout.starts_with("domain: \"edge\"\n"), "{}", r.stdout);
    let (doc, _) = envoy_json(&[src, "--domain", "other"]);
    assert_eq!(doc["http_filters"][0]["typed_config"]["domain"], "other");
}

#[test]
fn plain_envoy_matches_the_default_tenant_and_path_prefixes() {
    let m = |name: &str, how: &str, v: &str| serde_json::json!({ "name": name, "string_match": { how: v } });
    let not = |name: &str, how: &str, v: &str| serde_json::json!({ "name": name, "string_match": { how: v }, "invert_match": true });
    let absent =
        serde_json::json!({ "name": "x-tenant", "present_match": true, "invert_match": true });
    // A header, with a default tenant under `/acme`: a request naming no
    // tenant (no header, or an empty one) carries both limits.
    let dir = tree_with(r#"{"default_tenant": "/acme/eu"}"#);
    let (doc, _) = envoy_json(&[dir.path().to_str().unwrap()]);
    let h = |how: &str, v: &str| serde_json::json!([m("x-tenant", how, v)]);
    assert_eq!(
        doc["rate_limits"],
        serde_json::json!([
            entry("/acme", "rpm", h("exact", "/acme")),
            entry("/acme", "rpm", h("prefix", "/acme/")),
            entry("/acme", "rpm", serde_json::json!([absent])),
            entry("/acme", "rpm", h("exact", "")),
            entry("/", "rpm", h("prefix", "/")),
            entry("/", "rpm", serde_json::json!([absent])),
            entry("/", "rpm", h("exact", "")),
        ])
    );
    // A path prefix: `<prefix><tenant>` then the end, `/` or `?`; the
    // default tenant for paths outside the prefix.
    let dir = tree_with(r#"{"tenant": {"path_prefix": "/t/"}, "default_tenant": "/"}"#);
    let (doc, _) = envoy_json(&[dir.path().to_str().unwrap()]);
    let p = |how: &str, v: &str| serde_json::json!([m(":path", how, v)]);
    assert_eq!(
        doc["rate_limits"],
        serde_json::json!([
            entry("/acme", "rpm", p("exact", "/t/acme")),
            entry("/acme", "rpm", p("prefix", "/t/acme/")),
            entry("/acme", "rpm", p("prefix", "/t/acme?")),
            entry("/", "rpm", p("exact", "/t")),
            entry("/", "rpm", p("prefix", "/t/")),
            entry("/", "rpm", p("prefix", "/t?")),
            entry(
                "/",
                "rpm",
                serde_json::json!([
                    not(":path", "exact", "/t"),
                    not(":path", "prefix", "/t/"),
                    not(":path", "prefix", "/t?"),
                ])
            ),
        ])
    );
}

#[test]
fn plain_envoy_copies_a_metadata_tenant_into_a_header() {
    let dir = tree_with(
        r#"{"tenant": {"metadata": ["envoy.filters.http.jwt_authn", "payload", "tenant"]}}"#,
    );
    let src = dir.path().to_str().unwrap();
    let (doc, stderr) = envoy_json(&[src]);
    assert_eq!(stderr, "");
    let mutation = |name: &str, mutations: serde_json::Value| {
        serde_json::json!({ "name": name, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": { "request_mutations": mutations } } })
    };
    let filters = doc["http_filters"].as_array().unwrap();
    assert_eq!(filters.len(), 3);
    assert_eq!(
        filters[0],
        mutation(
            "tenantgate.tenant",
            serde_json::json!([
                { "remove": "x-tenantgate-ratelimit-tenant" },
                { "append": {
                    "header": {
                        "key": "x-tenantgate-ratelimit-tenant",
                        "value": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:tenant)%"
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
                } }
            ])
        )
    );
    assert_eq!(filters[1]["name"], "envoy.filters.http.ratelimit");
    assert_eq!(
        filters[2],
        mutation(
            "tenantgate.tenant.remove",
            serde_json::json!([{ "remove": "x-tenantgate-ratelimit-tenant" }])
        )
    );
    assert_eq!(
        doc["rate_limits"][0]["actions"][0]["header_value_match"]["headers"],
        serde_json::json!([{ "name": "x-tenantgate-ratelimit-tenant", "string_match": { "exact": "/acme" } }])
    );
    // A header the operator fills instead.
    let (doc, _) = envoy_json(&[src, "--tenant-header", "x-jwt-tenant"]);
    assert_eq!(doc["http_filters"].as_array().unwrap().len(), 1);
    assert_eq!(
        doc["rate_limits"][0]["actions"][0]["header_value_match"]["headers"],
        serde_json::json!([{ "name": "x-jwt-tenant", "string_match": { "exact": "/acme" } }])
    );
    let r = tenantgate(&[
        "limits",
        src,
        "--format",
        "envoy",
        "--tenant-header",
        "X Bad",
    ]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (
            1,
            format!("{src}: error: `--tenant-header X Bad` is not a lowercase header name\n")
                .as_str()
        )
    );
}

#[test]
fn plain_envoy_warns_that_a_cost_of_0_counts_1() {
    let dir = tree_with(r#"{"costs": {"GET": 0, "HEAD": 0, "POST": 1, "PUT": 3}}"#);
    let src = dir.path().to_str().unwrap();
    let (doc, stderr) = envoy_json(&[src]);
    assert_eq!(
        stderr,
        format!("{src}: warning: `costs` of 0 (GET, HEAD) count 1 in plain Envoy: the rate limit API reads a `hits_addend` of 0 as 1\n")
    );
    let map = &doc["http_filters"][0]["typed_config"]["xds_matcher"]["matcher_tree"]
        ["exact_match_map"]["map"];
    assert_eq!(
        map.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["PUT"]
    );
}
