//! The compiled bundle: per-tenant policy sets prepared at load time, so a
//! decision does no parsing and only looks at the policies of the request's
//! tenant and its ancestors.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Effect, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    RestrictedExpression,
};

use crate::bundle::{json_error, Bundle, BundleTenant, SourceFile, TenantConfig};
use crate::decision::Decision;
use crate::diag::{locate_json_key, Diagnostic, Diagnostics};
use crate::entities::{json_to_expr, Types};
use crate::quota::keyed::{Fingerprint, KeyedOutcome};
use crate::quota::{BucketStore, LimitsInput, QuotaModel};
use crate::request::Request;
use crate::settings::{FleetMode, OnPolicyError, Settings};
use crate::tenant::TenantPath;

/// A map keyed by tenant paths from the bundle, with the fast hasher of
/// configuration keys.
type TenantMap<V> = HashMap<TenantPath, V, std::hash::BuildHasherDefault<crate::quota::KeyHasher>>;

/// Where a policy came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyInfo {
    /// `@id` when present, else `<file>:<line>`.
    pub id: String,
    pub tenant: TenantPath,
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub forbid: bool,
    pub overridable: bool,
}

#[derive(Debug)]
struct CompiledPolicy {
    info: PolicyInfo,
    policy: Policy,
}

#[derive(Debug)]
struct TenantNode {
    path: TenantPath,
    /// Tenant entities from the root down to this tenant.
    lineage: Vec<Entity>,
    /// Their uids: the parents of a `Route` here and of a `User` at home here.
    lineage_uids: std::collections::HashSet<EntityUid>,
    /// The lineage and the action entities, with the transitive closure done.
    base: Entities,
    /// The policies that apply here: this tenant's and its ancestors', overrides applied.
    effective: PolicySet,
    effective_list: Vec<Arc<CompiledPolicy>>,
}

/// A loaded bundle, ready to decide.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    version: String,
    types: Types,
    /// Looked up with request data on every request, never filled from it:
    /// the fast hasher of configuration keys is safe here.
    tenants: TenantMap<TenantNode>,
    authorizer: Authorizer,
    quotas: QuotaModel,
    policy_count: usize,
    cache: crate::cache::DecisionCache,
    /// True if some policy mentions `source_ip`: only then does the filter
    /// ask the host for the downstream address.
    uses_source_ip: bool,
    /// This worker's quota leases (see `quota::Leases`).
    leases: crate::quota::Leases,
    /// This worker's batched fleet-limit state (see `quota::FleetState`).
    fleet: crate::quota::FleetState,
    /// The process's secret for keyed limits' fingerprints, read from (or
    /// put in) shared data at the first keyed admission.
    fingerprint: std::sync::OnceLock<crate::quota::keyed::Fingerprint>,
}

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
        let quotas = quota_model(&configs, &mut errors);
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
            policy_count,
            cache: crate::cache::DecisionCache::new(crate::cache::KeyShape::from_texts(
                policy_texts(),
            )),
            uses_source_ip: policy_texts().any(|t| t.contains("source_ip")),
            leases: crate::quota::Leases::default(),
            fleet: crate::quota::FleetState::default(),
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// This worker's quota leases.
    pub fn leases(&self) -> &crate::quota::Leases {
        &self.leases
    }

    /// Gives back the unspent tokens of expired leases (on a tick).
    pub fn return_expired_leases(
        &self,
        now_ns: u64,
        store: &dyn BucketStore,
    ) -> Result<u64, crate::quota::StoreError> {
        self.leases.return_expired(&self.quotas, now_ns, store)
    }

    /// Gives back the unspent tokens of every lease (before this engine is
    /// replaced by a new bundle's).
    pub fn return_all_leases(
        &self,
        store: &dyn BucketStore,
    ) -> Result<u64, crate::quota::StoreError> {
        self.leases.return_all(&self.quotas, store)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The bundle version (`sha256:...`).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn quotas(&self) -> &QuotaModel {
        &self.quotas
    }

    /// True if the bundle declares this tenant.
    /// The bundle's path for `text` when it is a declared tenant written in
    /// canonical form (a shared clone, no allocation).
    pub fn known_tenant(&self, text: &str) -> Option<TenantPath> {
        self.tenants.get_key_value(text).map(|(k, _)| k.clone())
    }

    pub fn has_tenant(&self, tenant: &TenantPath) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// Every tenant of the bundle, sorted.
    pub fn tenants(&self) -> Vec<&TenantPath> {
        let mut v: Vec<_> = self.tenants.keys().collect();
        v.sort();
        v
    }

    /// Number of policies in the bundle.
    pub fn policy_count(&self) -> usize {
        self.policy_count
    }

    /// The policies that apply to requests for `tenant`, ancestors' first.
    pub fn effective_policies(&self, tenant: &TenantPath) -> Vec<&PolicyInfo> {
        self.tenants
            .get(tenant)
            .map(|n| n.effective_list.iter().map(|p| &p.info).collect())
            .unwrap_or_default()
    }

    /// True if the policies read `context.source_ip`.
    pub fn uses_source_ip(&self) -> bool {
        self.uses_source_ip
    }

    /// The whole decision: policies first; only a request they allow is
    /// charged against the quotas (a request denied by policy costs nothing).
    /// A store failure gives the `on_error` decision. Fleet limits in
    /// `batched` mode refuse here when the service said they are over, and
    /// count what is admitted; in `per_request` mode see
    /// [`Engine::decide_refundable`].
    pub fn decide(&self, req: &Request, store: &dyn BucketStore) -> Decision {
        self.decide_refundable(req, store).0
    }

    /// [`Engine::decide`], and, when a `per_request` fleet check is still to
    /// come for this request ([`Engine::fleet_check`]), what its local
    /// admission charged, so a fleet refusal can give it back
    /// ([`Engine::refund`]). Such requests are admitted exactly, without a
    /// worker lease.
    pub fn decide_refundable(
        &self,
        req: &Request,
        store: &dyn BucketStore,
    ) -> (Decision, Option<crate::quota::Refund>) {
        let decision = self.decide_policy_cached(req);
        if !decision.is_allowed() {
            return (decision, None);
        }
        let cost = self.settings.cost_of(&req.method, req.action);
        let fleet = self.rate_limit_service().filter(|_| {
            self.fleet_limits()
                .indices_for(&req.tenant)
                .next()
                .is_some()
        });
        let per_request = fleet.is_some_and(|r| r.mode == FleetMode::PerRequest);
        let batched = fleet.is_some_and(|r| r.mode == FleetMode::Batched);
        if batched {
            if let Some(q) = self.fleet_refusal(&req.tenant, cost, req.time_ns) {
                return (Decision::over_quota(q), None);
            }
        }
        if self.quotas.is_empty() {
            if batched {
                self.fleet_count(&req.tenant, cost);
            }
            return (decision, None);
        }
        let exact = per_request && cost > 0;
        match self.admit_local(req, cost, exact, store) {
            Local::Admitted(q, refund) => {
                if batched {
                    self.fleet_count(&req.tenant, cost);
                }
                let refund = if per_request { refund } else { None };
                (
                    Decision {
                        quota: Some(q),
                        ..decision
                    },
                    refund,
                )
            }
            Local::Refused(refused) => (refused, None),
        }
    }

    /// The local quotas alone, for a request counted as allowed by policy:
    /// keyed limits first, then the hierarchical buckets, as in
    /// [`Engine::decide`], but admitted exactly (no worker lease) and without
    /// fleet limits. What `tenantgate simulate` replays.
    pub fn decide_quotas(&self, req: &Request, store: &dyn BucketStore) -> Decision {
        let decision = Decision::allow(Vec::new(), Vec::new());
        if self.quotas.is_empty() {
            return decision;
        }
        let cost = self.settings.cost_of(&req.method, req.action);
        match self.admit_local(req, cost, true, store) {
            Local::Admitted(q, _) => Decision {
                quota: Some(q),
                ..decision
            },
            Local::Refused(refused) => refused,
        }
    }

    /// Admission against the local limits: the keyed ones first (a refusal
    /// there charges nothing anywhere), then the hierarchical buckets, exactly
    /// or through this worker's lease; the keyed charges are given back when
    /// those refuse.
    fn admit_local(&self, req: &Request, cost: u64, exact: bool, store: &dyn BucketStore) -> Local {
        let store_error = |e: crate::quota::StoreError| {
            Decision::error(self.settings.on_error, format!("quota store: {e}"))
        };
        let (keyed, keyed_charges) = match self.admit_keyed(req, cost, store) {
            Ok(KeyedOutcome::Admitted(statuses, charges)) => (statuses, charges),
            Ok(KeyedOutcome::Refused(q)) => return Local::Refused(Decision::over_quota(q)),
            Ok(KeyedOutcome::Missing(message)) => {
                return Local::Refused(Decision::bad_request(message))
            }
            Err(e) => return Local::Refused(store_error(e)),
        };
        let admitted = if exact {
            self.quotas
                .admit_refundable(&req.tenant, cost, req.time_ns, store)
        } else {
            self.quotas
                .admit_leased(&self.leases, &req.tenant, cost, req.time_ns, store)
                .map(|q| (q, None))
        };
        let give_back = || {
            // Best effort: the decision stands whatever the store says.
            let _ = self.quotas.refund_keyed(&keyed_charges, store);
        };
        match admitted {
            Ok((q, refund)) if q.admitted => {
                let refund = if exact {
                    crate::quota::Refund::join(refund, keyed_charges)
                } else {
                    None
                };
                Local::Admitted(q.with_keyed(keyed, cost), refund)
            }
            Ok((q, _)) => {
                give_back();
                Local::Refused(Decision::over_quota(q))
            }
            Err(e) => {
                give_back();
                Local::Refused(store_error(e))
            }
        }
    }

    /// Reads (or creates) the process's keyed-limit seed now, so that no
    /// request pays for it; does nothing without keyed limits. The filter
    /// calls it at configure time.
    pub fn load_keyed_seed(&self, store: &dyn BucketStore) -> Result<(), crate::quota::StoreError> {
        if self.quotas.keyed().is_empty() || self.fingerprint.get().is_some() {
            return Ok(());
        }
        let f = Fingerprint::from_store(store, fresh_seed())?;
        let _ = self.fingerprint.get_or_init(|| f);
        Ok(())
    }

    /// The keyed limits' part of a decision.
    fn admit_keyed(
        &self,
        req: &Request,
        cost: u64,
        store: &dyn BucketStore,
    ) -> Result<KeyedOutcome, crate::quota::StoreError> {
        // No keyed limit on the request's lineage: no seed to read, no host call.
        if !self
            .quotas
            .keyed()
            .iter()
            .any(|k| k.applies_to(&req.tenant))
        {
            return Ok(KeyedOutcome::Admitted(Vec::new(), Default::default()));
        }
        let fingerprint = match self.fingerprint.get() {
            Some(f) => *f,
            None => {
                let f = Fingerprint::from_store(store, fresh_seed())?;
                *self.fingerprint.get_or_init(|| f)
            }
        };
        let principal = req.principal.as_ref().map(|p| p.id.as_str());
        self.quotas.admit_keyed(
            &fingerprint,
            &req.tenant,
            principal,
            &req.key_headers,
            cost,
            req.time_ns,
            store,
        )
    }

    /// Gives back what a local admission charged (a fleet refusal, or a
    /// request that ended while its fleet check was pending).
    pub fn refund(
        &self,
        refund: &crate::quota::Refund,
        store: &dyn BucketStore,
    ) -> Result<(), crate::quota::StoreError> {
        self.quotas.refund(refund, store)
    }

    /// This worker's batched fleet-limit state.
    pub(crate) fn fleet_state(&self) -> &crate::quota::FleetState {
        &self.fleet
    }

    /// [`Engine::decide_policy`] through the bounded decision cache.
    pub fn decide_policy_cached(&self, req: &Request) -> Decision {
        let Some(key) = self.cache.key(req) else {
            return self.decide_policy(req);
        };
        if let Some(d) = self.cache.get(&key) {
            return d;
        }
        let d = self.decide_policy(req);
        // Only decisions about declared tenants are kept, so a flood of
        // made-up tenants cannot push real entries out.
        if self.tenants.contains_key(&req.tenant) && d.kind != crate::decision::Kind::BadRequest {
            self.cache.put(key, &d);
        }
        d
    }

    /// The policy part of a decision: Cedar over the tenant's effective set.
    pub fn decide_policy(&self, req: &Request) -> Decision {
        let Some(node) = self.tenants.get(&req.tenant) else {
            return Decision::forbid(Vec::new(), vec![format!("unknown tenant `{}`", req.tenant)]);
        };
        let (cedar_req, entities) = match self.cedar_request(node, req) {
            Ok(x) => x,
            Err(m) => return Decision::bad_request(m),
        };
        let response = self
            .authorizer
            .is_authorized(&cedar_req, &node.effective, &entities);
        let diagnostics = response.diagnostics();
        let mut reasons: Vec<String> = diagnostics.reason().map(|id| id.to_string()).collect();
        reasons.sort();
        let mut errors: Vec<String> = diagnostics.errors().map(|e| e.to_string()).collect();
        errors.sort();
        let erroring: Vec<String> = {
            let mut ids: Vec<String> = diagnostics
                .errors()
                .map(|e| match e {
                    cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                        pe.policy_id().to_string()
                    }
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        match response.decision() {
            cedar_policy::Decision::Allow
                if erroring.is_empty() || self.settings.on_policy_error == OnPolicyError::Skip =>
            {
                Decision::allow(reasons, errors)
            }
            cedar_policy::Decision::Allow => Decision::forbid(erroring, errors),
            cedar_policy::Decision::Deny => {
                // A satisfied forbid determines the deny; with on_policy_error: deny
                // an erroring policy does too.
                let mut why = reasons;
                if self.settings.on_policy_error == OnPolicyError::Deny {
                    why.extend(erroring);
                    why.sort();
                    why.dedup();
                }
                Decision::forbid(why, errors)
            }
        }
    }

    /// The Cedar request and entities the engine builds for `req` (for
    /// benchmarks that compare against plain Cedar).
    #[doc(hidden)]
    pub fn cedar_parts(&self, req: &Request) -> Result<(cedar_policy::Request, Entities), String> {
        let node = self
            .tenants
            .get(&req.tenant)
            .ok_or_else(|| format!("unknown tenant `{}`", req.tenant))?;
        self.cedar_request(node, req)
    }

    fn cedar_request(
        &self,
        node: &TenantNode,
        req: &Request,
    ) -> Result<(cedar_policy::Request, Entities), String> {
        let t = &self.types;
        // The principal's parents: its home tenant's lineage, prepared at
        // load time when the home tenant is in the bundle.
        let home = req
            .principal
            .as_ref()
            .map(|p| (p, self.tenants.get(&p.tenant)));
        let user_parents = match home {
            Some((_, Some(h))) => h.lineage_uids.clone(),
            Some((p, None)) => t.lineage_uids(&p.tenant),
            None => Default::default(),
        };
        let user = t.user_entity(req.principal.as_ref(), user_parents)?;
        let route = t.route_entity(&node.path, &req.path, node.lineage_uids.clone())?;
        let mut all: Vec<Entity> = Vec::with_capacity(8);
        if let Some((_, Some(h))) = home {
            all.extend(
                h.lineage
                    .iter()
                    .filter(|e| !node.lineage_uids.contains(&e.uid()))
                    .cloned(),
            );
        }
        all.push(user.clone());
        all.push(route.clone());
        let entities = node
            .base
            .clone()
            .add_entities(all, None)
            .map_err(|e| e.to_string())?;
        let context = t.context(req)?;
        let action: EntityUid = t.action_uid(req.action_name());
        let r = cedar_policy::Request::new(user.uid(), action, route.uid(), context, None)
            .map_err(|e| e.to_string())?;
        Ok((r, entities))
    }
}

/// What the local limits say about a request ([`Engine::admit_local`]).
enum Local {
    /// The quota decision (keyed statuses included) and, for an exact
    /// admission, what it charged.
    Admitted(crate::quota::QuotaDecision, Option<crate::quota::Refund>),
    /// The decision to answer: 429, 400 for a missing key, or `on_error`'s.
    Refused(Decision),
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
            if let Err(e) = set.add(policy) {
                errors.push(Diagnostic::at(
                    &p.info.file,
                    p.info.line,
                    p.info.column,
                    e.to_string(),
                ));
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

/// The hierarchical quotas of every `tenant.json` that declares limits.
fn quota_model(configs: &[Config<'_>], errors: &mut Vec<Diagnostic>) -> QuotaModel {
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
    match QuotaModel::build(&inputs) {
        Ok(q) => q,
        Err(ds) => {
            errors.extend(ds);
            QuotaModel::default()
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
        let msg = format!(
            "templates (policies with `?principal` or `?resource` slots) are not supported: `{}`",
            template.id()
        );
        errors.push(match slots.next() {
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

/// 16 random bytes from the host (WASI `random_get` in the filter, the
/// operating system natively), through the standard library's hasher keys.
fn fresh_seed() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for half in out.chunks_mut(8) {
        let word = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            .to_le_bytes();
        half.copy_from_slice(&word);
    }
    out
}
