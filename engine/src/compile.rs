//! Compiling a bundle: every Cedar file parsed, each policy located in its
//! file, `@overridable` overrides applied, one Cedar `PolicySet` per tenant
//! (its own policies and its ancestors'), the tenant entities and the quota
//! model. Every problem is reported with its file, line and column.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Effect, Entities, Entity, Policy, PolicyId, PolicySet, RestrictedExpression,
};

use crate::bundle::{json_error, Bundle, BundleTenant, SourceFile, TenantConfig};
use crate::diag::{locate_json_key, Diagnostic, Diagnostics};
use crate::engine::{CompiledPolicy, Engine, PolicyInfo, TenantMap, TenantNode};
use crate::entities::{json_to_expr, Types};
use crate::fleet::FleetLimits;
use crate::quota::spec::FleetRules;
use crate::quota::{LimitsInput, QuotaModel};
use crate::tenant::TenantPath;

impl Engine {
    /// Compiles and validates a bundle. Every problem found is reported, each
    /// with its file, line and column.
    pub fn new(bundle: &Bundle) -> Result<Engine, Diagnostics> {
        let mut errors: Vec<Diagnostic> = Vec::new();
        let types = Types::new().map_err(|m| Diagnostic::new("bundle", m))?;
        errors.extend(
            bundle
                .settings
                .check()
                .into_iter()
                .map(|m| Diagnostic::new(crate::bundle::SETTINGS_FILE, m)),
        );
        let (schema, validator) = load_schema(bundle, &mut errors);
        let (sorted, configs) = tenant_configs(bundle, &mut errors);
        let entities = tenant_entities(&types, schema.as_ref(), &configs, &mut errors);
        let attached = attach_policies(&sorted, validator.as_ref(), &mut errors);
        let actions = types
            .action_entities()
            .map_err(|m| Diagnostic::new("bundle", m))?;
        let (tenants, policy_count) =
            effective_sets(&configs, &attached, &entities, &actions, &mut errors);
        let rules = match &bundle.settings.rate_limit_service {
            Some(r) if r.mode == crate::settings::FleetMode::Assigned => FleetRules::Hierarchical,
            _ => FleetRules::FlatCaps,
        };
        let (quotas, fleet) = limits(&configs, rules, &mut errors);
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        let policy_texts = || {
            bundle
                .tenants
                .iter()
                .flat_map(|t| &t.policies)
                .map(|p| p.text.as_str())
        };
        Ok(Engine {
            settings: bundle.settings.clone(),
            version: bundle.version.clone(),
            types,
            tenants,
            authorizer: Authorizer::new(),
            quotas,
            fleet,
            policy_count,
            cache_shape: crate::cache::KeyShape::from_texts(policy_texts()),
            uses_source_ip: policy_texts().any(|t| t.contains("source_ip")),
            layout: std::sync::OnceLock::new(),
        })
    }
}

/// A tenant's parsed `tenant.json` and its source, parents first.
type Config<'a> = (TenantPath, TenantConfig, Option<&'a SourceFile>);

/// The tenants sorted parents first, each with its parsed `tenant.json`;
/// reports a missing root, duplicates, orphans and unreadable configs.
fn tenant_configs<'a>(
    bundle: &'a Bundle,
    errors: &mut Vec<Diagnostic>,
) -> (Vec<&'a BundleTenant>, Vec<Config<'a>>) {
    let mut configs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut sorted: Vec<&BundleTenant> = bundle.tenants.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    if sorted.first().map(|t| t.path.is_root()) != Some(true) {
        errors.push(Diagnostic::new(
            "bundle",
            "the bundle has no root tenant `/`",
        ));
    }
    for t in &sorted {
        if !seen.insert(t.path.clone()) {
            errors.push(Diagnostic::new(
                "bundle",
                format!("tenant `{}` appears twice", t.path),
            ));
            continue;
        }
        if let Some(parent) = t.path.parent() {
            if !seen.contains(&parent) {
                errors.push(Diagnostic::new(
                    "bundle",
                    format!(
                        "tenant `{}` has no parent tenant `{parent}` in the bundle",
                        t.path
                    ),
                ));
            }
        }
        let config = match &t.config {
            Some(src) => match serde_json::from_str::<TenantConfig>(&src.text) {
                Ok(c) => {
                    errors.extend(crate::diag::duplicate_key_errors(&src.file, &src.text));
                    c
                }
                Err(e) => {
                    errors.push(json_error(&src.file, &e));
                    TenantConfig::default()
                }
            },
            None => TenantConfig::default(),
        };
        configs.push((t.path.clone(), config, t.config.as_ref()));
    }
    (sorted, configs)
}

/// Each tenant's entity with its declared attributes, checked against the
/// schema; errors located at the attribute.
fn tenant_entities(
    types: &Types,
    schema: Option<&LoadedSchema>,
    configs: &[Config<'_>],
    errors: &mut Vec<Diagnostic>,
) -> HashMap<TenantPath, Entity> {
    let mut entity_by_tenant = HashMap::new();
    for (path, config, src) in configs {
        let file = src
            .map(|s| s.file.clone())
            .unwrap_or_else(|| tenant_file_name(path));
        let text = src.map(|s| s.text.as_str()).unwrap_or("");
        let locate_at = |keys: &[&str], msg: String| match locate_json_key(text, keys) {
            Some(off) => Diagnostic::at_offset(&file, text, off, msg),
            None => Diagnostic::new(&file, msg),
        };
        let mut declared: Vec<(String, RestrictedExpression)> = Vec::new();
        for (name, value) in &config.attributes {
            if name == "path" || name == "depth" {
                errors.push(locate_at(
                    &["attributes", name],
                    format!("attribute `{name}` is reserved: the engine sets it"),
                ));
                continue;
            }
            match json_to_expr(value, name) {
                Ok(expr) => declared.push((name.clone(), expr)),
                Err(m) => errors.push(locate_at(&["attributes", name], format!("attribute {m}"))),
            }
        }
        match types.tenant_entity(path, &declared) {
            Ok(entity) => {
                if let Some(msg) = check_entity(schema, &entity) {
                    errors.push(locate_at(&["attributes"], msg));
                }
                entity_by_tenant.insert(path.clone(), entity);
            }
            Err(m) => errors.push(Diagnostic::new(&file, m)),
        }
    }
    entity_by_tenant
}

/// The policies attached to each tenant, compiled and located; two policies
/// of one tenant may not share an id.
fn attach_policies(
    sorted: &[&BundleTenant],
    validator: Option<&SchemaValidator>,
    errors: &mut Vec<Diagnostic>,
) -> HashMap<TenantPath, Vec<Arc<CompiledPolicy>>> {
    let mut attached = HashMap::new();
    for t in sorted {
        let mut list: Vec<Arc<CompiledPolicy>> = Vec::new();
        for src in &t.policies {
            let (ps, ds) = compile_file(src, &t.path, validator);
            list.extend(ps.into_iter().map(Arc::new));
            errors.extend(ds);
        }
        let mut ids: HashMap<&str, &PolicyInfo> = HashMap::new();
        for p in &list {
            if let Some(first) = ids.insert(&p.info.id, &p.info) {
                errors.push(Diagnostic::at(
                    &p.info.file,
                    p.info.line,
                    p.info.column,
                    format!(
                        "policy id `{}` is already used at {}:{}:{}",
                        p.info.id, first.file, first.line, first.column
                    ),
                ));
            }
        }
        attached.insert(t.path.clone(), list);
    }
    attached
}

/// The parent's effective list, minus what `own` overrides, plus `own`.
/// Reusing the id of a policy that is not `@overridable` is an error.
fn apply_overrides(
    inherited: Vec<Arc<CompiledPolicy>>,
    own: &[Arc<CompiledPolicy>],
    errors: &mut Vec<Diagnostic>,
) -> Vec<Arc<CompiledPolicy>> {
    let mut list = inherited;
    let mut refused: Vec<&str> = Vec::new();
    for p in own {
        let Some(pos) = list.iter().position(|q| q.info.id == p.info.id) else {
            continue;
        };
        match list.get(pos).map(|q| q.info.clone()) {
            Some(q) if q.overridable => {
                list.remove(pos);
            }
            Some(q) => {
                refused.push(&p.info.id);
                errors.push(Diagnostic::at(
                    &p.info.file,
                    p.info.line,
                    p.info.column,
                    format!(
                        "policy id `{}` reuses the id of a policy of tenant `{}` ({}:{}:{}) that is not `@overridable`; mark that policy `@overridable` to allow overriding it, or choose another id",
                        p.info.id, q.tenant, q.file, q.line, q.column
                    ),
                ))
            }
            None => {}
        }
    }
    list.extend(
        own.iter()
            .filter(|p| !refused.contains(&p.info.id.as_str()))
            .cloned(),
    );
    list
}

/// Every tenant's node: its effective policy set (its own policies and its
/// ancestors', overrides applied) and its lineage entities. Also counts the
/// policies.
fn effective_sets(
    configs: &[Config<'_>],
    attached: &HashMap<TenantPath, Vec<Arc<CompiledPolicy>>>,
    entities: &HashMap<TenantPath, Entity>,
    actions: &[Entity],
    errors: &mut Vec<Diagnostic>,
) -> (TenantMap<TenantNode>, usize) {
    let mut tenants = TenantMap::default();
    let mut effective_lists: HashMap<TenantPath, Vec<Arc<CompiledPolicy>>> = HashMap::new();
    let mut policy_count = 0;
    for (path, _, _) in configs {
        let own = attached.get(path).cloned().unwrap_or_default();
        policy_count += own.len();
        let inherited = path
            .parent()
            .and_then(|p| effective_lists.get(&p).cloned())
            .unwrap_or_default();
        let list = apply_overrides(inherited, &own, errors);
        let mut set = PolicySet::new();
        for p in &list {
            let policy = p.policy.new_id(PolicyId::new(&p.info.id));
            match set.add(policy) {
                // Two policies of one tenant with one id: reported once, where
                // they are attached (`attach_policies`), not again here and
                // at every descendant that inherits them.
                Ok(()) | Err(cedar_policy::PolicySetError::AlreadyDefined(_)) => {}
                Err(e) => errors.push(Diagnostic::at(
                    &p.info.file,
                    p.info.line,
                    p.info.column,
                    e.to_string(),
                )),
            }
        }
        let lineage: Vec<Entity> = path
            .lineage()
            .iter()
            .filter_map(|p| entities.get(p).cloned())
            .collect();
        tenants.insert(
            path.clone(),
            TenantNode {
                path: path.clone(),
                base: Entities::from_entities(
                    lineage.iter().cloned().chain(actions.iter().cloned()),
                    None,
                )
                .unwrap_or_else(|_| Entities::empty()),
                lineage_uids: lineage.iter().map(Entity::uid).collect(),
                lineage,
                effective: set,
                effective_list: list.clone(),
            },
        );
        effective_lists.insert(path.clone(), list);
    }
    (tenants, policy_count)
}

/// The limits of every `tenant.json` that declares some: the local ones as
/// hierarchical token buckets, the fleet ones for a rate limit service.
fn limits(
    configs: &[Config<'_>],
    rules: FleetRules,
    errors: &mut Vec<Diagnostic>,
) -> (QuotaModel, FleetLimits) {
    let inputs: Vec<LimitsInput<'_>> = configs
        .iter()
        .filter(|(_, c, _)| !c.limits.is_empty())
        .filter_map(|(path, c, src)| {
            src.map(|s| LimitsInput {
                tenant: path,
                file: &s.file,
                text: &s.text,
                limits: &c.limits,
            })
        })
        .collect();
    match crate::quota::spec::compile_with(&inputs, rules) {
        Ok(compiled) => (QuotaModel::new(&compiled), FleetLimits::new(&compiled)),
        Err(ds) => {
            errors.extend(ds);
            Default::default()
        }
    }
}

fn tenant_file_name(path: &TenantPath) -> String {
    if path.is_root() {
        format!(
            "{}/{}",
            crate::bundle::TENANTS_DIR,
            crate::bundle::TENANT_FILE
        )
    } else {
        format!(
            "{}{}/{}",
            crate::bundle::TENANTS_DIR,
            path,
            crate::bundle::TENANT_FILE
        )
    }
}

/// Offsets of the first slot (`?principal`, `?resource`) of each statement
/// that has one, outside comments and strings.
fn slot_offsets(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut in_statement_slot) = (0, false);
    while let Some(&c) = b.get(i) {
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while b.get(i).is_some_and(|&c| c != b'\n') {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while let Some(&c) = b.get(i) {
                    match c {
                        b'\\' => i += 1,
                        b'"' => break,
                        _ => {}
                    }
                    i += 1;
                }
            }
            b';' => in_statement_slot = false,
            b'?' if !in_statement_slot
                && (text
                    .get(i + 1..)
                    .is_some_and(|r| r.starts_with("principal") || r.starts_with("resource"))) =>
            {
                out.push(i);
                in_statement_slot = true;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Parses one `.cedar` file, locates each policy and validates it against the
/// schema. Returns the policies it could read and the errors found.
fn compile_file(
    src: &SourceFile,
    tenant: &TenantPath,
    validator: Option<&SchemaValidator>,
) -> (Vec<CompiledPolicy>, Vec<Diagnostic>) {
    let set = match PolicySet::from_str(&src.text) {
        Ok(set) => set,
        Err(e) => return (Vec::new(), miette_diagnostics(&src.file, &src.text, &e)),
    };
    let mut errors = Vec::new();
    // Each template is located at a slot of its own, in file order.
    let mut slots = slot_offsets(&src.text).into_iter();
    for template in set.templates() {
        let offset = slots.next();
        // Named as policies are: `@id`, else where it is (Cedar's own id,
        // `policy0`, means nothing to the author).
        let name = match (template.annotation("id"), offset) {
            (Some(id), _) => id.to_string(),
            (None, Some(off)) => {
                format!("{}:{}", src.file, crate::diag::line_col(&src.text, off).0)
            }
            (None, None) => src.file.clone(),
        };
        let msg = format!(
            "templates (policies with `?principal` or `?resource` slots) are not supported: `{name}`"
        );
        errors.push(match offset {
            Some(off) => Diagnostic::at_offset(&src.file, &src.text, off, msg),
            None => Diagnostic::new(&src.file, msg),
        });
    }
    errors.extend(validate_file(validator, src, &set));
    // Locate each policy: its original text appears verbatim in the file, in order.
    let mut located: Vec<(usize, &Policy)> = Vec::new();
    for p in set.policies() {
        let text = p.to_cedar().unwrap_or_default();
        let offset = find_policy(&src.text, &text).unwrap_or(0);
        located.push((offset, p));
    }
    located.sort_by_key(|(off, p)| (*off, p.id().to_string()));
    let mut out = Vec::new();
    for (offset, p) in located {
        let (line, column) = crate::diag::line_col(&src.text, offset);
        let id = match p.annotation("id") {
            Some(id) if !id.trim().is_empty() => id.to_string(),
            Some(_) => {
                errors.push(Diagnostic::at(
                    &src.file,
                    line,
                    column,
                    "`@id` must not be empty",
                ));
                continue;
            }
            None => format!("{}:{line}", src.file),
        };
        out.push(CompiledPolicy {
            info: PolicyInfo {
                id,
                tenant: tenant.clone(),
                file: src.file.clone(),
                line,
                column,
                forbid: p.effect() == Effect::Forbid,
                overridable: p.annotation("overridable").is_some(),
            },
            policy: p.clone(),
        });
    }
    (out, errors)
}

/// Byte offset of a policy's text in its file, skipping comments is not needed:
/// Cedar keeps the policy's exact source text.
fn find_policy(file: &str, policy_text: &str) -> Option<usize> {
    let needle = policy_text.trim();
    if needle.is_empty() {
        return None;
    }
    file.find(needle)
}

/// Turns a miette diagnostic from Cedar (parse, validation, schema errors) into
/// located diagnostics, one per label (or one unlocated if it has none).
fn miette_diagnostics(file: &str, text: &str, e: &dyn miette::Diagnostic) -> Vec<Diagnostic> {
    let mut message = e.to_string();
    if let Some(help) = e.help() {
        message = format!("{message} (help: {help})");
    }
    let mut out = Vec::new();
    if let Some(related) = e.related() {
        for r in related {
            out.extend(miette_diagnostics(file, text, r));
        }
        if !out.is_empty() {
            return out;
        }
    }
    match e.labels().and_then(|mut l| l.next()) {
        Some(label) => out.push(Diagnostic::at_offset(file, text, label.offset(), message)),
        None => out.push(Diagnostic::new(file, message)),
    }
    out
}

#[cfg(feature = "schema")]
/// Cedar prefixes validation messages with the parser's own policy id
/// (`for policy `policy0`, ...`), which means nothing to the author: the
/// diagnostic already points at the line.
fn strip_policy_prefix(msg: &str) -> &str {
    if let Some(rest) = msg.strip_prefix("for policy `") {
        if let Some(i) = rest.find("`, ") {
            return rest.get(i + 3..).unwrap_or(msg);
        }
    }
    msg
}

// Schema validation. `tenantgate validate` and `tenantgate bundle` always
// type-check policies against the schema (feature `schema`, on by default).
// The filter builds without it to stay under its 3 MiB size budget: it loads
// bundles the CLI validated, still parses every policy and checks everything
// else, and a policy that goes wrong at run time errors into `on_policy_error`.

#[cfg(feature = "schema")]
type SchemaValidator = cedar_policy::Validator;
#[cfg(feature = "schema")]
type LoadedSchema = cedar_policy::Schema;
#[cfg(not(feature = "schema"))]
type SchemaValidator = ();
#[cfg(not(feature = "schema"))]
type LoadedSchema = ();

#[cfg(feature = "schema")]
fn load_schema(
    bundle: &Bundle,
    errors: &mut Vec<Diagnostic>,
) -> (Option<LoadedSchema>, Option<SchemaValidator>) {
    match &bundle.schema {
        Some(src) => match cedar_policy::Schema::from_cedarschema_str(&src.text) {
            Ok((schema, _warnings)) => (
                Some(schema.clone()),
                Some(cedar_policy::Validator::new(schema)),
            ),
            Err(e) => {
                errors.extend(miette_diagnostics(&src.file, &src.text, &e));
                (None, None)
            }
        },
        None => (None, None),
    }
}

#[cfg(not(feature = "schema"))]
fn load_schema(
    _bundle: &Bundle,
    _errors: &mut [Diagnostic],
) -> (Option<LoadedSchema>, Option<SchemaValidator>) {
    (None, None)
}

#[cfg(feature = "schema")]
fn check_entity(schema: Option<&LoadedSchema>, entity: &Entity) -> Option<String> {
    let schema = schema?;
    Entities::from_entities([entity.clone()], Some(schema))
        .err()
        .map(|e| format!("tenant attributes do not match the schema: {e}"))
}

#[cfg(not(feature = "schema"))]
fn check_entity(_schema: Option<&LoadedSchema>, _entity: &Entity) -> Option<String> {
    None
}

#[cfg(feature = "schema")]
fn validate_file(
    validator: Option<&SchemaValidator>,
    src: &SourceFile,
    set: &PolicySet,
) -> Vec<Diagnostic> {
    let Some(v) = validator else {
        return Vec::new();
    };
    let result = v.validate(set, cedar_policy::ValidationMode::Strict);
    let mut out = Vec::new();
    for e in result.validation_errors() {
        let mut ds = miette_diagnostics(&src.file, &src.text, e);
        for d in &mut ds {
            d.message = format!("schema: {}", strip_policy_prefix(&d.message));
        }
        out.extend(ds);
    }
    out
}

#[cfg(not(feature = "schema"))]
fn validate_file(
    _validator: Option<&SchemaValidator>,
    _src: &SourceFile,
    _set: &PolicySet,
) -> Vec<Diagnostic> {
    Vec::new()
}
