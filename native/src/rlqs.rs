//! Mode `assigned`: the configuration's RLQS stream to the rate limit quota
//! service. One stream per filter configuration (the native build has one
//! worker for all of Envoy's threads, so one client per Envoy process), opened
//! on the main thread by the tick when the engine has a report to send, kept
//! open for the reports that follow; the service's messages go to the
//! engine ([`Worker::stream_message`]), the stream's end too
//! ([`Worker::stream_closed`]), which reopens it after its backoff. Nothing
//! here decides: the engine holds the assignments and admits requests
//! against them with no call.

use std::sync::{Arc, PoisonError};

use tenantgate_engine::fleet::{RLQS_METHOD, RLQS_SERVICE};
use tenantgate_engine::metrics::Update;
use tenantgate_engine::Worker;

use crate::abi::{Config, RawHeader};
use crate::config::Shared;
use crate::host::{grpc_frame, grpc_take_messages, now_ns};

/// The open stream: its id, bytes received but not yet a whole message, and
/// the `grpc-status` once the service sends one.
pub struct RlqsStream {
    id: u64,
    received: Vec<u8>,
    grpc_status: Option<String>,
}

impl Shared {
    fn rlqs_id(&self) -> Option<u64> {
        self.rlqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|s| s.id)
    }

    /// Sends an encoded usage report on the stream, opening it first if
    /// needed.
    pub fn send_stream_report(&self, c: &mut Config<'_>, worker: &Arc<Worker>, message: &[u8]) {
        let frame = grpc_frame(message);
        if let Some(id) = self.rlqs_id() {
            match c.stream_send_data(id, &frame, false) {
                Ok(()) => self.count_report(c, worker),
                Err(e) => {
                    self.rlqs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    c.reset_stream(id);
                    self.stream_closed(c, worker, &format!("cannot send a report: {e}"));
                }
            }
            return;
        }
        let Some(cluster) = worker.stream_cluster() else {
            return;
        };
        let path = format!("/{RLQS_SERVICE}/{RLQS_METHOD}");
        let headers = [
            (":method", "POST"),
            (":path", path.as_str()),
            ("host", cluster),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        // No end of stream and no timeout: the stream stays open.
        match c.start_http_stream(cluster, &headers, &frame, false, 0) {
            Ok(id) => {
                *self.rlqs.lock().unwrap_or_else(PoisonError::into_inner) = Some(RlqsStream {
                    id,
                    received: Vec::new(),
                    grpc_status: None,
                });
                let opened = worker.stream_opened();
                for u in &opened {
                    self.metrics.apply(*u, |m, l, v| c.update(m, l, v));
                }
                self.count_report(c, worker);
            }
            Err(e) => {
                let why = format!(
                    "cannot open a stream to cluster `{cluster}`: {e} (is it in Envoy's config, over HTTP/2?)"
                );
                self.stream_closed(c, worker, &why);
            }
        }
    }

    fn count_report(&self, c: &Config<'_>, worker: &Worker) {
        let calls = Update::Add(worker.layout().fleet_calls, 1);
        self.metrics.apply(calls, |m, l, v| c.update(m, l, v));
    }

    fn stream_closed(&self, c: &Config<'_>, worker: &Worker, why: &str) {
        let tick = worker.stream_closed(why, now_ns());
        crate::config::write_logs(&tick.logs);
        for u in &tick.metrics {
            self.metrics.apply(*u, |m, l, v| c.update(m, l, v));
        }
    }

    /// Headers or trailers of the RLQS stream; `false` if `stream` is
    /// another one.
    pub fn on_rlqs_headers(&self, stream: u64, headers: &[RawHeader<'_>]) -> bool {
        let mut rlqs = self.rlqs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = rlqs.as_mut().filter(|s| s.id == stream) else {
            return false;
        };
        if let Some((_, v)) = headers.iter().find(|(k, _)| *k == b"grpc-status") {
            s.grpc_status = Some(String::from_utf8_lossy(v).into_owned());
        }
        true
    }

    /// Data of the RLQS stream: each whole message goes to the worker;
    /// `false` if `stream` is another one.
    pub fn on_rlqs_data(&self, c: &Config<'_>, stream: u64, data: &[&[u8]]) -> bool {
        let messages = {
            let mut rlqs = self.rlqs.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(s) = rlqs.as_mut().filter(|s| s.id == stream) else {
                return false;
            };
            for chunk in data {
                s.received.extend_from_slice(chunk);
            }
            grpc_take_messages(&mut s.received)
        };
        let worker = Arc::clone(&self.worker);
        match messages {
            Ok(messages) => {
                for m in messages {
                    let tick = worker.stream_message(&m, now_ns());
                    crate::config::write_logs(&tick.logs);
                    for u in &tick.metrics {
                        self.metrics.apply(*u, |m, l, v| c.update(m, l, v));
                    }
                }
            }
            Err(why) => {
                self.rlqs
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                self.stream_closed(c, &worker, &why);
            }
        }
        true
    }

    /// The RLQS stream ended (`failure`: reset, with why); `false` if
    /// `stream` is another one.
    pub fn on_rlqs_done(&self, c: &Config<'_>, stream: u64, failure: Option<String>) -> bool {
        let ended = {
            let mut rlqs = self.rlqs.lock().unwrap_or_else(PoisonError::into_inner);
            if rlqs.as_ref().is_some_and(|s| s.id == stream) {
                rlqs.take()
            } else {
                None
            }
        };
        let Some(s) = ended else {
            return false;
        };
        let why = failure.unwrap_or_else(|| match s.grpc_status.as_deref().map(str::trim) {
            Some("0") | None => "closed by the service".to_string(),
            Some("14") => "gRPC status 14 (unavailable)".to_string(),
            Some(code) => format!("gRPC status {code}"),
        });
        let worker = Arc::clone(&self.worker);
        self.stream_closed(c, &worker, &why);
        true
    }
}
