//! HTTP in and out: mapping a request's headers and properties to a
//! [`Request`] (SPEC section 2) and a [`Decision`] to a local reply, response
//! headers and an audit line (SPEC section 7). The filter only moves bytes
//! between Envoy and these functions.

use crate::decision::{Decision, Kind};
use crate::engine::Engine;
use crate::path::normalize_path;
use crate::request::{Principal, Request};
use crate::settings::{Mode, Source};
use crate::tenant::{shorten, TenantPath};

/// Headers the filter owns: any client-sent header with this prefix is
/// removed, in any case and with `_` for `-` (see [`is_own_header`]).
pub const OWN_HEADER_PREFIX: &str = "x-tenantgate-";

/// True for a header or trailer name an upstream could read as one of ours:
/// [`OWN_HEADER_PREFIX`] in any case, with `_` in place of any `-` (CGI,
/// WSGI and Rack servers fold `_` and `-` into the same variable).
pub fn is_own_header(name: &str) -> bool {
    let (n, p) = (name.as_bytes(), OWN_HEADER_PREFIX.as_bytes());
    n.len() >= p.len()
        && n.iter().zip(p).all(|(&c, &want)| {
            let c = c.to_ascii_lowercase();
            c == want || (want == b'-' && c == b'_')
        })
}

/// The names of the client-sent headers (or trailers) the filter removes
/// before the request goes upstream.
pub fn own_headers(pairs: &[(String, Vec<u8>)]) -> impl Iterator<Item = &str> {
    pairs
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| is_own_header(n))
}

/// An id for one decision that the client cannot choose: unique per VM (a
/// random VM part and a counter) and carried in replies and audit lines
/// beside the incoming `x-request-id`, which the client may have chosen.
#[derive(Debug)]
pub struct DecisionIds {
    vm: u64,
    next: std::cell::Cell<u64>,
}

impl DecisionIds {
    /// `seed` should be random per VM (the filter mixes the host's random
    /// source, the time and the context id).
    pub fn new(seed: u64) -> Self {
        DecisionIds {
            vm: splitmix64(seed),
            next: std::cell::Cell::new(0),
        }
    }

    /// The next id: 32 lowercase hex digits. Two ids of one VM never repeat
    /// (the counter goes through a bijection).
    pub fn next_id(&self) -> String {
        let n = self.next.get();
        self.next.set(n.wrapping_add(1));
        format!("{:016x}{:016x}", self.vm, splitmix64(n ^ self.vm))
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
pub const TENANT_HEADER: &str = "x-tenantgate-tenant";
pub const PRINCIPAL_HEADER: &str = "x-tenantgate-principal";
/// The longest principal id accepted.
pub const MAX_PRINCIPAL_LEN: usize = 512;
/// The longest tenant value accepted (16 segments of 63 bytes and slashes).
pub const MAX_TENANT_LEN: usize = 16 * 64;

/// What the host gives us about one request.
pub struct HttpInput<'a> {
    /// Request headers as Envoy holds them (lowercase names, pseudo-headers
    /// `:method`, `:path`, `:authority` included), values as raw bytes.
    pub headers: &'a [(String, Vec<u8>)],
    /// Downstream address (`10.0.0.1:5555`), if known.
    pub source_address: Option<&'a str>,
    pub now_ns: u64,
}

/// Looks up a dynamic-metadata value (`["envoy.filters.http.jwt_authn", "payload", "tenant"]`).
pub trait MetadataSource {
    fn metadata(&self, path: &[String]) -> Option<Vec<u8>>;
}

/// No metadata available.
pub struct NoMetadata;
impl MetadataSource for NoMetadata {
    fn metadata(&self, _path: &[String]) -> Option<Vec<u8>> {
        None
    }
}

/// A request that could not be mapped: answered 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    /// The tenant, when it was read before the problem was found.
    pub tenant: Option<TenantPath>,
    pub message: String,
    /// The request id, when the request had one.
    pub request_id: Option<String>,
}

/// The mapped request and what else the reply needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub request: Request,
    pub request_id: Option<String>,
    /// The `:path` to forward when normalization changed it (the normalized
    /// path and the original query), so the upstream sees the path that was
    /// judged; `None` when the request's path is already normal.
    pub forward_path: Option<String>,
}

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

fn header<'a>(input: &'a HttpInput<'_>, name: &str) -> Result<Option<&'a str>, String> {
    let mut found: Option<&[u8]> = None;
    for (k, v) in input.headers {
        if k.eq_ignore_ascii_case(name) {
            if found.is_some() {
                return Err(format!("more than one `{name}` header"));
            }
            found = Some(v);
        }
    }
    match found {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .map(Some)
            .map_err(|_| format!("header `{name}` is not valid UTF-8")),
    }
}

fn from_source(
    input: &HttpInput<'_>,
    meta: &dyn MetadataSource,
    source: &Source,
) -> Result<Option<String>, String> {
    match source {
        Source::Header(name) => Ok(header(input, name)?.map(str::to_string)),
        Source::Metadata(path) => match meta.metadata(path) {
            Some(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| format!("metadata `{}` is not valid UTF-8", path.join("."))),
            None => Ok(None),
        },
        Source::PathPrefix(_) => Ok(None),
    }
}

impl Engine {
    /// Maps an HTTP request to an engine [`Request`], or says why it is bad.
    pub fn map_request(
        &self,
        input: &HttpInput<'_>,
        meta: &dyn MetadataSource,
    ) -> Result<Mapped, BadRequest> {
        let settings = self.settings();
        let request_id = header(input, "x-request-id")
            .ok()
            .flatten()
            .map(clip_request_id);
        let bad = |tenant: Option<&TenantPath>, message: String| BadRequest {
            tenant: tenant.cloned(),
            message,
            request_id: request_id.clone(),
        };
        let method = header(input, ":method")
            .map_err(|m| bad(None, m))?
            .unwrap_or("GET");
        if !crate::settings::is_method(method) {
            return Err(bad(
                None,
                format!("`{}` is not an HTTP method", shorten(method)),
            ));
        }
        let raw_path = header(input, ":path")
            .map_err(|m| bad(None, m))?
            .unwrap_or("/");
        let path = normalize_path(raw_path).map_err(|e| bad(None, e.to_string()))?;
        let forward_path = forward_path(raw_path, &path);

        let (tenant, path) = match &settings.tenant {
            Source::PathPrefix(prefix) => match self.tenant_from_path(prefix, &path) {
                Some(Ok((t, rest))) => (t, rest),
                Some(Err(m)) => return Err(bad(None, m)),
                None => match &settings.default_tenant {
                    Some(t) => (t.clone(), path),
                    None => {
                        return Err(bad(
                            None,
                            format!("the path does not start with the tenant prefix `{prefix}`"),
                        ))
                    }
                },
            },
            source => {
                let value = from_source(input, meta, source).map_err(|m| bad(None, m))?;
                match value.as_deref().map(trim_ows) {
                    Some(v) if !v.is_empty() => (parse_tenant(v).map_err(|m| bad(None, m))?, path),
                    empty => match &settings.default_tenant {
                        Some(t) => (t.clone(), path),
                        None if empty.is_some() => {
                            return Err(bad(None, format!("no tenant: {}", describe_empty(source))))
                        }
                        None => return Err(bad(None, format!("no tenant: {}", describe(source)))),
                    },
                }
            }
        };
        let principal = match from_source(input, meta, &settings.principal)
            .map_err(|m| bad(Some(&tenant), m))?
        {
            Some(id) if !id.is_empty() => {
                if id.len() > MAX_PRINCIPAL_LEN {
                    return Err(bad(
                        Some(&tenant),
                        format!("the principal is longer than {MAX_PRINCIPAL_LEN} bytes"),
                    ));
                }
                if id.chars().any(char::is_control) {
                    return Err(bad(
                        Some(&tenant),
                        "the principal contains control characters".into(),
                    ));
                }
                let home = match &settings.principal_tenant {
                    Some(source) => match from_source(input, meta, source)
                        .map_err(|m| bad(Some(&tenant), m))?
                    {
                        Some(v) if !trim_ows(&v).is_empty() => parse_tenant(trim_ows(&v))
                            .map_err(|m| bad(Some(&tenant), format!("principal tenant: {m}")))?,
                        _ => tenant.clone(),
                    },
                    None => tenant.clone(),
                };
                Some(Principal { id, tenant: home })
            }
            _ => None,
        };
        let mut headers = Vec::new();
        for name in &settings.context_headers {
            if let Some(v) = header(input, name).map_err(|m| bad(Some(&tenant), m))? {
                headers.push((name.clone(), v.to_string()));
            }
        }
        let claims = match &settings.claims {
            Some(Source::Header(name)) => {
                match header(input, name).map_err(|m| bad(Some(&tenant), m))? {
                    Some(v) => Some(
                        decode_claims(v)
                            .map_err(|m| bad(Some(&tenant), format!("header `{name}`: {m}")))?,
                    ),
                    None => None,
                }
            }
            _ => None,
        };
        let action = match &settings.grpc {
            Some(g) if method == "POST" && is_grpc(input) => Some(g.action(&path)),
            _ => None,
        };
        let host = header(input, ":authority")
            .ok()
            .flatten()
            .map(str::to_string);
        let source_ip = input.source_address.and_then(ip_of);
        let request = Request {
            tenant,
            principal,
            method: method.to_string(),
            action,
            path,
            host,
            source_ip,
            time_ns: input.now_ns,
            headers,
            claims,
            extra_context: None,
        };
        Ok(Mapped {
            request,
            request_id,
            forward_path,
        })
    }

    /// Tenant from the path: `prefix` then the longest run of segments naming a
    /// tenant of the bundle. `None` if the path is not under the prefix. Only
    /// the prefix itself maps to `/`; a first segment that names no tenant is
    /// refused rather than falling back to the root.
    fn tenant_from_path(
        &self,
        prefix: &str,
        path: &str,
    ) -> Option<Result<(TenantPath, String), String>> {
        let prefix = prefix.trim_end_matches('/');
        let rest = if prefix.is_empty() {
            path
        } else {
            path.strip_prefix(prefix)?
        };
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let mut best: Option<(TenantPath, usize)> = None;
        let mut cur = TenantPath::root();
        if segments.is_empty() {
            return Some(Ok((cur, "/".into())));
        }
        for (i, seg) in segments.iter().enumerate() {
            match cur.child(seg) {
                Ok(next) if self.has_tenant(&next) => {
                    best = Some((next.clone(), i + 1));
                    cur = next;
                }
                _ => break,
            }
        }
        match best {
            Some((tenant, used)) => {
                let remaining = segments.get(used..).unwrap_or_default();
                let resource = if remaining.is_empty() {
                    "/".to_string()
                } else {
                    format!("/{}", remaining.join("/"))
                };
                Some(Ok((tenant, resource)))
            }
            None => {
                let first = segments.first().copied().unwrap_or_default();
                Some(Err(format!(
                    "unknown tenant `/{}` in the path",
                    shorten(first)
                )))
            }
        }
    }

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
                    push_ratelimit_fields(&mut headers, q);
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
                        obj.insert("reasons".into(), decision.reasons.clone().into());
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
    pub fn allow_response_headers(&self, decision: &Decision) -> Vec<(String, String)> {
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
            push_ratelimit_fields(&mut out, q);
        }
        out
    }

    /// One JSON audit line, or `None` when the `audit` setting leaves it out.
    pub fn audit_line(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
        request_id: Option<&str>,
    ) -> Option<String> {
        let now = mapped.map(|m| m.request.time_ns).unwrap_or(0);
        self.audit_line_at(decision, mapped, None, request_id, None, now)
    }

    /// True when the `audit` setting asks for a line for this decision.
    pub fn audits(&self, decision: &Decision) -> bool {
        use crate::settings::Audit;
        match self.settings().audit {
            Audit::Off => false,
            Audit::Deny => !decision.is_allowed(),
            Audit::All => true,
        }
    }

    /// [`Engine::audit_line`] for requests that may not have been mapped (a
    /// 400): the tenant, when it was read, and the time come separately.
    pub fn audit_line_at(
        &self,
        decision: &Decision,
        mapped: Option<&Mapped>,
        tenant: Option<&TenantPath>,
        request_id: Option<&str>,
        decision_id: Option<&str>,
        now_ns: u64,
    ) -> Option<String> {
        if !self.audits(decision) {
            return None;
        }
        let req = mapped.map(|m| &m.request);
        let line = AuditLine {
            time: now_ns / 1_000_000_000,
            decision_id,
            request_id,
            tenant: req.map(|r| &r.tenant).or(tenant).map(TenantPath::as_str),
            principal: req.and_then(|r| r.principal.as_ref().map(|p| p.id.as_str())),
            principal_tenant: req.and_then(|r| r.principal.as_ref().map(|p| p.tenant.as_str())),
            action: req.map(|r| r.method.as_str()),
            resource: req.map(|r| r.path.as_str()),
            decision: decision.decision,
            status: decision.status,
            kind: decision.kind,
            policies: &decision.reasons,
            errors: &decision.errors,
            limit: decision.quota.as_ref().and_then(|q| q.limit.as_deref()),
            bundle: self.version(),
            mode: match self.settings().mode {
                Mode::Enforce => "enforce",
                Mode::Shadow => "shadow",
            },
        };
        serde_json::to_string(&line).ok()
    }
}

/// The RateLimit fields of a quota decision, when a limit applies.
fn push_ratelimit_fields(headers: &mut Vec<(String, String)>, q: &crate::quota::QuotaDecision) {
    if let Some(p) = q.ratelimit_policy() {
        headers.push(("ratelimit-policy".into(), p));
    }
    if let Some(r) = q.ratelimit() {
        headers.push(("ratelimit".into(), r));
    }
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

/// Trims HTTP optional whitespace (space and tab) only: any other character,
/// Unicode spaces included, stays and makes a tenant value invalid.
fn trim_ows(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The path to forward when normalization changed it: the normalized path
/// plus the original query.
fn forward_path(raw: &str, normalized: &str) -> Option<String> {
    let (path, query) = match raw.find('?') {
        Some(i) => (raw.get(..i).unwrap_or(raw), raw.get(i..)),
        None => (
            raw.find('#').and_then(|i| raw.get(..i)).unwrap_or(raw),
            None,
        ),
    };
    if path == normalized && !raw.contains('#') {
        return None;
    }
    let query = query
        .map(|q| q.split('#').next().unwrap_or_default())
        .unwrap_or_default();
    Some(format!("{normalized}{query}"))
}

/// The longest request id carried into replies and audit lines.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// The request id as sent (JSON output escapes it), cut at
/// [`MAX_REQUEST_ID_LEN`] bytes on a character boundary.
fn clip_request_id(v: &str) -> String {
    let mut end = v.len().min(MAX_REQUEST_ID_LEN);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v.get(..end).unwrap_or_default().to_string()
}

/// The longest claims header accepted.
pub const MAX_CLAIMS_LEN: usize = 16 * 1024;

/// A JWT payload as Envoy's `forward_payload_header` writes it: base64url
/// (padding optional) of a JSON object. Values Cedar cannot hold (`null`,
/// non-integer numbers) are left out rather than failing the request.
pub fn decode_claims(v: &str) -> Result<serde_json::Value, String> {
    if v.len() > MAX_CLAIMS_LEN {
        return Err(format!("longer than {MAX_CLAIMS_LEN} bytes"));
    }
    let bytes = base64url_decode(v.trim()).ok_or("not base64url")?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "not a JSON object")?;
    match value {
        serde_json::Value::Object(_) => Ok(cedar_safe(value)),
        _ => Err("not a JSON object".into()),
    }
}

fn cedar_safe(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let keep = |x: &Value| !x.is_null() && (!x.is_number() || x.as_i64().is_some());
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, x)| keep(x))
                .map(|(k, x)| (k, cedar_safe(x)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().filter(keep).map(cedar_safe).collect())
        }
        other => other,
    }
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character cannot encode a byte.
    (bits < 6).then_some(out)
}

/// One audit line, serialized straight from borrowed fields.
#[derive(serde::Serialize)]
struct AuditLine<'a> {
    time: u64,
    decision_id: Option<&'a str>,
    request_id: Option<&'a str>,
    tenant: Option<&'a str>,
    principal: Option<&'a str>,
    principal_tenant: Option<&'a str>,
    action: Option<&'a str>,
    resource: Option<&'a str>,
    decision: crate::decision::Outcome,
    status: u16,
    kind: Kind,
    policies: &'a [String],
    errors: &'a [String],
    limit: Option<&'a str>,
    bundle: &'a str,
    mode: &'static str,
}

/// A gRPC call: `content-type: application/grpc` or `application/grpc+...`.
fn is_grpc(input: &HttpInput<'_>) -> bool {
    match header(input, "content-type") {
        Ok(Some(ct)) => {
            let ct = ct.trim_start_matches([' ', '\t']);
            ct.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
                && matches!(ct.as_bytes().get(16), None | Some(b'+' | b';'))
        }
        _ => false,
    }
}

fn describe_empty(source: &Source) -> String {
    match source {
        Source::Header(h) => format!("the `{h}` header is empty"),
        Source::Metadata(p) => format!("metadata `{}` is empty", p.join(".")),
        Source::PathPrefix(p) => format!("the path has no tenant after `{p}`"),
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::Header(h) => format!("the `{h}` header is missing"),
        Source::Metadata(p) => format!("metadata `{}` is missing", p.join(".")),
        Source::PathPrefix(p) => format!("the path has no tenant after `{p}`"),
    }
}

fn parse_tenant(v: &str) -> Result<TenantPath, String> {
    if v.len() > MAX_TENANT_LEN {
        return Err(format!("the tenant is longer than {MAX_TENANT_LEN} bytes"));
    }
    TenantPath::parse(v).map_err(|e| e.to_string())
}

/// The IP of `host:port`, `[v6]:port` or a bare address.
fn ip_of(addr: &str) -> Option<String> {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    addr.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Bundle, BundleTenant, SourceFile, FORMAT};
    use crate::decision::Outcome;
    use crate::quota::MemoryStore;
    use crate::settings::{Audit, Settings};

    fn file(name: &str, text: &str) -> SourceFile {
        SourceFile {
            file: name.into(),
            text: text.into(),
        }
    }

    /// `/` (members read), `/acme` (limit 2 per minute), `/acme/eu`, `/globex`.
    fn engine(settings: Settings) -> Engine {
        let t = |p: &str, config: Option<SourceFile>, policies: Vec<SourceFile>| BundleTenant {
            path: TenantPath::parse(p).unwrap(),
            config,
            policies,
        };
        let mut b = Bundle {
            format: FORMAT,
            version: String::new(),
            settings,
            schema: None,
            tenants: vec![
                t(
                    "/",
                    None,
                    vec![file(
                        "tenants/p.cedar",
                        "@id(\"members-read\")\npermit(principal, action in Action::\"read\", resource) when { resource in principal.tenant };\n\
                         @id(\"no-admin\")\nforbid(principal, action, resource) when { resource.path like \"/admin*\" };",
                    )],
                ),
                t(
                    "/acme",
                    Some(file("tenants/acme/tenant.json", r#"{"limits": {"rpm": {"rate": 2, "per": "1m"}}}"#)),
                    vec![],
                ),
                t("/acme/eu", None, vec![]),
                t("/globex", None, vec![]),
            ],
        };
        b.version = b.compute_version();
        Engine::new(&b).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn map(e: &Engine, pairs: &[(&str, &str)]) -> Result<Mapped, BadRequest> {
        let h = headers(pairs);
        e.map_request(
            &HttpInput {
                headers: &h,
                source_address: Some("10.1.2.3:4567"),
                now_ns: 7_000_000_000,
            },
            &NoMetadata,
        )
    }

    /// Maps raw header bytes with a given metadata source.
    fn map_raw(
        e: &Engine,
        h: &[(String, Vec<u8>)],
        meta: &dyn MetadataSource,
    ) -> Result<Mapped, BadRequest> {
        e.map_request(
            &HttpInput {
                headers: h,
                source_address: None,
                now_ns: 0,
            },
            meta,
        )
    }

    const GET_ORDERS: [(&str, &str); 2] = [(":method", "GET"), (":path", "/orders/1?x=1")];

    #[test]
    fn maps_header_sources() {
        let e = engine(Settings::default());
        let mut h = GET_ORDERS.to_vec();
        h.extend([
            ("x-tenant", "/acme/eu"),
            ("x-user", "alice"),
            ("x-request-id", "r-1"),
            (":authority", "shop"),
        ]);
        let m = map(&e, &h).unwrap();
        assert_eq!(m.request.tenant.as_str(), "/acme/eu");
        assert_eq!(m.request.path, "/orders/1");
        assert_eq!(m.request.method, "GET");
        assert_eq!(m.request.principal.as_ref().unwrap().id, "alice");
        assert_eq!(
            m.request.principal.as_ref().unwrap().tenant.as_str(),
            "/acme/eu"
        );
        assert_eq!(m.request.host.as_deref(), Some("shop"));
        assert_eq!(m.request.source_ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(m.request_id.as_deref(), Some("r-1"));
        assert_eq!(m.request.time_ns, 7_000_000_000);
    }

    #[test]
    fn missing_or_bad_tenant_is_a_400_unless_defaulted() {
        let e = engine(Settings::default());
        let err = map(&e, &GET_ORDERS).unwrap_err();
        assert!(
            err.message.contains("`x-tenant` header is missing"),
            "{}",
            err.message
        );
        for bad in ["acme", "/Acme", "/acme//eu", "/a/../b", "/acme/\u{441}"] {
            let mut h = GET_ORDERS.to_vec();
            h.push(("x-tenant", bad));
            assert!(map(&e, &h).is_err(), "{bad} accepted");
        }
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-tenant", "/globex")]);
        assert!(map(&e, &h)
            .unwrap_err()
            .message
            .contains("more than one `x-tenant`"));

        let e = engine(Settings {
            default_tenant: Some(TenantPath::parse("/globex").unwrap()),
            ..Settings::default()
        });
        assert_eq!(
            map(&e, &GET_ORDERS).unwrap().request.tenant.as_str(),
            "/globex"
        );
    }

    #[test]
    fn non_utf8_and_control_characters_are_400() {
        let e = engine(Settings::default());
        let mut h = headers(&GET_ORDERS);
        h.push(("x-tenant".into(), vec![b'/', 0xff, 0xfe]));
        let err = map_raw(&e, &h, &NoMetadata).unwrap_err();
        assert!(err.message.contains("not valid UTF-8"), "{}", err.message);
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-user", "al\u{1}ice")]);
        assert!(map(&e, &h)
            .unwrap_err()
            .message
            .contains("control characters"));
        let mut h = GET_ORDERS.to_vec();
        let long = "u".repeat(MAX_PRINCIPAL_LEN + 1);
        h.extend([("x-tenant", "/acme"), ("x-user", long.as_str())]);
        assert!(map(&e, &h).is_err());
        // Quotes and backslashes are just characters of an id.
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-user", "a\"b\\c")]);
        assert_eq!(
            map(&e, &h).unwrap().request.principal.unwrap().id,
            "a\"b\\c"
        );
    }

    #[test]
    fn a_changed_path_is_forwarded_normalized() {
        let e = engine(Settings::default());
        let at = |path: &str| {
            map(
                &e,
                &[(":method", "GET"), (":path", path), ("x-tenant", "/acme")],
            )
            .unwrap()
        };
        assert_eq!(at("/orders/1?x=1").forward_path, None);
        assert_eq!(at("/orders/1").forward_path, None);
        assert_eq!(
            at("/a/../orders/%31?x=/../y").forward_path.as_deref(),
            Some("/orders/1?x=/../y")
        );
        assert_eq!(at("//orders").forward_path.as_deref(), Some("/orders"));
        assert_eq!(at("/orders#frag").forward_path.as_deref(), Some("/orders"));
        // Tenants: only ASCII space and tab are trimmed.
        let h = [
            (":method", "GET"),
            (":path", "/"),
            ("x-tenant", " \t/acme "),
        ];
        assert_eq!(map(&e, &h).unwrap().request.tenant.as_str(), "/acme");
        let h = [
            (":method", "GET"),
            (":path", "/"),
            ("x-tenant", "\u{a0}/acme\u{3000}"),
        ];
        assert!(map(&e, &h).is_err());
    }

    #[test]
    fn bad_paths_and_methods_are_400() {
        let e = engine(Settings::default());
        for path in ["/a%2Fb", "/../etc", "/a/%2e%2e/%2e%2e", "no-slash"] {
            let h = [(":method", "GET"), (":path", path), ("x-tenant", "/acme")];
            assert!(map(&e, &h).is_err(), "{path}");
        }
        let h = [(":method", "get"), (":path", "/"), ("x-tenant", "/acme")];
        assert!(map(&e, &h).is_err());
    }

    #[test]
    fn path_prefix_takes_the_longest_declared_tenant() {
        let e = engine(Settings {
            tenant: Source::PathPrefix("/t".into()),
            ..Settings::default()
        });
        let at = |path: &str| map(&e, &[(":method", "GET"), (":path", path)]);
        let m = at("/t/acme/eu/orders/1").unwrap();
        assert_eq!(
            (m.request.tenant.as_str(), m.request.path.as_str()),
            ("/acme/eu", "/orders/1")
        );
        let m = at("/t/acme/us/orders").unwrap();
        assert_eq!(
            (m.request.tenant.as_str(), m.request.path.as_str()),
            ("/acme", "/us/orders")
        );
        let m = at("/t/acme/eu/../../globex/x").unwrap();
        assert_eq!(
            (m.request.tenant.as_str(), m.request.path.as_str()),
            ("/globex", "/x")
        );
        assert_eq!(at("/t").unwrap().request.tenant.as_str(), "/");
        assert!(at("/t/nope/x")
            .unwrap_err()
            .message
            .contains("unknown tenant `/nope`"));
        assert!(at("/tx/acme").is_err());
        assert!(at("/t/../acme").is_err());
        // Header is ignored when the tenant comes from the path.
        let m = map(
            &e,
            &[
                (":method", "GET"),
                (":path", "/t/globex/a"),
                ("x-tenant", "/acme"),
            ],
        )
        .unwrap();
        assert_eq!(m.request.tenant.as_str(), "/globex");
    }

    struct Meta;
    impl MetadataSource for Meta {
        fn metadata(&self, path: &[String]) -> Option<Vec<u8>> {
            match path.last().map(String::as_str) {
                Some("tenant") => Some(b"/acme".to_vec()),
                Some("sub") => Some(b"alice".to_vec()),
                _ => None,
            }
        }
    }

    #[test]
    fn metadata_sources_ignore_headers() {
        let jwt = |k: &str| {
            Source::Metadata(vec![
                "envoy.filters.http.jwt_authn".into(),
                "payload".into(),
                k.into(),
            ])
        };
        let e = engine(Settings {
            tenant: jwt("tenant"),
            principal: jwt("sub"),
            ..Settings::default()
        });
        let h = headers(&[
            (":method", "GET"),
            (":path", "/"),
            ("x-tenant", "/globex"),
            ("x-user", "mallory"),
        ]);
        let m = map_raw(&e, &h, &Meta).unwrap();
        assert_eq!(m.request.tenant.as_str(), "/acme");
        assert_eq!(m.request.principal.unwrap().id, "alice");
        let err = map_raw(&e, &h, &NoMetadata).unwrap_err();
        assert!(err.message.contains("metadata"), "{}", err.message);
    }

    #[test]
    fn claims_come_from_the_forwarded_payload_header() {
        let e = engine(Settings {
            claims: Some(Source::Header("x-jwt-payload".into())),
            ..Settings::default()
        });
        // {"sub":"gus","roles":["admin"],"iat":1.5,"n":null,"exp":17}
        let payload =
            "eyJzdWIiOiJndXMiLCJyb2xlcyI6WyJhZG1pbiJdLCJpYXQiOjEuNSwibiI6bnVsbCwiZXhwIjoxN30";
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-jwt-payload", payload)]);
        let claims = map(&e, &h).unwrap().request.claims.unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"sub": "gus", "roles": ["admin"], "exp": 17})
        );
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-jwt-payload", "not base64!")]);
        assert!(map(&e, &h).unwrap_err().message.contains("x-jwt-payload"));
        let mut h = GET_ORDERS.to_vec();
        h.extend([("x-tenant", "/acme"), ("x-jwt-payload", "WzFd")]); // [1]
        assert!(map(&e, &h)
            .unwrap_err()
            .message
            .contains("not a JSON object"));
        assert_eq!(base64url_decode("aGk").unwrap(), b"hi");
        assert_eq!(base64url_decode("aGk=").unwrap(), b"hi");
        assert!(base64url_decode("a").is_none());
    }

    fn decide(
        e: &Engine,
        store: &MemoryStore,
        tenant: &str,
        user: &str,
        path: &str,
    ) -> (Decision, Mapped) {
        let h = [
            (":method", "GET"),
            (":path", path),
            ("x-tenant", tenant),
            ("x-user", user),
            ("x-request-id", "r-9"),
        ];
        let m = map(e, &h).unwrap();
        (e.decide(&m.request, store), m)
    }

    #[test]
    fn replies_follow_section_7() {
        let e = engine(Settings::default());
        let store = MemoryStore::new();
        let acme = TenantPath::parse("/acme").unwrap();
        // Allowed: no reply.
        let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
        assert!(d.is_allowed(), "{d:?}");
        assert!(e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).is_none());
        // Forbidden: 403 without reasons unless exposed.
        let (d, _) = decide(&e, &store, "/acme", "alice", "/admin/x");
        let r = e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).unwrap();
        assert_eq!(r.status, 403);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "forbidden");
        assert_eq!(body["tenant"], "/acme");
        assert_eq!(body["request_id"], "r-9");
        assert!(body.get("reasons").is_none());
        let exposed = engine(Settings {
            expose_reasons: true,
            ..Settings::default()
        });
        let r = exposed.reply(&d, Some(&acme), None, None).unwrap();
        assert!(r.body.contains("no-admin"), "{}", r.body);
        // Quota: the third request in a minute is refused with the RateLimit fields.
        let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
        assert!(d.is_allowed());
        let (d, _) = decide(&e, &store, "/acme", "alice", "/orders");
        assert_eq!(d.status, 429, "{d:?}");
        let r = e.reply(&d, Some(&acme), Some("r-9"), Some("d-1")).unwrap();
        let h: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
        let retry: u64 = h["retry-after"].parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert!(h["ratelimit-policy"].contains("\"rpm\";q=2;w=60"), "{h:?}");
        assert!(h["ratelimit"].starts_with("\"rpm\";r=0"), "{h:?}");
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "quota_exceeded");
        assert_eq!(body["limit"], "rpm");
        assert_eq!(body["retry_after_s"], retry);
        // Bad request: 400 that says what was wrong.
        let d = Decision::bad_request("the path contains an encoded `/` or `\\` (%2F)");
        let r = e.reply(&d, None, None, None).unwrap();
        assert_eq!(r.status, 400);
        assert!(r.body.contains("encoded"), "{}", r.body);
    }

    #[test]
    fn a_request_denied_by_policy_is_never_charged() {
        let e = engine(Settings::default());
        let store = MemoryStore::new();
        for _ in 0..10 {
            let (d, _) = decide(&e, &store, "/acme", "alice", "/admin");
            assert_eq!(d.status, 403);
            // A write: no permit, default deny.
            let h = [
                (":method", "POST"),
                (":path", "/orders"),
                ("x-tenant", "/acme"),
                ("x-user", "alice"),
            ];
            assert_eq!(e.decide(&map(&e, &h).unwrap().request, &store).status, 403);
        }
        assert!(decide(&e, &store, "/acme", "alice", "/orders")
            .0
            .is_allowed());
        assert!(decide(&e, &store, "/acme", "alice", "/orders")
            .0
            .is_allowed());
        assert_eq!(
            decide(&e, &store, "/acme", "alice", "/orders").0.status,
            429
        );
    }

    #[test]
    fn audit_lines_follow_the_setting() {
        let store = MemoryStore::new();
        for (audit, allow_logged, deny_logged) in [
            (Audit::All, true, true),
            (Audit::Deny, false, true),
            (Audit::Off, false, false),
        ] {
            let e = engine(Settings {
                audit,
                ..Settings::default()
            });
            let (allow, m) = decide(&e, &store, "/globex", "gus", "/x");
            assert!(allow.is_allowed());
            assert_eq!(
                e.audit_line(&allow, Some(&m), Some("r-9")).is_some(),
                allow_logged
            );
            let (deny, m) = decide(&e, &store, "/globex", "gus", "/admin");
            let line = e.audit_line(&deny, Some(&m), Some("r-9"));
            assert_eq!(line.is_some(), deny_logged);
            if let Some(line) = line {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["decision"], "deny");
                assert_eq!(v["tenant"], "/globex");
                assert_eq!(v["principal"], "gus");
                assert_eq!(v["action"], "GET");
                assert_eq!(v["resource"], "/admin");
                assert_eq!(v["policies"][0], "no-admin");
                assert_eq!(v["bundle"], e.version());
                assert_eq!(v["mode"], "enforce");
                assert_eq!(v["request_id"], "r-9");
            }
        }
    }

    #[test]
    fn ratelimit_headers_on_allow_only_when_asked() {
        let store = MemoryStore::new();
        let e = engine(Settings::default());
        let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
        assert!(e.allow_response_headers(&d).is_empty());
        let e = engine(Settings {
            ratelimit_headers_on_allow: crate::settings::HeadersOnAllow::Always,
            ..Settings::default()
        });
        let (d, _) = decide(&e, &store, "/acme/eu", "alice", "/o");
        assert!(d.is_allowed());
        let h = e.allow_response_headers(&d);
        assert!(
            h.iter()
                .any(|(k, v)| k == "ratelimit-policy" && v.contains("q=2")),
            "{h:?}"
        );
        assert_eq!(Outcome::Allow, d.decision);
    }

    #[test]
    fn own_headers_in_every_spelling_an_upstream_could_fold() {
        for name in [
            "x-tenantgate-principal",
            "x_tenantgate_principal",
            "X-TenantGate-Tenant",
            "x_tenantgate-tenant",
            "x-tenantgate_x",
            "X_TENANTGATE_",
        ] {
            assert!(is_own_header(name), "{name}");
        }
        for name in [
            "x-tenant",
            "x-tenantgat",
            "xx-tenantgate-a",
            "x.tenantgate.a",
            "x-user",
        ] {
            assert!(!is_own_header(name), "{name}");
        }
        let h = headers(&[
            ("x-tenant", "/acme"),
            ("x_tenantgate_principal", "root"),
            ("X-TENANTGATE-TENANT", "/"),
        ]);
        assert_eq!(
            own_headers(&h).collect::<Vec<_>>(),
            ["x_tenantgate_principal", "X-TENANTGATE-TENANT"]
        );
    }

    #[test]
    fn decision_ids_are_unique_and_not_the_clients() {
        let ids = DecisionIds::new(42);
        let a = ids.next_id();
        let b = ids.next_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(DecisionIds::new(43).next_id(), a, "another VM, other ids");
        let set: std::collections::HashSet<String> = (0..10_000).map(|_| ids.next_id()).collect();
        assert_eq!(set.len(), 10_000);
    }

    #[test]
    fn an_empty_tenant_header_is_reported_as_empty() {
        let e = engine(Settings::default());
        let mut h = GET_ORDERS.to_vec();
        h.push(("x-tenant", " "));
        let err = map(&e, &h).unwrap_err();
        assert_eq!(err.message, "no tenant: the `x-tenant` header is empty");
        let err = map(&e, &GET_ORDERS).unwrap_err();
        assert_eq!(err.message, "no tenant: the `x-tenant` header is missing");
    }

    #[test]
    fn grpc_calls_are_judged_by_method() {
        let grpc = crate::settings::GrpcSettings {
            read: vec!["/acme.Orders/Get*".into()],
        };
        let e = engine(Settings {
            grpc: Some(grpc),
            ..Settings::default()
        });
        let call = |path: &str, ct: &str| {
            let h = [
                (":method", "POST"),
                (":path", path),
                ("content-type", ct),
                ("x-tenant", "/acme"),
                ("x-user", "alice"),
            ];
            map(&e, &h).unwrap().request
        };
        let r = call("/acme.Orders/GetOrder", "application/grpc");
        assert_eq!(
            (r.action, r.method.as_str(), r.path.as_str()),
            (Some("read"), "POST", "/acme.Orders/GetOrder")
        );
        assert_eq!(
            call("/acme.Orders/Create", "application/grpc+proto").action,
            Some("write")
        );
        assert_eq!(
            call("/acme.Orders/GetOrder", "application/json").action,
            None
        );
        assert_eq!(
            call("/acme.Orders/GetOrder", "application/grpcx").action,
            None
        );
        // Read RPCs pass the members-read permit; write RPCs have no permit.
        let store = MemoryStore::new();
        let read = call("/acme.Orders/GetOrder", "application/grpc");
        assert!(e.decide(&read, &store).is_allowed());
        let write = call("/acme.Orders/Create", "application/grpc");
        assert_eq!(e.decide(&write, &store).status, 403);
        // Without the setting a gRPC call is a plain POST.
        let plain = engine(Settings::default());
        let h = [
            (":method", "POST"),
            (":path", "/acme.Orders/GetOrder"),
            ("content-type", "application/grpc"),
            ("x-tenant", "/acme"),
        ];
        assert_eq!(map(&plain, &h).unwrap().request.action, None);
    }

    #[test]
    fn replies_carry_the_grpc_status_for_their_http_status() {
        assert_eq!(
            [400, 403, 429, 503].map(grpc_status),
            [3, 7, 8, 14],
            "INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE"
        );
        let e = engine(Settings::default());
        let r = e
            .reply(
                &Decision::bad_request("x"),
                None,
                Some("client-id"),
                Some("d-1"),
            )
            .unwrap();
        assert_eq!(r.grpc_status, 3);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["request_id"], "client-id");
        assert_eq!(body["decision_id"], "d-1");
    }

    #[test]
    fn near_limit_headers_only_below_the_ratio() {
        let store = MemoryStore::new();
        let e = engine(Settings {
            ratelimit_headers_on_allow: crate::settings::HeadersOnAllow::NearLimit,
            near_limit_ratio: crate::settings::Ratio(0.5),
            ..Settings::default()
        });
        // /acme: 2 per minute. After the first request 1 of 2 is left: not below half.
        let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
        assert!(e.allow_response_headers(&d).is_empty());
        let (d, _) = decide(&e, &store, "/acme", "alice", "/o");
        let h = e.allow_response_headers(&d);
        assert_eq!(
            h,
            [
                (
                    "ratelimit-policy".to_string(),
                    "\"rpm\";q=2;w=60".to_string()
                ),
                ("ratelimit".to_string(), "\"rpm\";r=0;t=60".to_string())
            ]
        );
    }
}
