//! What `tenantgate check` prints and the decision service answers: the
//! decision, and what Envoy would do with the request (the headers and path
//! the upstream gets, or the local reply). Both go through the filter's own
//! flow ([`Worker::begin`]'s steps), from a request given by its parts.

use std::collections::BTreeMap;

use super::RequestSpec;
use crate::engine::Engine;
use crate::flow::{Effects, Step, Verdict};
use crate::quota::BucketStore;
use crate::worker::Worker;

impl Worker {
    /// Maps a spec as the filter maps the raw request it stands for and
    /// decides it through the filter's flow. With a `store` the quotas are
    /// charged there (`check` uses a fresh in-memory store); without one
    /// only the policies decide and `quota` is `null` (the decision service).
    /// No rate limit service is asked: a `per_request` fleet check is left
    /// out and the local decision stands. `Err`: the spec cannot be
    /// expressed under this bundle's settings.
    pub fn check(
        &self,
        spec: &RequestSpec,
        now_ns: u64,
        store: Option<&dyn BucketStore>,
    ) -> Result<Effects, String> {
        let mapped = self.engine.map_spec(spec, now_ns)?;
        Ok(match self.decide_mapped(mapped, store, now_ns) {
            Step::Done(effects) => effects,
            Step::Deferred(d) => self.finish_locally(d.pending),
        })
    }

    /// The JSON of `check`: [`Worker::check`] as [`Engine::outcome_json`].
    pub fn check_output(
        &self,
        spec: &RequestSpec,
        now_ns: u64,
        store: Option<&dyn BucketStore>,
    ) -> Result<serde_json::Value, String> {
        let effects = self.check(spec, now_ns, store)?;
        self.engine.outcome_json(&effects)
    }
}

impl Engine {
    /// The JSON of a decision and what Envoy does with the request, as
    /// `check` prints it: the decision's fields, then `reply` (a blocking
    /// denial: status, gRPC status, headers, body) or `upstream` (what the
    /// upstream gets when a mapped request goes on).
    pub fn outcome_json(&self, effects: &Effects) -> Result<serde_json::Value, String> {
        let mut out = serde_json::to_value(&effects.decision).map_err(|e| e.to_string())?;
        let Some(obj) = out.as_object_mut() else {
            return Ok(out);
        };
        match &effects.verdict {
            Verdict::Reply(r) => {
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
            Verdict::Continue { path, .. } if effects.mapped.is_some() => {
                let headers: BTreeMap<&str, &str> = effects.request_headers().collect();
                obj.insert(
                    "upstream".into(),
                    serde_json::json!({ "path": path, "headers": headers }),
                );
            }
            Verdict::Continue { .. } => {}
        }
        Ok(out)
    }
}
