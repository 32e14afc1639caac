//! HTTP in and out: mapping a request's headers and properties to a
//! [`Request`](crate::Request) (`map`), a request given by its parts as
//! `tenantgate check` and the policy tests give it (`spec`), a [`Decision`](crate::Decision)
//! to a local reply and response headers (`reply`), audit lines and decision
//! ids (`audit`), JWT claims (`claims`). The filter only moves bytes between
//! Envoy and these functions; the rules are in `docs/reference.md`.

mod audit;
mod check;
mod claims;
mod map;
mod reply;
mod spec;

pub use audit::DecisionIds;
pub use audit::{filter_state_keys, AuditIds};
pub use claims::{decode_claims, MAX_CLAIMS_LEN};
pub use map::{trace_id, MAX_REQUEST_ID_LEN};
pub use reply::{grpc_status, LocalReply};
pub use spec::{RawRequest, RequestSpec};

use crate::request::Request;
use crate::settings::Source;
use crate::tenant::TenantPath;

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
pub fn own_headers<'a>(pairs: &'a [HeaderPair<'a>]) -> impl Iterator<Item = &'a str> {
    pairs.iter().map(|(n, _)| *n).filter(|n| is_own_header(n))
}
pub const TENANT_HEADER: &str = "x-tenantgate-tenant";
pub const PRINCIPAL_HEADER: &str = "x-tenantgate-principal";
/// The longest principal id accepted.
pub const MAX_PRINCIPAL_LEN: usize = 512;
/// The longest tenant value accepted (16 segments of 63 bytes and slashes).
pub const MAX_TENANT_LEN: usize = 16 * 64;

/// One header as the host gives it: the name (lowercase in Envoy) and the
/// value's bytes, both borrowed from the host's buffer.
pub type HeaderPair<'a> = (&'a str, &'a [u8]);

/// What the host gives us about one request.
pub struct HttpInput<'a> {
    /// Request headers as Envoy holds them (lowercase names, pseudo-headers
    /// `:method`, `:path`, `:authority` included), values as raw bytes.
    pub headers: &'a [HeaderPair<'a>],
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
    /// The W3C trace id of a valid `traceparent` header (see [`trace_id`]).
    pub trace_id: Option<String>,
}

/// The mapped request and what else the reply needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub request: Request,
    pub request_id: Option<String>,
    /// The W3C trace id of a valid `traceparent` header, for audit lines
    /// only (see [`trace_id`]).
    pub trace_id: Option<String>,
    /// The `:path` to forward when normalization changed it (the normalized
    /// path and the original query), so the upstream sees the path that was
    /// judged; `None` when the request's path is already normal.
    pub forward_path: Option<String>,
}

impl Mapped {
    /// The identity headers the upstream gets with an allowed request:
    /// `x-tenantgate-tenant` always, `x-tenantgate-principal` when there is a
    /// principal. (Client-sent ones were removed: [`own_headers`].)
    pub fn upstream_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        std::iter::once((TENANT_HEADER, self.request.tenant.as_str())).chain(
            self.request
                .principal
                .as_ref()
                .map(|p| (PRINCIPAL_HEADER, p.id.as_str())),
        )
    }
}

pub(crate) fn header<'a>(input: &'a HttpInput<'_>, name: &str) -> Result<Option<&'a str>, String> {
    let mut found: Option<&[u8]> = None;
    for (k, v) in input.headers {
        // Envoy hands names over in lower case, as ours are: the byte compare
        // settles nearly every case; the length check skips the rest.
        if k.len() == name.len()
            && (k.as_bytes() == name.as_bytes() || k.eq_ignore_ascii_case(name))
        {
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

/// A value from a header (borrowed) or from metadata (owned).
pub(crate) fn from_source<'a>(
    input: &'a HttpInput<'_>,
    meta: &dyn MetadataSource,
    source: &Source,
) -> Result<Option<std::borrow::Cow<'a, str>>, String> {
    match source {
        Source::Header(name) => Ok(header(input, name)?.map(std::borrow::Cow::Borrowed)),
        Source::Metadata(path) => match meta.metadata(path) {
            Some(bytes) => String::from_utf8(bytes)
                .map(|s| Some(std::borrow::Cow::Owned(s)))
                .map_err(|_| format!("metadata `{}` is not valid UTF-8", path.join("."))),
            None => Ok(None),
        },
        Source::PathPrefix(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests;
