//! `tenantgate diff OLD NEW`: what changed between two policy folders or
//! bundles, and which policy-test decisions change.
//!
//! - Policies are matched per tenant by id (`@id`, else `<file>:<line>`) and
//!   compared in Cedar's normalized form (comments, whitespace and layout do
//!   not count). A policy whose only change is its id (an unnamed policy that
//!   moved to another line, an `@id` added) is reported as renamed.
//! - `tenant.json` is compared as parsed JSON: attributes and limits as
//!   written, plus the effective limits (shares resolved). A limit whose
//!   effective `rate`, `ceil`, `burst` or `per` changes starts from full
//!   buckets after the reload (its shared-data key changes).
//! - Settings are compared key by key; the schema as text.
//! - The policy tests (`DIR/tests/*.json` of OLD if it is a folder, else of
//!   NEW, or of `--tests DIR`) run against both bundles at one instant; a test
//!   whose decision or status differs is a decision change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;
use tenantgate_engine::bundle::{BundleTenant, TenantConfig};
use tenantgate_engine::quota::LimitInfo;
use tenantgate_engine::{Bundle, Decision, Engine, Outcome, TenantPath};

use tenantgate_serve::policytest;

/// One side of the comparison.
pub struct Side {
    pub source: PathBuf,
    pub bundle: Bundle,
    pub engine: std::sync::Arc<Engine>,
}

impl Side {
    /// A policy folder, a bundle, or a config that carries one (see
    /// [`embedded_bundle`]).
    pub fn load(source: &Path) -> Result<Side, String> {
        let (bundle, engine) = if source.is_dir() {
            crate::load(source)?
        } else {
            let text = std::fs::read_to_string(source)
                .map_err(|e| format!("{}: error: cannot read: {e}", source.display()))?;
            match embedded_bundle(&text) {
                Ok(Some(inner)) => crate::load_text(source, &inner)?,
                Ok(None) => crate::load_text(source, &text)?,
                Err(message) => return Err(format!("{}: error: {message}", source.display())),
            }
        };
        Ok(Side {
            source: source.to_path_buf(),
            bundle,
            engine,
        })
    }
}

/// The bundle inside a config that carries one, so `diff` can compare with
/// what a proxy runs: an Envoy bootstrap or ECDS file rendered by `tenantgate
/// envoy`, Envoy's `/config_dump`, or an Istio `WasmPlugin` (`kubectl get
/// wasmplugin NAME -o json`). `Ok(None)` when `text` is not such a config
/// (a bundle itself, or not JSON: the bundle loader reports that).
pub fn embedded_bundle(text: &str) -> Result<Option<String>, String> {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    if v.get("format").is_some() || v.get("tenants").is_some() {
        return Ok(None);
    }
    let mut found = Vec::new();
    find_bundles(&v, &mut found);
    match found.len() {
        0 if !ecds_paths(&v).is_empty() => Err(format!(
            "holds no tenantgate bundle: its filter configuration comes from the ECDS file {} (`config_discovery`); diff that file",
            ecds_paths(&v)
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        0 => Err("holds no tenantgate bundle: expected a bundle, an Envoy config or `/config_dump` with the Wasm filter's configuration, or an Istio `WasmPlugin`".into()),
        1 => Ok(found.pop()),
        n => Err(format!(
            "holds {n} different tenantgate bundles; extract the one to compare"
        )),
    }
}

/// The files of `path_config_source`s (ECDS) in an Envoy config.
fn ecds_paths(v: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(p) = m
                    .get("path_config_source")
                    .and_then(|s| s.get("path"))
                    .and_then(Value::as_str)
                {
                    if !out.iter().any(|q| q == p) {
                        out.push(p.to_string());
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn find_bundles(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            // Envoy: the Wasm filter's `configuration`, a `StringValue`.
            if m.get("@type").and_then(Value::as_str)
                == Some("type.googleapis.com/google.protobuf.StringValue")
            {
                if let Some(text) = m.get("value").and_then(Value::as_str) {
                    if is_bundle(text) && !out.iter().any(|b| b == text) {
                        out.push(text.to_string());
                    }
                }
            }
            // Istio: `spec.pluginConfig`, the bundle as an object.
            if let Some(config) = m.get("pluginConfig") {
                if config.get("format").is_some() && config.get("tenants").is_some() {
                    let text = config.to_string();
                    if !out.iter().any(|b| b == &text) {
                        out.push(text);
                    }
                }
            }
            m.values().for_each(|v| find_bundles(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| find_bundles(v, out)),
        _ => {}
    }
}

fn is_bundle(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .is_ok_and(|b| b.get("format").is_some() && b.get("tenants").is_some())
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub old: SideInfo,
    pub new: SideInfo,
    /// True when both bundles have the same version (identical content).
    pub same_version: bool,
    pub settings: Vec<ValueChange>,
    /// `null`, or `added`, `removed`, `changed`.
    pub schema: Option<&'static str>,
    pub tenants_added: Vec<String>,
    pub tenants_removed: Vec<String>,
    /// Tenants with a change (added and removed ones included), sorted.
    pub tenants: Vec<TenantDiff>,
    /// Effective limits (shares resolved, defaults applied) that differ.
    pub effective_limits: Vec<LimitChange>,
    pub tests: TestsReport,
    /// Number of policy tests whose decision or status differs under NEW.
    pub decisions_changed: usize,
}

#[derive(Debug, Serialize)]
pub struct SideInfo {
    pub source: String,
    pub version: String,
    pub tenants: usize,
    pub policies: usize,
}

#[derive(Debug, Serialize)]
pub struct ValueChange {
    pub key: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct TenantDiff {
    pub tenant: String,
    /// `added`, `removed` or `changed`.
    pub status: &'static str,
    pub policies: PolicyChanges,
    pub attributes: Vec<ValueChange>,
    /// Limits as written in `tenant.json`.
    pub limits: Vec<ValueChange>,
}

#[derive(Debug, Default, Serialize)]
pub struct PolicyChanges {
    pub added: Vec<PolicyRef>,
    pub removed: Vec<PolicyRef>,
    pub changed: Vec<PolicyChange>,
    pub renamed: Vec<PolicyRename>,
}

impl PolicyChanges {
    fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.renamed.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyRef {
    pub id: String,
    pub effect: &'static str,
    pub file: String,
    pub line: u32,
    /// The policy in Cedar's normalized form.
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct PolicyChange {
    pub id: String,
    pub old: PolicyRef,
    pub new: PolicyRef,
}

#[derive(Debug, Serialize)]
pub struct PolicyRename {
    pub old_id: String,
    pub new_id: String,
    pub file: String,
    pub line: u32,
}

#[derive(Debug, Serialize)]
pub struct LimitChange {
    pub tenant: String,
    pub name: String,
    pub old: Option<EffectiveLimit>,
    pub new: Option<EffectiveLimit>,
    /// True when the limit's bucket state starts over (full buckets) after
    /// the reload: its parameters changed, or it is new.
    pub resets_state: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveLimit {
    pub rate: u64,
    pub ceil: u64,
    pub burst: u64,
    pub per_s: u64,
}

#[derive(Debug, Serialize)]
pub struct TestsReport {
    /// The folder whose `tests/*.json` ran; `null` when none ran.
    pub source: Option<String>,
    /// Why no test ran, when none did.
    pub note: Option<String>,
    pub run: usize,
    /// Tests that do not meet their expectation, under OLD and under NEW.
    pub failing_old: usize,
    pub failing_new: usize,
    pub changed: Vec<TestChange>,
}

#[derive(Debug, Serialize)]
pub struct TestChange {
    pub file: String,
    pub name: String,
    pub expect: &'static str,
    pub old: DecisionSummary,
    pub new: DecisionSummary,
    /// `null` when the test passes under NEW, else what differs from its expectation.
    pub new_failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionSummary {
    pub decision: &'static str,
    pub status: u16,
    pub reasons: Vec<String>,
    pub errors: Vec<String>,
}

impl DecisionSummary {
    fn of(d: &Decision) -> Self {
        DecisionSummary {
            decision: outcome(d.decision),
            status: d.status,
            reasons: d.reasons.to_vec(),
            errors: d.errors.clone(),
        }
    }
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Allow => "allow",
        Outcome::Deny => "deny",
    }
}

/// Compares two loaded sides. `tests` overrides the folder whose tests run.
pub fn diff(old: &Side, new: &Side, tests: Option<&Path>) -> Result<Report, String> {
    let old_tenants: BTreeMap<&TenantPath, &BundleTenant> =
        old.bundle.tenants.iter().map(|t| (&t.path, t)).collect();
    let new_tenants: BTreeMap<&TenantPath, &BundleTenant> =
        new.bundle.tenants.iter().map(|t| (&t.path, t)).collect();
    let all: BTreeSet<&TenantPath> = old_tenants
        .keys()
        .chain(new_tenants.keys())
        .copied()
        .collect();

    let mut tenants = Vec::new();
    let mut tenants_added = Vec::new();
    let mut tenants_removed = Vec::new();
    for path in all {
        let o = old_tenants.get(path).copied();
        let n = new_tenants.get(path).copied();
        let status = match (o, n) {
            (None, Some(_)) => {
                tenants_added.push(path.to_string());
                "added"
            }
            (Some(_), None) => {
                tenants_removed.push(path.to_string());
                "removed"
            }
            _ => "changed",
        };
        let policies = diff_policies(
            &tenant_policies(&old.engine, o)?,
            &tenant_policies(&new.engine, n)?,
        );
        let (old_attrs, old_limits) = tenant_config(o)?;
        let (new_attrs, new_limits) = tenant_config(n)?;
        let attributes = diff_maps(&old_attrs, &new_attrs);
        let limits = diff_maps(&old_limits, &new_limits);
        if status != "changed"
            || !policies.is_empty()
            || !attributes.is_empty()
            || !limits.is_empty()
        {
            tenants.push(TenantDiff {
                tenant: path.to_string(),
                status,
                policies,
                attributes,
                limits,
            });
        }
    }

    let settings = diff_maps(
        &as_object(serde_json::to_value(&old.bundle.settings).map_err(|e| e.to_string())?),
        &as_object(serde_json::to_value(&new.bundle.settings).map_err(|e| e.to_string())?),
    );
    let schema = match (&old.bundle.schema, &new.bundle.schema) {
        (None, None) => None,
        (None, Some(_)) => Some("added"),
        (Some(_), None) => Some("removed"),
        (Some(a), Some(b)) if a.text.trim() == b.text.trim() => None,
        (Some(_), Some(_)) => Some("changed"),
    };

    let tests = run_tests(old, new, tests)?;
    Ok(Report {
        old: side_info(old),
        new: side_info(new),
        same_version: old.bundle.version == new.bundle.version,
        settings,
        schema,
        tenants_added,
        tenants_removed,
        tenants,
        effective_limits: diff_limits(&old.engine.quotas().limits(), &new.engine.quotas().limits()),
        decisions_changed: tests.changed.len(),
        tests,
    })
}

fn side_info(s: &Side) -> SideInfo {
    SideInfo {
        source: s.source.display().to_string(),
        version: s.bundle.version.clone(),
        tenants: s.bundle.tenants.len(),
        policies: s.engine.policy_count(),
    }
}

fn as_object(v: Value) -> BTreeMap<String, Value> {
    match v {
        Value::Object(m) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    }
}

/// Keys whose values differ (added and removed keys included), sorted by key.
fn diff_maps(old: &BTreeMap<String, Value>, new: &BTreeMap<String, Value>) -> Vec<ValueChange> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (o, n) = (old.get(k), new.get(k));
            (o != n).then(|| ValueChange {
                key: k.clone(),
                old: o.cloned(),
                new: n.cloned(),
            })
        })
        .collect()
}

type Attrs = BTreeMap<String, Value>;

/// Attributes and limits of a tenant's `tenant.json` (empty when it has none).
fn tenant_config(t: Option<&BundleTenant>) -> Result<(Attrs, Attrs), String> {
    let Some(src) = t.and_then(|t| t.config.as_ref()) else {
        return Ok((BTreeMap::new(), BTreeMap::new()));
    };
    let c: TenantConfig =
        serde_json::from_str(&src.text).map_err(|e| format!("{}: error: {e}", src.file))?;
    Ok((c.attributes, c.limits))
}

/// A policy as found in its file.
struct Found {
    r: PolicyRef,
    /// The normalized form without the `@id` annotation: equal for a
    /// policy that only changed its id.
    body: String,
}

/// The policies attached to a tenant (not inherited ones), by id.
fn tenant_policies(
    engine: &Engine,
    t: Option<&BundleTenant>,
) -> Result<BTreeMap<String, Found>, String> {
    let mut out = BTreeMap::new();
    let Some(t) = t else {
        return Ok(out);
    };
    let infos: Vec<_> = engine
        .effective_policies(&t.path)
        .into_iter()
        .filter(|p| p.tenant == t.path)
        .collect();
    for src in &t.policies {
        let set = cedar_policy::PolicySet::from_str(&src.text)
            .map_err(|e| format!("{}: error: {e}", src.file))?;
        for p in set.policies() {
            // Located as the engine does: the policy's text appears verbatim in its file.
            let original = p.to_cedar().unwrap_or_default();
            let offset = src.text.find(original.trim()).unwrap_or(0);
            let (line, column) = tenantgate_engine::diag::line_col(&src.text, offset);
            let id = infos
                .iter()
                .find(|i| i.file == src.file && i.line == line && i.column == column)
                .map(|i| i.id.clone())
                .or_else(|| p.annotation("id").map(str::to_string))
                .unwrap_or_else(|| format!("{}:{line}", src.file));
            let est = p
                .to_json()
                .map_err(|e| format!("{}:{line}: error: {e}", src.file))?;
            let text = normalized(&est).map_err(|e| format!("{}:{line}: error: {e}", src.file))?;
            let mut bare = est;
            if let Some(Value::Object(a)) = bare.get_mut("annotations") {
                a.remove("id");
            }
            let body = canonical(&bare);
            out.insert(
                id.clone(),
                Found {
                    r: PolicyRef {
                        id,
                        effect: match p.effect() {
                            cedar_policy::Effect::Permit => "permit",
                            cedar_policy::Effect::Forbid => "forbid",
                        },
                        file: src.file.clone(),
                        line,
                        text,
                    },
                    body,
                },
            );
        }
    }
    Ok(out)
}

/// Cedar's own rendering of a policy's JSON form: no comments, one layout.
fn normalized(est: &Value) -> Result<String, String> {
    let p = cedar_policy::Policy::from_json(None, est.clone()).map_err(|e| e.to_string())?;
    Ok(p.to_cedar().unwrap_or_default())
}

/// JSON with object keys sorted.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, String> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let parts: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

fn diff_policies(old: &BTreeMap<String, Found>, new: &BTreeMap<String, Found>) -> PolicyChanges {
    let mut out = PolicyChanges::default();
    let mut removed: Vec<&Found> = Vec::new();
    let mut added: Vec<&Found> = Vec::new();
    for (id, o) in old {
        match new.get(id) {
            Some(n) if n.r.text != o.r.text || n.body != o.body => out.changed.push(PolicyChange {
                id: id.clone(),
                old: o.r.clone(),
                new: n.r.clone(),
            }),
            Some(_) => {}
            None => removed.push(o),
        }
    }
    for (id, n) in new {
        if !old.contains_key(id) {
            added.push(n);
        }
    }
    // Same content under another id: renamed, not removed and added.
    for o in removed {
        match added.iter().position(|n| n.body == o.body) {
            Some(i) => {
                let n = added.remove(i);
                out.renamed.push(PolicyRename {
                    old_id: o.r.id.clone(),
                    new_id: n.r.id.clone(),
                    file: n.r.file.clone(),
                    line: n.r.line,
                });
            }
            None => out.removed.push(o.r.clone()),
        }
    }
    out.added = added.into_iter().map(|n| n.r.clone()).collect();
    out
}

fn effective(l: &LimitInfo) -> EffectiveLimit {
    EffectiveLimit {
        rate: l.rate,
        ceil: l.ceil,
        burst: l.burst,
        per_s: l.per_s,
    }
}

fn diff_limits(old: &[LimitInfo], new: &[LimitInfo]) -> Vec<LimitChange> {
    let index = |ls: &[LimitInfo]| -> BTreeMap<(TenantPath, String), LimitInfo> {
        ls.iter()
            .map(|l| ((l.tenant.clone(), l.name.clone()), l.clone()))
            .collect()
    };
    let (old, new) = (index(old), index(new));
    let keys: BTreeSet<&(TenantPath, String)> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (o, n) = (old.get(k), new.get(k));
            let (oe, ne) = (o.map(effective), n.map(effective));
            if oe == ne {
                return None;
            }
            Some(LimitChange {
                tenant: k.0.to_string(),
                name: k.1.clone(),
                // Other effective numbers: the bucket is reset in place
                // (its stored stamp differs); a new limit starts full.
                resets_state: n.is_some(),
                old: oe,
                new: ne,
            })
        })
        .collect()
}

fn run_tests(old: &Side, new: &Side, tests: Option<&Path>) -> Result<TestsReport, String> {
    let folder = match tests {
        Some(dir) => Some(dir.to_path_buf()),
        None if old.source.is_dir() => Some(old.source.clone()),
        None if new.source.is_dir() => Some(new.source.clone()),
        None => None,
    };
    let empty = |source: Option<String>, note: String| TestsReport {
        source,
        note: Some(note),
        run: 0,
        failing_old: 0,
        failing_new: 0,
        changed: Vec::new(),
    };
    let Some(folder) = folder else {
        return Ok(empty(
            None,
            "no policy tests were run: neither OLD nor NEW is a policy folder (pass `--tests DIR`)"
                .into(),
        ));
    };
    let shown = folder.display().to_string();
    if !folder.join("tests").is_dir() {
        if tests.is_some() {
            return Err(format!(
                "{}: error: `--tests` names a folder without `tests/`",
                folder.display()
            ));
        }
        return Ok(empty(
            Some(shown.clone()),
            format!("no policy tests were run: `{shown}` has no `tests/` folder"),
        ));
    }
    let loaded = policytest::load(&folder).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("{}: {e}", folder.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    // Both bundles decide at the same instant, so time-dependent policies agree.
    let now = crate::now_ns();
    let mut report = TestsReport {
        source: Some(shown),
        note: None,
        run: loaded.len(),
        failing_old: 0,
        failing_new: 0,
        changed: Vec::new(),
    };
    for t in &loaded {
        let o = policytest::decide_at(&old.engine, &t.test, now)?;
        let n = policytest::decide_at(&new.engine, &t.test, now)?;
        if policytest::check(&t.test, &o).is_err() {
            report.failing_old += 1;
        }
        let new_failure = policytest::check(&t.test, &n).err();
        if new_failure.is_some() {
            report.failing_new += 1;
        }
        if o.decision != n.decision || o.status != n.status {
            report.changed.push(TestChange {
                file: t.file.clone(),
                name: t.test.name.clone(),
                expect: match t.test.expect.decision {
                    policytest::Outcome2::Allow => "allow",
                    policytest::Outcome2::Deny => "deny",
                },
                old: DecisionSummary::of(&o),
                new: DecisionSummary::of(&n),
                new_failure,
            });
        }
    }
    Ok(report)
}

/// The readable form of a report.
pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "old: {} ({}, {} tenants, {} policies)",
        r.old.source, r.old.version, r.old.tenants, r.old.policies
    );
    let _ = writeln!(
        out,
        "new: {} ({}, {} tenants, {} policies)",
        r.new.source, r.new.version, r.new.tenants, r.new.policies
    );
    if r.same_version {
        let _ = writeln!(out, "same bundle version: no changes");
    }
    if !r.settings.is_empty() {
        let _ = writeln!(out, "\nsettings (tenantgate.json):");
        for c in &r.settings {
            let _ = writeln!(out, "  {}", value_change(&c.key, c));
        }
    }
    if let Some(s) = r.schema {
        let _ = writeln!(out, "\nschema: {s}");
    }
    if !r.tenants_added.is_empty() {
        let _ = writeln!(out, "\ntenants added: {}", r.tenants_added.join(", "));
    }
    if !r.tenants_removed.is_empty() {
        let _ = writeln!(out, "\ntenants removed: {}", r.tenants_removed.join(", "));
    }
    for t in &r.tenants {
        let _ = match t.status {
            "changed" => writeln!(out, "\ntenant {}:", t.tenant),
            s => writeln!(out, "\ntenant {} ({s}):", t.tenant),
        };
        for p in &t.policies.added {
            let _ = writeln!(
                out,
                "  + policy `{}` ({} at {}:{})",
                p.id, p.effect, p.file, p.line
            );
        }
        for p in &t.policies.removed {
            let _ = writeln!(
                out,
                "  - policy `{}` ({} at {}:{})",
                p.id, p.effect, p.file, p.line
            );
        }
        for c in &t.policies.changed {
            let was = if (&c.old.file, c.old.line) == (&c.new.file, c.new.line) {
                String::new()
            } else {
                format!(", was {}:{}", c.old.file, c.old.line)
            };
            let _ = writeln!(
                out,
                "  ~ policy `{}` ({} at {}:{}{was})",
                c.id, c.new.effect, c.new.file, c.new.line
            );
            for l in line_diff(&c.old.text, &c.new.text) {
                let _ = writeln!(out, "      {l}");
            }
        }
        for c in &t.policies.renamed {
            let _ = writeln!(
                out,
                "  = policy `{}` is now `{}` ({}:{}), content unchanged",
                c.old_id, c.new_id, c.file, c.line
            );
        }
        for c in &t.attributes {
            let _ = writeln!(
                out,
                "  {}",
                value_change(&format!("attribute {}", c.key), c)
            );
        }
        for c in &t.limits {
            let _ = writeln!(out, "  {}", value_change(&format!("limit {}", c.key), c));
        }
    }
    if !r.effective_limits.is_empty() {
        let _ = writeln!(out, "\neffective limits (shares resolved):");
        for l in &r.effective_limits {
            let show = |e: &Option<EffectiveLimit>| match e {
                Some(e) => format!(
                    "rate {} ceil {} burst {} per {}s",
                    e.rate, e.ceil, e.burst, e.per_s
                ),
                None => "none".to_string(),
            };
            let _ = writeln!(
                out,
                "  {} {}: {} -> {}{}",
                l.tenant,
                l.name,
                show(&l.old),
                show(&l.new),
                if l.resets_state {
                    " (starts from full buckets after the reload)"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(out);
    match (&r.tests.source, &r.tests.note) {
        (_, Some(note)) => {
            let _ = writeln!(out, "{note}");
        }
        (Some(source), None) => {
            let _ = writeln!(
                out,
                "policy tests of {source}: {} run, failing {} under old, {} under new",
                r.tests.run, r.tests.failing_old, r.tests.failing_new
            );
            for c in &r.tests.changed {
                let _ = writeln!(
                    out,
                    "  ~ {}: {}: {} -> {}{}",
                    c.file,
                    c.name,
                    summary(&c.old),
                    summary(&c.new),
                    match &c.new_failure {
                        Some(_) => format!(" (test expects {}: fails under new)", c.expect),
                        None => format!(" (test expects {}: passes under new)", c.expect),
                    }
                );
            }
        }
        (None, None) => {}
    }
    let _ = writeln!(
        out,
        "{} test decision{} change{}",
        r.decisions_changed,
        if r.decisions_changed == 1 { "" } else { "s" },
        if r.decisions_changed == 1 { "s" } else { "" },
    );
    out
}

fn summary(d: &DecisionSummary) -> String {
    if d.reasons.is_empty() {
        format!("{} {}", d.decision, d.status)
    } else {
        format!("{} {} [{}]", d.decision, d.status, d.reasons.join(", "))
    }
}

fn value_change(what: &str, c: &ValueChange) -> String {
    match (&c.old, &c.new) {
        (None, Some(n)) => format!("+ {what}: {n}"),
        (Some(o), None) => format!("- {what}: {o}"),
        (Some(o), Some(n)) => format!("~ {what}: {o} -> {n}"),
        (None, None) => format!("  {what}"),
    }
}

/// The lines of `old` and `new` that differ, `-` and `+` prefixed, in order
/// (a longest-common-subsequence diff; policies are short).
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len().saturating_mul(b.len()) > 1_000_000 {
        let mut out: Vec<String> = a.iter().map(|l| format!("- {l}")).collect();
        out.extend(b.iter().map(|l| format!("+ {l}")));
        return out;
    }
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, la) in a.iter().enumerate().rev() {
        for (j, lb) in b.iter().enumerate().rev() {
            let v = if la == lb {
                cell(&lcs, i + 1, j + 1) + 1
            } else {
                cell(&lcs, i + 1, j).max(cell(&lcs, i, j + 1))
            };
            if let Some(c) = lcs.get_mut(i).and_then(|row| row.get_mut(j)) {
                *c = v;
            }
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                i += 1;
                j += 1;
            }
            (Some(x), Some(_)) if cell(&lcs, i + 1, j) >= cell(&lcs, i, j + 1) => {
                out.push(format!("- {x}"));
                i += 1;
            }
            (_, Some(y)) => {
                out.push(format!("+ {y}"));
                j += 1;
            }
            (Some(x), None) => {
                out.push(format!("- {x}"));
                i += 1;
            }
            (None, None) => break,
        }
    }
    out
}

fn cell(t: &[Vec<usize>], i: usize, j: usize) -> usize {
    t.get(i).and_then(|r| r.get(j)).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_diff_shows_only_changed_lines() {
        let d = line_diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(d, vec!["- b", "+ B", "+ d"]);
        assert!(line_diff("x\ny", "x\ny").is_empty());
    }

    #[test]
    fn canonical_sorts_keys() {
        let a: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[1,{"z":0,"y":1}],"c":null}}"#).unwrap();
        assert_eq!(
            canonical(&a),
            r#"{"a":{"c":null,"d":[1,{"y":1,"z":0}]},"b":1}"#
        );
    }
}
