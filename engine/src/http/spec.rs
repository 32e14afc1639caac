//! A request given by its parts, as `tenantgate check`, the policy tests and
//! the decision service take it. It is turned into the raw request Envoy
//! would hand the filter (method, raw path, header bytes, dynamic metadata)
//! and mapped by [`Engine::map_request`], the filter's own code: the same
//! raw request gets the same answer everywhere.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{BadRequest, HttpInput, Mapped, MetadataSource};
use crate::engine::Engine;
use crate::settings::Source;

/// A request by its parts. `tenant`, `principal` and `principal_tenant` are
/// placed where the bundle's settings read them (a header, the path after
/// `path_prefix`, or dynamic metadata); `headers` are sent as given, so a
/// request can also be written entirely in raw headers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default)]
    pub tenant: Option<String>,
    /// The method as sent (`GET`; `get` is a 400, as in Envoy).
    pub method: String,
    /// The raw path, query included, as the client sends it.
    pub path: String,
    #[serde(default)]
    pub principal: Option<String>,
    #[serde(default)]
    pub principal_tenant: Option<String>,
    /// Request headers, sent as given (names are lowercased, as Envoy's
    /// codecs do): an object, or a list of `[name, value]` pairs when a
    /// name repeats.
    #[serde(default, deserialize_with = "header_list")]
    pub headers: Vec<(String, String)>,
    /// JWT claims (an object), sent where the bundle reads claims (the
    /// `claims` header, base64url JSON, as `jwt_authn` writes it).
    #[serde(default)]
    pub claims: Option<serde_json::Value>,
    /// Dynamic metadata by filter name, as Envoy filters before tenantgate set
    /// it (`{"envoy.filters.http.jwt_authn": {"payload": {...}}}`).
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The downstream address (`10.0.0.1:5555`).
    #[serde(default)]
    pub source_address: Option<String>,
    /// Fields merged over the request context (for tests: a fixed `time`).
    #[serde(default)]
    pub context: Option<serde_json::Map<String, serde_json::Value>>,
}

fn header_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Headers {
        Map(BTreeMap<String, String>),
        List(Vec<(String, String)>),
    }
    Ok(match Headers::deserialize(d)? {
        Headers::Map(m) => m.into_iter().collect(),
        Headers::List(l) => l,
    })
}

/// The raw request a [`RequestSpec`] stands for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest {
    /// Header pairs as Envoy holds them, pseudo-headers first.
    pub headers: Vec<(String, Vec<u8>)>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub source_address: Option<String>,
}

impl RawRequest {
    /// The headers as the host would hand them over.
    pub fn pairs(&self) -> Vec<super::HeaderPair<'_>> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect()
    }
}

impl MetadataSource for RawRequest {
    /// A string value as its bytes; anything else as JSON text (Envoy hands
    /// non-string values over in an encoding that is no tenant or id either).
    fn metadata(&self, path: &[String]) -> Option<Vec<u8>> {
        let (first, rest) = path.split_first()?;
        let mut v = self.metadata.get(first)?;
        for key in rest {
            v = v.as_object()?.get(key)?;
        }
        Some(match v {
            serde_json::Value::String(s) => s.as_bytes().to_vec(),
            other => other.to_string().into_bytes(),
        })
    }
}

impl Engine {
    /// The raw request a spec stands for under this bundle's settings, or why
    /// the spec cannot be expressed (a value the settings read from nowhere).
    pub fn raw_request(&self, spec: &RequestSpec) -> Result<RawRequest, String> {
        let settings = self.settings();
        let mut raw = RawRequest {
            headers: Vec::new(),
            metadata: spec.metadata.clone().unwrap_or_default(),
            source_address: spec.source_address.clone(),
        };
        let mut path = spec.path.clone();
        let mut extra: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(t) = &spec.tenant {
            match &settings.tenant {
                Source::PathPrefix(prefix) => path = prefixed_path(prefix, t, &spec.path),
                s => place(s, "tenant", t, &mut extra, &mut raw.metadata)?,
            }
        }
        if let Some(p) = &spec.principal {
            place(
                &settings.principal,
                "principal",
                p,
                &mut extra,
                &mut raw.metadata,
            )?;
        }
        if let Some(home) = &spec.principal_tenant {
            match &settings.principal_tenant {
                Some(s) => place(s, "principal_tenant", home, &mut extra, &mut raw.metadata)?,
                // The home tenant is the request tenant: a spec that says the
                // same is fine, another one cannot happen in the filter.
                None if spec.tenant.as_deref() == Some(home.as_str()) => {}
                None => {
                    return Err(format!(
                        "`principal_tenant` `{home}`: the bundle takes the principal's home tenant from the request tenant (no `principal_tenant` setting)"
                    ))
                }
            }
        }
        if let Some(claims) = &spec.claims {
            match &settings.claims {
                Some(Source::Header(name)) => {
                    let text = serde_json::to_string(claims).map_err(|e| e.to_string())?;
                    extra.push((name.clone(), base64url_encode(text.as_bytes()).into_bytes()));
                }
                _ => {
                    return Err(
                        "`claims`: the bundle reads no claims (set `\"claims\": {\"header\": ...}` in tenantgate.json)".into(),
                    )
                }
            }
        }
        raw.headers
            .push((":method".into(), spec.method.clone().into_bytes()));
        raw.headers.push((":path".into(), path.into_bytes()));
        raw.headers.extend(extra);
        raw.headers.extend(
            spec.headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone().into_bytes())),
        );
        Ok(raw)
    }

    /// Maps a spec exactly as the filter maps the raw request it stands for
    /// (`Err(Err(_))`: the spec cannot be expressed; `Err(Ok(_))`: a 400).
    pub fn map_spec(
        &self,
        spec: &RequestSpec,
        now_ns: u64,
    ) -> Result<Result<Mapped, BadRequest>, String> {
        let raw = self.raw_request(spec)?;
        let pairs = raw.pairs();
        let input = HttpInput {
            headers: &pairs,
            source_address: raw.source_address.as_deref(),
            now_ns,
        };
        Ok(self.map_request(&input, &raw).map(|mut m| {
            m.request.extra_context = spec.context.clone();
            m
        }))
    }
}

/// `prefix` + tenant + path: `/t` + `/acme/eu` + `/orders` is `/t/acme/eu/orders`.
fn prefixed_path(prefix: &str, tenant: &str, path: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let tenant = tenant.trim_end_matches('/');
    format!("{prefix}{tenant}{path}")
}

/// Puts a value where `source` reads it.
fn place(
    source: &Source,
    what: &str,
    value: &str,
    headers: &mut Vec<(String, Vec<u8>)>,
    metadata: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    match source {
        Source::Header(name) => {
            headers.push((name.clone(), value.as_bytes().to_vec()));
            Ok(())
        }
        Source::Metadata(path) => {
            let Some((last, parents)) = path.split_last() else {
                return Err(format!("`{what}`: the metadata path is empty"));
            };
            let mut at = metadata;
            for key in parents {
                let entry = at
                    .entry(key.clone())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if !entry.is_object() {
                    *entry = serde_json::Value::Object(Default::default());
                }
                at = match entry.as_object_mut() {
                    Some(m) => m,
                    None => return Err(format!("`{what}`: metadata `{key}` is not an object")),
                };
            }
            at.insert(last.clone(), serde_json::Value::String(value.to_string()));
            Ok(())
        }
        Source::PathPrefix(_) => Err(format!("`{what}` cannot come from a path prefix")),
    }
}

fn base64url_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let take = chunk.len() + 1;
        for i in 0..take {
            let idx = ((n >> (18 - 6 * i)) & 63) as usize;
            out.push(char::from(ALPHABET.get(idx).copied().unwrap_or(b'A')));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips() {
        for s in ["", "h", "hi", "hi!", "{\"sub\":\"gus\"}"] {
            let enc = base64url_encode(s.as_bytes());
            assert!(!enc.contains('='));
            assert_eq!(
                super::super::claims::base64url_decode(&enc).unwrap(),
                s.as_bytes()
            );
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefixed_path("/t", "/acme/eu", "/x?q"), "/t/acme/eu/x?q");
        assert_eq!(prefixed_path("/t/", "/", "/x"), "/t/x");
    }
}
