//! One HTTP stream: headers in, engine decision, continue or reply. The same
//! steps as the Wasm filter's HTTP context (`filter/src/wasm.rs`), over the
//! engine's public API; kept in this one file so it can move to the
//! engine's request flow as a whole.

use std::sync::{Arc, PoisonError};

use tenantgate_engine::http::{own_headers, HttpInput, LocalReply, Mapped, MetadataSource};
use tenantgate_engine::settings::OnError;
use tenantgate_engine::{Decision, Engine, TenantPath};

use crate::abi::{self, Filter};
use crate::config::Shared;
use crate::host::{
    grpc_message, header_pairs, is_grpc, now_ns, Attribute, BodyStatus, CalloutResult, HeaderKind,
    HeadersStatus, LogLevel, TrailersStatus,
};

/// The response code details Envoy logs for our replies.
const DETAILS: &str = "tenantgate";

/// One stream's state.
pub struct Stream {
    shared: Arc<Shared>,
    /// Headers to add to the response (RateLimit fields on allowed requests).
    response_headers: Vec<(&'static str, String)>,
}

/// Dynamic metadata through the ABI: `[namespace, key]` paths (a string
/// value one level down, which covers `jwt_authn`'s `payload_in_metadata`
/// only for flat claims; see `docs/reference.md`, "Native build").
struct HostMetadata<'a, 'h>(&'a Filter<'h>);

impl MetadataSource for HostMetadata<'_, '_> {
    fn metadata(&self, path: &[String]) -> Option<Vec<u8>> {
        match path {
            [namespace, key] => self.0.dynamic_metadata(namespace, key).map(<[u8]>::to_vec),
            _ => None,
        }
    }
}

/// A request with no state to decide with: a plain 503 (fail closed).
pub fn fail_closed(f: &mut Filter<'_>) {
    let reply = LocalReply::unavailable(503);
    send(f, &reply, false);
}

impl Stream {
    pub fn new(shared: Arc<Shared>) -> Stream {
        Stream {
            shared,
            response_headers: Vec::new(),
        }
    }

    pub fn on_request_headers(
        &mut self,
        f: &mut Filter<'_>,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        let shared = Arc::clone(&self.shared);
        let engine = &shared.engine;
        let start = now_ns();
        let (mapped, strip, grpc) = {
            let raw = match f.headers(HeaderKind::RequestHeaders) {
                Ok(raw) => raw,
                Err(e) => {
                    let d = Decision::error(
                        engine.settings().on_error,
                        format!("cannot read request headers: {e}"),
                    );
                    return self.finish(f, d, None, None, None, start, false);
                }
            };
            let headers = match header_pairs(&raw) {
                Ok(h) => h,
                Err(e) => {
                    let d = Decision::error(
                        engine.settings().on_error,
                        format!("cannot read request headers: {e}"),
                    );
                    return self.finish(f, d, None, None, None, start, false);
                }
            };
            let strip: Vec<String> = own_headers(&headers).map(str::to_owned).collect();
            let source = if engine.uses_source_ip() {
                f.attribute(Attribute::SourceAddress)
                    .and_then(|b| std::str::from_utf8(b).ok())
            } else {
                None
            };
            let input = HttpInput {
                headers: &headers,
                source_address: source,
                now_ns: start,
            };
            (
                engine.map_request(&input, &HostMetadata(f)),
                strip,
                is_grpc(&headers),
            )
        };
        for name in &strip {
            let _ = f.remove_header(HeaderKind::RequestHeaders, name);
        }
        match mapped {
            Ok(m) => {
                let (decision, refund) = engine.decide_refundable(&m.request, &*shared.store);
                let decision = if decision.is_allowed() && engine.fleet_check(&m.request).is_some()
                {
                    // The ABI can call the rate limit service (HTTP streams),
                    // but this build does not yet: the check fails, and
                    // `rate_limit_service.on_error` decides.
                    let why =
                        "the native build does not call the rate limit service yet".to_string();
                    match engine.rate_limit_service().map(|r| r.on_error) {
                        Some(OnError::Allow) => decision,
                        _ => {
                            if let Some(r) = refund.as_ref() {
                                let _ = engine.refund(r, &*shared.store);
                            }
                            Decision::error(OnError::Deny, format!("rate limit service: {why}"))
                        }
                    }
                } else {
                    decision
                };
                let (tenant, request_id) = (Some(&m.request.tenant), m.request_id.as_deref());
                self.finish(f, decision, Some(&m), tenant, request_id, start, grpc)
            }
            Err(bad) => {
                let decision = Decision::bad_request(bad.message);
                self.finish(
                    f,
                    decision,
                    None,
                    bad.tenant.as_ref(),
                    bad.request_id.as_deref(),
                    start,
                    grpc,
                )
            }
        }
    }

    pub fn on_request_body(&mut self, _f: &mut Filter<'_>, _end_of_stream: bool) -> BodyStatus {
        BodyStatus::Continue
    }

    pub fn on_request_trailers(&mut self, f: &mut Filter<'_>) -> TrailersStatus {
        // A client may send our headers as trailers (HTTP/2, chunked
        // HTTP/1.1); the upstream must never receive them.
        let strip: Vec<String> = match f.headers(HeaderKind::RequestTrailers) {
            Ok(raw) => header_pairs(&raw)
                .map(|h| own_headers(&h).map(str::to_owned).collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for name in &strip {
            let _ = f.remove_header(HeaderKind::RequestTrailers, name);
        }
        TrailersStatus::Continue
    }

    pub fn on_response_headers(&mut self, f: &mut Filter<'_>) {
        for (k, v) in self.response_headers.drain(..) {
            let _ = f.add_header(HeaderKind::ResponseHeaders, k, &v);
        }
    }

    pub fn on_stream_complete(&mut self) {}

    /// The answer to a callout this stream started (fleet checks: not yet).
    pub fn on_callout_done(
        &mut self,
        _f: &mut Filter<'_>,
        _id: u64,
        _result: CalloutResult,
        _headers: &[(&[u8], &[u8])],
        _body: &[&[u8]],
    ) {
    }

    /// Counts, audits and carries out a decision: continue (with the
    /// identity headers when the request was mapped) or send the reply.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        f: &mut Filter<'_>,
        decision: Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        start: u64,
        grpc: bool,
    ) -> HeadersStatus {
        let shared = Arc::clone(&self.shared);
        let engine: &Engine = &shared.engine;
        let mode = engine.settings().mode;
        if let Some(m) = shared.metrics.outcome(decision.counter(mode)) {
            let _ = f.update(m, &[], 1);
        }
        let blocks = decision.blocks(mode);
        let audits = engine.audits(&decision) && abi::log_enabled(LogLevel::Info);
        let decision_id = (blocks || audits).then(|| {
            shared
                .ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .next_id()
        });
        if audits {
            if let Some(line) = engine.audit_line_at(
                &decision,
                mapped,
                tenant,
                request_id,
                decision_id.as_deref(),
                start,
            ) {
                abi::log(LogLevel::Info, &line);
            }
        }
        if !blocks {
            if let Some(m) = mapped {
                // The upstream sees the path that was judged.
                if let Some(p) = &m.forward_path {
                    let _ = f.set_header(HeaderKind::RequestHeaders, ":path", p);
                }
                for (name, value) in m.upstream_headers() {
                    let _ = f.add_header(HeaderKind::RequestHeaders, name, value);
                }
            }
            self.response_headers = engine.allow_response_headers(&decision);
            return HeadersStatus::Continue;
        }
        let reply = engine
            .reply(&decision, tenant, request_id, decision_id.as_deref())
            .unwrap_or_else(|| LocalReply::unavailable(decision.status));
        send(f, &reply, grpc);
        HeadersStatus::StopIteration
    }
}

/// Sends a local reply. A gRPC call gets a trailers-only response with the
/// reply's `grpc-status` (Envoy's `send_response` in this ABI passes no gRPC
/// status: it would answer `grpc-status: 0`).
fn send(f: &mut Filter<'_>, reply: &LocalReply, grpc: bool) {
    let mut headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| !grpc || *k != "content-type")
        .collect();
    if grpc {
        let status = reply.grpc_status.to_string();
        let message = grpc_message(&reply.body);
        let mut h = vec![
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", status.as_str()),
            ("grpc-message", message.as_str()),
        ];
        h.append(&mut headers);
        f.send_response_headers_only(&h);
    } else {
        f.send_response(u32::from(reply.status), &headers, &reply.body, DETAILS);
    }
}
