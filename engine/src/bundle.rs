//! The bundle: one JSON document holding a whole policy tree (settings, schema,
//! tenants with attributes, limits and Cedar sources). It is the filter's plugin
//! configuration. Cedar and schema text travel verbatim with their file names,
//! so errors found when a bundle is loaded still point at file, line and column.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::diag::{Diagnostic, Diagnostics};
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
        let mut errors = Vec::new();
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
            walk_tenant(dir, &root, TenantPath::root(), &mut tenants, &mut errors);
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

fn walk_tenant(
    base: &Path,
    dir: &Path,
    path: TenantPath,
    out: &mut Vec<BundleTenant>,
    errors: &mut Vec<Diagnostic>,
) {
    let rel = relative(base, dir);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(Diagnostic::new(rel, format!("cannot read folder: {e}")));
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
                errors.push(Diagnostic::new(
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
                Err(e) => errors.push(Diagnostic::new(file, e.to_string())),
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
            tenant.config = read(errors);
        } else if name.ends_with(".cedar") {
            if let Some(f) = read(errors) {
                tenant.policies.push(f);
            }
        }
        // Other files (README.md, notes) are not part of the tree.
    }
    out.push(tenant);
    for (dir, child) in children {
        walk_tenant(base, &dir, child, out, errors);
    }
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
