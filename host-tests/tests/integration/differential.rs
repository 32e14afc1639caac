//! One table of raw requests (`testdata/differential.json`) fed to
//! `tenantgate check` (the CLI binary) and to the real `tenantgate.wasm`:
//! both must give the row's status, the same policy ids on a 403, and for a
//! forwarded request the same `x-tenantgate-*` headers and `:path`. The same
//! table runs in real Envoy (`envoy/differential_test.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host-tests lives in the repository")
}

/// The `tenantgate` binary: `TENANTGATE_CLI`, else `target/debug/tenantgate`.
fn cli() -> PathBuf {
    if let Ok(p) = std::env::var("TENANTGATE_CLI") {
        return PathBuf::from(p);
    }
    let p = repo().join("target/debug/tenantgate");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p tenantgate-cli` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// What one side did with a request.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: u16,
    /// 403: the policy ids (the example bundle exposes them).
    reasons: Vec<String>,
    /// Forwarded: the `x-tenantgate-*` headers the upstream gets.
    upstream: BTreeMap<String, String>,
    /// Forwarded: the `:path` the upstream gets.
    path: Option<String>,
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn by_check(row: &Value) -> Outcome {
    let mut cmd = Command::new(cli());
    cmd.current_dir(repo()).args([
        "check",
        "policies",
        "--method",
        row["method"].as_str().unwrap(),
        "--path",
        row["path"].as_str().unwrap(),
    ]);
    for h in row["headers"].as_array().unwrap() {
        cmd.arg("--header").arg(format!(
            "{}={}",
            h[0].as_str().unwrap(),
            h[1].as_str().unwrap()
        ));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}: check failed: {}",
        row["id"],
        String::from_utf8_lossy(&out.stderr)
    );
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = d["status"].as_u64().unwrap() as u16;
    let upstream = d["upstream"]["headers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let original = row["path"].as_str().unwrap().to_string();
    Outcome {
        status,
        reasons: if status == 403 {
            sorted(&d["reasons"])
        } else {
            vec![]
        },
        upstream,
        path: (status == 200).then(|| {
            d["upstream"]["path"]
                .as_str()
                .map(String::from)
                .unwrap_or(original)
        }),
    }
}

fn by_filter(vm: &mut tenantgate_host_tests::Vm, row: &Value) -> Outcome {
    let path = row["path"].as_str().unwrap();
    let mut b = vm
        .request()
        .without_header(":method")
        .header(":method", row["method"].as_str().unwrap())
        .without_header(":path")
        .header(":path", path)
        .property(&["request", "path"], path.as_bytes().to_vec());
    for h in row["headers"].as_array().unwrap() {
        b = b.header(h[0].as_str().unwrap(), h[1].as_str().unwrap());
    }
    let resp = b.send().unwrap();
    if resp.is_continue() {
        let upstream = resp
            .request_headers
            .names_folding_to("x-tenantgate-")
            .into_iter()
            .map(|n| {
                let v = resp.request_headers.get_all(&n).join(",");
                (n, v)
            })
            .collect();
        return Outcome {
            status: 200,
            reasons: vec![],
            upstream,
            path: resp.upstream_header(":path"),
        };
    }
    let body = resp.json().unwrap();
    Outcome {
        status: resp.status,
        reasons: if resp.status == 403 {
            sorted(&body["reasons"])
        } else {
            vec![]
        },
        upstream: BTreeMap::new(),
        path: None,
    }
}

#[test]
fn check_decides_every_raw_request_exactly_as_the_filter() {
    let table: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("testdata/differential.json")).unwrap(),
    )
    .unwrap();
    let rows = table["rows"].as_array().unwrap();
    assert!(rows.len() >= 40, "the table lost rows");
    let host = host();
    let mut vm = configured_vm(&host, &example_bundle());
    let mut problems = Vec::new();
    for row in rows {
        let want = row["status"].as_u64().unwrap() as u16;
        let check = by_check(row);
        let filter = by_filter(&mut vm, row);
        if check != filter {
            problems.push(format!(
                "{}: check {check:?} != filter {filter:?}",
                row["id"]
            ));
        } else if check.status != want {
            problems.push(format!("{}: both {}, want {want}", row["id"], check.status));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} rows differ:\n  {}",
        problems.len(),
        rows.len(),
        problems.join("\n  ")
    );
}
