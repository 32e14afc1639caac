//! A decision as Envoy answers it: the local reply of a denial (status, gRPC
//! status, headers, JSON body) and the headers of an allowed response.

use crate::decision::{Decision, Kind};
use crate::engine::Engine;
use crate::tenant::TenantPath;

/// A reply the filter sends instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    /// The gRPC status Envoy sends instead when the request is a gRPC call
    /// (with the body as `grpc-message`).
    pub grpc_status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl LocalReply {
    /// The reply when there is no engine to ask (no bundle loaded): the
    /// status of an `on_error` deny and a body that says only that.
    pub fn unavailable(status: u16) -> LocalReply {
        LocalReply {
            status,
            grpc_status: grpc_status(status),
            headers: vec![("content-type".into(), "application/json".into())],
            body: r#"{"error":"unavailable"}"#.into(),
        }
    }
}

impl Engine {
    /// The local reply for a denied decision; `None` when the request goes on.
    /// `request_id` is the incoming `x-request-id` (for tracing; a client may
    /// have chosen it), `decision_id` the filter's own id for this decision.
    pub fn reply(
        &self,
        decision: &Decision,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        decision_id: Option<&str>,
    ) -> Option<LocalReply> {
        if decision.is_allowed() {
            return None;
        }
        let settings = self.settings();
        let tenant_json = tenant
            .map(|t| serde_json::Value::String(t.to_string()))
            .unwrap_or(serde_json::Value::Null);
        let rid = request_id
            .map(|r| serde_json::Value::String(r.to_string()))
            .unwrap_or(serde_json::Value::Null);
        let did = decision_id
            .map(|r| serde_json::Value::String(r.to_string()))
            .unwrap_or(serde_json::Value::Null);
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        let body = match decision.kind {
            Kind::QuotaExceeded => {
                let q = decision.quota.as_ref();
                let retry = q.map(|q| q.retry_after_s).unwrap_or(1);
                headers.push(("retry-after".into(), retry.to_string()));
                if let Some(q) = q {
                    headers.extend(ratelimit_fields(q).map(|(k, v)| (k.to_string(), v)));
                }
                serde_json::json!({
                    "error": "quota_exceeded",
                    "tenant": tenant_json,
                    "limit": q.and_then(|q| q.limit.clone()),
                    "retry_after_s": retry,
                    "request_id": rid,
                    "decision_id": did,
                })
            }
            Kind::BadRequest => serde_json::json!({
                "error": "bad_request",
                "message": decision.errors.first().cloned().unwrap_or_default(),
                "tenant": tenant_json,
                "request_id": rid,
                "decision_id": did,
            }),
            Kind::Error => {
                serde_json::json!({ "error": "unavailable", "tenant": tenant_json, "request_id": rid, "decision_id": did })
            }
            Kind::Forbidden | Kind::Allowed => {
                let mut body = serde_json::json!({ "error": "forbidden", "tenant": tenant_json, "request_id": rid, "decision_id": did });
                if settings.expose_reasons {
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("reasons".into(), decision.reasons.to_vec().into());
                    }
                }
                body
            }
        };
        Some(LocalReply {
            status: decision.status,
            grpc_status: grpc_status(decision.status),
            headers,
            body: body.to_string(),
        })
    }

    /// Headers added to the response of an allowed request (the RateLimit
    /// fields, when the bundle asks for them).
    pub fn allow_response_headers(&self, decision: &Decision) -> Vec<(&'static str, String)> {
        use crate::settings::HeadersOnAllow;
        let mut out = Vec::new();
        let Some(q) = decision.quota.as_ref().filter(|_| decision.is_allowed()) else {
            return out;
        };
        let send = match self.settings().ratelimit_headers_on_allow {
            HeadersOnAllow::Never => false,
            HeadersOnAllow::Always => true,
            HeadersOnAllow::NearLimit => q.near_limit(self.settings().near_limit_ratio.0),
        };
        if send {
            out.extend(ratelimit_fields(q));
        }
        out
    }
}

/// The RateLimit fields of a quota decision, when a limit applies.
fn ratelimit_fields(
    q: &crate::quota::QuotaDecision,
) -> impl Iterator<Item = (&'static str, String)> {
    let policy = q.ratelimit_policy().map(|p| ("ratelimit-policy", p));
    let state = q.ratelimit().map(|r| ("ratelimit", r));
    policy.into_iter().chain(state)
}

/// The gRPC status for a local reply's HTTP status (what Envoy's own
/// `ratelimit` filter sends with `rate_limited_as_resource_exhausted`):
/// 429 is RESOURCE_EXHAUSTED (8), which standard retry policies do not
/// retry; 400 INVALID_ARGUMENT (3); 403 PERMISSION_DENIED (7); 503
/// UNAVAILABLE (14).
pub fn grpc_status(http_status: u16) -> u32 {
    match http_status {
        400 => 3,
        401 => 16,
        403 => 7,
        429 => 8,
        503 => 14,
        _ => 2,
    }
}
