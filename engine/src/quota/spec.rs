//! Reading and validating the `limits` of `tenant.json` files (the keys are in
//! docs/reference.md). Every error is located at the offending key.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::bucket::{Params, MAX_AMOUNT};
use super::LimitsInput;
use crate::diag::{locate_json_key, Diagnostic};
use crate::tenant::{is_valid_segment, shorten, TenantPath};

/// Longest `per`: 365 days.
pub(crate) const MAX_PER_NS: u64 = 365 * DAY_NS;
/// `per` of a top-level limit that does not say.
pub(crate) const DEFAULT_PER_NS: u64 = SECOND_NS;

const SECOND_NS: u64 = 1_000_000_000;
const DAY_NS: u64 = 86_400 * SECOND_NS;
const KEYS: &str = "`rate`, `ceil`, `burst`, `per`, `scope`, `key`, `missing` or `max_keys`";
/// `max_keys` of a keyed limit that does not say.
pub const DEFAULT_MAX_KEYS: u32 = 10_000;
/// Largest `max_keys`.
pub const MAX_MAX_KEYS: u32 = 1_000_000;

/// Where a limit is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Token buckets in this Envoy process (proxy-wasm shared data).
    #[default]
    Local,
    /// The rate limit service, across the fleet.
    Fleet,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Local => "local",
            Scope::Fleet => "fleet",
        })
    }
}

/// `"local"` or `"fleet"`; errors are message tails read after the key name.
pub(crate) fn parse_scope(v: &serde_json::Value) -> Result<Scope, String> {
    match v.as_str() {
        Some("local") => Ok(Scope::Local),
        Some("fleet") => Ok(Scope::Fleet),
        _ => Err(format!(
            "must be `\"local\"` or `\"fleet\"`, got `{}`",
            v.to_string().chars().take(80).collect::<String>()
        )),
    }
}

/// The keys of a limit object that a fleet limit may not have.
pub(crate) fn local_only_keys(
    fields: &serde_json::Map<String, serde_json::Value>,
) -> impl Iterator<Item = &'static str> + '_ {
    ["ceil", "burst"]
        .into_iter()
        .filter(|k| fields.contains_key(*k))
}

/// One node's compiled limit.
#[derive(Debug)]
pub(crate) struct Limit {
    pub node: TenantPath,
    pub name: Arc<str>,
    pub params: Params,
    /// Its shared-data key; see the module doc of `quota` for the layout.
    pub key: String,
    /// Local (token buckets in this process) or fleet (the rate limit service).
    pub scope: Scope,
    /// A keyed limit: one bucket per value of its key (see `keyed`).
    pub keyed: Option<KeySpec>,
    /// Its id among the children of its parent (the nearest ancestor with a
    /// limit of the same name) when that parent has two or more: the parent
    /// then shares its spare capacity fairly among them (see `fair`).
    pub slot: Option<u32>,
}

/// What a keyed limit counts by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// The request's principal id.
    Principal,
    /// A request header (name in lower case).
    Header(String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Principal => f.write_str("principal"),
            KeySource::Header(h) => write!(f, "header `{h}`"),
        }
    }
}

/// What a request without the key's value gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Missing {
    /// 400 (the default).
    Refuse,
    /// The keyed limit does not apply to it.
    Skip,
}

/// A keyed limit's key: where its value comes from, what its absence does,
/// and how many values one process tracks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySpec {
    pub source: KeySource,
    pub missing: Missing,
    pub max_keys: u32,
}

/// A `rate` or `ceil` as written: tokens, or a share of the nearest ancestor's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Amount {
    Tokens(u64),
    /// Basis points (1/100 of a percent), 1..=10000.
    Share(u32),
}

/// What a node's resolved limit contributes to validating its descendants.
#[derive(Debug, Clone)]
enum Def {
    Ok(usize),
    /// Had an error: descendants relying on it are not checked against it.
    Broken,
}

struct Entry {
    limit: Arc<Limit>,
    /// Index of the nearest ancestor's limit of the same name.
    parent: Option<usize>,
    input: usize,
}

/// The compiled limits, parents before children, with fleet limits as flat
/// caps (`per_request` and `batched` modes).
pub(crate) fn compile(inputs: &[LimitsInput<'_>]) -> Result<Vec<Arc<Limit>>, Vec<Diagnostic>> {
    compile_with(inputs, FleetRules::FlatCaps)
}

/// What a fleet limit may declare, from `rate_limit_service.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum FleetRules {
    /// `per_request`, `batched`: a cap per window; `ceil` and `burst` are errors.
    #[default]
    FlatCaps,
    /// `assigned`: the service divides the fleet capacity down the tree as
    /// HTB does, so `ceil` and `burst` mean what they mean locally.
    Hierarchical,
}

/// [`compile`] under the given rules for fleet limits.
pub(crate) fn compile_with(
    inputs: &[LimitsInput<'_>],
    rules: FleetRules,
) -> Result<Vec<Arc<Limit>>, Vec<Diagnostic>> {
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| inputs.get(i).map(|x| (x.tenant.depth(), x.tenant.clone()));
        key(a).cmp(&key(b))
    });
    let mut errors = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    let mut defs: HashMap<(TenantPath, String), Def> = HashMap::new();
    let mut seen: HashMap<TenantPath, ()> = HashMap::new();
    for &i in &order {
        let Some(input) = inputs.get(i) else { continue };
        if seen.insert(input.tenant.clone(), ()).is_some() {
            errors.push(Diagnostic::new(
                input.file,
                format!("tenant `{}` declares its limits twice", input.tenant),
            ));
            continue;
        }
        for (name, value) in input.limits {
            let def = match compile_one(input, i, name, value, rules, &defs, &entries) {
                Ok(entry) => {
                    entries.push(entry);
                    Def::Ok(entries.len() - 1)
                }
                Err(mut ds) => {
                    errors.append(&mut ds);
                    Def::Broken
                }
            };
            defs.insert((input.tenant.clone(), name.clone()), def);
        }
    }
    check_sums(inputs, &entries, &mut errors);
    assign_slots(&mut entries);
    if errors.is_empty() {
        Ok(entries.into_iter().map(|e| e.limit).collect())
    } else {
        Err(errors)
    }
}

/// A diagnostic at `limits.<name>.<key>` of `input`'s file (or the nearest
/// key that exists).
fn at(input: &LimitsInput<'_>, name: &str, key: Option<&str>, message: String) -> Diagnostic {
    let mut path = vec!["limits", name];
    path.extend(key);
    match locate_json_key(input.text, &path) {
        Some(offset) => Diagnostic::at_offset(input.file, input.text, offset, message),
        None => Diagnostic::new(input.file, message),
    }
}

/// The keys of one limit as written, before shares are resolved.
struct Fields<'a> {
    rate: Amount,
    ceil: Option<Amount>,
    burst: Option<u64>,
    per: Option<u64>,
    scope: Scope,
    key: Option<KeySource>,
    missing: Option<Missing>,
    max_keys: Option<u32>,
    /// The object as written, to locate keys.
    raw: &'a serde_json::Map<String, serde_json::Value>,
}

fn compile_one(
    input: &LimitsInput<'_>,
    input_index: usize,
    name: &str,
    value: &serde_json::Value,
    rules: FleetRules,
    defs: &HashMap<(TenantPath, String), Def>,
    entries: &[Entry],
) -> Result<Entry, Vec<Diagnostic>> {
    let fields = parse_fields(input, name, value, rules)?;
    let parent = nearest_parent(input, name, &fields, defs, entries)?;
    if let Some((_, p)) = parent {
        if fields.key.is_some() || p.limit.keyed.is_some() {
            let keyed = if fields.key.is_some() { "this" } else { "its" };
            return Err(vec![at(input, name, fields.key.as_ref().map(|_| "key"), format!(
                "limit `{name}`: `{}` declares a limit of the same name; {keyed} one is keyed, and a keyed limit's name is its own along a branch (use another name)",
                p.limit.node
            ))]);
        }
    }
    let params = resolve(input, name, &fields, parent.map(|(_, e)| e))?;
    let keyed = fields.key.clone().map(|source| KeySpec {
        source,
        missing: fields.missing.unwrap_or(Missing::Refuse),
        max_keys: fields.max_keys.unwrap_or(DEFAULT_MAX_KEYS),
    });
    let key = match keyed {
        Some(_) => format!("tenantgate:keyed:v1:{}:{name}:", input.tenant),
        None => bucket_key(input.tenant, name),
    };
    Ok(Entry {
        limit: Arc::new(Limit {
            node: input.tenant.clone(),
            name: Arc::from(name),
            params,
            key,
            scope: fields.scope,
            keyed,
            slot: None,
        }),
        parent: parent.map(|(i, _)| i),
        input: input_index,
    })
}

/// Reads the keys of one limit: every unknown key and bad value reported,
/// each located at its key.
fn parse_fields<'a>(
    input: &LimitsInput<'_>,
    name: &str,
    value: &'a serde_json::Value,
    rules: FleetRules,
) -> Result<Fields<'a>, Vec<Diagnostic>> {
    let err = |key: Option<&str>, msg: String| vec![at(input, name, key, msg)];
    if !is_valid_segment(name) {
        return Err(err(
            None,
            format!(
                "limit name `{}` is not valid: use lowercase letters, digits, `_` and `-`, starting with a letter or digit, at most 63 characters",
                shorten(name)
            ),
        ));
    }
    let Some(raw) = value.as_object() else {
        return Err(err(
            None,
            format!("limit `{name}` must be an object like `{{\"rate\": 100, \"per\": \"1s\"}}`, got `{}`", describe(value)),
        ));
    };
    let mut p = Parsed::default();
    let mut errors = Vec::new();
    for (key, v) in raw {
        let message = match p.read(key, v) {
            Some(Ok(())) => continue,
            Some(Err(tail)) => format!("limit `{name}`: `{key}` {tail}"),
            None => format!(
                "limit `{name}`: unknown key `{}` (expected {KEYS})",
                shorten(key)
            ),
        };
        errors.push(at(input, name, Some(key), message));
    }
    errors.extend(combination_errors(input, name, raw, &p, rules));
    match (p.rate, errors.is_empty()) {
        (Some(rate), true) => Ok(Fields {
            rate,
            ceil: p.ceil,
            burst: p.burst,
            per: p.per,
            scope: p.scope,
            key: p.key,
            missing: p.missing,
            max_keys: p.max_keys,
            raw,
        }),
        _ => Err(errors),
    }
}

/// A limit's keys as read so far.
#[derive(Default)]
struct Parsed {
    rate: Option<Amount>,
    ceil: Option<Amount>,
    burst: Option<u64>,
    per: Option<u64>,
    scope: Scope,
    key: Option<KeySource>,
    missing: Option<Missing>,
    max_keys: Option<u32>,
}

impl Parsed {
    /// Reads one key: `None` for an unknown key, `Err` with the message's
    /// tail for a bad value.
    fn read(&mut self, key: &str, v: &serde_json::Value) -> Option<Result<(), String>> {
        Some(match key {
            "rate" => parse_amount(v, true).map(|a| self.rate = Some(a)),
            "ceil" => parse_amount(v, true).map(|a| self.ceil = Some(a)),
            "burst" => parse_amount(v, false).map(|a| {
                if let Amount::Tokens(n) = a {
                    self.burst = Some(n);
                }
            }),
            "per" => parse_per(v).map(|p| self.per = Some(p)),
            "scope" => parse_scope(v).map(|s| self.scope = s),
            "key" => parse_key(v).map(|k| self.key = Some(k)),
            "missing" => match v.as_str() {
                Some("skip") => Ok(Missing::Skip),
                Some("refuse") => Ok(Missing::Refuse),
                _ => Err(format!(
                    "must be `\"skip\"` or `\"refuse\"` (a 400), got `{}`",
                    describe(v)
                )),
            }
            .map(|m| self.missing = Some(m)),
            "max_keys" => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) if (1..=MAX_MAX_KEYS).contains(&n) => Ok(n),
                _ => Err(format!(
                    "must be a whole number from 1 to {MAX_MAX_KEYS}, got `{}`",
                    describe(v)
                )),
            }
            .map(|n| self.max_keys = Some(n)),
            _ => return None,
        })
    }
}

/// Errors of keys that do not go together: a missing `rate`, keyed-only
/// keys without `key`, what a keyed or a fleet limit cannot have.
fn combination_errors(
    input: &LimitsInput<'_>,
    name: &str,
    raw: &serde_json::Map<String, serde_json::Value>,
    p: &Parsed,
    rules: FleetRules,
) -> Vec<Diagnostic> {
    let mut errors = Vec::new();
    let mut err = |key: Option<&str>, msg: String| errors.push(at(input, name, key, msg));
    if !raw.contains_key("rate") {
        err(None, format!("limit `{name}`: `rate` is required"));
    }
    if p.key.is_none() {
        for k in ["missing", "max_keys"]
            .into_iter()
            .filter(|k| raw.contains_key(*k))
        {
            err(
                Some(k),
                format!("limit `{name}`: `{k}` only applies to a keyed limit (one with `key`)"),
            );
        }
    } else {
        if raw.contains_key("ceil") {
            err(Some("ceil"), format!("limit `{name}`: a keyed limit has no `ceil`: its buckets (one per key value) do not borrow"));
        }
        if matches!(p.rate, Some(Amount::Share(_))) {
            err(
                Some("rate"),
                format!(
                    "limit `{name}`: a keyed limit's `rate` is tokens per key value, not a share"
                ),
            );
        }
        if p.scope == Scope::Fleet {
            err(Some("key"), format!("limit `{name}`: keyed fleet limits are not supported; make it local (the default) or remove `key`"));
        }
    }
    if p.scope == Scope::Fleet && rules == FleetRules::FlatCaps {
        for key in local_only_keys(raw) {
            err(Some(key), format!("limit `{name}`: `{key}` is a local notion and cannot be set on a fleet limit (`\"scope\": \"fleet\"`): a fleet limit is at most `rate` per `per` window, unless `rate_limit_service.mode` is `\"assigned\"`"));
        }
    }
    errors
}

/// The nearest ancestor that defines the same limit name (index and entry),
/// if any; it must have the same scope.
fn nearest_parent<'e>(
    input: &LimitsInput<'_>,
    name: &str,
    fields: &Fields<'_>,
    defs: &HashMap<(TenantPath, String), Def>,
    entries: &'e [Entry],
) -> Result<Option<(usize, &'e Entry)>, Vec<Diagnostic>> {
    let mut cursor = input.tenant.parent();
    while let Some(p) = cursor {
        if let Some(def) = defs.get(&(p.clone(), name.to_owned())) {
            let parent = match def {
                // Its own error is reported; checking against it would only echo it.
                Def::Broken => return Err(Vec::new()),
                Def::Ok(i) => entries.get(*i).map(|e| (*i, e)),
            };
            if let Some((_, e)) = parent.filter(|(_, e)| e.limit.scope != fields.scope) {
                let key = fields.raw.contains_key("scope").then_some("scope");
                return Err(vec![at(input, name, key, format!("limit `{name}`: scope `{}` differs from the scope `{}` of `{}`; one limit name keeps one scope along a branch (use another name)", fields.scope, e.limit.scope, e.limit.node))]);
            }
            return Ok(parent);
        }
        cursor = p.parent();
    }
    Ok(None)
}

/// The limit's numbers: shares of the parent's rate resolved, the window
/// inherited, defaults applied, and the bounds against the parent checked.
fn resolve(
    input: &LimitsInput<'_>,
    name: &str,
    fields: &Fields<'_>,
    parent: Option<&Entry>,
) -> Result<Params, Vec<Diagnostic>> {
    let r = Resolving {
        input,
        name,
        parent: parent.map(|e| &e.limit.params),
        parent_node: parent.map(|e| e.limit.node.as_str()).unwrap_or(""),
    };
    let rate = r.tokens("rate", fields.rate)?;
    let ceil = match fields.ceil {
        Some(c) => r.tokens("ceil", c)?,
        None => rate,
    };
    let per_ns = r.window(fields.per)?;
    let mut errors = Vec::new();
    if rate > ceil {
        errors.push(r.at(
            "ceil",
            format!("limit `{name}`: `rate` {rate} is larger than `ceil` {ceil}"),
        ));
    }
    if let (Some(pp), Some(_)) = (r.parent, fields.ceil) {
        if ceil > pp.ceil {
            errors.push(r.at(
                "ceil",
                format!(
                    "limit `{name}`: `ceil` {ceil} is larger than the ceil {} of `{}` (a tenant cannot borrow more than its parent may use)",
                    pp.ceil, r.parent_node
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Params::new(
        rate,
        ceil,
        fields.burst.unwrap_or(rate),
        per_ns,
    ))
}

/// One limit being resolved against its nearest ancestor's of the same name.
struct Resolving<'a> {
    input: &'a LimitsInput<'a>,
    name: &'a str,
    parent: Option<&'a Params>,
    parent_node: &'a str,
}

impl Resolving<'_> {
    fn at(&self, key: &str, msg: String) -> Diagnostic {
        at(self.input, self.name, Some(key), msg)
    }

    /// An amount in tokens: a share is of the parent's rate, rounded down,
    /// at least one token.
    fn tokens(&self, key: &str, a: Amount) -> Result<u64, Vec<Diagnostic>> {
        let name = self.name;
        let bp = match a {
            Amount::Tokens(n) => return Ok(n),
            Amount::Share(bp) => bp,
        };
        let Some(pp) = self.parent else {
            return Err(vec![self.at(
                key,
                format!(
                    "limit `{name}`: `{key}` is a share ({}) but no ancestor of `{}` defines limit `{name}` to take it from",
                    fmt_share(bp),
                    self.input.tenant
                ),
            )]);
        };
        let n = u64::try_from(u128::from(pp.rate) * u128::from(bp) / 10_000).unwrap_or(u64::MAX);
        if n == 0 {
            return Err(vec![self.at(
                key,
                format!(
                    "limit `{name}`: `{key}` {} of the rate {} of `{}` is less than one token",
                    fmt_share(bp),
                    pp.rate,
                    self.parent_node
                ),
            )]);
        }
        Ok(n)
    }

    /// The window: the parent's (a child may only repeat it), else `per`,
    /// else one second.
    fn window(&self, per: Option<u64>) -> Result<u64, Vec<Diagnostic>> {
        Ok(match (per, self.parent) {
            (Some(p), Some(pp)) if p != pp.per_ns => {
                return Err(vec![self.at(
                    "per",
                    format!(
                        "limit `{}`: `per` `{}` differs from the window `{}` of `{}`; one limit name keeps one window along a branch (omit `per` to inherit it)",
                        self.name,
                        fmt_per(p),
                        fmt_per(pp.per_ns),
                        self.parent_node
                    ),
                )]);
            }
            (Some(p), _) => p,
            (None, Some(pp)) => pp.per_ns,
            (None, None) => DEFAULT_PER_NS,
        })
    }
}

/// For each limit, its children's rates add up to at most its own rate.
fn check_sums(inputs: &[LimitsInput<'_>], entries: &[Entry], errors: &mut Vec<Diagnostic>) {
    let mut children: BTreeMap<usize, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        if let Some(p) = e.parent {
            children.entry(p).or_default().push(e);
        }
    }
    for (p, kids) in children {
        let (Some(parent), Some(input)) = (
            entries.get(p),
            entries.get(p).and_then(|e| inputs.get(e.input)),
        ) else {
            continue;
        };
        let sum: u128 = kids.iter().map(|k| u128::from(k.limit.params.rate)).sum();
        if sum > u128::from(parent.limit.params.rate) {
            let mut list: Vec<String> = kids
                .iter()
                .take(5)
                .map(|k| format!("`{}` {}", k.limit.node, k.limit.params.rate))
                .collect();
            if kids.len() > 5 {
                list.push(format!("and {} more", kids.len() - 5));
            }
            let name = &parent.limit.name;
            errors.push(at(
                input,
                name,
                Some("rate"),
                format!(
                    "limit `{name}`: the rates of the children add up to {sum} ({}), more than this tenant's rate {}",
                    list.join(", "),
                    parent.limit.params.rate
                ),
            ));
        }
    }
}

/// Gives every limit whose parent has two or more children its id there: a
/// hash of its tenant path, so it stays the same when a reload adds or
/// removes siblings (the parent's stored slots keep meaning the same child).
fn assign_slots(entries: &mut [Entry]) {
    let mut children: HashMap<usize, usize> = HashMap::new();
    for e in entries.iter() {
        if let Some(p) = e.parent {
            *children.entry(p).or_default() += 1;
        }
    }
    for e in entries.iter_mut() {
        let siblings = e.parent.and_then(|p| children.get(&p)).copied();
        if siblings.unwrap_or(0) >= 2 {
            if let Some(limit) = Arc::get_mut(&mut e.limit) {
                limit.slot = Some(child_id(&limit.node));
            }
        }
    }
}

/// A child's id in its parent's fairness state: 32 bits of SHA-256 over its
/// tenant path.
fn child_id(node: &TenantPath) -> u32 {
    let digest = Sha256::digest(node.as_str().as_bytes());
    let mut word = [0u8; 4];
    for (w, b) in word.iter_mut().zip(digest.iter()) {
        *w = *b;
    }
    u32::from_le_bytes(word)
}

/// `tenantgate:quota:v3:<tenant>:<name>`: the same key whatever the limit's
/// numbers, so a reload never leaves a key behind; the stored value carries
/// the numbers' stamp ([`Params::stamp`]), and a value stamped by other
/// numbers starts again from full buckets, in place.
fn bucket_key(node: &TenantPath, name: &str) -> String {
    format!("tenantgate:quota:v3:{node}:{name}")
}

/// `"principal"` or `{"header": NAME}`; errors are message tails.
fn parse_key(v: &serde_json::Value) -> Result<KeySource, String> {
    if v.as_str() == Some("principal") {
        return Ok(KeySource::Principal);
    }
    let header = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("header"))
        .and_then(serde_json::Value::as_str);
    match header {
        Some(h) if crate::settings::is_header_name(h) => Ok(KeySource::Header(h.to_string())),
        Some(h) => Err(format!(
            "`{{\"header\": \"{}\"}}`: not a header name (lower case letters, digits and `-`)",
            shorten(h)
        )),
        None => Err(format!(
            "must be `\"principal\"` or `{{\"header\": \"x-api-key\"}}`, got `{}`",
            describe(v)
        )),
    }
}

/// A JSON value as written, cut to 80 bytes (JSON already escapes control
/// characters).
fn describe(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() <= 80 {
        return s;
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default())
}

/// A `rate`, `ceil` (`allow_share`) or `burst`. Errors are message tails that
/// read after the key's name.
fn parse_amount(v: &serde_json::Value, allow_share: bool) -> Result<Amount, String> {
    use serde_json::Value;
    let what = if allow_share {
        "a whole number of tokens or a share like `\"40%\"`"
    } else {
        "a whole number of tokens"
    };
    match v {
        Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                if n == 0 {
                    Err("must be at least 1, got `0`".to_string())
                } else if n > MAX_AMOUNT {
                    Err(format!("must be at most {MAX_AMOUNT}, got `{n}`"))
                } else {
                    Ok(Amount::Tokens(n))
                }
            } else if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
                Err(format!("must be positive, got `{n}`"))
            } else if n.as_f64().is_some_and(|f| f.fract() == 0.0) {
                Err(format!("must be at most {MAX_AMOUNT}, got `{n}`"))
            } else {
                Err(format!("must be {what}, got `{n}`"))
            }
        }
        Value::String(s) if allow_share && s.ends_with('%') => parse_share(s).map(Amount::Share),
        _ => Err(format!("must be {what}, got `{}`", describe(v))),
    }
}

/// `"40%"`, `"12.5%"`, `"0.25%"` in basis points.
fn parse_share(s: &str) -> Result<u32, String> {
    let bad = || {
        format!(
            "must be a share like `\"40%\"` or `\"12.5%\"`, got `\"{}\"`",
            shorten(s)
        )
    };
    let body = s.strip_suffix('%').ok_or_else(bad)?;
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (body.contains('.') && !digits(frac)) || frac.len() > 2 || int.len() > 6 {
        return Err(bad());
    }
    let int: u32 = int.parse().map_err(|_| bad())?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    let bp = int.saturating_mul(100).saturating_add(frac);
    if bp == 0 {
        return Err(format!("share `\"{}\"` must be more than 0%", shorten(s)));
    }
    if bp > 10_000 {
        return Err(format!("share `\"{}\"` is over 100%", shorten(s)));
    }
    Ok(bp)
}

/// `"1s"`, `"5m"`, `"1h"`, `"1d"`: `<n><s|m|h|d>` in nanoseconds.
pub(crate) fn parse_per(v: &serde_json::Value) -> Result<u64, String> {
    let bad = || {
        format!(
            "`{}` does not parse: write a whole number and a unit `s`, `m`, `h` or `d`, such as `\"1s\"` or `\"5m\"`",
            describe(v)
        )
    };
    let s = v.as_str().ok_or_else(bad)?;
    let unit_ns = match s.bytes().last() {
        Some(b's') => SECOND_NS,
        Some(b'm') => 60 * SECOND_NS,
        Some(b'h') => 3_600 * SECOND_NS,
        Some(b'd') => DAY_NS,
        _ => return Err(bad()),
    };
    let digits = s.get(..s.len() - 1).ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!("`{}` must be at least one second", describe(v)));
    }
    match n.checked_mul(unit_ns) {
        Some(ns) if ns <= MAX_PER_NS => Ok(ns),
        _ => Err(format!(
            "`{}` is longer than the maximum `\"365d\"`",
            describe(v)
        )),
    }
}

/// A window as an author would write it (`1s`, `90s`, `5m`, `1d`).
pub(crate) fn fmt_per(ns: u64) -> String {
    let s = ns / SECOND_NS;
    match (s % 86_400, s % 3_600, s % 60) {
        (0, _, _) => format!("{}d", s / 86_400),
        (_, 0, _) => format!("{}h", s / 3_600),
        (_, _, 0) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

fn fmt_share(bp: u32) -> String {
    match bp % 100 {
        0 => format!("`\"{}%\"`", bp / 100),
        frac => format!(
            "`\"{}.{}%\"`",
            bp / 100,
            format!("{frac:02}").trim_end_matches('0')
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_pers() {
        for (v, ns) in [
            ("1s", SECOND_NS),
            ("90s", 90 * SECOND_NS),
            ("5m", 300 * SECOND_NS),
            ("1h", 3_600 * SECOND_NS),
            ("1d", DAY_NS),
            ("365d", MAX_PER_NS),
        ] {
            assert_eq!(parse_per(&json!(v)), Ok(ns), "{v}");
            assert_eq!(parse_per(&json!(fmt_per(ns))), Ok(ns), "{v}");
        }
        for v in [
            json!("1"),
            json!("s"),
            json!("1w"),
            json!("-1s"),
            json!("1.5s"),
            json!(" 1s"),
            json!(1),
            json!("1ms"),
            json!("é"),
        ] {
            assert!(parse_per(&v).unwrap_err().contains("does not parse"), "{v}");
        }
        assert!(parse_per(&json!("0s"))
            .unwrap_err()
            .contains("at least one second"));
        assert!(parse_per(&json!("366d")).unwrap_err().contains("maximum"));
        assert!(parse_per(&json!("999999999999d"))
            .unwrap_err()
            .contains("maximum"));
    }

    #[test]
    fn parses_shares() {
        assert_eq!(parse_share("40%"), Ok(4_000));
        assert_eq!(parse_share("12.5%"), Ok(1_250));
        assert_eq!(parse_share("0.25%"), Ok(25));
        assert_eq!(parse_share("100%"), Ok(10_000));
        assert!(parse_share("100.01%").unwrap_err().contains("over 100%"));
        assert!(parse_share("0%").unwrap_err().contains("more than 0%"));
        for bad in ["%", "4x%", ".5%", "5.%", "1.234%", "-5%", "9999999999%"] {
            assert!(
                parse_share(bad)
                    .unwrap_err()
                    .starts_with("must be a share like"),
                "{bad}"
            );
        }
        assert_eq!(fmt_share(1_250), "`\"12.5%\"`");
        assert_eq!(fmt_share(4_000), "`\"40%\"`");
    }

    #[test]
    fn keys_name_the_tenant_and_the_limit_not_its_numbers() {
        let t = TenantPath::parse("/acme").unwrap();
        assert_eq!(bucket_key(&t, "rps"), "tenantgate:quota:v3:/acme:rps");
        let (a, b) = (
            Params::new(10, 10, 10, SECOND_NS),
            Params::new(10, 20, 10, SECOND_NS),
        );
        assert_eq!(a.stamp, Params::new(10, 10, 10, SECOND_NS).stamp);
        assert_ne!(a.stamp, b.stamp);
        assert_ne!(a.stamp, Params::new(10, 10, 10, 60 * SECOND_NS).stamp);
    }
}
