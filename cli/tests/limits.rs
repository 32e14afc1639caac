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
