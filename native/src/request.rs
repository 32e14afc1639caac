//! One HTTP stream: headers in, engine decision, continue or reply. The same
//! steps as the Wasm filter's HTTP context (`filter/src/wasm.rs`), over the
//! engine's public API; kept in this one file so it can move to the
//! engine's request flow as a whole.

use std::sync::{Arc, PoisonError};

use tenantgate_engine::fleet::{FleetCall, FleetOutcome, RLS_METHOD, RLS_SERVICE};
use tenantgate_engine::http::{own_headers, HttpInput, LocalReply, Mapped, MetadataSource};
use tenantgate_engine::quota::Refund;
use tenantgate_engine::settings::OnError;
use tenantgate_engine::{Decision, TenantPath, Worker};

use crate::abi::{self, Filter, RawHeader};
use crate::config::Shared;
use crate::host::{
    grpc_answer, grpc_frame, grpc_message, header_pairs, is_grpc, now_ns, Attribute, BodyStatus,
    CalloutResult, HeaderKind, HeadersStatus, LogLevel, TrailersStatus,
};

/// The response code details Envoy logs for our replies.
const DETAILS: &str = "tenantgate";

/// One stream's state.
pub struct Stream {
    shared: Arc<Shared>,
    /// Headers to add to the response (RateLimit fields on allowed requests).
    response_headers: Vec<(&'static str, String)>,
    /// The request waits for the rate limit service.
    pending: Option<Pending>,
}

/// A request paused for its `per_request` fleet check: what finishing it
/// needs, and the answer as it arrives (headers, data, trailers).
struct Pending {
    stream: u64,
    call: FleetCall,
    decision: Decision,
    mapped: Mapped,
    /// What the local limits charged, given back if the fleet refuses.
    refund: Option<Refund>,
    start: u64,
    grpc: bool,
    http_status: Option<String>,
    grpc_status: Option<String>,
    body: Vec<u8>,
}

fn find<'a>(headers: &[RawHeader<'a>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// Logs a failed fleet call, at most once a second for the process (each
/// one is counted in `tenantgate.fleet_errors`).
pub fn log_fleet_error(why: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ns();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1_000_000_000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        abi::log(
            LogLevel::Warn,
            &format!("tenantgate: rate limit service call failed: {why}"),
        );
    }
}

/// Gives back a local charge (the fleet refused, or the stream ended).
fn give_back(shared: &Shared, refund: Option<&Refund>) {
    if let Some(r) = refund {
        if let Err(e) = shared.engine.refund(r, &*shared.store) {
            abi::log(
                LogLevel::Error,
                &format!("tenantgate: cannot give back local quota tokens: {e}"),
            );
        }
    }
}

/// The decision when the fleet check failed: `rate_limit_service.on_error`.
fn fleet_failed(
    shared: &Shared,
    f: &Filter<'_>,
    local: Decision,
    refund: Option<&Refund>,
    why: String,
) -> Decision {
    if let Some(m) = shared.metrics.fleet_errors {
        let _ = f.update(m, &[], 1);
    }
    log_fleet_error(&why);
    match shared.engine.rate_limit_service().map(|r| r.on_error) {
        Some(OnError::Allow) => local,
        _ => {
            give_back(shared, refund);
            Decision::error(OnError::Deny, format!("rate limit service: {why}"))
        }
    }
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
            pending: None,
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
                if decision.is_allowed() {
                    if let Some(call) = engine.fleet_check(&m.request) {
                        return self.check_fleet(f, call, decision, m, refund, start, grpc);
                    }
                }
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
        // While the fleet check is pending the body waits too, or it would
        // release the request upstream.
        if self.pending.is_some() {
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
        if self.pending.is_some() {
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
        if let Some(p) = self.pending.take() {
            give_back(&self.shared, p.refund.as_ref());
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

    /// Pauses an admitted request and asks the rate limit service over a
    /// streamed HTTP/2 call (gRPC framed here); the answer finishes it.
    #[allow(clippy::too_many_arguments)]
    fn check_fleet(
        &mut self,
        f: &mut Filter<'_>,
        call: FleetCall,
        decision: Decision,
        mapped: Mapped,
        refund: Option<Refund>,
        start: u64,
        grpc: bool,
    ) -> HeadersStatus {
        let shared = Arc::clone(&self.shared);
        let Some(rls) = shared.engine.rate_limit_service() else {
            let (tenant, rid) = (Some(&mapped.request.tenant), mapped.request_id.as_deref());
            return self.finish(f, decision, Some(&mapped), tenant, rid, start, grpc);
        };
        let path = format!("/{RLS_SERVICE}/{RLS_METHOD}");
        let headers = [
            (":method", "POST"),
            (":path", path.as_str()),
            ("host", rls.cluster.as_str()),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        let body = grpc_frame(&call.message);
        match f.start_http_stream(
            &rls.cluster,
            &headers,
            &body,
            true,
            u64::from(rls.timeout_ms),
        ) {
            Ok(stream) => {
                if let Some(m) = shared.metrics.fleet_calls {
                    let _ = f.update(m, &[], 1);
                }
                self.pending = Some(Pending {
                    stream,
                    call,
                    decision,
                    mapped,
                    refund,
                    start,
                    grpc,
                    http_status: None,
                    grpc_status: None,
                    body: Vec::new(),
                });
                HeadersStatus::StopAllIterationAndWatermark
            }
            Err(e) => {
                let why = format!("cannot call cluster `{}`: {e}", rls.cluster);
                let decision = fleet_failed(&shared, f, decision, refund.as_ref(), why);
                let (tenant, rid) = (Some(&mapped.request.tenant), mapped.request_id.as_deref());
                self.finish(f, decision, Some(&mapped), tenant, rid, start, grpc)
            }
        }
    }

    fn pending_for(&mut self, stream: u64) -> Option<&mut Pending> {
        self.pending.as_mut().filter(|p| p.stream == stream)
    }

    pub fn on_http_stream_headers(&mut self, stream: u64, headers: &[RawHeader<'_>]) {
        if let Some(p) = self.pending_for(stream) {
            p.http_status = find(headers, ":status");
            // A trailers-only answer (an error) has its status here.
            if let Some(s) = find(headers, "grpc-status") {
                p.grpc_status = Some(s);
            }
        }
    }

    pub fn on_http_stream_data(&mut self, stream: u64, data: &[&[u8]]) {
        if let Some(p) = self.pending_for(stream) {
            for chunk in data {
                p.body.extend_from_slice(chunk);
            }
        }
    }

    pub fn on_http_stream_trailers(&mut self, stream: u64, trailers: &[RawHeader<'_>]) {
        if let Some(p) = self.pending_for(stream) {
            if let Some(s) = find(trailers, "grpc-status") {
                p.grpc_status = Some(s);
            }
        }
    }

    /// The fleet check's call ended (`failure`: reset, with why).
    pub fn on_http_stream_done(
        &mut self,
        f: &mut Filter<'_>,
        stream: u64,
        failure: Option<String>,
    ) {
        if self.pending_for(stream).is_none() {
            return;
        }
        let Some(p) = self.pending.take() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let engine = &shared.engine;
        let answer = match failure {
            Some(why) => Err(why),
            None => grpc_answer(p.http_status.as_deref(), p.grpc_status.as_deref(), &p.body),
        };
        let decision =
            match engine.fleet_answer(&p.call, answer.as_deref().map_err(Clone::clone), now_ns()) {
                FleetOutcome::Admitted => p.decision,
                FleetOutcome::Refused(q) => {
                    give_back(&shared, p.refund.as_ref());
                    Decision::over_quota(q)
                }
                FleetOutcome::Failed(why) => {
                    fleet_failed(&shared, f, p.decision, p.refund.as_ref(), why)
                }
            };
        let (tenant, rid) = (
            Some(&p.mapped.request.tenant),
            p.mapped.request_id.as_deref(),
        );
        if self.finish(f, decision, Some(&p.mapped), tenant, rid, p.start, p.grpc)
            == HeadersStatus::Continue
        {
            f.continue_decoding();
        }
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
        let engine: &Worker = &shared.engine;
        let mode = engine.settings().mode;
        if let Some(m) = shared.metrics.outcome(decision.counter(mode)) {
            let _ = f.update(m, &[], 1);
        }
        let series = &shared.series;
        let tenant_series = {
            let mut tally = series.tally.lock().unwrap_or_else(PoisonError::into_inner);
            series.layout.record(&mut tally, tenant, &decision)
        };
        if let Some((m, values)) = tenant_series.and_then(|r| series.target(r)) {
            let _ = f.update(m, &values, 1);
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
        self.record_time(f, start);
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

impl Stream {
    /// Records the decision time of one request in 8 (the first always),
    /// as the Wasm filter does.
    fn record_time(&self, f: &Filter<'_>, start: u64) {
        let n = self
            .shared
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !n.is_multiple_of(tenantgate_engine::metrics::names::DECISION_TIME_SAMPLE) {
            return;
        }
        if let Some(m) = self.shared.metrics.decision_us {
            let _ = f.update(m, &[], now_ns().saturating_sub(start) / 1_000);
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
