//! Policy tests: `DIR/tests/*.json`, each `{"tests": [{name, request, expect}]}`.
//! `tenantgate test` and `diff` run them, and so does `serve --xds` before it
//! pushes a policy folder's change (docs/reference.md).

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use std::sync::Arc;

use tenantgate_engine::{Decision, Engine, Outcome, Worker};

use tenantgate_engine::http::RequestSpec as RequestArgs;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub tests: Vec<PolicyTest>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTest {
    pub name: String,
    pub request: RequestArgs,
    /// Send the request this many times, at one instant, against one set of
    /// quota buckets; `expect` is about the last (quota tests: "the fourth
    /// request of one API key in a minute gets 429").
    #[serde(default)]
    pub repeat: Option<u32>,
    pub expect: Expect,
}

/// Most repetitions of one test.
pub const MAX_REPEAT: u32 = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: Outcome2,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub reasons: Option<BTreeSet<String>>,
    #[serde(default)]
    pub errors: Option<bool>,
    /// The limit that refused (a 429's `limit`).
    #[serde(default)]
    pub limit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome2 {
    Allow,
    Deny,
}

/// A test with the file it came from.
pub struct LoadedTest {
    pub file: String,
    pub test: PolicyTest,
}

/// Reads every `tests/*.json` of a policy folder, sorted by file name.
pub fn load(dir: &Path) -> Result<Vec<LoadedTest>, Vec<String>> {
    let tests_dir = dir.join("tests");
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut files: Vec<_> = match std::fs::read_dir(&tests_dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(e) => {
            return Err(vec![format!(
                "{}: error: cannot read: {e}",
                tests_dir.display()
            )])
        }
    };
    files.sort();
    for path in files {
        // As the user typed DIR: `policies/tests/acme.json`.
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{name}: error: cannot read: {e}"));
                continue;
            }
        };
        if let Some(why) = shape_error(&text) {
            errors.push(format!("{name}:1:1: error: {why}"));
            continue;
        }
        match serde_json::from_str::<TestFile>(&text) {
            Ok(f) => out.extend(f.tests.into_iter().map(|test| LoadedTest {
                file: name.clone(),
                test,
            })),
            Err(e) => errors.push(format!(
                "{name}:{}:{}: error: {}",
                e.line(),
                e.column(),
                strip_location(&e.to_string())
            )),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A tests file that is valid JSON of the wrong shape: serde would name
/// the Rust type it expected.
fn shape_error(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let shape =
        "a tests file is an object `{\"tests\": [{\"name\", \"request\", \"expect\"}, ...]}`";
    match &value {
        serde_json::Value::Object(map) => match map.get("tests") {
            Some(serde_json::Value::Array(_)) | None => None,
            Some(_) => Some(format!("`tests` is not a list ({shape})")),
        },
        serde_json::Value::Array(_) => Some(format!("the file is a list, not an object ({shape})")),
        _ => Some(format!("the file is not an object ({shape})")),
    }
}

fn strip_location(msg: &str) -> &str {
    msg.rfind(" at line ")
        .and_then(|i| msg.get(..i))
        .unwrap_or(msg)
}

/// Whether a policy folder has policy tests (a `tests` folder).
pub fn has_tests(dir: &Path) -> bool {
    dir.join("tests").is_dir()
}

/// Runs every test: how many passed, and one line per failure
/// (`FAIL tests/FILE: NAME: what differed`).
pub fn run_all(engine: &Arc<Engine>, tests: &[LoadedTest]) -> (usize, Vec<String>) {
    let mut passed = 0;
    let mut failures = Vec::new();
    for t in tests {
        match run(engine, &t.test) {
            Ok(_) => passed += 1,
            Err(why) => failures.push(format!("FAIL {}: {}: {why}", t.file, t.test.name)),
        }
    }
    (passed, failures)
}

/// Runs one test; `Err` says what differed.
pub fn run(engine: &Arc<Engine>, test: &PolicyTest) -> Result<Decision, String> {
    let decision = decide_at(engine, test, crate::now_ns())?;
    check(test, &decision)?;
    Ok(decision)
}

/// The decision a test's expectation is about: its request at `now`, sent
/// `repeat` times against one fresh set of quota buckets.
pub fn decide_at(engine: &Arc<Engine>, test: &PolicyTest, now: u64) -> Result<Decision, String> {
    let n = test.repeat.unwrap_or(1);
    if !(1..=MAX_REPEAT).contains(&n) {
        return Err(format!("`repeat` must be from 1 to {MAX_REPEAT}, got {n}"));
    }
    let store = tenantgate_engine::quota::MemoryStore::new();
    let worker = Worker::new(Arc::clone(engine));
    let mut last = None;
    for _ in 0..n {
        last = Some(worker.check(&test.request, now, Some(&store))?.decision);
    }
    last.ok_or_else(|| "no request was sent".to_string())
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
    }
}

/// Checks a decision against a test's expectation; `Err` says what differed.
pub fn check(test: &PolicyTest, decision: &Decision) -> Result<(), String> {
    let mut problems = Vec::new();
    let want = match test.expect.decision {
        Outcome2::Allow => Outcome::Allow,
        Outcome2::Deny => Outcome::Deny,
    };
    if decision.decision != want {
        problems.push(format!(
            "decision: want {}, got {}",
            outcome_name(want),
            outcome_name(decision.decision)
        ));
    }
    if let Some(status) = test.expect.status {
        if decision.status != status {
            problems.push(format!("status: want {status}, got {}", decision.status));
        }
    }
    if let Some(reasons) = &test.expect.reasons {
        let got: BTreeSet<String> = decision.reasons.iter().cloned().collect();
        if &got != reasons {
            problems.push(format!("reasons: want {reasons:?}, got {got:?}"));
        }
    }
    if let Some(errors) = test.expect.errors {
        if errors == decision.errors.is_empty() {
            problems.push(format!(
                "errors: want {}, got {:?}",
                if errors { "some" } else { "none" },
                decision.errors
            ));
        }
    }
    if let Some(limit) = &test.expect.limit {
        let got = decision.quota.as_ref().and_then(|q| q.limit.as_deref());
        if got != Some(limit.as_str()) || decision.is_allowed() {
            problems.push(format!(
                "limit: want a refusal by `{limit}`, got {}",
                got.map_or("none".to_string(), |g| format!("`{g}`"))
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
