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

/// The ids an audit line carries (`None`: absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditIds<'a> {
    /// The client's `x-request-id`.
    pub request_id: Option<&'a str>,
    /// The W3C trace id of a valid `traceparent` header.
    pub trace_id: Option<&'a str>,
    pub decision_id: Option<&'a str>,
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
        let ids = AuditIds {
            request_id,
            trace_id: mapped.and_then(|m| m.trace_id.as_deref()),
            decision_id: None,
        };
        self.audit_line_at(decision, mapped, None, ids, now)
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
        ids: AuditIds<'_>,
        now_ns: u64,
    ) -> Option<String> {
        if !self.audits(decision) {
            return None;
        }
        let req = mapped.map(|m| &m.request);
        let line = AuditLine {
            time: now_ns / 1_000_000_000,
            decision_id: ids.decision_id,
            request_id: ids.request_id,
            trace_id: ids.trace_id,
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
        // A line is 350-450 bytes: one allocation instead of growing from
        // serde_json's 128.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, &line).ok()?;
        String::from_utf8(out).ok()
    }
}

/// The filter state keys of a decision (with the `filter_state` setting):
/// Envoy prefixes them with `wasm.`, so an access log reads
/// `%FILTER_STATE(wasm.tenantgate.tenant:PLAIN)%`. A key without a value
/// (no principal, no limit, ...) is not set. See docs/reference.md.
pub mod filter_state_keys {
    pub const TENANT: &str = "tenantgate.tenant";
    pub const PRINCIPAL: &str = "tenantgate.principal";
    pub const DECISION: &str = "tenantgate.decision";
    pub const KIND: &str = "tenantgate.kind";
    /// The determining policies' ids, joined with `,`.
    pub const POLICIES: &str = "tenantgate.policies";
    /// The limit that refused the request.
    pub const LIMIT: &str = "tenantgate.limit";
    pub const DECISION_ID: &str = "tenantgate.decision_id";
    pub const BUNDLE: &str = "tenantgate.bundle";
    /// Every key, in the order they are set.
    pub const ALL: [&str; 8] = [
        TENANT,
        PRINCIPAL,
        DECISION,
        KIND,
        POLICIES,
        LIMIT,
        DECISION_ID,
        BUNDLE,
    ];
}

impl Engine {
    /// The filter state a decision sets, or nothing when the `filter_state`
    /// setting is off (the default: each key is a host call).
    pub fn filter_state(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        decision_id: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        use filter_state_keys as k;
        if !self.settings().filter_state {
            return Vec::new();
        }
        let req = mapped.map(|m| &m.request);
        let tenant = req.map(|r| &r.tenant).or(tenant);
        let mut out = Vec::with_capacity(k::ALL.len());
        let mut put = |key: &'static str, value: Option<String>| {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                out.push((key, v));
            }
        };
        put(k::TENANT, tenant.map(|t| t.as_str().to_string()));
        put(
            k::PRINCIPAL,
            req.and_then(|r| r.principal.as_ref().map(|p| p.id.clone())),
        );
        put(k::DECISION, Some(decision.decision.as_str().to_string()));
        put(k::KIND, Some(decision.kind.as_str().to_string()));
        put(k::POLICIES, Some(decision.reasons.join(",")));
        put(
            k::LIMIT,
            decision
                .quota
                .as_ref()
                .filter(|q| !q.admitted)
                .and_then(|q| q.limit.clone()),
        );
        put(k::DECISION_ID, decision_id.map(str::to_string));
        put(k::BUNDLE, Some(self.version().to_string()));
        out
    }
}

/// One audit line, serialized straight from borrowed fields.
#[derive(serde::Serialize)]
struct AuditLine<'a> {
    time: u64,
    decision_id: Option<&'a str>,
    request_id: Option<&'a str>,
    /// The W3C trace id of a valid `traceparent` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
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
