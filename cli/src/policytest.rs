//! Policy tests: `DIR/tests/*.json`, each `{"tests": [{name, request, expect}]}`.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use tenantgate_engine::{Decision, Engine, Outcome};

use crate::RequestArgs;

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
    pub expect: Expect,
}

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
        let name = format!(
            "tests/{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{name}: error: cannot read: {e}"));
                continue;
            }
        };
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

fn strip_location(msg: &str) -> &str {
    msg.rfind(" at line ")
        .and_then(|i| msg.get(..i))
        .unwrap_or(msg)
}

/// Runs one test; `Err` says what differed.
pub fn run(engine: &Engine, test: &PolicyTest) -> Result<Decision, String> {
    let decision = crate::decide(engine, &test.request)?;
    check(test, &decision)?;
    Ok(decision)
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
            "decision: want {:?}, got {:?}",
            want, decision.decision
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
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
