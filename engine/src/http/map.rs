//! Mapping a request's headers, properties and metadata to a [`Request`].

use super::{
    decode_claims, from_source, header, BadRequest, HttpInput, Mapped, MetadataSource,
    MAX_PRINCIPAL_LEN, MAX_TENANT_LEN,
};
use crate::engine::Engine;
use crate::path::normalize_path;
use crate::request::{Principal, Request};
use crate::settings::Source;
use crate::tenant::{shorten, TenantPath};

impl Engine {
    /// Maps an HTTP request to an engine [`Request`], or says why it is bad.
    /// Steps: method, path (normalized), tenant, principal, context headers,
    /// claims; the first problem is the 400.
    pub fn map_request(
        &self,
        input: &HttpInput<'_>,
        meta: &dyn MetadataSource,
    ) -> Result<Mapped, BadRequest> {
        let request_id = header(input, "x-request-id")
            .ok()
            .flatten()
            .map(clip_request_id);
        let trace_id = header(input, "traceparent")
            .ok()
            .flatten()
            .and_then(trace_id)
            .map(str::to_string);
        let bad = |tenant: Option<&TenantPath>, message: String| BadRequest {
            tenant: tenant.cloned(),
            message,
            request_id: request_id.clone(),
            trace_id: trace_id.clone(),
        };
        let method = map_method(input).map_err(|m| bad(None, m))?;
        let raw_path = header(input, ":path")
            .map_err(|m| bad(None, m))?
            .unwrap_or("/");
        let path = normalize_path(raw_path).map_err(|e| bad(None, e.to_string()))?;
        let forward_path = forward_path(raw_path, &path);
        let (tenant, path) = self
            .map_tenant(input, meta, path)
            .map_err(|m| bad(None, m))?;
        let in_tenant = |m: String| bad(Some(&tenant), m);
        let principal = self
            .map_principal(input, meta, &tenant)
            .map_err(in_tenant)?;
        let headers = self.context_headers(input).map_err(in_tenant)?;
        let key_headers = self.key_headers(input, &tenant).map_err(in_tenant)?;
        let claims = self.map_claims(input).map_err(in_tenant)?;
        let action = match &self.settings().grpc {
            Some(g) if method == "POST" && is_grpc(input) => Some(g.action(&path)),
            _ => None,
        };
        let request = Request {
            tenant,
            principal,
            method: method.to_string(),
            action,
            path,
            host: header(input, ":authority")
                .ok()
                .flatten()
                .map(str::to_string),
            source_ip: input.source_address.and_then(ip_of),
            time_ns: input.now_ns,
            headers,
            key_headers,
            claims,
            extra_context: None,
        };
        Ok(Mapped {
            request,
            request_id,
            trace_id,
            forward_path,
        })
    }

    /// The request tenant and the resource path (the path after the tenant
    /// for a `path_prefix` source, else the whole normalized path).
    fn map_tenant(
        &self,
        input: &HttpInput<'_>,
        meta: &dyn MetadataSource,
        path: String,
    ) -> Result<(TenantPath, String), String> {
        let settings = self.settings();
        let default = || settings.default_tenant.clone();
        match &settings.tenant {
            Source::PathPrefix(prefix) => match self.tenant_from_path(prefix, &path) {
                Some(found) => found,
                None => default().map(|t| (t, path)).ok_or_else(|| {
                    format!("the path does not start with the tenant prefix `{prefix}`")
                }),
            },
            source => {
                let value = from_source(input, meta, source)?;
                match value.as_deref().map(trim_ows) {
                    Some(v) if !v.is_empty() => Ok((self.parse_tenant(v)?, path)),
                    empty => match default() {
                        Some(t) => Ok((t, path)),
                        None => Err(format!(
                            "no tenant: {}",
                            describe(source, if empty.is_some() { "empty" } else { "missing" })
                        )),
                    },
                }
            }
        }
    }

    /// The principal and its home tenant; `None` when the source is absent or
    /// empty (an anonymous request).
    fn map_principal(
        &self,
        input: &HttpInput<'_>,
        meta: &dyn MetadataSource,
        tenant: &TenantPath,
    ) -> Result<Option<Principal>, String> {
        let settings = self.settings();
        let Some(id) = from_source(input, meta, &settings.principal)?.filter(|id| !id.is_empty())
        else {
            return Ok(None);
        };
        if id.len() > MAX_PRINCIPAL_LEN {
            return Err(format!(
                "the principal is longer than {MAX_PRINCIPAL_LEN} bytes"
            ));
        }
        if id.chars().any(char::is_control) {
            return Err("the principal contains control characters".into());
        }
        let home = match &settings.principal_tenant {
            Some(source) => match from_source(input, meta, source)? {
                Some(v) if !trim_ows(&v).is_empty() => self
                    .parse_tenant(trim_ows(&v))
                    .map_err(|m| format!("principal tenant: {m}"))?,
                _ => tenant.clone(),
            },
            None => tenant.clone(),
        };
        Ok(Some(Principal {
            id: id.into_owned(),
            tenant: home,
        }))
    }

    /// The `context_headers` present on the request.
    fn context_headers(&self, input: &HttpInput<'_>) -> Result<Vec<(String, String)>, String> {
        let mut headers = Vec::new();
        for name in &self.settings().context_headers {
            if let Some(v) = header(input, name)? {
                headers.push((name.clone(), v.to_string()));
            }
        }
        Ok(headers)
    }

    /// The headers the keyed limits of `tenant` count by, when present
    /// (trimmed of optional whitespace).
    fn key_headers(
        &self,
        input: &HttpInput<'_>,
        tenant: &TenantPath,
    ) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for name in self.quotas().keyed_headers_for(tenant) {
            if let Some(v) = header(input, name)? {
                out.push((name.to_string(), trim_ows(v).to_string()));
            }
        }
        Ok(out)
    }

    /// JWT claims from the `claims` header, when the bundle names one.
    fn map_claims(&self, input: &HttpInput<'_>) -> Result<Option<serde_json::Value>, String> {
        let Some(Source::Header(name)) = &self.settings().claims else {
            return Ok(None);
        };
        header(input, name)?
            .map(|v| decode_claims(v).map_err(|m| format!("header `{name}`: {m}")))
            .transpose()
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
}

/// The method, if tenantgate judges it (one with a Cedar action, upper case).
fn map_method<'a>(input: &'a HttpInput<'_>) -> Result<&'a str, String> {
    let method = header(input, ":method")?.unwrap_or("GET");
    if crate::entities::is_known_method(method) {
        Ok(method)
    } else {
        Err(format!(
            "`{}` is not a method tenantgate judges (GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE; upper case)",
            shorten(method)
        ))
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

/// The trace id of a W3C `traceparent` header value
/// (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase, neither id all zeros), or
/// `None` when it is malformed. It only joins an audit line to its trace:
/// nothing decides on it.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let v = traceparent.trim_matches([' ', '\t']).as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    if v.len() != 55 || !v.starts_with(b"00-") {
        return None;
    }
    let (id, parent, flags) = (v.get(3..35)?, v.get(36..52)?, v.get(53..55)?);
    let dashes = v.get(35) == Some(&b'-') && v.get(52) == Some(&b'-');
    if dashes && hex(id) && hex(parent) && hex(flags) && nonzero(id) && nonzero(parent) {
        traceparent.trim_matches([' ', '\t']).get(3..35)
    } else {
        None
    }
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

/// Why a source gave no tenant: its value is `missing` or `empty`.
fn describe(source: &Source, why: &str) -> String {
    match source {
        Source::Header(h) => format!("the `{h}` header is {why}"),
        Source::Metadata(p) => format!("metadata `{}` is {why}", p.join(".")),
        Source::PathPrefix(p) => format!("the path has no tenant after `{p}`"),
    }
}

impl Engine {
    /// A tenant path from a request: the bundle's own path when it names a
    /// declared tenant as written (no allocation), else parsed.
    fn parse_tenant(&self, v: &str) -> Result<TenantPath, String> {
        if v.len() > MAX_TENANT_LEN {
            return Err(format!("the tenant is longer than {MAX_TENANT_LEN} bytes"));
        }
        if let Some(t) = self.known_tenant(v) {
            return Ok(t);
        }
        TenantPath::parse(v).map_err(|e| e.to_string())
    }
}

/// The IP of `host:port`, `[v6]:port` or a bare address.
fn ip_of(addr: &str) -> Option<String> {
    // The common case, `a.b.c.d:port`: the address as written is the
    // canonical text (the parser refuses leading zeros), so it is copied
    // rather than formatted again.
    if let Some((ip, port)) = addr.rsplit_once(':') {
        if port.parse::<u16>().is_ok() && ip.parse::<std::net::Ipv4Addr>().is_ok() {
            return Some(ip.to_string());
        }
    }
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_string());
    }
    addr.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

#[cfg(test)]
mod trace_tests {
    use super::trace_id;

    #[test]
    fn a_valid_traceparent_gives_its_trace_id_and_anything_else_none() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        for (value, want) in [
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some(id),
            ),
            (
                " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\t",
                Some(id),
            ),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                None,
            ),
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
                None,
            ),
            (
                "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0z",
                None,
            ),
            ("", None),
            ("garbage", None),
        ] {
            assert_eq!(trace_id(value), want, "{value:?}");
        }
    }
}

#[cfg(test)]
mod ip_tests {
    use super::ip_of;

    #[test]
    fn source_ips_come_out_in_canonical_form() {
        for (addr, want) in [
            ("10.0.0.7:40000", Some("10.0.0.7")),
            ("10.0.0.7", Some("10.0.0.7")),
            ("[::1]:8080", Some("::1")),
            ("[2001:db8:0:0::1]:1", Some("2001:db8::1")),
            ("::ffff:10.0.0.1", Some("::ffff:10.0.0.1")),
            ("010.0.0.7:80", None),
            ("10.0.0.7:99999", None),
            ("not an address", None),
        ] {
            assert_eq!(ip_of(addr).as_deref(), want, "{addr}");
        }
    }
}
