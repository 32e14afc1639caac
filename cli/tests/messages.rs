//! What a new user meets first: every message a mistake gets, exactly (the
//! input, the standard error, the exit status), and the exit-status table of
//! docs/reference.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const PERMIT: &str = "@id(\"all\")\npermit (principal, action, resource);\n";
const SCHEMA_NOTE: &str = "p: note: no `schema.cedarschema`: policies are not type-checked, so a misspelled attribute, entity type or action is not caught\n";

/// `(exit status, stdout, stderr)` of `tenantgate ARGS` run beside `p/`.
fn run(dir: &tempfile::TempDir, args: &[&str]) -> (i32, String, String) {
    let r = tenantgate_in(dir.path(), args, "");
    (r.code, r.stdout, r.stderr)
}

fn ok_line(version_of: &tempfile::TempDir, tenants: usize, policies: usize) -> String {
    let b = tenantgate_engine::Bundle::from_dir(&version_of.path().join("p")).unwrap();
    format!(
        "p: ok: {tenants} tenants, {policies} policies, version {}\n",
        b.version
    )
}

#[test]
fn files_a_policy_folder_does_not_read_are_warnings_and_errors_with_strict() {
    let limit = r#"{"limits": {"rps": {"rate": 5}}}"#;
    let t = small_tree(&[
        ("tenants/all.cedar", PERMIT),
        ("tenants/acme/tenant.json", "{}"),
        ("tenants/acme/tenants.json", limit),
        ("tenants/acme/deny.ceder", PERMIT),
        ("tenants/acme/deny.cedar.txt", PERMIT),
        ("tenants/acme/README.md", "notes\n"),
        ("tenants/acme/notes.txt", "notes\n"),
        ("top.cedar", PERMIT),
        ("tenantgate.jsn", "{}"),
        ("traffic.json", "{}"),
    ]);
    let warnings = "\
p/tenantgate.jsn: warning: `tenantgate.jsn` is not read: the settings file is `tenantgate.json`
p/top.cedar: warning: `top.cedar` is not read: policies go under `tenants/` (a file in `tenants/` applies to every tenant)
p/tenants/acme/deny.cedar.txt: warning: `deny.cedar.txt` is not read: policy files end in `.cedar`
p/tenants/acme/deny.ceder: warning: `deny.ceder` is not read: policy files end in `.cedar`
p/tenants/acme/tenants.json: warning: `tenants.json` is not read: a tenant's attributes and limits go in `tenant.json`
";
    assert_eq!(
        run(&t, &["validate", "p"]),
        (0, ok_line(&t, 2, 1), format!("{warnings}{SCHEMA_NOTE}"))
    );
    let errors = warnings.replace(": warning: ", ": error: ");
    assert_eq!(
        run(&t, &["validate", "p", "--strict"]),
        (1, String::new(), format!("{SCHEMA_NOTE}{errors}5 errors\n"))
    );
    // `bundle` and `test` print them too, and refuse them with `--strict`.
    let (code, _, stderr) = run(&t, &["bundle", "p"]);
    assert_eq!((code, stderr), (0, format!("{warnings}{SCHEMA_NOTE}")));
    let (code, _, stderr) = run(&t, &["bundle", "p", "--strict"]);
    assert_eq!(
        (code, stderr),
        (1, format!("{SCHEMA_NOTE}{errors}5 errors\n"))
    );
    let (code, _, stderr) = run(&t, &["test", "p", "--strict"]);
    assert_eq!(
        (code, stderr),
        (1, format!("{SCHEMA_NOTE}{errors}5 errors\n"))
    );
}

#[test]
fn notes_for_unenforced_fleet_limits_and_a_default_tenant_that_is_not_declared() {
    let t = small_tree(&[
        ("tenantgate.json", r#"{"default_tenant": "/acme/eu"}"#),
        ("schema.cedarschema", SCHEMA),
        (
            "tenants/acme/tenant.json",
            r#"{"limits": {"rpm": {"rate": 60, "per": "1m", "scope": "fleet"}}}"#,
        ),
    ]);
    assert_eq!(
        run(&t, &["validate", "p"]),
        (
            0,
            ok_line(&t, 2, 0).replace("policies,", "policies, limits valid,"),
            "\
p/tenantgate.json: note: fleet limits are not enforced by the filter without `rate_limit_service`: `rpm` on `/acme` (docs/fleet.md)
p/tenantgate.json: warning: `default_tenant`: `/acme/eu` is not a tenant of this tree, so every request that names no tenant is refused (403 `unknown tenant`)
"
            .into()
        )
    );
}

#[test]
fn sources_that_are_not_a_policy_folder_or_a_bundle_say_so() {
    let t = small_tree(&[
        ("tenantgate.json", "{}"),
        ("tenants/all.cedar", PERMIT),
        ("README.md", "# notes\n"),
        ("docs/x.md", "x\n"),
    ]);
    let cases: [(&str, &str); 5] = [
        ("p/tenantgate.json", "p/tenantgate.json: error: not a bundle: no `format` or `tenants` key (this is a policy folder's `tenantgate.json`; give the folder that holds it)\n1 error\n"),
        ("p/README.md", "p/README.md: error: not a bundle: the file is not JSON (SOURCE is a policy folder or a bundle file, as `tenantgate bundle` writes it)\n1 error\n"),
        ("p/docs", "p/docs: error: not a policy folder: it has no `tenants/` folder (the root tenant `/`; docs/reference.md, \"The policy folder\")\n1 error\n"),
        ("nope", "nope: error: no such file or folder (SOURCE is a policy folder or a bundle file)\n1 error\n"),
        ("p/tenants", "p/tenants: error: not a policy folder: it has no `tenants/` folder (the root tenant `/`; docs/reference.md, \"The policy folder\")\n1 error\n"),
    ];
    for (source, want) in cases {
        assert_eq!(
            run(&t, &["validate", source]),
            (1, String::new(), want.to_string()),
            "{source}"
        );
    }
    // `serve` says it once, with its name.
    assert_eq!(
        run(&t, &["serve", "nope", "--http", "127.0.0.1:0"]),
        (1, String::new(), "tenantgate serve: nope: error: no such file or folder (SOURCE is a policy folder or a bundle file)\n".into())
    );
}

#[test]
fn errors_in_a_bundle_point_into_the_file_it_carries() {
    let t = small_tree(&[("tenants/all.cedar", PERMIT)]);
    let (code, bundle, _) = run(&t, &["bundle", "p"]);
    assert_eq!(code, 0);
    // A second policy file, with a syntax error on line 2, column 11.
    let mut v: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    v["tenants"][0]["policies"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"file": "tenants/bad.cedar", "text": "// x\npermit (principal,, action, resource);\n"}));
    v["version"] = "".into();
    let text = v.to_string();
    let b: tenantgate_engine::Bundle = serde_json::from_str(&text).unwrap();
    v["version"] = b.compute_version().into();
    std::fs::write(t.path().join("b.json"), v.to_string()).unwrap();
    let (code, _, stderr) = run(&t, &["validate", "b.json"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("b.json (tenants/bad.cedar):2:19: error: "),
        "{stderr}"
    );
}

#[test]
fn settings_messages_say_what_is_expected() {
    let cases: [(&str, &str); 3] = [
        (
            r#"{"tenant": {"header": "X-Tenant"}}"#,
            "p/tenantgate.json:1:13: error: `tenant.header`: `X-Tenant` is not a valid header name: header names are lowercase (`x-tenant`), as Envoy stores them\n1 error\n",
        ),
        (
            r#"{"tenant": "x-tenant"}"#,
            "p/tenantgate.json:1:22: error: a source is an object, not a string: `{\"header\": \"x-tenant\"}`; its one key is `header`, `path_prefix` or `metadata` (docs/reference.md, \"tenantgate.json\")\n1 error\n",
        ),
        (
            r#"{"principal": {"heder": "x-user"}}"#,
            "p/tenantgate.json:1:34: error: a source is an object with one key, `header`, `path_prefix` or `metadata` (docs/reference.md, \"tenantgate.json\"); got `{\"heder\":\"x-user\"}`\n1 error\n",
        ),
    ];
    for (settings, want) in cases {
        let t = small_tree(&[("tenantgate.json", settings), ("tenants/all.cedar", PERMIT)]);
        assert_eq!(
            run(&t, &["validate", "p"]),
            (1, String::new(), want.to_string()),
            "{settings}"
        );
    }
}

fn test_tree(tests: &[(&str, &str)]) -> tempfile::TempDir {
    let mut files = vec![
        ("schema.cedarschema", SCHEMA),
        ("tenants/all.cedar", PERMIT),
        ("tenants/acme/tenant.json", "{}"),
    ];
    files.extend_from_slice(tests);
    let t = small_tree(&files);
    std::fs::create_dir_all(t.path().join("p/tests")).unwrap();
    t
}

const ONE_TEST: &str = r#"{"tests": [
  {"name": "acme reads", "request": {"tenant": "/acme", "method": "GET", "path": "/x"}, "expect": {"decision": "allow"}},
  {"name": "acme is refused", "request": {"tenant": "/acme", "method": "GET", "path": "/x"}, "expect": {"decision": "deny"}}
]}"#;

#[test]
fn policy_test_messages() {
    let t = test_tree(&[]);
    assert_eq!(
        run(&t, &["test", "p"]),
        (1, String::new(), "p/tests: error: no test ran: no test in `*.json` files of this folder (docs/reference.md, \"Policy tests\")\n".into())
    );
    let t = test_tree(&[("tests/list.json", "[{\"name\": \"x\"}]")]);
    assert_eq!(
        run(&t, &["test", "p"]),
        (1, String::new(), "p/tests/list.json:1:1: error: the file is a list, not an object (a tests file is an object `{\"tests\": [{\"name\", \"request\", \"expect\"}, ...]}`)\n".into())
    );
    let t = test_tree(&[("tests/obj.json", "{\"tests\": {\"name\": \"x\"}}")]);
    assert_eq!(
        run(&t, &["test", "p"]).2,
        "p/tests/obj.json:1:1: error: `tests` is not a list (a tests file is an object `{\"tests\": [{\"name\", \"request\", \"expect\"}, ...]}`)\n"
    );
    let t = test_tree(&[("tests/a.json", ONE_TEST)]);
    assert_eq!(
        run(&t, &["test", "p"]),
        (1, "FAIL p/tests/a.json: acme is refused: decision: want deny, got allow\n1 passed, 1 failed\n".into(), String::new())
    );
    assert_eq!(
        run(&t, &["test", "p", "--run", "reads", "-v"]),
        (
            0,
            "ok   p/tests/a.json: acme reads\n1 passed, 0 failed, 1 not run (`--run`)\n".into(),
            String::new()
        )
    );
    assert_eq!(
        run(&t, &["test", "p", "--run", "nothing"]),
        (
            1,
            String::new(),
            "error: no test ran: no test name contains `nothing` (2 tests)\n".into()
        )
    );
    let (code, out, _) = run(&t, &["test", "p", "--format", "json"]);
    assert_eq!(
        (
            code,
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        ),
        (
            1,
            serde_json::json!({"passed": 1, "failed": 1, "tests": [
                {"file": "p/tests/a.json", "name": "acme reads", "passed": true, "failure": null},
                {"file": "p/tests/a.json", "name": "acme is refused", "passed": false, "failure": "decision: want deny, got allow"}
            ]})
        )
    );
    assert_eq!(
        run(&t, &["test", "p", "--format", "junit"]),
        (
            1,
            "\
<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<testsuites name=\"p\" tests=\"2\" failures=\"1\">
  <testsuite name=\"p/tests/a.json\" tests=\"2\" failures=\"1\">
    <testcase name=\"acme reads\" classname=\"p/tests/a.json\"/>
    <testcase name=\"acme is refused\" classname=\"p/tests/a.json\">
      <failure message=\"decision: want deny, got allow\"/>
    </testcase>
  </testsuite>
</testsuites>
"
            .into(),
            String::new()
        )
    );
}

#[test]
fn validate_json_report() {
    let t = test_tree(&[]);
    let b = tenantgate_engine::Bundle::from_dir(&t.path().join("p")).unwrap();
    let (code, out, err) = run(&t, &["validate", "p", "--format", "json"]);
    assert_eq!(
        (
            code,
            serde_json::from_str::<serde_json::Value>(&out).unwrap(),
            err
        ),
        (
            0,
            serde_json::json!({"ok": true, "source": "p", "version": b.version, "tenants": 2, "policies": 1, "diagnostics": []}),
            String::new()
        )
    );
    std::fs::write(t.path().join("p/tenants/acme/x.cedar"), "permit (").unwrap();
    let (code, out, _) = run(&t, &["validate", "p", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (code, &v["ok"], &v["version"]),
        (1, &serde_json::json!(false), &serde_json::Value::Null)
    );
    assert_eq!(v["diagnostics"][0]["file"], "p/tenants/acme/x.cedar");
    assert_eq!(
        (
            v["diagnostics"][0]["line"].as_u64(),
            v["diagnostics"][0]["column"].as_u64()
        ),
        (Some(1), Some(9))
    );
}

#[test]
fn check_reads_a_request_from_a_file_or_standard_input_and_warns_on_unknown_context_keys() {
    let t = test_tree(&[]);
    let request = r#"{"tenant": "/acme", "method": "GET", "path": "/x"}"#;
    std::fs::write(t.path().join("req.json"), request).unwrap();
    let by_flags = run(
        &t,
        &[
            "check", "p", "--tenant", "/acme", "--method", "GET", "--path", "/x",
        ],
    );
    assert_eq!(by_flags.0, 0, "{}", by_flags.2);
    let by_file = run(&t, &["check", "p", "--request", "req.json"]);
    let by_stdin = tenantgate_in(t.path(), &["check", "p", "--request", "-"], request);
    assert_eq!(by_file, by_flags);
    assert_eq!((by_stdin.code, by_stdin.stdout, by_stdin.stderr), by_flags);
    let v: serde_json::Value = serde_json::from_str(&by_flags.1).unwrap();
    assert_eq!(v["decision"], "allow");
    assert_eq!(
        run(&t, &["check", "p", "--request", "p/tenants/all.cedar"]),
        (2, String::new(), "error: `--request`: `p/tenants/all.cedar` is not a JSON object (a request: `{\"tenant\", \"method\", \"path\", ...}`, as in a policy test)\n".into())
    );
    let (code, _, stderr) = run(
        &t,
        &[
            "check",
            "p",
            "--tenant",
            "/acme",
            "--method",
            "GET",
            "--path",
            "/x",
            "--context",
            r#"{"tim": {}, "time": {"hour": 3}}"#,
        ],
    );
    assert_eq!(
        (code, stderr.as_str()),
        (0, "warning: `--context`: `tim` is not a key of the context the filter builds (method, path, time, headers, host, source_ip, claims); a policy reading it would see it here only\nwarning: `--context`: `time.hour` is not a key of `time` (epoch_s, hour_utc, weekday)\n")
    );
}

#[test]
fn diff_of_an_ecds_bootstrap_names_the_ecds_file() {
    let t = test_tree(&[]);
    let (code, boot, err) = run(
        &t,
        &[
            "envoy",
            "p",
            "--wasm",
            "/f.wasm",
            "--ecds",
            "/etc/envoy/tenantgate.json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    std::fs::write(t.path().join("boot.json"), boot).unwrap();
    assert_eq!(
        run(&t, &["diff", "boot.json", "p"]),
        (2, String::new(), "boot.json: error: holds no tenantgate bundle: its filter configuration comes from the ECDS file `/etc/envoy/tenantgate.json` (`config_discovery`); diff that file\n".into())
    );
}

/// docs/reference.md, "Exit statuses": usage errors are 2 for every verb.
#[test]
fn exit_statuses() {
    let t = test_tree(&[("tests/a.json", ONE_TEST)]);
    let cases: [(&[&str], i32); 16] = [
        (&["validate", "p"], 0),
        (&["validate", "nope"], 1),
        (&["validate"], 2),
        (&["validate", "p", "--bogus"], 2),
        (&["bundle", "p", "-o"], 2),
        (
            &[
                "check", "p", "--method", "GET", "--path", "/", "--header", "x",
            ],
            2,
        ),
        (
            &[
                "check", "p", "--method", "GET", "--path", "/", "--claims", "x",
            ],
            2,
        ),
        (
            &[
                "check",
                "p",
                "--method",
                "GET",
                "--path",
                "/",
                "--context",
                "[]",
            ],
            2,
        ),
        (
            &[
                "check", "p", "--method", "GET", "--path", "/", "--claims", "{}",
            ],
            1,
        ),
        (&["check", "p", "--path", "/"], 2),
        (&["test", "p"], 1),
        (
            &["envoy", "p", "--wasm", "/f.wasm", "--listen", "127.0.0.1"],
            2,
        ),
        (
            &["envoy", "p", "--wasm", "/f.wasm", "--namespace", "shop"],
            2,
        ),
        (&["envoy", "nope", "--wasm", "/f.wasm"], 1),
        (&["diff", "p", "nope"], 2),
        (&["serve", "p", "--http", "nope"], 2),
    ];
    for (args, want) in cases {
        let (code, out, err) = run(&t, args);
        assert_eq!(code, want, "{args:?}\n{out}{err}");
    }
    assert_eq!(
        run(
            &t,
            &["envoy", "p", "--wasm", "/f.wasm", "--namespace", "shop"]
        )
        .2,
        "error: `--namespace` only applies with `--istio`\n"
    );
    assert_eq!(
        run(
            &t,
            &["envoy", "p", "--wasm", "/f.wasm", "--listen", "127.0.0.1"]
        )
        .2,
        "error: `--listen 127.0.0.1` is not `host:port`\n"
    );
}

#[test]
fn completions_and_help() {
    let t = test_tree(&[]);
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, _) = run(&t, &["completions", shell]);
        assert_eq!(code, 0);
        assert!(
            out.contains("validate") && out.contains("strict"),
            "{shell}: {out}"
        );
    }
    // Every argument and flag of every verb has a description.
    let (_, top, _) = run(&t, &["--help"]);
    assert!(
        top.contains("Exit status:") && top.contains("Examples:"),
        "{top}"
    );
    for verb in [
        "validate",
        "bundle",
        "check",
        "test",
        "simulate",
        "diff",
        "envoy",
        "limits",
        "fmt",
        "serve",
        "completions",
    ] {
        let (code, help, _) = run(&t, &[verb, "--help"]);
        assert_eq!(code, 0);
        let mut undocumented = Vec::new();
        let mut section = "";
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = line;
                continue;
            }
            let entry = line.starts_with("  ") && !line.starts_with("      ");
            if (section == "Arguments:" || section == "Options:") && entry {
                let rest = line.trim_start();
                // Short help: `-o, --output <OUTPUT>  Write ...`; long help:
                // the description on the next lines, indented further.
                let next = lines.get(i + 1).copied().unwrap_or("");
                let described = rest.contains("  ")
                    || (next.starts_with("          ") && !next.trim().is_empty());
                if !described {
                    undocumented.push(rest.to_string());
                }
            }
        }
        assert!(undocumented.is_empty(), "{verb}: {undocumented:?}\n{help}");
    }
}

#[test]
fn fmt_takes_one_file_and_shows_a_diff() {
    let t = small_tree(&[(
        "one.cedar",
        "@id(\"x\")\npermit(principal,action,resource) when { principal == User::\"a\" };\n// keep\n@id(\"y\") forbid(principal, action, resource);\n",
    )]);
    let diff = "\
--- p/one.cedar
+++ p/one.cedar (formatted)
@@ -1,4 +1,7 @@
 @id(\"x\")
-permit(principal,action,resource) when { principal == User::\"a\" };
+permit (principal, action, resource)
+when { principal == User::\"a\" };
+
 // keep
-@id(\"y\") forbid(principal, action, resource);
+@id(\"y\")
+forbid (principal, action, resource);
";
    assert_eq!(
        run(&t, &["fmt", "p/one.cedar", "--diff"]),
        (1, diff.to_string(), String::new())
    );
    assert_eq!(
        run(&t, &["fmt", "p/one.cedar"]),
        (0, "formatted p/one.cedar\n".into(), String::new())
    );
    assert_eq!(
        run(&t, &["fmt", "p/one.cedar", "--diff"]),
        (0, String::new(), String::new())
    );
}

/// A policy inherited by several tenants is compiled once per tenant; its
/// problem is reported once.
#[test]
fn a_duplicate_id_is_reported_once() {
    let t = small_tree(&[
        ("schema.cedarschema", SCHEMA),
        ("tenants/acme/tenant.json", "{}"),
        ("tenants/acme/eu/tenant.json", "{}"),
        ("tenants/acme/us/tenant.json", "{}"),
        (
            "tenants/acme/dup.cedar",
            "@id(\"dup\")\npermit (principal, action, resource);\n@id(\"dup\")\nforbid (principal, action, resource);\n",
        ),
    ]);
    let (code, out, err) = run(&t, &["validate", "p"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        "p/tenants/acme/dup.cedar:3:1: error: policy id `dup` is already used at tenants/acme/dup.cedar:1:1\n1 error\n"
    );
}

/// A template is named as policies are (its `@id`, else file and line),
/// not by Cedar's own `policy0`.
#[test]
fn a_template_is_named_by_its_id_or_its_place() {
    let t = small_tree(&[
        ("schema.cedarschema", SCHEMA),
        ("tenants/acme/tenant.json", "{}"),
        (
            "tenants/acme/t.cedar",
            "permit (principal, action, resource);\n@id(\"per-user\")\npermit (principal == ?principal, action, resource);\n",
        ),
        (
            "tenants/acme/u.cedar",
            "\npermit (principal, action, resource == ?resource);\n",
        ),
    ]);
    let (code, out, err) = run(&t, &["validate", "p"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        "p/tenants/acme/t.cedar:3:22: error: templates (policies with `?principal` or `?resource` slots) are not supported: `per-user`\n\
         p/tenants/acme/u.cedar:2:40: error: templates (policies with `?principal` or `?resource` slots) are not supported: `tenants/acme/u.cedar:2`\n\
         2 errors\n"
    );
}

/// A misspelled action is one error, at its place, with the fix.
#[test]
fn a_misspelled_action_is_one_error() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("policies"), &t.path().join("p"));
    let file = t.path().join("p/tenants/acme/defaults.cedar");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replacen("Action::\"read\"", "Action::\"raed\"", 1),
    )
    .unwrap();
    assert_eq!(
        run(&t, &["validate", "p"]),
        (1, String::new(), "p/tenants/acme/defaults.cedar:9:13: error: schema: unrecognized action `Action::\"raed\"` (help: did you mean `Action::\"read\"`?)\n1 error\n".into())
    );
}
