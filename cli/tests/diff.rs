//! `tenantgate diff` on copies of the example tree.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

use std::path::{Path, PathBuf};

fn diff(old: &Path, new: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["diff", old.to_str().unwrap(), new.to_str().unwrap()];
    args.extend(extra);
    tenantgate(&args)
}

fn diff_json(old: &Path, new: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["--json"];
    args.extend(extra);
    let r = diff(old, new, &args);
    let v = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", r.stdout, r.stderr));
    (r.code, v)
}

/// A copy of `policies/`.
/// Replaces `from` by `to` in a file of the tree; the text must be there.
fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "`{from}` not in {file}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

fn bundle(dir: &Path, out: &Path) {
    let r = tenantgate(&["bundle", dir.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn policies() -> PathBuf {
    repo().join("policies")
}

/// The changes the issue asks about: a changed policy (Globex reads narrowed
/// to HEAD), an added tenant with a policy and a limit, a changed limit, and
/// a settings change.
fn changed_tree() -> tempfile::TempDir {
    let new = copy_tree();
    let p = new.path();
    edit(
        p,
        "tenants/globex/members.cedar",
        "action in Action::\"read\",",
        "action == Action::\"HEAD\",",
    );
    std::fs::create_dir_all(p.join("tenants/globex/beta")).unwrap();
    std::fs::write(
        p.join("tenants/globex/beta/tenant.json"),
        r#"{ "attributes": { "tier": "bronze" }, "limits": { "rps": { "rate": "10%" } } }"#,
    )
    .unwrap();
    std::fs::write(
        p.join("tenants/globex/beta/status.cedar"),
        "@id(\"beta-status\")\npermit (principal, action == Action::\"GET\", resource)\n  when { resource.path == \"/status\" };\n",
    )
    .unwrap();
    edit(
        p,
        "tenants/globex/labs/tenant.json",
        "\"rate\": 5,",
        "\"rate\": 4,",
    );
    edit(
        p,
        "tenantgate.json",
        "\"audit\": \"all\"",
        "\"audit\": \"deny\"",
    );
    new
}

#[test]
fn a_tree_against_itself_changes_nothing() {
    let r = diff(&policies(), &policies(), &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("same bundle version"), "{}", r.stdout);
    assert!(
        r.stdout.trim_end().ends_with("0 test decisions change"),
        "{}",
        r.stdout
    );
}

#[test]
fn text_names_the_changed_policy_the_new_tenant_the_limits_and_the_tests() {
    let new = changed_tree();
    let r = diff(&policies(), new.path(), &[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let out = &r.stdout;
    for want in [
        "~ audit: \"all\" -> \"deny\"",
        "tenants added: /globex/beta",
        "tenant /globex:",
        "~ policy `globex-read` (permit at tenants/globex/members.cedar:",
        "-   action in [Action::\"read\"],",
        "+   action == Action::\"HEAD\",",
        "tenant /globex/beta (added):",
        "+ policy `beta-status` (permit at tenants/globex/beta/status.cedar:1)",
        "+ attribute tier: \"bronze\"",
        "+ limit rps: {\"rate\":\"10%\"}",
        "tenant /globex/labs:",
        "~ limit rps: {\"rate\":5,",
        "/globex/labs rps: rate 5 ceil 5 burst 5 per 1s -> rate 4 ceil 4 burst 5 per 1s (starts from full buckets after the reload)",
        "/globex/beta rps: none -> rate 20 ceil 20 burst 20 per 1s",
        "gus (/globex) reads down into /globex/labs: allow 200 [globex-read] -> deny 403 (test expects allow: fails under new)",
        "tests/quotas.json: keyed limit: the fourth request of that key in the minute is refused, also below /globex: deny 429 -> deny 403 (test expects deny: fails under new)",
        "6 test decisions change",
    ] {
        assert!(out.contains(want), "no `{want}` in:\n{out}");
    }
    // Unchanged tenants are not listed.
    assert!(!out.contains("tenant /acme"), "{out}");
}

#[test]
fn json_is_one_object_with_the_same_findings() {
    let new = changed_tree();
    let (code, v) = diff_json(&policies(), new.path(), &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["same_version"], false);
    assert_eq!(v["settings"][0]["key"], "audit");
    assert_eq!(v["settings"][0]["new"], "deny");
    assert_eq!(v["tenants_added"], serde_json::json!(["/globex/beta"]));
    assert_eq!(v["tenants_removed"], serde_json::json!([]));
    let tenant = |path: &str| {
        v["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == path)
            .unwrap_or_else(|| panic!("no tenant {path} in {v}"))
            .clone()
    };
    let globex = tenant("/globex");
    assert_eq!(globex["status"], "changed");
    assert_eq!(globex["policies"]["changed"][0]["id"], "globex-read");
    assert!(globex["policies"]["changed"][0]["new"]["text"]
        .as_str()
        .unwrap()
        .contains("Action::\"HEAD\""));
    let beta = tenant("/globex/beta");
    assert_eq!(beta["status"], "added");
    assert_eq!(beta["policies"]["added"][0]["id"], "beta-status");
    assert_eq!(beta["limits"][0]["key"], "rps");
    let labs = tenant("/globex/labs");
    assert_eq!(labs["limits"][0]["old"]["rate"], 5);
    assert_eq!(labs["limits"][0]["new"]["rate"], 4);
    let labs_limit = v["effective_limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["tenant"] == "/globex/labs")
        .unwrap();
    assert_eq!(labs_limit["resets_state"], true);
    assert_eq!(v["decisions_changed"], 6);
    assert!(v["tests"]["run"].as_u64().unwrap() >= 30);
    let changed = v["tests"]["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 6, "{v}");
    // Four allows, and two quota refusals (429) that the new policy now
    // forbids first.
    let was_429 = changed.iter().filter(|c| c["old"]["status"] == 429).count();
    assert_eq!(was_429, 2, "{v}");
    for c in changed {
        assert!(
            c["old"]["decision"] == "allow" || c["old"]["status"] == 429,
            "{c}"
        );
        assert_eq!(c["new"]["decision"], "deny");
        assert_eq!(c["new"]["status"], 403);
        assert!(c["new_failure"].is_string());
    }
}

#[test]
fn comments_and_layout_change_nothing_and_exit_0() {
    // OLD has an unnamed policy (id `<file>:<line>`); NEW adds comments and
    // reflows it, which moves it to another line.
    let old = copy_tree();
    let policy = "permit (principal == User::\"root\", action == Action::\"GET\", resource)\n  when { resource.path == \"/status\" };\n";
    std::fs::write(old.path().join("tenants/ops/status.cedar"), policy).unwrap();
    let new = copy_tree();
    std::fs::write(
        new.path().join("tenants/ops/status.cedar"),
        format!(
            "// Status page for the platform's root user.\n\n{}",
            policy.replace(", ", ",\n  ")
        ),
    )
    .unwrap();
    edit(
        new.path(),
        "tenants/globex/members.cedar",
        "// Globex members may read anywhere in Globex.",
        "// Globex members may read anywhere in Globex,\n// including /globex/labs.",
    );
    let r = diff(old.path(), new.path(), &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(
            "= policy `tenants/ops/status.cedar:1` is now `tenants/ops/status.cedar:3` (tenants/ops/status.cedar:3), content unchanged"
        ),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("globex"), "{}", r.stdout);
    let (code, v) = diff_json(old.path(), new.path(), &[]);
    assert_eq!(code, 0);
    assert_eq!(v["decisions_changed"], 0);
    let ops = &v["tenants"][0];
    assert_eq!(ops["tenant"], "/ops");
    assert_eq!(ops["policies"]["added"], serde_json::json!([]));
    assert_eq!(ops["policies"]["removed"], serde_json::json!([]));
    assert_eq!(
        ops["policies"]["renamed"][0]["new_id"],
        "tenants/ops/status.cedar:3"
    );
}

#[test]
fn bundles_take_their_tests_from_the_folder_side_or_from_tests() {
    let out = tempfile::tempdir().unwrap();
    let (old_b, new_b) = (out.path().join("old.json"), out.path().join("new.json"));
    let new = changed_tree();
    bundle(&policies(), &old_b);
    bundle(new.path(), &new_b);

    // Two bundles: no folder, no tests, nothing to gate on.
    let r = diff(&old_b, &new_b, &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("no policy tests were run: neither OLD nor NEW is a policy folder"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("~ policy `globex-read`"), "{}", r.stdout);

    // Two bundles and `--tests`: the tests of that folder.
    let r = diff(&old_b, &new_b, &["--tests", "policies"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("6 test decisions change"), "{}", r.stdout);

    // The running bundle against a changed folder: NEW's tests.
    let (code, v) = diff_json(&old_b, new.path(), &[]);
    assert_eq!(code, 1);
    assert_eq!(v["tests"]["source"], new.path().to_str().unwrap());
    assert_eq!(v["decisions_changed"], 6);
}

#[test]
fn load_errors_exit_2_on_stderr() {
    let new = copy_tree();
    std::fs::write(
        new.path().join("tenants/acme/bad.cedar"),
        "permit(principal, action, resource)\n  when { principal == };\n",
    )
    .unwrap();
    let r = diff(&policies(), new.path(), &[]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!(
            "{}/tenants/acme/bad.cedar:2:",
            new.path().display()
        )),
        "{}",
        r.stderr
    );
    let r = diff(
        &policies(),
        Path::new("/nonexistent/bundle.json"),
        &["--json"],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot read"), "{}", r.stderr);
}

#[test]
fn the_bundle_inside_an_envoy_config_or_a_wasm_plugin_is_what_runs() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.wasm");
    std::fs::write(&module, b"\0asm\x01\0\0\0").unwrap();
    let m = module.to_str().unwrap();
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    for (name, extra) in [
        ("bootstrap.json", vec![]),
        ("ecds.json", vec!["--discovery-response"]),
        ("plugin.json", vec!["--istio"]),
    ] {
        let out = file(name);
        let mut args = vec!["envoy", "policies", "--wasm", m, "-o", &out];
        args.extend(extra);
        let r = tenantgate(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        // Against the tree it came from: nothing changes.
        let r = diff(Path::new(&out), &policies(), &[]);
        assert_eq!(r.code, 0, "{name}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains("same bundle version"),
            "{name}: {}",
            r.stdout
        );
        // Against a changed tree: the changes, and NEW's tests.
        let new = changed_tree();
        let (code, v) = diff_json(Path::new(&out), new.path(), &[]);
        assert_eq!(code, 1, "{name}: {v}");
        assert_eq!(v["decisions_changed"], 6, "{name}");
    }
    // An ECDS bootstrap carries no bundle: an error that says so, exit 2.
    let out = file("ecds-bootstrap.json");
    let ecds = file("ecds.json");
    let r = tenantgate(&[
        "envoy", "policies", "--wasm", m, "--ecds", &ecds, "-o", &out,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = diff(Path::new(&out), &policies(), &[]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("holds no tenantgate bundle"),
        "{}",
        r.stderr
    );
}
