//! `tenantgate limits BUNDLE --format limitador|ratelimit|envoy`: the bundle's
//! fleet limits as the configuration of another rate limit service, for
//! operators who already run one, or as plain Envoy's own rate limit filter
//! configuration, so Envoy without the Wasm filter can call `tenantgate-rls`.
//! Each request descriptor is `[("tenant", A), ("limit", N)]` (see
//! `docs/fleet.md`).
//!
//! - Limitador: its limits file, one limit per fleet limit, in `namespace`
//!   = the domain, matched with `descriptors.exists(...)` because a request
//!   carries one descriptor per limit of its tenant chain.
//! - envoyproxy/ratelimit: its config file, one `tenant` descriptor per
//!   declaring tenant with one nested `limit` descriptor per limit. It has
//!   only the units second, minute, hour and day and 32-bit counts: a limit
//!   it cannot express is an error naming the limit.
//! - Envoy: the `envoy.filters.http.ratelimit` filter, the virtual host's
//!   `rate_limits` and the service's cluster, as one JSON document (see
//!   [`envoy`]).

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use serde_json::{json, Value};
use tenantgate_engine::fleet::{FleetLimit, FleetLimits, LIMIT_KEY, TENANT_KEY};
use tenantgate_engine::settings::{OnError, RateLimitService, Settings, Source};
use tenantgate_engine::tenant::TenantPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Limitador's limits file (YAML).
    Limitador,
    /// envoyproxy/ratelimit's config file (YAML).
    Ratelimit,
    /// Plain Envoy's rate limit filter, the route `rate_limits` and the service's cluster (JSON).
    Envoy,
}

/// The `limits` command: prints the rendering, or every limit the format
/// cannot express. `domain`: the bundle's `rate_limit_service.domain` when
/// `None`.
pub fn run(
    source: &Path,
    format: Format,
    domain: Option<&str>,
    envoy_options: &EnvoyOptions,
) -> Result<ExitCode, String> {
    let (bundle, engine) = crate::load(source)?;
    let service = bundle
        .settings
        .rate_limit_service
        .clone()
        .unwrap_or_default();
    let domain = domain.unwrap_or(&service.domain);
    let text = match format {
        Format::Envoy => {
            if let Some(w) = costs_warning(&bundle.settings) {
                eprintln!("{}: {w}", source.display());
            }
            let doc = envoy(
                engine.fleet_limits(),
                &bundle.settings,
                &service,
                domain,
                envoy_options,
            )
            .map_err(|e| format!("{}: error: {e}", source.display()))?;
            let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
            text.push('\n');
            text
        }
        Format::Limitador => limitador(engine.fleet_limits(), domain),
        Format::Ratelimit => ratelimit(engine.fleet_limits(), domain).map_err(|errors| {
            let n = errors.len();
            let mut lines: Vec<String> = errors
                .into_iter()
                .map(|e| format!("{}: error: {e}", source.display()))
                .collect();
            lines.push(format!("{n} error{}", if n == 1 { "" } else { "s" }));
            lines.join("\n")
        })?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// A YAML double-quoted string. Tenant paths and limit names are lowercase
/// tokens and `/`, so this only guards the domain.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Limitador's limits file.
pub fn limitador(fleet: &FleetLimits, domain: &str) -> String {
    let mut out = String::from("---\n");
    if fleet.is_empty() {
        out.push_str("[]\n");
        return out;
    }
    for l in fleet.all() {
        let _ = write!(
            out,
            "- namespace: {}\n  name: {}\n  max_value: {}\n  seconds: {}\n  conditions:\n    - {}\n  variables: []\n",
            quoted(domain),
            quoted(&format!("{} {}", l.tenant, l.name)),
            l.rate,
            l.per_s,
            quoted(&format!(
                "descriptors.exists(d, d.tenant == '{}' && d.limit == '{}')",
                l.tenant, l.name
            )),
        );
    }
    out
}

/// envoyproxy/ratelimit's unit for a window, if it has one.
fn ratelimit_unit(per_s: u64) -> Option<&'static str> {
    match per_s {
        1 => Some("second"),
        60 => Some("minute"),
        3_600 => Some("hour"),
        86_400 => Some("day"),
        _ => None,
    }
}

/// envoyproxy/ratelimit's config, or one message per limit it cannot express.
pub fn ratelimit(fleet: &FleetLimits, domain: &str) -> Result<String, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = format!("domain: {}\n", quoted(domain));
    if fleet.is_empty() {
        out.push_str("descriptors: []\n");
        return Ok(out);
    }
    out.push_str("descriptors:\n");
    let mut current: Option<&str> = None;
    for l in fleet.all() {
        let Some(unit) = check(l, &mut errors) else {
            continue;
        };
        if current != Some(l.tenant.as_str()) {
            let _ = write!(
                out,
                "  - key: tenant\n    value: {}\n    descriptors:\n",
                quoted(l.tenant.as_str())
            );
            current = Some(l.tenant.as_str());
        }
        let _ = write!(
            out,
            "      - key: limit\n        value: {}\n        rate_limit:\n          unit: {unit}\n          requests_per_unit: {}\n",
            quoted(&l.name),
            l.rate
        );
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The unit of a limit envoyproxy/ratelimit can express, else an error.
fn check(l: &FleetLimit, errors: &mut Vec<String>) -> Option<&'static str> {
    let unit = ratelimit_unit(l.per_s);
    if unit.is_none() {
        errors.push(format!(
            "limit `{}` of `{}`: its window of {} s is not one second, minute, hour or day, the only units of envoyproxy/ratelimit",
            l.name, l.tenant, l.per_s
        ));
    }
    if u32::try_from(l.rate).is_err() {
        errors.push(format!(
            "limit `{}` of `{}`: its rate {} does not fit envoyproxy/ratelimit's 32-bit `requests_per_unit` (at most {})",
            l.name,
            l.tenant,
            l.rate,
            u32::MAX
        ));
        return None;
    }
    unit
}

/// The warning for a bundle with a cost of 0, which plain Envoy counts as 1
/// (the API reads a `hits_addend` of 0 as 1).
pub fn costs_warning(settings: &Settings) -> Option<String> {
    let free: Vec<&str> = settings
        .costs
        .iter()
        .filter(|(_, c)| **c == 0)
        .map(|(m, _)| m.as_str())
        .collect();
    (!free.is_empty()).then(|| {
        format!(
            "warning: `costs` of 0 ({}) count 1 in plain Envoy: the rate limit API reads a `hits_addend` of 0 as 1",
            free.join(", ")
        )
    })
}

/// The filter that gives a request its cost: Envoy's rate limit filter sends
/// the filter state `envoy.ratelimit.hits_addend` as the call's
/// `hits_addend` (a route's own `hits_addend` is not sent, Envoy 1.40), so a
/// composite filter matches `:method` and sets it with `set_filter_state`.
/// `None` when every method costs 1.
fn costs_filter(settings: &Settings) -> Option<Value> {
    let map: serde_json::Map<String, Value> = settings
        .costs
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(method, cost)| {
            let set = json!({
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
                "on_request_headers": [{
                    "object_key": "envoy.ratelimit.hits_addend",
                    "format_string": { "text_format_source": { "inline_string": cost.to_string() } }
                }]
            });
            let action = json!({ "action": {
                "name": format!("cost-{cost}"),
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                    "typed_config": { "name": "envoy.filters.http.set_filter_state", "typed_config": set }
                }
            } });
            (method.clone(), action)
        })
        .collect();
    (!map.is_empty()).then(|| {
        json!({
            "name": "tenantgate.costs",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                "extension_config": {
                    "name": "composite",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite" }
                },
                "xds_matcher": { "matcher_tree": {
                    "input": {
                        "name": "method",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                            "header_name": ":method"
                        }
                    },
                    "exact_match_map": { "map": map }
                } }
            }
        })
    })
}

/// `--format envoy`'s own options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EnvoyOptions {
    /// `--format envoy`: the address of `tenantgate-rls` (the cluster's endpoint).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8081")]
    pub rls: String,
    /// `--format envoy`: the request header that carries the tenant path in plain Envoy, instead of the bundle's `tenant` source.
    #[arg(long, value_name = "NAME")]
    pub tenant_header: Option<String>,
}

/// The request header that carries a tenant read from dynamic metadata to
/// the rate limit actions (which cannot match metadata by prefix): set from
/// the metadata before the rate limit filter (a client's copy removed
/// first), removed after it.
pub const METADATA_TENANT_HEADER: &str = "x-tenantgate-ratelimit-tenant";

/// `envoy.filters.http.header_mutation` with these request mutations.
fn header_mutation(name: &str, mutations: Value) -> Value {
    json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": { "request_mutations": mutations }
        }
    })
}

/// Where plain Envoy finds the tenant.
enum TenantIn<'a> {
    Header(&'a str),
    /// `:path`, after this prefix (without a trailing `/`; empty for `/`).
    Path(&'a str),
}

/// A `HeaderMatcher`.
fn matcher(name: &str, how: &str, value: &str, invert: bool) -> Value {
    if invert {
        json!({ "name": name, "string_match": { how: value }, "invert_match": true })
    } else {
        json!({ "name": name, "string_match": { how: value } })
    }
}

/// The header matchers (each a list, ANDed) under which a request's tenant
/// is `a` or below it, one list per `rate_limits` entry (the lists exclude
/// each other, so one request matches at most one).
fn under(a: &TenantPath, tenant: &TenantIn<'_>) -> Vec<Vec<Value>> {
    match tenant {
        // The value as tenantgate reads it: `A` itself, `A/` (one trailing
        // slash is accepted) or anything below `A/`.
        TenantIn::Header(h) if a.is_root() => vec![vec![matcher(h, "prefix", "/", false)]],
        TenantIn::Header(h) => vec![
            vec![matcher(h, "exact", a.as_str(), false)],
            vec![matcher(h, "prefix", &format!("{a}/"), false)],
        ],
        // The path `<prefix><A>`, then the end, a `/` or the query.
        TenantIn::Path(p) => {
            let base = if a.is_root() {
                (*p).to_owned()
            } else {
                format!("{p}{a}")
            };
            let mut out = Vec::new();
            if !base.is_empty() {
                out.push(vec![matcher(":path", "exact", &base, false)]);
            }
            out.push(vec![matcher(":path", "prefix", &format!("{base}/"), false)]);
            out.push(vec![matcher(":path", "prefix", &format!("{base}?"), false)]);
            out
        }
    }
}

/// The header matchers of a request that names no tenant (so
/// `default_tenant` applies): the header absent or empty, or a path outside
/// the prefix.
fn names_none(tenant: &TenantIn<'_>) -> Vec<Vec<Value>> {
    match tenant {
        TenantIn::Header(h) => vec![
            vec![json!({ "name": h, "present_match": true, "invert_match": true })],
            vec![matcher(h, "exact", "", false)],
        ],
        TenantIn::Path("") => Vec::new(),
        TenantIn::Path(p) => vec![vec![
            matcher(":path", "exact", p, true),
            matcher(":path", "prefix", &format!("{p}/"), true),
            matcher(":path", "prefix", &format!("{p}?"), true),
        ]],
    }
}

/// Plain Envoy's configuration for calling `tenantgate-rls` (or any RLS
/// holding the same limits) with tenantgate's descriptors:
///
/// - `http_filters`: `envoy.filters.http.ratelimit` (to go before the
///   router) with the domain, the bundle's `timeout_ms`, `on_error` as
///   `failure_mode_deny` (503, as the filter answers), and
///   `x-ratelimit-*` headers (`DRAFT_VERSION_03`);
/// - `rate_limits`: for the virtual host (every route without its own).
///   Each fleet limit `N` declared on `A` gets entries whose actions are a
///   `header_value_match` (descriptor entry `("tenant", A)`) that matches
///   when the request's tenant is `A` or below it, and a `generic_key`
///   (`("limit", N)`). The matchers are exact and prefix string matches, no
///   regular expressions: one entry for `A` itself, one for `A/...`; with
///   `default_tenant`, one more for requests that name no tenant when `A`
///   is `default_tenant` or above it. So a request carries exactly the
///   descriptors the Wasm filter would send, deepest first;
/// - with `costs`, a filter before it that sets the request's cost
///   ([`costs_filter`]); with a tenant from dynamic metadata, filters
///   around it that copy the tenant into [`METADATA_TENANT_HEADER`] and
///   remove it again;
/// - `clusters`: the service's HTTP/2 cluster, named as
///   `rate_limit_service.cluster`.
pub fn envoy(
    fleet: &FleetLimits,
    settings: &Settings,
    service: &RateLimitService,
    domain: &str,
    o: &EnvoyOptions,
) -> Result<Value, String> {
    let tenant = match (&o.tenant_header, &settings.tenant) {
        (Some(h), _) => TenantIn::Header(h.as_str()),
        (None, Source::Header(h)) => TenantIn::Header(h.as_str()),
        (None, Source::PathPrefix(p)) => TenantIn::Path(p.trim_end_matches('/')),
        (None, Source::Metadata(_)) => TenantIn::Header(METADATA_TENANT_HEADER),
    };
    if let Some(h) = &o.tenant_header {
        if h.is_empty()
            || h.starts_with(':')
            || h.chars()
                .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
        {
            return Err(format!(
                "`--tenant-header {h}` is not a lowercase header name"
            ));
        }
    }
    let mut rate_limits = Vec::new();
    // Deepest declaring tenant first, then by name: the Wasm filter's order.
    let mut limits: Vec<&FleetLimit> = fleet.all().iter().collect();
    limits.sort_by(|x, y| {
        y.tenant
            .depth()
            .cmp(&x.tenant.depth())
            .then_with(|| x.tenant.as_str().cmp(y.tenant.as_str()))
            .then_with(|| x.name.cmp(&y.name))
    });
    for l in limits {
        let mut cases = under(&l.tenant, &tenant);
        if let Some(d) = &settings.default_tenant {
            if d.lineage().iter().any(|a| a == &l.tenant) {
                cases.extend(names_none(&tenant));
            }
        }
        for headers in cases {
            rate_limits.push(json!({
                "actions": [
                    { "header_value_match": {
                        "descriptor_key": TENANT_KEY,
                        "descriptor_value": l.tenant.as_str(),
                        "expect_match": true,
                        "headers": headers
                    } },
                    { "generic_key": { "descriptor_key": LIMIT_KEY, "descriptor_value": l.name } }
                ]
            }));
        }
    }
    let (host, port) = crate::render::host_port(&o.rls, "--rls")?;
    let cluster = crate::render::upstream_cluster(
        &service.cluster,
        crate::render::cluster_type(&host),
        &host,
        port,
        crate::render::UpstreamProtocol::Http2,
    );
    let ms = service.timeout_ms;
    let mut filter = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        "domain": domain,
        "timeout": format!("{}.{:03}s", ms / 1000, ms % 1000),
        "failure_mode_deny": service.on_error == OnError::Deny,
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "rate_limit_service": {
            "transport_api_version": "V3",
            "grpc_service": { "envoy_grpc": { "cluster_name": service.cluster } }
        }
    });
    if let (OnError::Deny, Some(obj)) = (service.on_error, filter.as_object_mut()) {
        obj.insert(
            "status_on_error".into(),
            json!({ "code": "ServiceUnavailable" }),
        );
    }
    let metadata = match (&o.tenant_header, &settings.tenant) {
        (None, Source::Metadata(path)) => Some(path.join(":")),
        _ => None,
    };
    let mut http_filters = Vec::new();
    if let Some(path) = &metadata {
        http_filters.push(header_mutation(
            "tenantgate.tenant",
            json!([
                { "remove": METADATA_TENANT_HEADER },
                { "append": {
                    "header": { "key": METADATA_TENANT_HEADER, "value": format!("%DYNAMIC_METADATA({path})%") },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"
                } }
            ]),
        ));
    }
    http_filters.extend(costs_filter(settings));
    http_filters.push(json!({ "name": "envoy.filters.http.ratelimit", "typed_config": filter }));
    if metadata.is_some() {
        http_filters.push(header_mutation(
            "tenantgate.tenant.remove",
            json!([{ "remove": METADATA_TENANT_HEADER }]),
        ));
    }
    Ok(json!({
        "http_filters": http_filters,
        "rate_limits": rate_limits,
        "clusters": [cluster]
    }))
}
