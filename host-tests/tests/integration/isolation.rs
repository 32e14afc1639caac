//! The tenant isolation matrix (SECURITY.md, "Isolation rules") over the
//! example tree `policies/`, read from `testdata/isolation.json`: one table
//! of rows in three bundle variants (the tenant from the `x-tenant` header,
//! from the path, from JWT claims in dynamic metadata). The same file runs
//! against real Envoy in `envoy/isolation_test.py`; its `about` field
//! describes the schema, `envoy/README.md` the rows and their reasons.
//!
//! Every row ends in a 4xx or in a decision the policies allow. For allowed
//! rows the test checks the tenant and principal the upstream sees and that
//! no other spelling of an `x-tenantgate-*` header or trailer reaches it; for
//! 4xx the body (error, tenant, policy ids, the filter's own decision id, the
//! incoming request id); where a row says so, the normalized resource in the
//! audit line and the upstream `:path`. Rows marked `"only": "envoy"` are
//! skipped here, `"envoy"` overrides are Envoy's alone.
//!
//! Rows alternate between two VMs of one host (two workers sharing shared
//! data); afterwards both still serve, nothing trapped, and every 400 was
//! counted in `tenantgate.bad_request`.

use std::path::Path;

use serde_json::{json, Map, Value};
use tenantgate_host_tests::{Host, Response, Vm};

use crate::support::*;

const JWT: &str = "envoy.filters.http.jwt_authn";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host-tests lives in the repository")
}

/// The matrix, `testdata/isolation.json`.
fn matrix() -> Value {
    let file = repo().join("testdata/isolation.json");
    let text = std::fs::read_to_string(&file).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The bytes a value of the file stands for: a string (its UTF-8 bytes),
/// `{"latin1": s}` (each char one byte) or `{"repeat": s, "times": n}` with
/// optional `prefix` and `suffix`.
fn bytes_of(v: &Value) -> Vec<u8> {
    let text = |v: &Value| {
        v.as_str()
            .unwrap_or_else(|| panic!("not a string: {v}"))
            .to_string()
    };
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(o) if o.len() == 1 && o.contains_key("latin1") => text(&o["latin1"])
            .chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or_else(|_| panic!("not Latin-1: {c:?}")))
            .collect(),
        Value::Object(o)
            if o.contains_key("repeat")
                && o.contains_key("times")
                && o.keys()
                    .all(|k| ["repeat", "times", "prefix", "suffix"].contains(&k.as_str())) =>
        {
            let part = |k: &str| o.get(k).map(text).unwrap_or_default();
            let times = o["times"].as_u64().unwrap_or_else(|| panic!("times: {v}")) as usize;
            format!(
                "{}{}{}",
                part("prefix"),
                part("repeat").repeat(times),
                part("suffix")
            )
            .into_bytes()
        }
        _ => panic!("not a value: {v}"),
    }
}

fn pairs(v: Option<&Value>) -> Vec<(String, Vec<u8>)> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), bytes_of(&p[1])))
                .collect()
        })
        .unwrap_or_default()
}

/// One request of the matrix and what must come of it.
#[derive(Clone)]
struct Row {
    id: String,
    method: String,
    path: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    /// Request trailers (after the body).
    trailers: Vec<(String, Vec<u8>)>,
    /// The `envoy.filters.http.jwt_authn` / `payload` dynamic metadata.
    jwt: Option<Value>,
    want: Want,
}

#[derive(Clone, Default)]
struct Want {
    status: u16,
    /// 200: `x-tenantgate-tenant` at the upstream; 4xx: `tenant` of the body.
    tenant: Option<String>,
    /// 200: `x-tenantgate-principal` at the upstream (`Some(None)`: absent).
    principal: Option<Option<String>>,
    /// 403: the policy ids of the body (`expose_reasons` is on), any order.
    reasons: Option<Vec<String>>,
    /// The normalized resource in the audit line.
    resource: Option<String>,
    /// 200: the `:path` the upstream receives.
    upstream_path: Option<String>,
}

const ROW_KEYS: &[&str] = &[
    "id",
    "note",
    "method",
    "path",
    "headers",
    "trailers",
    "jwt",
    "status",
    "by",
    "tenant",
    "principal",
    "reasons",
    "resource",
    "upstream_path",
    "envoy",
    "only",
];

/// A row of the file as this runner reads it (the `envoy` override is not ours).
fn parse_row(v: &Value) -> Row {
    let o: &Map<String, Value> = v.as_object().unwrap_or_else(|| panic!("not a row: {v}"));
    let id = o["id"].as_str().unwrap().to_string();
    if let Some(k) = o.keys().find(|k| !ROW_KEYS.contains(&k.as_str())) {
        panic!("{id}: unknown key {k:?}");
    }
    let only = o.get("only").map(|v| v.as_str().unwrap_or_default());
    assert!(
        only.is_none_or(|w| w == "envoy" || w == "host"),
        "{id}: only {only:?}"
    );
    let status = o["status"].as_u64().unwrap() as u16;
    let by = o.get("by").and_then(Value::as_str);
    let default_by = if status == 200 {
        "upstream"
    } else {
        "tenantgate"
    };
    assert!(
        by.is_none_or(|b| b == default_by),
        "{id}: only tenantgate or the upstream answer in host-tests (by {by:?}, status {status})"
    );
    let string = |k: &str| o.get(k).map(|v| v.as_str().unwrap().to_string());
    Row {
        method: string("method").unwrap_or_else(|| "GET".into()),
        path: o
            .get("path")
            .map(bytes_of)
            .unwrap_or_else(|| b"/orders/1".to_vec()),
        headers: pairs(o.get("headers")),
        trailers: pairs(o.get("trailers")),
        jwt: o.get("jwt").cloned(),
        want: Want {
            status,
            tenant: string("tenant"),
            principal: o.get("principal").map(|p| p.as_str().map(String::from)),
            reasons: o.get("reasons").map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect()
            }),
            resource: string("resource"),
            upstream_path: string("upstream_path"),
        },
        id,
    }
}

/// The bundle of a copy of `policies/` with these settings changed.
fn example_variant(changes: &Value) -> String {
    let changes = changes.as_object().unwrap();
    if changes.is_empty() {
        return example_bundle();
    }
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("policies"), dir.path());
    let file = dir.path().join("tenantgate.json");
    let mut settings: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for (k, v) in changes {
        settings[k] = v.clone();
    }
    std::fs::write(&file, settings.to_string()).unwrap();
    bundle_of(dir.path())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn send(vm: &mut Vm, r: &Row) -> Response {
    let mut b = vm
        .request()
        .method(&r.method)
        .id(&format!("iso-{}", r.id))
        .without_header(":path")
        .header_bytes(":path", &r.path)
        .property(&["request", "path"], r.path.clone());
    for (k, v) in &r.headers {
        b = b.header_bytes(k, v);
    }
    for (k, v) in &r.trailers {
        let v = std::str::from_utf8(v).expect("the host takes UTF-8 trailers");
        b = b.trailer(k, v);
    }
    if let Some(claims) = &r.jwt {
        b = b.metadata(&[JWT, "payload"], claims.clone());
    }
    b.send().unwrap()
}

/// What is wrong with a response to `r` (empty: as expected).
fn check(host: &Host, r: &Row, resp: &Response) -> Vec<String> {
    let mut bad = Vec::new();
    let w = &r.want;
    if resp.status != w.status || resp.is_continue() != (w.status == 200) {
        bad.push(format!(
            "status {} (continue: {}), want {}: {}",
            resp.status,
            resp.is_continue(),
            w.status,
            resp.body_str()
        ));
        return bad;
    }
    if w.status == 200 {
        let seen = resp.upstream_header("x-tenantgate-tenant");
        if seen != w.tenant {
            bad.push(format!("upstream saw tenant {seen:?}, want {:?}", w.tenant));
        }
        let own = resp.request_headers.names_folding_to("x-tenantgate-");
        let own_trailers = resp.request_trailers.names_folding_to("x-tenantgate-");
        if !own_trailers.is_empty() {
            bad.push(format!("upstream trailers: {own_trailers:?}"));
        }
        let principal = resp.upstream_header("x-tenantgate-principal");
        if let Some(want) = &w.principal {
            if &principal != want {
                bad.push(format!(
                    "upstream saw principal {principal:?}, want {want:?}"
                ));
            }
        }
        if let Some(want) = &w.upstream_path {
            let seen = resp.upstream_header(":path");
            if seen.as_deref() != Some(want.as_str()) {
                bad.push(format!("upstream :path {seen:?}, want {want}"));
            }
        }
        let mut expected_own = vec!["x-tenantgate-tenant".to_string()];
        if principal.is_some() {
            expected_own.push("x-tenantgate-principal".into());
        }
        let mut own_sorted = own.clone();
        own_sorted.sort();
        expected_own.sort();
        if own_sorted != expected_own
            || resp.request_headers.get_all("x-tenantgate-tenant").len() != 1
        {
            bad.push(format!("upstream x-tenantgate-* headers: {own:?}"));
        }
    } else {
        let body = match resp.json() {
            Ok(b) => b,
            Err(e) => return vec![format!("{e}")],
        };
        let error = match w.status {
            400 => "bad_request",
            403 => "forbidden",
            _ => "?",
        };
        if body["error"] != error {
            bad.push(format!("body {body}, want error {error}"));
        }
        // The id of the decision is the filter's, never the client's.
        let did = body["decision_id"].as_str().unwrap_or_default();
        if did.len() != 32 || !did.bytes().all(|c| c.is_ascii_hexdigit()) {
            bad.push(format!("decision_id {did:?} is not the filter's own id"));
        }
        if body["request_id"] != json!(format!("iso-{}", r.id)) {
            bad.push(format!(
                "request_id {} is not the incoming one",
                body["request_id"]
            ));
        }
        if w.status == 400 && body["message"].as_str().unwrap_or("").is_empty() {
            bad.push(format!("400 without a message: {body}"));
        }
        if let Some(t) = &w.tenant {
            if body["tenant"] != json!(t) {
                bad.push(format!("judged tenant {}, want {t}", body["tenant"]));
            }
        }
        if let Some(want) = &w.reasons {
            let mut got: Vec<String> = body["reasons"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            got.sort();
            let mut want = want.clone();
            want.sort();
            if got != want {
                bad.push(format!("reasons {got:?}, want {want:?}"));
            }
        }
    }
    if let Some(res) = &w.resource {
        let rid = format!("iso-{}", r.id);
        let line = audit_lines(host)
            .into_iter()
            .rev()
            .find(|l| l["request_id"] == json!(rid));
        match line {
            Some(l) if l["resource"] == json!(res) => {}
            other => bad.push(format!("audit resource: {other:?}, want {res}")),
        }
    }
    bad
}

/// Runs one variant of the file over two VMs of one host, alternating; then
/// checks both still serve, nothing trapped and every 400 was counted.
fn run_matrix(name: &str) {
    let file = matrix();
    let variant = &file["variants"][name];
    assert!(
        variant.is_object(),
        "no variant {name} in testdata/isolation.json"
    );
    let all = variant["rows"].as_array().unwrap();
    let rows: Vec<Row> = all
        .iter()
        .filter(|r| r.get("only").and_then(Value::as_str) != Some("envoy"))
        .map(parse_row)
        .collect();
    assert!(rows.len() >= 10, "the {name} matrix lost rows");
    let mut ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), rows.len(), "duplicate row ids in {name}");
    let healthy = parse_row(&variant["healthy"]);

    let host = host();
    let bundle = example_variant(&variant["settings"]);
    let mut vms = [configured_vm(&host, &bundle), configured_vm(&host, &bundle)];
    let bad_before = metric(&host, names::BAD_REQUEST);
    let mut failures = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (i, r) in rows.iter().enumerate() {
        let vm = &mut vms[i % 2];
        let resp = send(vm, r);
        *statuses.entry(resp.status).or_default() += 1;
        for problem in check(&host, r, &resp) {
            failures.push(format!(
                "{} {}: {problem}",
                r.id,
                String::from_utf8_lossy(&r.path)
            ));
        }
    }
    let want_400 = rows.iter().filter(|r| r.want.status == 400).count() as u64;
    let counted = metric(&host, names::BAD_REQUEST) - bad_before;
    if counted != want_400 {
        failures.push(format!(
            "tenantgate.bad_request counted {counted}, want {want_400}"
        ));
    }
    // Afterwards both workers still answer normal requests.
    for vm in vms.iter_mut() {
        for k in 0..3 {
            let mut r = healthy.clone();
            r.id = format!("{}-after-{}-{k}", healthy.id, vm.index());
            let resp = send(vm, &r);
            for problem in check(&host, &r, &resp) {
                failures.push(format!("after the matrix, vm {}: {problem}", vm.index()));
            }
        }
        assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    }
    assert_eq!(host.traps(), 0, "{}", dump_logs(&host));
    eprintln!(
        "isolation matrix ({name}): {} rows ({} in the file), statuses {statuses:?}, {} failures",
        rows.len(),
        all.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "isolation matrix ({name}): {} of {} rows wrong:\n  {}",
        failures.len(),
        rows.len(),
        failures.join("\n  ")
    );
}

#[test]
fn isolation_matrix_with_the_tenant_from_a_header() {
    run_matrix("header");
}

#[test]
fn isolation_matrix_with_the_tenant_from_the_path() {
    run_matrix("path");
}

#[test]
fn isolation_matrix_with_the_tenant_from_jwt_metadata() {
    run_matrix("jwt");
}

#[test]
fn isolation_values_stand_for_exact_bytes() {
    assert_eq!(bytes_of(&json!("/\u{430}cme")), "/\u{430}cme".as_bytes());
    assert_eq!(
        bytes_of(&json!({"latin1": "/acme/\u{ff}\u{fe}"})),
        b"/acme/\xff\xfe"
    );
    assert_eq!(bytes_of(&json!({"latin1": "al\u{1}ice"})), b"al\x01ice");
    assert_eq!(
        bytes_of(&json!({"prefix": "/t/", "repeat": "a/", "times": 3, "suffix": "x"})),
        b"/t/a/a/a/x"
    );
    assert_eq!(
        bytes_of(&json!({"repeat": "j", "times": 51200})).len(),
        51200
    );
}
