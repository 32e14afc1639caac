//! The `tenantgate` binary on the example tree and on broken copies of it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

use std::path::Path;

/// Validates a broken tree: exit 1 and an error line that starts with `want`
/// (path relative to the tree, then `:line:column:`).
fn assert_error(dir: &Path, want: &str, message: &str) {
    let r = tenantgate(&["validate", dir.to_str().unwrap()]);
    assert_eq!(r.code, 1, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    let prefix = format!("{}/{want}", dir.display());
    assert!(
        r.stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(message)),
        "no line starting with `{prefix}` and containing `{message}` in:\n{}",
        r.stderr
    );
}

#[test]
fn example_tree_validates() {
    let r = tenantgate(&["validate", "policies"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("ok:") && r.stdout.contains("version sha256:"),
        "{}",
        r.stdout
    );
}

#[test]
fn example_tests_pass_and_there_are_at_least_30() {
    let r = tenantgate(&["test", "policies"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let last = r.stdout.lines().last().unwrap();
    let (passed, failed) = last.split_once(" passed, ").unwrap();
    assert!(passed.parse::<u32>().unwrap() >= 30, "{last}");
    assert_eq!(failed, "0 failed");
}

#[test]
fn a_failing_policy_test_exits_1() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tests/zz-wrong.json"),
        r#"{"tests": [{"name": "wrong on purpose", "request": {"tenant": "/nope", "method": "GET", "path": "/"}, "expect": {"decision": "allow"}}]}"#,
    )
    .unwrap();
    let r = tenantgate(&["test", dir.path().to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains(&format!(
            "FAIL {}/tests/zz-wrong.json: wrong on purpose",
            dir.path().display()
        )),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(" 1 failed"), "{}", r.stdout);
}

#[test]
fn cedar_syntax_error_is_located() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/acme/bad.cedar"),
        "// comment\npermit(principal, action, resource)\n  when { principal == };\n",
    )
    .unwrap();
    assert_error(dir.path(), "tenants/acme/bad.cedar:3:", "unexpected token");
}

#[test]
fn reusing_a_non_overridable_id_is_an_error() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/acme/eu/reuse.cedar"),
        "\n\n@id(\"platform-isolation\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/acme/eu/reuse.cedar:3:1:",
        "not `@overridable`",
    );
}

#[test]
fn tenant_json_that_is_not_json_is_located() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/globex/tenant.json"),
        "{\n  \"attributes\": {\n    \"tier\": silver\n  }\n}\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/globex/tenant.json:3:",
        "expected value",
    );
}

#[test]
fn tenant_json_with_unknown_keys_is_located() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/globex/tenant.json"),
        "{\n  \"atributes\": {}\n}\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/globex/tenant.json:2:",
        "unknown field `atributes`",
    );
}

#[test]
fn bad_tenant_folder_names_are_refused() {
    for name in ["Acme2", "has space", "-dash"] {
        let dir = copy_tree();
        std::fs::create_dir_all(dir.path().join("tenants").join(name)).unwrap();
        assert_error(
            dir.path(),
            &format!("tenants/{name}"),
            "not a valid tenant segment",
        );
    }
}

#[test]
fn schema_violation_is_located() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/public/typo.cedar"),
        "@id(\"typo\")\npermit(principal, action, resource)\n  when { resource.tenant.teir == \"gold\" };\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/public/typo.cedar:3:",
        "schema: attribute `teir`",
    );
}

#[test]
fn bundle_round_trips_and_a_tampered_bundle_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("bundle.json");
    let r = tenantgate(&["bundle", "policies", "-o", bundle.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = tenantgate(&["validate", bundle.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let from_dir = tenantgate(&["validate", "policies"]);
    let version = |s: &str| s.split("version ").nth(1).unwrap().trim().to_string();
    assert_eq!(version(&v.stdout), version(&from_dir.stdout));

    let text = std::fs::read_to_string(&bundle).unwrap();
    let tampered = text.replacen("permit", "forbid", 1);
    assert_ne!(text, tampered);
    std::fs::write(&bundle, tampered).unwrap();
    let t = tenantgate(&["validate", bundle.to_str().unwrap()]);
    assert_eq!(t.code, 1);
    assert!(
        t.stderr.contains("does not match its content"),
        "{}",
        t.stderr
    );
}

#[test]
fn check_prints_one_decision_object() {
    let r = tenantgate(&[
        "check",
        "policies",
        "--tenant",
        "/globex",
        "--method",
        "GET",
        "--path",
        "/catalog/1",
        "--principal",
        "bob",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["status"], 200);
    assert!(
        v["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "globex-read"),
        "{v}"
    );
}

#[test]
fn check_on_an_unknown_tenant_denies_with_a_reason() {
    let r = tenantgate(&[
        "check",
        "policies",
        "--tenant",
        "/nope",
        "--method",
        "GET",
        "--path",
        "/",
        "--principal",
        "x",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .contains("unknown tenant `/nope`"),
        "{v}"
    );
}

#[test]
fn check_refuses_bad_tenants_and_paths_with_400() {
    for (tenant, path) in [
        ("/Acme", "/"),
        ("acme", "/"),
        ("/acme", "/a%2Fb"),
        ("/acme", "/../x"),
    ] {
        let r = tenantgate(&[
            "check", "policies", "--tenant", tenant, "--method", "GET", "--path", path,
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["status"], 400, "{tenant} {path}: {v}");
    }
}

#[test]
fn a_limit_declared_twice_is_located_at_the_second() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/globex/labs/tenant.json"),
        "{\n  \"limits\": {\n    \"rps\": { \"rate\": 5 },\n    \"rps\": { \"rate\": 50 }\n  }\n}\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/globex/labs/tenant.json:4:5:",
        "key `rps` appears twice in `limits`",
    );
}

#[test]
fn tenantgate_json_checks_are_located() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenantgate.json"),
        "{\n  \"tenant\": { \"header\": \"X Tenant\" },\n  \"costs\": { \"POST\": 2, \"post\": 1,\n             \"POST\": 3 }\n}\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenantgate.json:2:15:",
        "`tenant.header`: `X Tenant`",
    );
    assert_error(
        dir.path(),
        "tenantgate.json:3:25:",
        "`costs.post`: `post` is not a method",
    );
    assert_error(
        dir.path(),
        "tenantgate.json:4:14:",
        "key `POST` appears twice in `costs`",
    );
}

#[test]
fn a_template_is_located_at_its_slot() {
    let dir = copy_tree();
    std::fs::write(
        dir.path().join("tenants/globex/tmpl.cedar"),
        "// a template\n@id(\"t\")\npermit(principal == ?principal, action, resource);\n",
    )
    .unwrap();
    assert_error(
        dir.path(),
        "tenants/globex/tmpl.cedar:3:21:",
        "templates (policies with `?principal` or `?resource` slots) are not supported",
    );
}

#[test]
fn simulate_counts_keyed_limits_per_flow() {
    let run = tenantgate(&[
        "simulate",
        "policies",
        "--traffic",
        "policies/traffic-keys.json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "tenants": {
                "/globex": { "admitted": 6088, "denied": 272, "denied_by": { "per_key": 272 } }
            },
            "flows": [
                { "tenant": "/globex", "admitted": 8, "denied": 232, "denied_by": { "per_key": 232 } },
                { "tenant": "/globex", "keys": 10, "admitted": 80, "denied": 40, "denied_by": { "per_key": 40 } },
                { "tenant": "/globex", "admitted": 6000, "denied": 0, "denied_by": {} }
            ]
        })
    );
}

#[test]
fn simulate_refuses_keys_where_no_keyed_limit_applies() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"duration_s": 10, "flows": [{"tenant": "/acme/eu", "rps": 5, "keys": 3}]}"#,
    )
    .unwrap();
    let run = tenantgate(&["simulate", "policies", "--traffic", plan.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(
            "error: traffic plan: flow 1: `keys` spreads the flow over key values, but no keyed limit applies to `/acme/eu`"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn serve_xds_refuses_to_start_on_a_tree_whose_policy_tests_fail() {
    let tree = copy_tree();
    let members = tree.path().join("tenants/globex/members.cedar");
    let text = std::fs::read_to_string(&members).unwrap();
    std::fs::write(
        &members,
        text.replacen(
            "@id(\"globex-read\")\npermit",
            "@id(\"globex-read\")\nforbid",
            1,
        ),
    )
    .unwrap();
    let dir = tree.path().to_str().unwrap();
    // The tree loads (`validate` accepts it); the control plane also runs its tests.
    assert_eq!(tenantgate(&["validate", dir]).code, 0);
    let r = tenantgate(&[
        "serve",
        dir,
        "--http",
        "127.0.0.1:0",
        "--xds",
        "127.0.0.1:0",
        "--wasm",
        "dist/tenantgate.wasm",
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    // The tree's notes first (as for every load), then the failing test.
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("tenantgate serve: {dir}/tenantgate.json: note: fleet limits are not enforced by the filter without `rate_limit_service`: `rpm` on `/acme`, `rpm` on `/acme/eu` (docs/fleet.md)").as_str())
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(format!(
            "tenantgate serve: {dir}/tests/defaults.json: error: policy test failed: two permits: gus GET /healthz in /globex: decision: want allow, got deny; status: want 200, got 403; reasons: want {{\"globex-read\", \"platform-healthz\"}}, got {{\"globex-read\"}}"
        ).as_str())
    );
    assert!(
        r.stderr.trim_end().ends_with("policy tests failed"),
        "{}",
        r.stderr
    );
    let r = tenantgate(&[
        "serve",
        dir,
        "--http",
        "127.0.0.1:0",
        "--xds",
        "127.0.0.1:0",
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("--wasm <PATH>"), "{}", r.stderr);
}
