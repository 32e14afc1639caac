//! The command transcripts of README.md, docs/reference.md and
//! policies/README.md run as written, and print what the docs show.
//!
//! A transcript is a ```` ```text ```` block whose lines start with `$ `: a
//! `tenantgate` command (run with this build, from the repository root,
//! standard error merged into standard output) or `echo $?`, each followed by
//! its output; `tenantgate serve ... &` starts the service (until the block
//! ends) for the block's `curl` lines. An output that is JSON is compared as
//! JSON (the docs may print it more compactly); any other is compared line by
//! line. Blocks with other commands (Envoy's demo: `cli/tests/guide.rs`,
//! `scripts/demo.sh`) are left to the suites that run them, and so are blocks
//! after a `<!-- not run ... -->` line (their test is named there).
//!
//! `TENANTGATE_BLESS_DOCS=1` rewrites, in place, every text (not JSON) output
//! that differs, so a change that alters outputs (a bundle version) is one
//! run; review the diff.
//!
//! When the binaries change what they print, this test names the doc, the
//! line and the difference: the docs cannot drift.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// One `$ command` of a transcript and the output the doc shows.
struct Step {
    line: usize,
    command: String,
    output: String,
}

/// The transcripts of a Markdown file, each with its first line number.
fn transcripts(text: &str) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```text" {
            i += 1;
            continue;
        }
        // `<!-- not run ... -->` on the line before: checked elsewhere.
        let marked = i > 0 && lines[i - 1].starts_with("<!-- not run");
        let mut block = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            block.push((i + 1, lines[i]));
            i += 1;
        }
        i += 1;
        if !block.first().is_some_and(|(_, l)| l.starts_with("$ ")) {
            continue;
        }
        // `tenantgate serve ... &` starts a server the block's `curl`s call.
        let mut serving = false;
        let runnable = block.iter().all(|(_, l)| {
            if l.starts_with("$ tenantgate serve ") && l.trim_end().ends_with('&') {
                serving = true;
                return true;
            }
            !l.starts_with("$ ")
                || (l.starts_with("$ tenantgate ") && !l.trim_end().ends_with('&'))
                || l.trim_end() == "$ echo $?"
                || (serving && l.starts_with("$ curl "))
        });
        if !runnable || marked {
            continue;
        }
        let mut steps: Vec<Step> = Vec::new();
        for (n, l) in block {
            if let Some(cmd) = l.strip_prefix("$ ") {
                steps.push(Step {
                    line: n,
                    command: cmd.to_string(),
                    output: String::new(),
                });
            } else if let Some(s) = steps.last_mut() {
                s.output.push_str(l);
                s.output.push('\n');
            }
        }
        out.push(steps);
    }
    out
}

/// Whether the output printed matches the output shown.
fn matches(shown: &str, printed: &str) -> bool {
    if let (Ok(a), Ok(b)) = (
        serde_json::from_str::<serde_json::Value>(shown),
        serde_json::from_str::<serde_json::Value>(printed),
    ) {
        if shown.trim_start().starts_with(['{', '[']) {
            return a == b;
        }
    }
    shown.trim_end() == printed.trim_end()
}

/// Starts `tenantgate serve ... --http ADDR` in the background and waits
/// until ADDR accepts connections.
fn start_server(cmd: &str, path: &str, root: &Path) -> std::process::Child {
    let child = Command::new("bash")
        .arg("-c")
        .arg(format!("exec {cmd}"))
        .env("PATH", path)
        .current_dir(root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = cmd
        .split_whitespace()
        .skip_while(|w| *w != "--http")
        .nth(1)
        .expect("a server started by the docs names its `--http` address");
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "`{cmd}` did not listen on {addr} within 20 s (is the port in use?)"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

fn run_doc(doc: &str) -> usize {
    let root = repo();
    let text = std::fs::read_to_string(root.join(doc)).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tenantgate"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bless = std::env::var_os("TENANTGATE_BLESS_DOCS").is_some();
    let mut ran = 0;
    let mut failures = Vec::new();
    // (first line of the shown output, its line count, the printed output).
    let mut rewrites: Vec<(usize, usize, String)> = Vec::new();
    for steps in transcripts(&text) {
        let mut last_status = 0;
        let mut servers = Vec::new();
        for s in steps {
            if let Some(cmd) = s.command.trim_end().strip_suffix('&') {
                servers.push(start_server(cmd, &path, &root));
                continue;
            }
            let printed = if s.command == "echo $?" {
                format!("{last_status}\n")
            } else {
                let out = Command::new("bash")
                    .arg("-c")
                    .arg(format!("{{ {}; }} 2>&1", s.command))
                    .env("PATH", &path)
                    .current_dir(&root)
                    .output()
                    .unwrap();
                last_status = out.status.code().unwrap_or(-1);
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            ran += 1;
            let is_json = s.output.trim_start().starts_with(['{', '[']);
            if bless && !is_json && !matches(&s.output, &printed) {
                rewrites.push((s.line + 1, s.output.lines().count(), printed));
                continue;
            }
            if !matches(&s.output, &printed) {
                failures.push(format!(
                    "{doc}:{}: `{}`\n--- the doc shows:\n{}--- the binary printed:\n{}",
                    s.line, s.command, s.output, printed
                ));
            }
        }
        for mut child in servers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if !rewrites.is_empty() {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        for (first, count, printed) in rewrites.into_iter().rev() {
            let new: Vec<String> = printed.lines().map(str::to_string).collect();
            lines.splice(first - 1..first - 1 + count, new);
        }
        std::fs::write(root.join(doc), lines.join("\n") + "\n").unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ran
}

#[test]
fn readme_transcripts_run_as_written() {
    // `test`, `check`, and `curl` against `tenantgate serve` (port 8181).
    assert!(run_doc("README.md") >= 3);
}

#[test]
fn reference_transcripts_run_as_written() {
    assert!(run_doc("docs/reference.md") >= 5);
}

#[test]
fn policies_readme_transcripts_run_as_written() {
    assert!(run_doc("policies/README.md") >= 2);
}

/// README's broken-tree example: its output, exactly, for the file it names.
#[test]
fn readme_broken_tree_example() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let after = readme
        .split("A broken tree names the place")
        .nth(1)
        .expect("README's broken-tree example");
    let block = after.split("```").nth(1).unwrap();
    let (source, shown) = block.split_once('\n').unwrap();
    let source = source.strip_prefix("text").unwrap_or(source);
    assert!(source.is_empty(), "{source}");
    // The command and the file the example is about.
    let (cmd, shown) = shown.split_once('\n').unwrap();
    assert_eq!(cmd, "$ tenantgate validate policies");
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("policies"), &dir.path().join("policies"));
    std::fs::write(
        dir.path().join("policies/tenants/acme/eu/reuse.cedar"),
        "// Reuses a root policy's id.\n\n@id(\"platform-isolation\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let r = tenantgate_in(dir.path(), &["validate", "policies"], "");
    assert_eq!((r.code, r.stdout.as_str()), (1, ""));
    // Notes and warnings before the errors are not part of the example.
    let errors: String = r
        .stderr
        .lines()
        .filter(|l| !l.contains(": note: ") && !l.contains(": warning: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(errors, shown);
}

#[test]
fn the_transcript_reader_finds_commands_and_outputs() {
    let doc = "x\n```text\n$ tenantgate validate p\np: ok\n$ echo $?\n0\n```\n```text\n$ curl x\ny\n```\n";
    let t = transcripts(doc);
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].iter()
            .map(|s| (s.line, s.command.as_str(), s.output.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (3, "tenantgate validate p", "p: ok\n"),
            (5, "echo $?", "0\n")
        ]
    );
    assert!(matches(
        "{\"a\": [1,\n 2]}\n",
        "{\n  \"a\": [\n    1,\n    2\n  ]\n}\n"
    ));
    assert!(!matches("{\"a\": 1}\n", "{\"a\": 2}\n"));
    assert!(!matches("p: ok\n", "p: ok, 2\n"));
}

/// The bundle versions docs/operators-guide.md shows in forms its transcript
/// test cannot compare (a gauge as an integer, a 12-digit label) are the
/// example tree's.
#[test]
fn operators_guide_versions_are_the_example_trees() {
    let guide = std::fs::read_to_string(repo().join("docs/operators-guide.md")).unwrap();
    let version = tenantgate_engine::Bundle::from_dir(&repo().join("policies"))
        .unwrap()
        .version;
    let hex = version.strip_prefix("sha256:").unwrap();
    let gauge = u64::from_str_radix(&hex[..8], 16).unwrap();
    for want in [
        format!("wasmcustom.tenantgate.bundle_version: {gauge}\n"),
        format!("\nsha256:{}\n", &hex[..8]),
        format!(
            "`printf 'sha256:%08x\\n' {gauge}` prints `sha256:{}`",
            &hex[..8]
        ),
        format!("{{bundle=\"{}\", instance=", &hex[..12]),
    ] {
        assert!(
            guide.contains(&want),
            "docs/operators-guide.md lacks `{want}`"
        );
    }
}

/// The Istio stats matcher the guide recommends is the one `tenantgate envoy
/// --istio` renders, and it keeps the labelled series (whose names start with
/// `wasmcustom.tenant=.=`, not `wasmcustom.tenantgate`).
#[test]
fn the_istio_stats_matcher_keeps_the_labelled_series() {
    let guide = std::fs::read_to_string(repo().join("docs/operators-guide.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("f.wasm");
    std::fs::write(&wasm, b"\0asm").unwrap();
    let r = tenantgate(&[
        "envoy",
        "policies",
        "--istio",
        "--wasm",
        wasm.to_str().unwrap(),
        "--namespace",
        "shop",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let config = v["metadata"]["annotations"]["tenantgate/proxy-config"]
        .as_str()
        .unwrap();
    let config: serde_json::Value = serde_json::from_str(config).unwrap();
    let regexps = config["proxyStatsMatcher"]["inclusionRegexps"]
        .as_array()
        .unwrap();
    assert_eq!(regexps, &[serde_json::json!(".*tenantgate\\..*")]);
    // The guide's YAML and prose give the same regex.
    assert!(guide.contains(r#"{"proxyStatsMatcher":{"inclusionRegexps":[".*tenantgate\\..*"]},"#));
    assert!(guide.contains(r#"`proxyStatsMatcher: {inclusionRegexps: [".*tenantgate\\..*"]}`"#));
    // `.*tenantgate\..*` matches a name that contains `tenantgate.`: every
    // series the reference lists, labelled ones included.
    // docs/operators-guide.md, "Labels", shows such a name.
    let labelled = "wasmcustom.tenant=.=/acme/eu;.;parent=.=/acme;.;tenantgate.tenant.allowed";
    assert!(guide.contains(labelled));
    assert!(labelled.contains("tenantgate."));
    assert!(!labelled.starts_with("wasmcustom.tenantgate"));
}
