//! Audit lines and the ids of decisions.

use super::Mapped;
use crate::decision::{Decision, Kind};
use crate::engine::Engine;
use crate::settings::Mode;
use crate::tenant::TenantPath;

/// An id for one decision that the client cannot choose: unique per VM (a
/// random VM part and a counter) and carried in replies and audit lines
/// beside the incoming `x-request-id`, which the client may have chosen.
#[derive(Debug)]
pub struct DecisionIds {
    vm: u64,
    next: std::sync::atomic::AtomicU64,
}

impl DecisionIds {
    /// `seed` should be random per VM (the filter mixes the host's random
    /// source, the time and the context id).
    pub fn new(seed: u64) -> Self {
        DecisionIds {
            vm: splitmix64(seed),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next id: 32 lowercase hex digits. Two ids of one VM never repeat
    /// (the counter goes through a bijection).
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:016x}{:016x}", self.vm, splitmix64(n ^ self.vm))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Engine {
    /// One JSON audit line, or `None` when the `audit` setting leaves it out.
    pub fn audit_line(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
        request_id: Option<&str>,
    ) -> Option<String> {
        let now = mapped.map(|m| m.request.time_ns).unwrap_or(0);
        self.audit_line_at(decision, mapped, None, request_id, None, now)
    }

    /// True when the `audit` setting asks for a line for this decision.
    pub fn audits(&self, decision: &Decision) -> bool {
        use crate::settings::Audit;
        match self.settings().audit {
            Audit::Off => false,
            Audit::Deny => !decision.is_allowed(),
            Audit::All => true,
        }
    }

    /// [`Engine::audit_line`] for requests that may not have been mapped (a
    /// 400): the tenant, when it was read, and the time come separately.
    pub fn audit_line_at(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        decision_id: Option<&str>,
        now_ns: u64,
    ) -> Option<String> {
        if !self.audits(decision) {
            return None;
        }
        let req = mapped.map(|m| &m.request);
        let line = AuditLine {
            time: now_ns / 1_000_000_000,
            decision_id,
            request_id,
            tenant: req.map(|r| &r.tenant).or(tenant).map(TenantPath::as_str),
            principal: req.and_then(|r| r.principal.as_ref().map(|p| p.id.as_str())),
            principal_tenant: req.and_then(|r| r.principal.as_ref().map(|p| p.tenant.as_str())),
            action: req.map(|r| r.method.as_str()),
            resource: req.map(|r| r.path.as_str()),
            decision: decision.decision,
            status: decision.status,
            kind: decision.kind,
            policies: &decision.reasons,
            errors: &decision.errors,
            limit: decision.quota.as_ref().and_then(|q| q.limit.as_deref()),
            bundle: self.version(),
            mode: match self.settings().mode {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            },
        };
        serde_json::to_string(&line).ok()
    }
}

/// One audit line, serialized straight from borrowed fields.
#[derive(serde::Serialize)]
struct AuditLine<'a> {
    time: u64,
    decision_id: Option<&'a str>,
    request_id: Option<&'a str>,
    tenant: Option<&'a str>,
    principal: Option<&'a str>,
    principal_tenant: Option<&'a str>,
    action: Option<&'a str>,
    resource: Option<&'a str>,
    decision: crate::decision::Outcome,
    status: u16,
    kind: Kind,
    policies: &'a [String],
    errors: &'a [String],
    limit: Option<&'a str>,
    bundle: &'a str,
    mode: &'static str,
}
