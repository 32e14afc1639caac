//! The bundle: one JSON document holding a whole policy tree (settings, schema,
//! tenants with attributes, limits and Cedar sources). It is the filter's plugin
//! configuration. Cedar and schema text travel verbatim with their file names,
//! so errors found when a bundle is loaded still point at file, line and column.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::settings::Settings;
use crate::tenant::{is_valid_segment, TenantPath};

/// Bundle format understood by this build.
pub const FORMAT: u32 = 1;

/// A file carried in the bundle: its path relative to the policy folder and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub file: String,
    pub text: String,
}

/// One tenant of the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleTenant {
    pub path: TenantPath,
    /// `tenant.json` as written (kept as text so limit errors can be located).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<SourceFile>,
    /// Cedar files attached to this tenant, in file-name order.
    #[serde(default)]
    pub policies: Vec<SourceFile>,
}

/// The plugin configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format: u32,
    /// `sha256:<hex>` over the canonical content (everything but this field).
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SourceFile>,
    /// Tenants, parents before children (sorted by path).
    pub tenants: Vec<BundleTenant>,
}

/// `tenant.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    #[serde(default)]
    pub attributes: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub limits: BTreeMap<String, serde_json::Value>,
}

pub const SETTINGS_FILE: &str = "tenantgate.json";
pub const SCHEMA_FILE: &str = "schema.cedarschema";
pub const TENANTS_DIR: &str = "tenants";
pub const TENANT_FILE: &str = "tenant.json";

impl Bundle {
    /// Reads a policy folder (docs/reference.md, "The policy folder") into a
    /// bundle. Only reads files and checks the layout; [`crate::Engine::new`]
    /// validates the content.
    pub fn from_dir(dir: &Path) -> Result<Bundle, Diagnostics> {
        Self::from_dir_warn(dir, &mut Vec::new())
    }

    /// [`Bundle::from_dir`], adding to `warnings` the files of the folder that
    /// are not read but look meant to be (`tenants/acme/tenants.json`,
    /// `deny.ceder`, a `.cedar` file beside `tenants/`).
    pub fn from_dir_warn(
        dir: &Path,
        warnings: &mut Vec<Diagnostic>,
    ) -> Result<Bundle, Diagnostics> {
        let mut errors = Vec::new();
        top_level_warnings(dir, warnings);
        let settings = match read_optional(dir, SETTINGS_FILE) {
            Ok(Some(text)) => match serde_json::from_str::<Settings>(&text) {
                Ok(s) => {
                    errors.extend(crate::diag::duplicate_key_errors(SETTINGS_FILE, &text));
                    errors.extend(
                        s.check()
                            .into_iter()
                            .map(|m| crate::diag::locate_setting(SETTINGS_FILE, &text, m)),
                    );
                    s
                }
                Err(e) => {
                    errors.push(json_error(SETTINGS_FILE, &e));
                    Settings::default()
                }
            },
            Ok(None) => Settings::default(),
            Err(d) => {
                errors.push(d);
                Settings::default()
            }
        };
        let schema = match read_optional(dir, SCHEMA_FILE) {
            Ok(text) => text.map(|text| SourceFile {
                file: SCHEMA_FILE.into(),
                text,
            }),
            Err(d) => {
                errors.push(d);
                None
            }
        };
        let mut tenants = Vec::new();
        let root = dir.join(TENANTS_DIR);
        if root.is_dir() {
            let mut walk = Walk {
                base: dir,
                out: &mut tenants,
                errors: &mut errors,
                warnings,
            };
            walk.tenant(&root, TenantPath::root());
        } else {
            errors.push(Diagnostic::new(
                TENANTS_DIR,
                format!(
                    "`{}` has no `{TENANTS_DIR}/` folder (the root tenant `/`)",
                    dir.display()
                ),
            ));
        }
        tenants.sort_by(|a, b| a.path.cmp(&b.path));
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        let mut bundle = Bundle {
            format: FORMAT,
            version: String::new(),
            settings,
            schema,
            tenants,
        };
        bundle.version = bundle.compute_version();
        Ok(bundle)
    }

    /// Parses a bundle document and checks its version hash.
    pub fn from_json(text: &str) -> Result<Bundle, Diagnostics> {
        let bundle: Bundle = serde_json::from_str(text).map_err(|e| json_error("bundle", &e))?;
        if bundle.format != FORMAT {
            return Err(Diagnostic::new(
                "bundle",
                format!(
                    "bundle format {} is not supported (this build reads format {FORMAT})",
                    bundle.format
                ),
            )
            .into());
        }
        let want = bundle.compute_version();
        if bundle.version != want {
            return Err(Diagnostic::new(
                "bundle",
                format!(
                    "bundle version `{}` does not match its content (`{want}`): the bundle was edited after `tenantgate bundle` wrote it",
                    crate::tenant::shorten(&bundle.version)
                ),
            )
            .into());
        }
        Ok(bundle)
    }

    /// The bundle as pretty JSON, as `tenantgate bundle` writes it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// `sha256:<hex>` of the canonical content: the bundle without `version`,
    /// serialized as JSON with object keys sorted and no whitespace.
    pub fn compute_version(&self) -> String {
        let mut value = match serde_json::to_value(self) {
            Ok(v) => v,
            Err(_) => return String::new(),
        };
        if let serde_json::Value::Object(map) = &mut value {
            map.remove("version");
        }
        let mut canonical = String::new();
        write_canonical(&value, &mut canonical);
        let digest = Sha256::digest(canonical.as_bytes());
        let mut out = String::from("sha256:");
        for b in digest {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

/// Canonical JSON: keys sorted, no whitespace, serde_json's escaping of strings.
fn write_canonical(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                if let Some(v) = map.get(*k) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

pub(crate) fn json_error(file: &str, e: &serde_json::Error) -> Diagnostic {
    // serde_json appends " at line L column C"; the location goes in front instead.
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(&msg).to_string(),
        None => msg,
    };
    let line = u32::try_from(e.line()).unwrap_or(0);
    let column = u32::try_from(e.column()).unwrap_or(0);
    Diagnostic::at(file, line, column, msg)
}

fn read_optional(dir: &Path, name: &str) -> Result<Option<String>, Diagnostic> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    std::fs::read_to_string(&path)
        .map(Some)
        .map_err(|e| Diagnostic::new(name, format!("cannot read: {e}")))
}

fn relative(base: &Path, p: &Path) -> String {
    p.strip_prefix(base)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

struct Walk<'a> {
    base: &'a Path,
    out: &'a mut Vec<BundleTenant>,
    errors: &'a mut Vec<Diagnostic>,
    warnings: &'a mut Vec<Diagnostic>,
}

impl Walk<'_> {
    fn tenant(&mut self, dir: &Path, path: TenantPath) {
        let base = self.base;
        let rel = relative(base, dir);
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.errors
                    .push(Diagnostic::new(rel, format!("cannot read folder: {e}")));
                return;
            }
        };
        let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        names.sort();
        let mut tenant = BundleTenant {
            path: path.clone(),
            config: None,
            policies: Vec::new(),
        };
        let mut children = Vec::new();
        for p in names {
            let file = relative(base, &p);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if p.is_dir() {
                if !is_valid_segment(&name) {
                    self.errors.push(Diagnostic::new(
                        file,
                        format!(
                            "folder name `{}` is not a valid tenant segment (lowercase letters, digits, `_` and `-`, starting with a letter or digit, at most 63 characters)",
                            crate::tenant::shorten(&name)
                        ),
                    ));
                    continue;
                }
                match path.child(&name) {
                    Ok(child) => children.push((p, child)),
                    Err(e) => self.errors.push(Diagnostic::new(file, e.to_string())),
                }
                continue;
            }
            let read = |errors: &mut Vec<Diagnostic>| match std::fs::read_to_string(&p) {
                Ok(text) => Some(SourceFile {
                    file: file.clone(),
                    text,
                }),
                Err(e) => {
                    errors.push(Diagnostic::new(file.clone(), format!("cannot read: {e}")));
                    None
                }
            };
            if name == TENANT_FILE {
                tenant.config = read(self.errors);
            } else if name.ends_with(".cedar") {
                if let Some(f) = read(self.errors) {
                    tenant.policies.push(f);
                }
            } else if let Some(why) = unread_tenant_file(&name) {
                self.warnings.push(Diagnostic::warning(file, why));
            }
        }
        self.out.push(tenant);
        for (dir, child) in children {
            self.tenant(&dir, child);
        }
    }
}

/// Why a file in a tenant folder that is not read is worth a warning; `None`
/// for notes (`*.md`, `*.txt` other than `*.cedar.txt`) and hidden files.
fn unread_tenant_file(name: &str) -> Option<String> {
    if name.starts_with('.') || name.ends_with(".md") {
        return None;
    }
    let holds = "a tenant folder holds `tenant.json`, `*.cedar` policy files, tenant folders and `*.md` notes";
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
    if name.contains(".cedar") || near(ext, "cedar") {
        return Some(format!(
            "`{name}` is not read: policy files end in `.cedar`"
        ));
    }
    if ext == "json" || near(name, TENANT_FILE) || near(stem, "tenant") {
        if near(name, TENANT_FILE) || near(stem, "tenant") {
            return Some(format!(
                "`{name}` is not read: a tenant's attributes and limits go in `{TENANT_FILE}`"
            ));
        }
        return Some(format!("`{name}` is not read ({holds})"));
    }
    if matches!(ext, "yaml" | "yml" | "toml") {
        return Some(format!("`{name}` is not read ({holds})"));
    }
    None
}

/// Files beside `tenants/` that look meant for the tree.
fn top_level_warnings(dir: &Path, warnings: &mut Vec<Diagnostic>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') || name == SETTINGS_FILE || name == SCHEMA_FILE {
            continue;
        }
        let why = if p.is_dir() {
            if name == TENANTS_DIR || name == "tests" {
                continue;
            }
            [TENANTS_DIR, "tests"]
                .into_iter()
                .find(|want| near(&name, want))
                .map(|want| format!("folder `{name}/` is not read: did you mean `{want}/`?"))
        } else if name.ends_with(".cedar") || name.contains(".cedar.") {
            Some(format!(
                "`{name}` is not read: policies go under `{TENANTS_DIR}/` (a file in `{TENANTS_DIR}/` applies to every tenant)"
            ))
        } else if name.ends_with(".cedarschema") || near(&name, SCHEMA_FILE) {
            Some(format!(
                "`{name}` is not read: the schema file is `{SCHEMA_FILE}`"
            ))
        } else if near(&name, SETTINGS_FILE) {
            Some(format!(
                "`{name}` is not read: the settings file is `{SETTINGS_FILE}`"
            ))
        } else if name == TENANT_FILE {
            Some(format!(
                "`{name}` is not read: the root tenant's `{TENANT_FILE}` goes in `{TENANTS_DIR}/`"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let file = if p.is_dir() { format!("{name}/") } else { name };
            warnings.push(Diagnostic::warning(file, why));
        }
    }
}

/// Whether `a` is a likely misspelling of `b`: at most two single-character
/// edits apart (case ignored), and not equal.
fn near(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    if a == b || a.len().abs_diff(b.len()) > 2 || a.is_empty() {
        return false;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let del = prev.get(j + 1).copied().unwrap_or(usize::MAX) + 1;
            let ins = cur.get(j).copied().unwrap_or(usize::MAX) + 1;
            let sub = prev.get(j).copied().unwrap_or(usize::MAX) + usize::from(ca != cb);
            cur.push(del.min(ins).min(sub));
        }
        prev = cur;
    }
    prev.last().is_some_and(|d| *d <= 2)
}

/// A policy folder or a bundle file, loaded and compiled ([`Bundle::load`]).
pub struct Loaded {
    pub bundle: Bundle,
    pub engine: crate::Engine,
    /// Warnings and notes, files named as in [`Bundle::load`]'s errors.
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    /// The warnings (not the notes): what `--strict` refuses.
    pub fn strict_errors(&self) -> Vec<Diagnostic> {
        self.warnings
            .iter()
            .filter(|w| w.severity == Severity::Warning)
            .cloned()
            .map(|w| Diagnostic {
                severity: Severity::Error,
                ..w
            })
            .collect()
    }
}

impl Bundle {
    /// Loads a policy folder or a bundle file and compiles it: what every
    /// command and service that takes a SOURCE uses. Every diagnostic names
    /// the file as the user gave it: `DIR/tenants/acme/a.cedar:3:5` for a
    /// folder, `FILE (tenants/acme/a.cedar):3:5` for a bundle (the line and
    /// column are in the Cedar or JSON text the bundle carries, as written),
    /// `FILE:L:C` for the bundle document itself.
    pub fn load(source: &Path) -> Result<Loaded, Diagnostics> {
        let shown = source.display().to_string();
        let is_dir = source.is_dir();
        let place = |d: Diagnostic| located(&shown, is_dir, d);
        let mut warnings = Vec::new();
        let bundle = if is_dir {
            if !source.join(TENANTS_DIR).is_dir() {
                return Err(Diagnostic::new(
                    shown.clone(),
                    format!(
                        "not a policy folder: it has no `{TENANTS_DIR}/` folder (the root tenant `/`; docs/reference.md, \"The policy folder\")"
                    ),
                )
                .into());
            }
            Bundle::from_dir_warn(source, &mut warnings)
                .map_err(|d| Diagnostics(d.0.into_iter().map(place).collect()))?
        } else {
            let text = match std::fs::read_to_string(source) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Diagnostic::new(
                        shown,
                        "no such file or folder (SOURCE is a policy folder or a bundle file)",
                    )
                    .into())
                }
                Err(e) => return Err(Diagnostic::new(shown, format!("cannot read: {e}")).into()),
            };
            if let Some(why) = not_a_bundle(source, &text) {
                return Err(Diagnostic::new(shown, why).into());
            }
            Bundle::from_json(&text)
                .map_err(|d| Diagnostics(d.0.into_iter().map(place).collect()))?
        };
        let engine = crate::Engine::new(&bundle).map_err(|d| {
            // A problem of a policy inherited by several tenants is found
            // once per tenant: say it once.
            let mut seen = Vec::new();
            for diag in d.0.into_iter().map(place) {
                if !seen.contains(&diag) {
                    seen.push(diag);
                }
            }
            Diagnostics(seen)
        })?;
        warnings.extend(notes(&bundle, &engine));
        let warnings = warnings.into_iter().map(place).collect();
        Ok(Loaded {
            bundle,
            engine,
            warnings,
        })
    }
}

/// A diagnostic's file as the user named the source (see [`Bundle::load`]).
fn located(source: &str, is_dir: bool, mut d: Diagnostic) -> Diagnostic {
    d.file = if d.file.is_empty() || (!is_dir && d.file == "bundle") {
        source.to_string()
    } else if is_dir {
        format!("{}/{}", source.trim_end_matches('/'), d.file)
    } else {
        format!("{source} ({})", d.file)
    };
    d
}

/// Why a file given as SOURCE is not a bundle, when it plainly is not one
/// (not JSON, or JSON without a bundle's keys); `None` for a bundle, even a
/// broken one (its own errors say what is wrong).
fn not_a_bundle(source: &Path, text: &str) -> Option<String> {
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) if e.is_syntax() || e.is_eof() => {
            // A bundle that is broken JSON still starts like one.
            if text.trim_start().starts_with('{') && text.contains("\"tenants\"") {
                return None;
            }
            return Some(
                "not a bundle: the file is not JSON (SOURCE is a policy folder or a bundle file, as `tenantgate bundle` writes it)".into(),
            );
        }
        Err(_) => return None,
    };
    let obj = value.as_object()?;
    if obj.contains_key("format") || obj.contains_key("tenants") {
        return None;
    }
    let what = if name == SETTINGS_FILE {
        format!("this is a policy folder's `{SETTINGS_FILE}`; give the folder that holds it")
    } else if name == TENANT_FILE {
        format!("this is a tenant's `{TENANT_FILE}`; give the policy folder")
    } else {
        "SOURCE is a policy folder or a bundle file, as `tenantgate bundle` writes it".into()
    };
    Some(format!(
        "not a bundle: no `format` or `tenants` key ({what})"
    ))
}

/// Notes and warnings about a bundle that loads (docs/reference.md,
/// "Warnings and notes").
fn notes(bundle: &Bundle, engine: &crate::Engine) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if bundle.schema.is_none() {
        out.push(Diagnostic::note(
            "",
            format!("no `{SCHEMA_FILE}`: policies are not type-checked, so a misspelled attribute, entity type or action is not caught"),
        ));
    }
    let fleet = engine.fleet_limits().all();
    if !fleet.is_empty() && bundle.settings.rate_limit_service.is_none() {
        let names: Vec<String> = fleet
            .iter()
            .map(|l| format!("`{}` on `{}`", l.name, l.tenant))
            .collect();
        out.push(Diagnostic::note(
            SETTINGS_FILE,
            format!(
                "fleet limits are not enforced by the filter without `rate_limit_service`: {} (docs/fleet.md)",
                names.join(", ")
            ),
        ));
    }
    if let Some(t) = &bundle.settings.default_tenant {
        if !engine.has_tenant(t) {
            out.push(Diagnostic::warning(
                SETTINGS_FILE,
                format!("`default_tenant`: `{t}` is not a tenant of this tree, so every request that names no tenant is refused (403 `unknown tenant`)"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        let mut b = Bundle {
            format: FORMAT,
            version: String::new(),
            settings: Settings::default(),
            schema: None,
            tenants: vec![BundleTenant {
                path: TenantPath::root(),
                config: None,
                policies: vec![SourceFile {
                    file: "tenants/a.cedar".into(),
                    text: "permit(principal, action, resource);".into(),
                }],
            }],
        };
        b.version = b.compute_version();
        b
    }

    #[test]
    fn round_trips_and_checks_version() {
        let b = sample();
        assert!(b.version.starts_with("sha256:") && b.version.len() == 7 + 64);
        let back = Bundle::from_json(&b.to_json()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn version_ignores_formatting_but_not_content() {
        let b = sample();
        let compact = serde_json::to_string(&b).unwrap();
        assert_eq!(Bundle::from_json(&compact).unwrap().version, b.version);
        let edited = b.to_json().replace("permit(", "forbid(");
        let err = Bundle::from_json(&edited).unwrap_err();
        assert!(
            err.to_string().contains("does not match its content"),
            "{err}"
        );
    }

    #[test]
    fn refuses_unknown_format_and_keys() {
        let b = sample();
        let mut v = serde_json::to_value(&b).unwrap();
        v["format"] = 2.into();
        assert!(Bundle::from_json(&v.to_string())
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        let mut v = serde_json::to_value(&b).unwrap();
        v["extra"] = 1.into();
        assert!(Bundle::from_json(&v.to_string()).is_err());
    }

    #[test]
    fn json_errors_are_located() {
        let e = Bundle::from_json("{\n  \"format\": 1,\n  oops\n}").unwrap_err();
        let d = &e.0[0];
        assert_eq!((d.line, d.column > 0), (3, true), "{d}");
    }
}
