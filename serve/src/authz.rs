//! Envoy's external authorization API, `envoy.service.auth.v3.Authorization/
//! Check`. The `CheckRequest` is turned back into the raw request the filter
//! would have seen (method, path with query, header bytes, source address,
//! dynamic metadata) and mapped by the filter's own code
//! (`Engine::map_request`); the answer is what the filter would do:
//!
//! - allowed (or shadow mode): OK, with `x-tenantgate-tenant` and
//!   `x-tenantgate-principal` to set, `:path` set to the normalized path when
//!   normalization changed it, and every client-sent header an upstream could
//!   read as `x-tenantgate-*` (any case, `_` for `-`) to remove;
//! - denied: the status (400, 403, 503) and JSON body of the filter's reply.
//!
//! Policies only: quotas are not evaluated here.

use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Address, Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
use envoy_types::pb::google::rpc;
use tenantgate_engine::flow::{Step, Verdict};
use tenantgate_engine::http::{is_own_header, HttpInput, LocalReply, RawRequest};
use tonic::{Request, Response, Status};

use crate::{now_ns, State};

/// The gRPC service over the shared state.
pub struct Authz {
    state: Arc<State>,
}

/// The tonic service to add to a server.
pub fn server(state: Arc<State>) -> AuthorizationServer<Authz> {
    AuthorizationServer::new(Authz { state })
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(check(&self.state, req.get_ref(), now_ns())))
    }
}

/// Answers one `CheckRequest` (the RPC without the gRPC wrapping): the
/// filter's own flow, policies only.
pub fn check(state: &State, req: &CheckRequest, now: u64) -> CheckResponse {
    let worker = state.worker();
    let raw = raw_request(req);
    let pairs = raw.pairs();
    let input = HttpInput {
        headers: &pairs,
        // As the filter: the address is read only when the policies use it.
        source_address: raw
            .source_address
            .as_deref()
            .filter(|_| worker.engine().uses_source_ip()),
        now_ns: now,
    };
    // Without a store nothing is deferred: only the policies decide.
    let effects = match worker.begin(&input, &raw, None) {
        Step::Done(e) => e,
        Step::Deferred(_) => return denied(&LocalReply::unavailable(503)),
    };
    state.count_decision(crate::Api::Grpc, effects.decision.is_allowed());
    state.audit(&effects.logs);
    let identity: Vec<(&str, &str)> = effects.request_headers().collect();
    match &effects.verdict {
        Verdict::Continue { path, .. } => allowed(&raw, path.as_deref(), &identity),
        Verdict::Reply(reply) => denied(reply),
    }
}

/// An allowed request: the headers to set (the identity headers, `:path`
/// when normalization changed it) and every client-sent spelling of ours to
/// remove.
fn allowed(raw: &RawRequest, path: Option<&str>, identity: &[(&str, &str)]) -> CheckResponse {
    let mut set: Vec<(&str, &str)> = Vec::new();
    if let Some(p) = path {
        set.push((":path", p));
    }
    set.extend(identity.iter().copied());
    // Every spelling of ours the client sent, except the names set above
    // (setting replaces every value of that name).
    let remove: BTreeSet<String> = raw
        .headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .filter(|k| is_own_header(k) && !set.iter().any(|(n, _)| n == k))
        .collect();
    CheckResponse {
        status: Some(rpc::Status {
            code: 0,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: set
                .into_iter()
                .map(|(k, v)| header(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                .collect(),
            headers_to_remove: remove.into_iter().collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A denial carrying the filter's reply.
fn denied(reply: &LocalReply) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: i32::try_from(reply.grpc_status).unwrap_or(7),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(reply.status),
            }),
            headers: reply
                .headers
                .iter()
                .map(|(k, v)| header(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                .collect(),
            body: reply.body.clone(),
        })),
        ..Default::default()
    }
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

/// The raw request a `CheckRequest` describes: `:method` and `:path` from
/// the request attributes, then every header as Envoy sent it (the raw bytes
/// of `header_map` when Envoy sends them, `encode_raw_headers`; else the
/// `headers` map, where Envoy joined repeated names with `,`), the
/// downstream address, and the dynamic metadata by filter name.
pub fn raw_request(req: &CheckRequest) -> RawRequest {
    let attrs = req.attributes.as_ref();
    let http = attrs
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(h) = http {
        headers.push((":method".into(), h.method.clone().into_bytes()));
        headers.push((":path".into(), h.path.clone().into_bytes()));
        let skip = |k: &str| k == ":method" || k == ":path";
        match &h.header_map {
            Some(map) => {
                for hv in &map.headers {
                    let key = hv.key.to_ascii_lowercase();
                    if skip(&key) {
                        continue;
                    }
                    let value = if hv.raw_value.is_empty() {
                        hv.value.clone().into_bytes()
                    } else {
                        hv.raw_value.clone()
                    };
                    headers.push((key, value));
                }
            }
            None => {
                let mut pairs: Vec<(&String, &String)> = h.headers.iter().collect();
                pairs.sort();
                for (k, v) in pairs {
                    let key = k.to_ascii_lowercase();
                    if !skip(&key) {
                        headers.push((key, v.clone().into_bytes()));
                    }
                }
            }
        }
        if !h.host.is_empty() && !headers.iter().any(|(k, _)| k == ":authority") {
            headers.push((":authority".into(), h.host.clone().into_bytes()));
        }
    }
    let source_address = attrs
        .and_then(|a| a.source.as_ref())
        .and_then(|p| p.address.as_ref())
        .and_then(|a| a.address.as_ref())
        .and_then(|a| match a {
            Address::SocketAddress(s) => Some(s),
            _ => None,
        })
        .map(|s| {
            let port = match s.port_specifier {
                Some(PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            if s.address.contains(':') {
                format!("[{}]:{port}", s.address)
            } else {
                format!("{}:{port}", s.address)
            }
        });
    let metadata = attrs
        .and_then(|a| a.metadata_context.as_ref())
        .map(|m| {
            m.filter_metadata
                .iter()
                .map(|(k, v)| (k.clone(), struct_json(v)))
                .collect()
        })
        .unwrap_or_default();
    RawRequest {
        headers,
        metadata,
        source_address,
    }
}

fn struct_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_json).collect())
        }
    }
}
