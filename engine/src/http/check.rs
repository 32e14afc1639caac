//! What `tenantgate check` prints and the decision service answers: the
//! decision, and what Envoy would do with the request (the headers and path
//! the upstream gets, or the local reply).

use std::collections::BTreeMap;

use super::{Mapped, RequestSpec};
use crate::decision::Decision;
use crate::engine::Engine;
use crate::quota::BucketStore;

impl Engine {
    /// Maps a spec as the filter maps the raw request it stands for and
    /// decides it. With a `store` the quotas are charged there (`check` uses
    /// a fresh in-memory store); without one only the policies decide and
    /// `quota` is `null` (the decision service). `Err`: the spec cannot be
    /// expressed under this bundle's settings.
    pub fn check_decision(
        &self,
        spec: &RequestSpec,
        now_ns: u64,
        store: Option<&dyn BucketStore>,
    ) -> Result<(Decision, Option<Mapped>), String> {
        Ok(match self.map_spec(spec, now_ns)? {
            Ok(m) => {
                let d = match store {
                    Some(s) => self.decide(&m.request, s),
                    None => self.decide_policy_cached(&m.request),
                };
                (d, Some(m))
            }
            Err(bad) => (Decision::bad_request(bad.message), None),
        })
    }

    /// The JSON of `check`: [`Engine::check_decision`], then `reply` (a
    /// blocking denial: status, gRPC status, headers, body) or `upstream`
    /// (what the upstream gets when the request goes on).
    pub fn check_output(
        &self,
        spec: &RequestSpec,
        now_ns: u64,
        store: Option<&dyn BucketStore>,
    ) -> Result<serde_json::Value, String> {
        let (decision, mapped) = self.check_decision(spec, now_ns, store)?;
        self.outcome_json(&decision, mapped.as_ref())
    }

    /// The JSON of a decision and its mapping, as `check` prints it.
    pub fn outcome_json(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
    ) -> Result<serde_json::Value, String> {
        let mut out = serde_json::to_value(decision).map_err(|e| e.to_string())?;
        let Some(obj) = out.as_object_mut() else {
            return Ok(out);
        };
        if decision.blocks(self.settings().mode) {
            let tenant = mapped.map(|m| &m.request.tenant);
            let request_id = mapped.and_then(|m| m.request_id.as_deref());
            if let Some(r) = self.reply(decision, tenant, request_id, None) {
                obj.insert(
                    "reply".into(),
                    serde_json::json!({
                        "status": r.status,
                        "grpc_status": r.grpc_status,
                        "headers": r.headers.iter().cloned().collect::<BTreeMap<_, _>>(),
                        "body": serde_json::from_str::<serde_json::Value>(&r.body).unwrap_or_default(),
                    }),
                );
            }
        } else if let Some(m) = mapped {
            let headers: BTreeMap<&str, &str> = m.upstream_headers().collect();
            obj.insert(
                "upstream".into(),
                serde_json::json!({ "path": m.forward_path, "headers": headers }),
            );
        }
        Ok(out)
    }
}
