//! A decision is a value: allow or deny, the HTTP status, what determined it.

use serde::Serialize;
use std::sync::Arc;

use crate::quota::QuotaDecision;
use crate::settings::Mode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
}

impl Outcome {
    /// As in audit lines and check's JSON: `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
        }
    }
}

/// Why the decision came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Policies allowed it (and the quotas, if any, admitted it).
    Allowed,
    /// A `forbid` matched, no `permit` matched, or a policy errored under `on_policy_error: deny`.
    Forbidden,
    /// A limit refused it.
    QuotaExceeded,
    /// The request could not be mapped (bad tenant, bad path...).
    BadRequest,
    /// No decision could be made (store failure, internal error); `on_error` decided.
    Error,
}

impl Kind {
    /// As in audit lines and check's JSON (`quota_exceeded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Allowed => "allowed",
            Kind::Forbidden => "forbidden",
            Kind::QuotaExceeded => "quota_exceeded",
            Kind::BadRequest => "bad_request",
            Kind::Error => "error",
        }
    }
}

/// The per-tenant counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantCounter {
    Allowed,
    Denied,
}

/// The empty reason list, shared (decisions without reasons allocate none).
fn no_reasons() -> Arc<[String]> {
    static EMPTY: std::sync::OnceLock<Arc<[String]>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(Vec::new())).clone()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub decision: Outcome,
    /// 200 when allowed; 400, 403, 429 or the `on_error` status when denied.
    pub status: u16,
    pub kind: Kind,
    /// Ids of the policies that determined the decision (satisfied permits for
    /// an allow; satisfied forbids or erroring policies for a deny; empty for a
    /// default deny). Shared: a decision cache hit hands out the same list.
    pub reasons: Arc<[String]>,
    /// Evaluation errors and other problems, as readable messages.
    pub errors: Vec<String>,
    /// The quota part, when limits apply and the policies allowed the request.
    pub quota: Option<QuotaDecision>,
}

impl Decision {
    pub fn allow(reasons: Vec<String>, errors: Vec<String>) -> Self {
        Decision {
            decision: Outcome::Allow,
            status: 200,
            kind: Kind::Allowed,
            reasons: reasons.into(),
            errors,
            quota: None,
        }
    }

    pub fn forbid(reasons: Vec<String>, errors: Vec<String>) -> Self {
        Decision {
            decision: Outcome::Deny,
            status: 403,
            kind: Kind::Forbidden,
            reasons: reasons.into(),
            errors,
            quota: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Decision {
            decision: Outcome::Deny,
            status: 400,
            kind: Kind::BadRequest,
            reasons: no_reasons(),
            errors: vec![message.into()],
            quota: None,
        }
    }

    /// No decision could be made: `on_error` decides. A deny answers 503
    /// (the gate could not decide, the client may retry); an allow lets it through.
    pub fn error(on_error: crate::settings::OnError, message: impl Into<String>) -> Self {
        let (decision, status) = match on_error {
            crate::settings::OnError::Deny => (Outcome::Deny, 503),
            crate::settings::OnError::Allow => (Outcome::Allow, 200),
        };
        Decision {
            decision,
            status,
            kind: Kind::Error,
            reasons: no_reasons(),
            errors: vec![message.into()],
            quota: None,
        }
    }

    /// A request refused by a quota (local or fleet): 429 with its fields.
    pub fn over_quota(q: crate::quota::QuotaDecision) -> Self {
        Decision {
            decision: Outcome::Deny,
            status: 429,
            kind: Kind::QuotaExceeded,
            reasons: no_reasons(),
            errors: Vec::new(),
            quota: Some(q),
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.decision == Outcome::Allow
    }

    /// True if the filter answers the request itself (`reply`) instead of
    /// forwarding it: a denial in enforce mode. Shadow mode never blocks.
    pub fn blocks(&self, mode: Mode) -> bool {
        !self.is_allowed() && mode == Mode::Enforce
    }

    /// The per-tenant counter this decision goes to: `Denied` for every
    /// denial, would-be denials of shadow mode included (a tenant's refusals
    /// show during a shadow rollout), `Allowed` otherwise.
    pub fn tenant_counter(&self) -> TenantCounter {
        if self.is_allowed() {
            TenantCounter::Allowed
        } else {
            TenantCounter::Denied
        }
    }

    /// The counter this decision goes to. In shadow mode a would-be denial
    /// counts as `ShadowDenied`; a store failure counts as `Error` in every
    /// mode, so a broken store shows during a shadow rollout.
    pub fn counter(&self, mode: Mode) -> Counter {
        match (self.is_allowed(), self.kind) {
            (_, Kind::Error) => Counter::Error,
            (true, _) => Counter::Allowed,
            (false, _) if mode == Mode::Shadow => Counter::ShadowDenied,
            (false, Kind::Forbidden | Kind::Allowed) => Counter::DeniedPolicy,
            (false, Kind::QuotaExceeded) => Counter::DeniedQuota,
            (false, Kind::BadRequest) => Counter::BadRequest,
        }
    }
}

/// The outcome counters operators read (`tenantgate.allowed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Allowed,
    DeniedPolicy,
    DeniedQuota,
    BadRequest,
    ShadowDenied,
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::OnError;

    fn quota_deny() -> Decision {
        Decision {
            status: 429,
            kind: Kind::QuotaExceeded,
            ..Decision::forbid(vec![], vec![])
        }
    }

    #[test]
    fn names_are_the_serialized_ones() {
        for k in [
            Kind::Allowed,
            Kind::Forbidden,
            Kind::QuotaExceeded,
            Kind::BadRequest,
            Kind::Error,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for o in [Outcome::Allow, Outcome::Deny] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }

    #[test]
    fn counters_and_blocking_follow_the_mode() {
        let cases = [
            (
                Decision::allow(vec![], vec![]),
                Counter::Allowed,
                Counter::Allowed,
                false,
            ),
            (
                Decision::forbid(vec![], vec![]),
                Counter::DeniedPolicy,
                Counter::ShadowDenied,
                true,
            ),
            (
                quota_deny(),
                Counter::DeniedQuota,
                Counter::ShadowDenied,
                true,
            ),
            (
                Decision::bad_request("x"),
                Counter::BadRequest,
                Counter::ShadowDenied,
                true,
            ),
            (
                Decision::error(OnError::Deny, "x"),
                Counter::Error,
                Counter::Error,
                true,
            ),
            (
                Decision::error(OnError::Allow, "x"),
                Counter::Error,
                Counter::Error,
                false,
            ),
        ];
        for (d, enforce, shadow, blocks) in cases {
            assert_eq!(d.counter(Mode::Enforce), enforce, "{d:?}");
            assert_eq!(d.counter(Mode::Shadow), shadow, "{d:?}");
            assert_eq!(d.blocks(Mode::Enforce), blocks, "{d:?}");
            assert!(!d.blocks(Mode::Shadow), "{d:?}");
        }
    }
}

#[cfg(test)]
mod counter_tests {
    use super::*;

    #[test]
    fn tenant_counters_count_would_be_denials_too() {
        assert_eq!(
            Decision::allow(vec![], vec![]).tenant_counter(),
            TenantCounter::Allowed
        );
        for d in [
            Decision::forbid(vec![], vec![]),
            Decision::bad_request("x"),
            Decision::error(crate::settings::OnError::Deny, "x"),
        ] {
            assert_eq!(d.tenant_counter(), TenantCounter::Denied);
            assert_eq!(
                d.counter(Mode::Shadow),
                if d.kind == Kind::Error {
                    Counter::Error
                } else {
                    Counter::ShadowDenied
                }
            );
        }
        assert_eq!(
            Decision::error(crate::settings::OnError::Allow, "x").tenant_counter(),
            TenantCounter::Allowed
        );
    }
}
