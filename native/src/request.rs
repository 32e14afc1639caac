//! One HTTP stream: headers in, the engine's flow
//! (`tenantgate_engine::flow`), its effects carried out with host calls, as
//! the Wasm filter's HTTP context (`filter/src/wasm.rs`) does. What is
//! native here: the gRPC framing of the fleet check over an HTTP stream, and
//! gRPC requests' local replies as trailers-only responses.

use std::sync::Arc;

use tenantgate_engine::fleet::{RLS_METHOD, RLS_SERVICE};
use tenantgate_engine::flow::{self, Deferred, Effects, Pending, Step, Verdict};
use tenantgate_engine::http::{own_headers, HttpInput, LocalReply, MetadataSource};
use tenantgate_engine::metrics::Update;

use crate::abi::{Filter, RawHeader};
use crate::config::{write_logs, Shared};
use crate::host::{
    grpc_answer, grpc_frame, grpc_message, header_pairs, is_grpc, now_ns, Attribute, BodyStatus,
    CalloutResult, HeaderKind, HeadersStatus, TrailersStatus,
};

/// The response code details Envoy logs for our replies.
const DETAILS: &str = "tenantgate";

/// The dynamic metadata namespace of a decision's fields
/// (`%DYNAMIC_METADATA(tenantgate:tenant)%`; see docs/reference.md).
const METADATA_NAMESPACE: &str = "tenantgate";

/// A filter state key's name in the metadata namespace (`tenantgate.tenant`
/// is `tenant` under `tenantgate`).
fn metadata_key(key: &str) -> &str {
    key.strip_prefix("tenantgate.").unwrap_or(key)
}

/// One stream's state.
pub struct Stream {
    shared: Arc<Shared>,
    /// Whether the request is a gRPC call (its replies are trailers-only).
    grpc: bool,
    /// Headers to add to the response (RateLimit fields on allowed requests).
    response_headers: Vec<(&'static str, String)>,
    /// The request waits for the rate limit service.
    waiting: Option<Waiting>,
}

/// A request paused for its fleet check: the engine's [`Pending`] and the
/// answer as it arrives (headers, data, trailers).
struct Waiting {
    stream: u64,
    pending: Pending,
    http_status: Option<String>,
    grpc_status: Option<String>,
    body: Vec<u8>,
}

fn find(headers: &[RawHeader<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
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

/// A request with no state to decide with (fail closed).
pub fn fail_closed(f: &mut Filter<'_>) {
    if let Verdict::Reply(r) = flow::no_bundle() {
        send(f, &r, false);
    }
}

impl Stream {
    pub fn new(shared: Arc<Shared>) -> Stream {
        Stream {
            shared,
            grpc: false,
            response_headers: Vec::new(),
            waiting: None,
        }
    }

    pub fn on_request_headers(
        &mut self,
        f: &mut Filter<'_>,
        _end_of_stream: bool,
    ) -> HeadersStatus {
        let shared = Arc::clone(&self.shared);
        let worker = &shared.worker;
        let start = now_ns();
        let (step, strip) = {
            let raw = f.headers(HeaderKind::RequestHeaders);
            let headers = match raw.and_then(|raw| header_pairs(&raw)) {
                Ok(h) => h,
                Err(e) => {
                    let msg = format!("cannot read request headers: {e}");
                    return self.carry_out(f, worker.host_error(msg, start));
                }
            };
            let strip: Vec<String> = own_headers(&headers).map(str::to_owned).collect();
            let source = if worker.uses_source_ip() {
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
            self.grpc = is_grpc(&headers);
            let step = worker.begin(&input, &HostMetadata(f), Some(&*shared.store));
            (step, strip)
        };
        for name in &strip {
            let _ = f.remove_header(HeaderKind::RequestHeaders, name);
        }
        match step {
            Step::Done(effects) => self.carry_out(f, effects),
            Step::Deferred(d) => self.check_fleet(f, d),
        }
    }

    pub fn on_request_body(&mut self, _f: &mut Filter<'_>, _end_of_stream: bool) -> BodyStatus {
        // While the fleet check is pending the body waits too, or it would
        // release the request upstream.
        if self.waiting.is_some() {
            BodyStatus::StopIterationAndWatermark
        } else {
            BodyStatus::Continue
        }
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
        if self.waiting.is_some() {
            TrailersStatus::StopIteration
        } else {
            TrailersStatus::Continue
        }
    }

    pub fn on_response_headers(&mut self, f: &mut Filter<'_>) {
        for (k, v) in self.response_headers.drain(..) {
            let _ = f.add_header(HeaderKind::ResponseHeaders, k, &v);
        }
    }

    /// The downstream stream ended: a fleet check still pending gives back
    /// the local tokens its request was charged.
    pub fn on_stream_complete(&mut self) {
        if let Some(w) = self.waiting.take() {
            let shared = &self.shared;
            let line = shared.worker.abandon(w.pending, &*shared.store);
            write_logs(line.as_slice());
        }
    }

    /// The answer to a one-shot callout (none is made yet).
    pub fn on_callout_done(
        &mut self,
        _f: &mut Filter<'_>,
        _id: u64,
        _result: CalloutResult,
        _headers: &[RawHeader<'_>],
        _body: &[&[u8]],
    ) {
    }

    /// Pauses the request and sends the engine's fleet check over a
    /// streamed HTTP/2 call (gRPC framed here); the answer resumes it.
    fn check_fleet(&mut self, f: &mut Filter<'_>, d: Deferred) -> HeadersStatus {
        let shared = Arc::clone(&self.shared);
        let path = format!("/{RLS_SERVICE}/{RLS_METHOD}");
        let headers = [
            (":method", "POST"),
            (":path", path.as_str()),
            ("host", d.cluster.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        let body = grpc_frame(&d.call);
        let timeout_ms = u64::from(d.timeout_ms);
        match f.start_http_stream(&d.cluster, &headers, &body, true, timeout_ms) {
            Ok(stream) => {
                let calls = Update::Add(shared.worker.layout().fleet_calls, 1);
                shared.metrics.apply(calls, |m, l, v| f.update(m, l, v));
                self.waiting = Some(Waiting {
                    stream,
                    pending: d.pending,
                    http_status: None,
                    grpc_status: None,
                    body: Vec::new(),
                });
                HeadersStatus::StopAllIterationAndWatermark
            }
            Err(e) => {
                let why = format!("cannot call cluster `{}`: {e}", d.cluster);
                let effects = shared
                    .worker
                    .resume(d.pending, Err(why), now_ns(), &*shared.store);
                self.carry_out(f, effects)
            }
        }
    }

    fn waiting_for(&mut self, stream: u64) -> Option<&mut Waiting> {
        self.waiting.as_mut().filter(|w| w.stream == stream)
    }

    pub fn on_http_stream_headers(&mut self, stream: u64, headers: &[RawHeader<'_>]) {
        if let Some(w) = self.waiting_for(stream) {
            w.http_status = find(headers, ":status");
            // A trailers-only answer (an error) has its status here.
            if let Some(s) = find(headers, "grpc-status") {
                w.grpc_status = Some(s);
            }
        }
    }

    pub fn on_http_stream_data(&mut self, stream: u64, data: &[&[u8]]) {
        if let Some(w) = self.waiting_for(stream) {
            for chunk in data {
                w.body.extend_from_slice(chunk);
            }
        }
    }

    pub fn on_http_stream_trailers(&mut self, stream: u64, trailers: &[RawHeader<'_>]) {
        if let Some(w) = self.waiting_for(stream) {
            if let Some(s) = find(trailers, "grpc-status") {
                w.grpc_status = Some(s);
            }
        }
    }

    /// The fleet check's call ended (`failure`: reset, with why): the
    /// engine finishes the request with the answer.
    pub fn on_http_stream_done(
        &mut self,
        f: &mut Filter<'_>,
        stream: u64,
        failure: Option<String>,
    ) {
        let Some(w) = self.waiting.take_if(|w| w.stream == stream) else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let answer = match failure {
            Some(why) => Err(why),
            None => grpc_answer(w.http_status.as_deref(), w.grpc_status.as_deref(), &w.body),
        };
        let effects = shared.worker.resume(
            w.pending,
            answer.as_deref().map_err(Clone::clone),
            now_ns(),
            &*shared.store,
        );
        if self.carry_out(f, effects) == HeadersStatus::Continue {
            f.continue_decoding();
        }
    }

    /// Carries out a decided request's effects: logs, metrics, then the
    /// verdict (continue with the engine's headers and path, or reply).
    fn carry_out(&mut self, f: &mut Filter<'_>, effects: Effects) -> HeadersStatus {
        let metrics = &self.shared.metrics;
        write_logs(&effects.logs);
        // The decision's fields for access logs, span tags and later
        // filters (with the `filter_state` setting): filter state keyed as
        // given (no `wasm.`), and the same as dynamic metadata in one call.
        if !effects.filter_state.is_empty() {
            for (key, value) in &effects.filter_state {
                let _ = f.set_filter_state(key, value);
            }
            let metadata: Vec<(&str, &str)> = effects
                .filter_state
                .iter()
                .map(|(k, v)| (metadata_key(k), v.as_str()))
                .collect();
            f.set_dynamic_metadata(METADATA_NAMESPACE, &metadata);
        }
        for u in &effects.metrics {
            metrics.apply(*u, |m, l, v| f.update(m, l, v));
        }
        if let Some((r, start)) = effects.sample_time {
            let us = now_ns().saturating_sub(start) / 1_000;
            metrics.apply(Update::Set(r, us), |m, l, v| f.update(m, l, v));
        }
        for (name, value) in effects.request_headers() {
            let _ = f.add_header(HeaderKind::RequestHeaders, name, value);
        }
        match effects.verdict {
            Verdict::Continue {
                path,
                response_headers,
            } => {
                // The upstream sees the path that was judged.
                if let Some(p) = path {
                    let _ = f.set_header(HeaderKind::RequestHeaders, ":path", &p);
                }
                self.response_headers = response_headers;
                HeadersStatus::Continue
            }
            Verdict::Reply(r) => {
                send(f, &r, self.grpc);
                HeadersStatus::StopIteration
            }
        }
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
