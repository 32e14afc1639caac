//! The safe, pure half of the host layer: the ABI's enums as Rust types,
//! what a host call can fail with, and the conversions the calls in
//! [`crate::abi`] share. No host call here, so all of it is unit tested.

use tenantgate_engine::http::HeaderPair;
use tenantgate_engine::{Bundle, Diagnostics, Engine};

/// Which header map a call reads or writes (`envoy_dynamic_module_type_http_header_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum HeaderKind {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

/// Envoy's log levels (`envoy_dynamic_module_type_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// The attributes the filter reads (`envoy_dynamic_module_type_attribute_id`;
/// the values are the enum's positions in `abi.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Attribute {
    /// `source.address`: `ip:port` of the downstream peer.
    SourceAddress = 24,
}

/// What a request-headers hook tells Envoy (`FilterHeadersStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum HeadersStatus {
    Continue = 0,
    /// Stop: a local reply was sent, or the request waits for a callout.
    StopIteration = 1,
    /// Stop and let Envoy buffer the body up to its limit (a paused request).
    StopAllIterationAndWatermark = 4,
}

/// What a body hook tells Envoy (`FilterDataStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BodyStatus {
    Continue = 0,
    StopIterationAndWatermark = 2,
}

/// What a trailers hook tells Envoy (`FilterTrailersStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum TrailersStatus {
    Continue = 0,
    StopIteration = 1,
}

/// A metric's kind, for the three `define_*` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric defined at config time: Envoy's id (ids start at 1) and how many
/// label values each update must carry (Envoy does not check the count:
/// the layer does, before the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    pub id: usize,
    pub labels: usize,
}

/// How a one-shot HTTP callout ended (`envoy_dynamic_module_type_http_callout_result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutResult {
    Success,
    Reset,
    ExceedResponseBufferLimit,
    Unknown(u32),
}

impl CalloutResult {
    pub fn from_raw(raw: u32) -> CalloutResult {
        match raw {
            0 => CalloutResult::Success,
            1 => CalloutResult::Reset,
            2 => CalloutResult::ExceedResponseBufferLimit,
            n => CalloutResult::Unknown(n),
        }
    }
}

/// A host call that did not succeed. Every status the ABI returns becomes
/// one of these; nothing panics on an unexpected one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// A call that returns `bool` said `false`.
    #[error("envoy refused `{0}`")]
    Refused(&'static str),
    #[error("metric not found (id {0})")]
    MetricNotFound(usize),
    #[error("invalid metric labels")]
    InvalidLabels,
    #[error("metrics are frozen: they can only be defined while the configuration loads")]
    Frozen,
    #[error("metric takes {want} label values, got {got}")]
    LabelCount { want: usize, got: usize },
    #[error("callout is missing `:method`, `:path` or `host`")]
    MissingRequiredHeaders,
    #[error("cluster `{0}` is not in Envoy's configuration")]
    ClusterNotFound(String),
    #[error("duplicate callout id")]
    DuplicateCalloutId,
    #[error("cannot create the request to cluster `{0}` (no healthy host?)")]
    CannotCreateRequest(String),
    #[error("unknown host status {0}")]
    Status(u32),
    /// The header map has a name that is not UTF-8 (Envoy's names are ASCII).
    #[error("malformed header map")]
    MalformedHeaders,
}

/// `envoy_dynamic_module_type_metrics_result` as a value.
pub fn metrics_result(raw: u32, id: usize) -> Result<(), HostError> {
    match raw {
        0 => Ok(()),
        1 => Err(HostError::MetricNotFound(id)),
        2 => Err(HostError::InvalidLabels),
        3 => Err(HostError::Frozen),
        n => Err(HostError::Status(n)),
    }
}

/// `envoy_dynamic_module_type_http_callout_init_result` as a value.
pub fn callout_init(raw: u32, cluster: &str) -> Result<(), HostError> {
    match raw {
        0 => Ok(()),
        1 => Err(HostError::MissingRequiredHeaders),
        2 => Err(HostError::ClusterNotFound(cluster.to_string())),
        3 => Err(HostError::DuplicateCalloutId),
        4 => Err(HostError::CannotCreateRequest(cluster.to_string())),
        n => Err(HostError::Status(n)),
    }
}

/// Checks an update's label values against the metric's definition.
pub fn check_labels(metric: Metric, values: usize) -> Result<(), HostError> {
    if metric.labels == values {
        Ok(())
    } else {
        Err(HostError::LabelCount {
            want: metric.labels,
            got: values,
        })
    }
}

/// Envoy's header pairs as the engine reads them: names as `&str` (Envoy's
/// names are lowercase ASCII; a name that is not UTF-8 makes the map
/// malformed, as in the Wasm filter), values as raw bytes.
pub fn header_pairs<'a>(raw: &[(&'a [u8], &'a [u8])]) -> Result<Vec<HeaderPair<'a>>, HostError> {
    raw.iter()
        .map(|(k, v)| {
            std::str::from_utf8(k)
                .map(|k| (k, *v))
                .map_err(|_| HostError::MalformedHeaders)
        })
        .collect()
}

/// The engine for a filter config as Envoy hands it to the module (the
/// bundle JSON, `filter_config`'s `StringValue`), or the located errors
/// that refuse it. Bytes that are not UTF-8 are read lossily: the bundle
/// parser then names what is wrong with them.
pub fn engine_of(config: &[u8]) -> Result<Engine, Diagnostics> {
    let text = String::from_utf8_lossy(config);
    Bundle::from_json(&text).and_then(|b| Engine::new(&b))
}

/// True if the request is a gRPC call (its local replies must be gRPC
/// trailers-only responses, with `grpc-status`).
pub fn is_grpc(headers: &[HeaderPair<'_>]) -> bool {
    headers
        .iter()
        .find(|(k, _)| *k == "content-type")
        .is_some_and(|(_, v)| v.starts_with(b"application/grpc"))
}

/// A `grpc-message` value: percent-encoded as the gRPC spec asks (bytes
/// outside printable ASCII, and `%`).
pub fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A series name of the engine's metrics layout split into its base name
/// and its Istio-style tags (`tag=.=value;.;` before the name): the Wasm
/// filter puts labels in the name for Envoy's `stats_tags`; the native build
/// gives them to Envoy as real labels.
pub fn split_tags(name: &str) -> (&str, Vec<(&str, &str)>) {
    let mut tags = Vec::new();
    let mut rest = name;
    while let Some((tag, after)) = rest.split_once("=.=") {
        if tag.contains('.') {
            break;
        }
        let Some((value, tail)) = after.split_once(";.;") else {
            break;
        };
        tags.push((tag, value));
        rest = tail;
    }
    (rest, tags)
}

/// `envoy_dynamic_module_type_http_stream_reset_reason` in words.
pub fn reset_reason(raw: u32) -> String {
    match raw {
        0 => "connection failure".into(),
        1 => "connection termination".into(),
        2 => "local reset".into(),
        3 => "local refused stream reset".into(),
        4 => "overflow".into(),
        5 => "remote reset".into(),
        6 => "remote refused stream reset".into(),
        7 => "protocol error".into(),
        n => format!("reason {n}"),
    }
}

/// A gRPC message on the wire: the uncompressed flag, the length (4 bytes,
/// big-endian) and the message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The message of a unary gRPC answer's body (one uncompressed frame).
pub fn grpc_unframe(body: &[u8]) -> Result<&[u8], String> {
    let (Some(&flag), Some(len)) = (body.first(), body.get(1..5)) else {
        return Err(format!(
            "a gRPC answer of {} bytes has no frame",
            body.len()
        ));
    };
    if flag != 0 {
        return Err("the gRPC answer is compressed".into());
    }
    let mut n = [0u8; 4];
    n.copy_from_slice(len);
    let n = u32::from_be_bytes(n) as usize;
    body.get(5..5 + n)
        .ok_or_else(|| format!("a gRPC frame of {n} bytes is cut short"))
}

/// The largest gRPC message a stream may carry (the RLQS service's
/// answers are a few hundred bytes per bucket).
pub const MAX_STREAM_MESSAGE: usize = 4 << 20;

/// Takes the whole gRPC messages at the front of a stream's received bytes
/// out of `received` (a message cut short stays for the next data). `Err`:
/// a compressed or oversized frame; the stream cannot go on.
pub fn grpc_take_messages(received: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let (Some(&flag), Some(len)) = (received.get(at), received.get(at + 1..at + 5)) {
        if flag != 0 {
            return Err("a compressed gRPC message on the stream".into());
        }
        let mut n = [0u8; 4];
        n.copy_from_slice(len);
        let n = u32::from_be_bytes(n) as usize;
        if n > MAX_STREAM_MESSAGE {
            return Err(format!(
                "a gRPC message of {n} bytes on the stream (at most {MAX_STREAM_MESSAGE})"
            ));
        }
        let Some(message) = received.get(at + 5..at + 5 + n) else {
            break;
        };
        out.push(message.to_vec());
        at += 5 + n;
    }
    received.drain(..at.min(received.len()));
    Ok(out)
}

/// What a unary gRPC call answered: the message, or why there is none (as
/// the Wasm filter words it). `status` is `grpc-status` from the trailers
/// (or the headers of a trailers-only answer), `http` the `:status`.
pub fn grpc_answer(
    http: Option<&str>,
    status: Option<&str>,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    match status.map(str::trim) {
        Some("0") => grpc_unframe(body).map(<[u8]>::to_vec),
        Some(code) => Err(format!(
            "gRPC status {code} ({})",
            match code {
                "4" => "past timeout_ms",
                "14" => "unavailable, or past timeout_ms",
                _ => "see the service's log",
            }
        )),
        None => Err(format!(
            "no gRPC status (HTTP status {}; is the cluster HTTP/2?)",
            http.unwrap_or("none")
        )),
    }
}

/// The wall clock in nanoseconds since the Unix epoch (what the Wasm filter
/// reads from the host; a native module reads it itself).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages_are_taken_whole_and_a_cut_one_waits() {
        let mut received = grpc_frame(b"one");
        received.extend(grpc_frame(b""));
        let two = grpc_frame(b"second message");
        received.extend_from_slice(&two[..7]);
        let got = grpc_take_messages(&mut received).unwrap();
        assert_eq!(got, vec![b"one".to_vec(), Vec::new()]);
        assert_eq!(received, two[..7].to_vec());
        received.extend_from_slice(&two[7..]);
        assert_eq!(
            grpc_take_messages(&mut received).unwrap(),
            vec![b"second message".to_vec()]
        );
        assert!(received.is_empty());
        // A header alone, cut short: nothing yet.
        let mut partial = vec![0, 0, 0];
        assert_eq!(
            grpc_take_messages(&mut partial).unwrap(),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(partial, vec![0, 0, 0]);
    }

    #[test]
    fn compressed_or_oversized_stream_messages_end_the_stream() {
        let mut compressed = vec![1, 0, 0, 0, 1, 7];
        assert_eq!(
            grpc_take_messages(&mut compressed).unwrap_err(),
            "a compressed gRPC message on the stream"
        );
        let mut huge = vec![0, 0x7f, 0xff, 0xff, 0xff];
        assert_eq!(
            grpc_take_messages(&mut huge).unwrap_err(),
            "a gRPC message of 2147483647 bytes on the stream (at most 4194304)"
        );
    }

    #[test]
    fn metrics_results_are_values() {
        assert_eq!(metrics_result(0, 1), Ok(()));
        assert_eq!(metrics_result(1, 7), Err(HostError::MetricNotFound(7)));
        assert_eq!(metrics_result(2, 1), Err(HostError::InvalidLabels));
        assert_eq!(metrics_result(3, 1), Err(HostError::Frozen));
        assert_eq!(metrics_result(9, 1), Err(HostError::Status(9)));
    }

    #[test]
    fn callout_init_results_are_values() {
        assert_eq!(callout_init(0, "rls"), Ok(()));
        assert_eq!(
            callout_init(2, "rls").unwrap_err().to_string(),
            "cluster `rls` is not in Envoy's configuration"
        );
        assert_eq!(callout_init(3, "rls"), Err(HostError::DuplicateCalloutId));
        assert_eq!(
            callout_init(4, "rls"),
            Err(HostError::CannotCreateRequest("rls".into()))
        );
        assert_eq!(
            callout_init(1, "rls"),
            Err(HostError::MissingRequiredHeaders)
        );
        assert_eq!(callout_init(42, "rls"), Err(HostError::Status(42)));
        assert_eq!(CalloutResult::from_raw(1), CalloutResult::Reset);
        assert_eq!(CalloutResult::from_raw(5), CalloutResult::Unknown(5));
    }

    #[test]
    fn label_counts_are_checked_before_the_call() {
        let m = Metric {
            kind: MetricKind::Counter,
            id: 1,
            labels: 2,
        };
        assert_eq!(check_labels(m, 2), Ok(()));
        assert_eq!(
            check_labels(m, 1).unwrap_err().to_string(),
            "metric takes 2 label values, got 1"
        );
    }

    #[test]
    fn header_names_must_be_utf8() {
        let ok: Vec<(&[u8], &[u8])> = vec![(b":path", b"/x"), (b"x-v", b"\xff")];
        assert_eq!(
            header_pairs(&ok).unwrap(),
            vec![(":path", &b"/x"[..]), ("x-v", &b"\xff"[..])]
        );
        let bad: Vec<(&[u8], &[u8])> = vec![(b"\xffname", b"v")];
        assert_eq!(header_pairs(&bad), Err(HostError::MalformedHeaders));
    }

    #[test]
    fn a_config_that_is_not_a_bundle_is_refused_with_located_errors() {
        let e = engine_of(b"{\"format\": 1").err().unwrap();
        assert_eq!(e.len(), 1, "{e}");
        assert!(engine_of(b"\xff\xfe").is_err());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let bundle = Bundle::from_dir(&dir).unwrap();
        let engine = engine_of(bundle.to_json().as_bytes()).unwrap();
        assert_eq!(engine.version(), bundle.version);
    }

    #[test]
    fn grpc_requests_are_told_by_content_type() {
        assert!(is_grpc(&[("content-type", b"application/grpc+proto")]));
        assert!(!is_grpc(&[("content-type", b"application/json")]));
        assert!(!is_grpc(&[]));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("over quota: 100%"), "over quota: 100%25");
        assert_eq!(grpc_message("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn series_names_split_into_name_and_labels() {
        assert_eq!(
            split_tags(
                "tenant=.=/acme/eu;.;parent=.=/acme;.;limit=.=rps;.;tenantgate.limit.admitted"
            ),
            (
                "tenantgate.limit.admitted",
                vec![
                    ("tenant", "/acme/eu"),
                    ("parent", "/acme"),
                    ("limit", "rps")
                ]
            )
        );
        assert_eq!(
            split_tags("tenantgate.allowed"),
            ("tenantgate.allowed", vec![])
        );
        assert_eq!(
            split_tags("bundle=.=0123456789ab;.;tenantgate.bundle_active"),
            ("tenantgate.bundle_active", vec![("bundle", "0123456789ab")])
        );
    }

    #[test]
    fn grpc_frames_round_trip() {
        let framed = grpc_frame(b"abc");
        assert_eq!(framed, vec![0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(grpc_unframe(&framed), Ok(&b"abc"[..]));
        assert_eq!(grpc_unframe(&[0, 0, 0, 0, 0]), Ok(&b""[..]));
        assert!(grpc_unframe(&[0, 0, 0, 0, 9, 1])
            .unwrap_err()
            .contains("cut short"));
        assert!(grpc_unframe(&[1, 0, 0, 0, 0])
            .unwrap_err()
            .contains("compressed"));
        assert!(grpc_unframe(&[]).unwrap_err().contains("no frame"));
    }

    #[test]
    fn grpc_answers_say_why_they_failed() {
        assert_eq!(
            grpc_answer(Some("200"), Some("0"), &grpc_frame(b"m")),
            Ok(b"m".to_vec())
        );
        assert_eq!(
            grpc_answer(Some("200"), Some("14"), b""),
            Err("gRPC status 14 (unavailable, or past timeout_ms)".into())
        );
        assert_eq!(
            grpc_answer(Some("200"), Some("4"), b""),
            Err("gRPC status 4 (past timeout_ms)".into())
        );
        assert_eq!(
            grpc_answer(Some("503"), None, b""),
            Err("no gRPC status (HTTP status 503; is the cluster HTTP/2?)".into())
        );
    }

    #[test]
    fn enum_values_match_the_abi() {
        // Positions in abi.h's enums, checked by hand against the header.
        assert_eq!(HeaderKind::ResponseHeaders as u32, 2);
        assert_eq!(LogLevel::Critical as u32, 5);
        assert_eq!(Attribute::SourceAddress as u32, 24);
        assert_eq!(HeadersStatus::StopAllIterationAndWatermark as u32, 4);
        assert_eq!(BodyStatus::StopIterationAndWatermark as u32, 2);
        assert_eq!(TrailersStatus::StopIteration as u32, 1);
    }
}
