//! The compiled bundle and its policy decision: per-tenant policy sets
//! prepared at load time (`compile`), so a decision does no parsing and only
//! looks at the policies of the request's tenant and its ancestors.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{Authorizer, Entities, Entity, EntityUid, Policy, PolicySet};

use crate::decision::Decision;
use crate::entities::Types;
use crate::fleet::FleetLimits;
use crate::quota::QuotaModel;
use crate::request::Request;
use crate::settings::{OnPolicyError, Settings};
use crate::tenant::TenantPath;

/// A map keyed by tenant paths from the bundle, with the fast hasher of
/// configuration keys.
pub(crate) type TenantMap<V> =
    HashMap<TenantPath, V, std::hash::BuildHasherDefault<crate::quota::KeyHasher>>;

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
pub(crate) struct CompiledPolicy {
    pub(crate) info: PolicyInfo,
    pub(crate) policy: Policy,
}

#[derive(Debug)]
pub(crate) struct TenantNode {
    pub(crate) path: TenantPath,
    /// Tenant entities from the root down to this tenant.
    pub(crate) lineage: Vec<Entity>,
    /// Their uids: the parents of a `Route` here and of a `User` at home here.
    pub(crate) lineage_uids: std::collections::HashSet<EntityUid>,
    /// The lineage and the action entities, with the transitive closure done.
    pub(crate) base: Entities,
    /// The policies that apply here: this tenant's and its ancestors', overrides applied.
    pub(crate) effective: PolicySet,
    pub(crate) effective_list: Vec<Arc<CompiledPolicy>>,
}

/// A compiled bundle, ready to decide: immutable once built, so one
/// engine can serve every worker of a process. What changes per worker
/// (decision cache, quota leases, fleet state) is in [`crate::Worker`].
#[derive(Debug)]
pub struct Engine {
    pub(crate) settings: Settings,
    pub(crate) version: String,
    pub(crate) types: Types,
    /// Looked up with request data on every request, never filled from it:
    /// the fast hasher of configuration keys is safe here.
    pub(crate) tenants: TenantMap<TenantNode>,
    pub(crate) authorizer: Authorizer,
    pub(crate) quotas: QuotaModel,
    /// The fleet limits: validated with the local ones, enforced by a rate
    /// limit service.
    pub(crate) fleet: FleetLimits,
    pub(crate) policy_count: usize,
    /// Which inputs the policies can read: the decision cache's key.
    pub(crate) cache_shape: crate::cache::KeyShape,
    /// True if some policy mentions `source_ip`: only then does the filter
    /// ask the host for the downstream address.
    pub(crate) uses_source_ip: bool,
    /// The metric series of this bundle, built once when first asked for
    /// (proxy adapters; `check` and the services never need it).
    pub(crate) layout: std::sync::OnceLock<crate::metrics::Layout>,
}

impl Engine {
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

    /// The metric series this bundle defines (see [`crate::metrics::Layout`]),
    /// built on first use and then shared by every worker.
    pub fn layout(&self) -> &crate::metrics::Layout {
        self.layout
            .get_or_init(|| crate::metrics::Layout::new(self))
    }

    /// The bundle's fleet limits (see [`FleetLimits`]).
    pub fn fleet_limits(&self) -> &FleetLimits {
        &self.fleet
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
