//! `tenantgate envoy BUNDLE --wasm PATH` (or `--native PATH`): configs that
//! load the filter with a bundle. Output is JSON, which Envoy reads from a `.json` or `.yaml` file
//! and `kubectl` applies as it is.
//!
//! - default: an Envoy bootstrap (listener, HTTP connection manager, the Wasm
//!   filter with the bundle as its `StringValue` configuration, router, one
//!   static upstream cluster, admin on loopback);
//! - `--ecds FILE`: the same bootstrap with the filter's config discovered
//!   from FILE (extension config discovery), for reloads without a restart;
//! - `--discovery-response`: the content of that FILE for this bundle;
//! - `--istio`: an Istio `WasmPlugin` (`extensions.istio.io/v1alpha1`);
//! - `--rls HOST:PORT`: adds the HTTP/2 cluster the filter calls for fleet
//!   limits (named by the bundle's `rate_limit_service.cluster`);
//! - `--xds HOST:PORT`: the filter's config (module and bundle) comes from
//!   `tenantgate serve --xds` at HOST:PORT (ECDS over ADS, or over the
//!   extension config discovery service with `--xds-api ecds`), the node
//!   named by `--node-id`; the Wasm filter's, or with `--native` the native
//!   build's;
//! - `--native PATH`: the native build (`libtenantgate.so`, an Envoy dynamic
//!   module) instead of the Wasm filter, with the same bundle;
//! - `--access-log PATH`: a JSON access log (one line per request) to PATH
//!   with each decision's fields, read from the filter state the filter (or
//!   the native build) sets with the bundle's `filter_state` setting
//!   (`access_log_format`);
//! - `--ext-authz HOST:PORT`: no Wasm filter; Envoy's `ext_authz` filter asks
//!   `tenantgate serve --grpc` at HOST:PORT (policies only).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tenantgate_engine::metrics::names;
use tenantgate_engine::Bundle;

pub const WASM_FILTER: &str = "envoy.filters.http.wasm";
pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NATIVE_FILTER: &str = "envoy.filters.http.dynamic_modules";
pub const NATIVE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
const TYPED_EXTENSION_CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const EXT_AUTHZ_FILTER: &str = "envoy.filters.http.ext_authz";
const EXT_AUTHZ_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
/// The cluster of `tenantgate serve --xds` with `--xds`.
pub const XDS_CLUSTER: &str = "tenantgate_xds";
/// The cluster of `tenantgate serve` with `--ext-authz`.
pub const AUTHZ_CLUSTER: &str = "tenantgate_authz";
/// The filter's name in the HTTP filter chain, its plugin name and VM id; the
/// ECDS resource name.
pub const FILTER_NAME: &str = "tenantgate";

/// Which way a `WasmPlugin` applies (Istio's `WorkloadMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficMode {
    /// Inbound traffic to the workload.
    Server,
    /// Outbound traffic (and every gateway's traffic).
    Client,
    ClientAndServer,
}

impl TrafficMode {
    fn as_str(self) -> &'static str {
        match self {
            TrafficMode::Server => "SERVER",
            TrafficMode::Client => "CLIENT",
            TrafficMode::ClientAndServer => "CLIENT_AND_SERVER",
        }
    }
}

/// Which xDS service the filter's config comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsApi {
    /// The aggregated discovery service: one stream (`dynamic_resources.ads_config`).
    Ads,
    /// The extension config discovery service: a stream of its own.
    Ecds,
}

/// How Envoy talks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to the upstream, whatever the client spoke.
    Http1,
    /// HTTP/2 (cleartext) to the upstream: for gRPC services.
    Http2,
    /// The client's protocol: HTTP/2 clients (gRPC) upstream over HTTP/2, HTTP/1.1 ones over HTTP/1.1.
    Downstream,
}

/// Everything `tenantgate envoy` takes besides the bundle.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The filter module, as the proxy sees it (`dist/tenantgate.wasm`).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["ext_authz", "xds", "native"],
        conflicts_with_all = ["ext_authz", "xds", "native"]
    )]
    pub wasm: Option<PathBuf>,
    /// Load the native build (`dist/libtenantgate.so`, an Envoy dynamic
    /// module, Envoy 1.40+) at PATH instead of the Wasm filter. With `--xds`,
    /// the filter takes the native build's config from the server (which
    /// names the module: `serve --xds ... --native PATH`).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["ext_authz"])]
    pub native: Option<PathBuf>,
    /// Take the filter's config (module and bundle) from `tenantgate serve --xds`
    /// at HOST:PORT; the bundle given only names the rate limit cluster.
    #[arg(
        long,
        value_name = "HOST:PORT",
        conflicts_with_all = ["ext_authz", "istio", "ecds", "discovery_response", "sha256", "fail_open"]
    )]
    pub xds: Option<String>,
    /// With `--xds`: the service the config comes from.
    #[arg(long = "xds-api", value_enum, default_value = "ads", requires = "xds")]
    pub xds_api: XdsApi,
    /// The bootstrap's node id: how `tenantgate serve --xds` (`GET /v1/rollout`)
    /// names this Envoy; unique per Envoy.
    #[arg(long = "node-id", default_value = "tenantgate", value_name = "ID")]
    pub node_id: String,
    /// Decide with `tenantgate serve --grpc` at HOST:PORT through Envoy's
    /// `ext_authz` filter instead of loading the Wasm filter (policies only:
    /// no quotas).
    #[arg(long = "ext-authz", value_name = "HOST:PORT")]
    pub ext_authz: Option<String>,
    /// The rate limit service (`tenantgate-rls`, Limitador, envoyproxy/ratelimit)
    /// at HOST:PORT: adds the HTTP/2 cluster the filter calls for fleet limits,
    /// named by the bundle's `rate_limit_service.cluster`.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "ext_authz")]
    pub rls: Option<String>,
    /// Render an Istio `WasmPlugin` instead of an Envoy bootstrap.
    #[arg(long)]
    pub istio: bool,
    /// Listener address.
    #[arg(long, default_value = "0.0.0.0:10000", value_name = "IP:PORT")]
    pub listen: String,
    /// The upstream the listener routes to (an IP address or a DNS name, and a port).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    pub upstream: String,
    /// How many proxies in front of Envoy append to `x-forwarded-for` (a load
    /// balancer: 1). Envoy takes the client address that many hops back.
    #[arg(long = "trusted-hops", default_value_t = 0, value_name = "N")]
    pub trusted_hops: u32,
    /// A range of addresses Envoy treats as internal (trusted to set
    /// `x-request-id` and `x-envoy-*` headers), e.g. `10.0.0.0/8`; repeatable.
    /// Default: none, every client is external.
    #[arg(long = "internal-cidr", value_name = "CIDR")]
    pub internal_cidrs: Vec<String>,
    /// The protocol to the upstream.
    #[arg(long = "upstream-protocol", value_enum, default_value = "http1")]
    pub upstream_protocol: UpstreamProtocol,
    /// Envoy's admin interface (keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:9901", value_name = "IP:PORT")]
    pub admin: String,
    /// Expected sha256 of the module (64 lowercase hex digits); refused if the file differs.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// With `--istio`: where the proxy fetches the module (default: `file://` and the absolute `--wasm` path).
    #[arg(long)]
    pub url: Option<String>,
    /// Let requests through when the filter cannot load or crashes (default: refuse them).
    #[arg(long = "fail-open")]
    pub fail_open: bool,
    /// With `--istio`: `metadata.name`.
    #[arg(long, default_value = "tenantgate")]
    pub name: String,
    /// With `--istio`: `metadata.namespace`.
    #[arg(long)]
    pub namespace: Option<String>,
    /// With `--istio`: a workload label `key=value` for `spec.selector.matchLabels`; repeatable.
    #[arg(long, value_name = "K=V")]
    pub selector: Vec<String>,
    /// With `--istio`: the traffic direction, `spec.match[].mode` (`SERVER`: inbound to the workload).
    #[arg(long, value_enum)]
    pub mode: Option<TrafficMode>,
    /// Envoy: take the filter config from this ECDS file (live reload) instead of inline.
    #[arg(long, value_name = "FILE")]
    pub ecds: Option<PathBuf>,
    /// Envoy: print the ECDS file's content (a `DiscoveryResponse`) for this bundle instead of a bootstrap.
    #[arg(long = "discovery-response")]
    pub discovery_response: bool,
    /// Envoy: write a JSON access log to PATH (`/dev/stdout` works), one line per
    /// request with its decision's fields (needs `"filter_state": true` in tenantgate.json).
    #[arg(long = "access-log", value_name = "PATH")]
    pub access_log: Option<PathBuf>,
}

impl Options {
    /// The module path (`--wasm`; required by clap unless `--ext-authz` or `--native`).
    fn wasm_path(&self) -> &Path {
        self.wasm.as_deref().unwrap_or(Path::new(""))
    }

    /// The module file `--sha256` checks: the native one, else the Wasm one.
    fn module_path(&self) -> &Path {
        self.native.as_deref().unwrap_or(self.wasm_path())
    }

    /// The type URL of this build's filter config.
    fn filter_type(&self) -> &'static str {
        if self.native.is_some() {
            NATIVE_TYPE
        } else {
            WASM_TYPE
        }
    }

    /// The filter config for this build (the Wasm filter's or the native one's).
    fn filter_config(&self, bundle: &Bundle) -> Value {
        match &self.native {
            Some(path) => native_filter(bundle, path),
            None => wasm_filter(bundle, self),
        }
    }
}

/// The flag combinations and values that cannot work, checked before the
/// bundle is read (a usage error: exit 2).
pub fn usage(o: &Options) -> Result<(), String> {
    if let Some(want) = &o.sha256 {
        if want.len() != 64
            || !want
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "error: `--sha256 {want}` is not 64 lowercase hex digits"
            ));
        }
    }
    if o.istio {
        for kv in &o.selector {
            if kv.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(format!("error: `--selector {kv}` must be `key=value`"));
            }
        }
        if !is_dns_label(&o.name) {
            return Err(format!(
                "error: `--name {}` is not a valid resource name (lowercase letters, digits and `-`, at most 63)",
                o.name
            ));
        }
    }
    if o.ext_authz.is_some() {
        for (flag, set) in [
            ("--istio", o.istio),
            ("--ecds", o.ecds.is_some()),
            ("--discovery-response", o.discovery_response),
            ("--sha256", o.sha256.is_some()),
            ("--access-log", o.access_log.is_some()),
        ] {
            if set {
                return Err(format!(
                    "error: `{flag}` configures the Wasm filter; it does not apply with `--ext-authz`"
                ));
            }
        }
    }
    if o.native.is_some() {
        for (flag, set, why) in [
            (
                "--istio",
                o.istio,
                "Istio loads Wasm plugins, not dynamic modules",
            ),
            (
                "--fail-open",
                o.fail_open,
                "a dynamic module has no failure policy: it runs in Envoy's process",
            ),
        ] {
            if set {
                return Err(format!(
                    "error: `{flag}` does not apply with `--native`: {why}"
                ));
            }
        }
    }
    if o.istio {
        if o.rls.is_some() {
            return Err("error: `--rls` adds a cluster to an Envoy bootstrap; with Istio, add the service as a `ServiceEntry` (see docs/fleet.md)".into());
        }
        if o.ecds.is_some() || o.discovery_response {
            return Err("error: `--ecds` and `--discovery-response` render Envoy configs; they do not apply with `--istio`".into());
        }
        if o.access_log.is_some() {
            return Err("error: `--access-log` adds an access log to an Envoy bootstrap; with Istio, use its `Telemetry` API with the format in docs/reference.md".into());
        }
        return Ok(());
    }
    for (flag, set) in [
        ("--url", o.url.is_some()),
        ("--selector", !o.selector.is_empty()),
        ("--mode", o.mode.is_some()),
        ("--namespace", o.namespace.is_some()),
    ] {
        if set {
            return Err(format!("error: `{flag}` only applies with `--istio`"));
        }
    }
    if o.discovery_response && o.access_log.is_some() {
        return Err("error: `--access-log` adds an access log to an Envoy bootstrap; it does not apply with `--discovery-response`".into());
    }
    socket_address(&o.listen, "--listen")?;
    socket_address(&o.admin, "--admin")?;
    host_port(&o.upstream, "--upstream")?;
    Ok(())
}

/// The rendered document.
pub fn render(bundle: &Bundle, o: &Options) -> Result<Value, String> {
    usage(o)?;
    if o.istio {
        return wasm_plugin(bundle, o);
    }
    if let Some(want) = &o.sha256 {
        // Envoy loads a local module without a checksum; check it here.
        let module = o.module_path();
        let got = file_sha256(module)?;
        check_sha256(want, &got, module)?;
    }
    if o.discovery_response {
        return Ok(discovery_response(bundle, o));
    }
    if o.access_log.is_some() && !bundle.settings.filter_state {
        return Err("error: `--access-log` logs each decision from the filter state the filter sets; set `\"filter_state\": true` in tenantgate.json (see docs/reference.md)".into());
    }
    bootstrap(bundle, o)
}

/// The access log's JSON format: the request, Envoy's answer and the
/// decision's fields (`%FILTER_STATE(wasm.tenantgate.*:PLAIN)%` from the
/// Wasm filter, `%FILTER_STATE(tenantgate.*:PLAIN)%` from the native build,
/// `null` when a decision has no such value). See docs/reference.md.
pub fn access_log_format(native: bool) -> Value {
    use tenantgate_engine::http::filter_state_keys as k;
    let mut format = Map::new();
    for (name, operator) in [
        ("start_time", "%START_TIME%"),
        ("method", "%REQ(:METHOD)%"),
        ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("status", "%RESPONSE_CODE%"),
        ("duration_ms", "%DURATION%"),
        ("request_id", "%REQ(X-REQUEST-ID)%"),
        ("traceparent", "%REQ(TRACEPARENT)%"),
    ] {
        format.insert(name.into(), json!(operator));
    }
    for key in k::ALL {
        let name = key.strip_prefix("tenantgate.").unwrap_or(key);
        format.insert(
            name.into(),
            json!(format!(
                "%FILTER_STATE({}{key}:PLAIN)%",
                filter_state_prefix(native)
            )),
        );
    }
    Value::Object(format)
}

/// What Envoy puts before the filter state keys a build sets: `wasm.` for
/// the Wasm filter (Envoy's prefix for what a Wasm filter sets), nothing for
/// the native build.
pub fn filter_state_prefix(native: bool) -> &'static str {
    if native {
        ""
    } else {
        "wasm."
    }
}

/// The HTTP connection manager's `access_log` for `--access-log PATH`.
fn access_log(path: &Path, native: bool) -> Value {
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.display().to_string(),
            "log_format": { "json_format": access_log_format(native) }
        }
    }])
}

/// The `Wasm` HTTP filter config (`typed_config` of the filter or of its
/// ECDS resource).
pub fn wasm_filter(bundle: &Bundle, o: &Options) -> Value {
    json!({
        "@type": WASM_TYPE,
        "config": {
            "name": FILTER_NAME,
            "root_id": FILTER_NAME,
            "vm_config": {
                // One VM id: the worker VMs of one Envoy share the quota
                // buckets through shared data.
                "vm_id": FILTER_NAME,
                "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": o.wasm_path().display().to_string() } }
            },
            "configuration": {
                "@type": STRING_VALUE_TYPE,
                "value": compact(bundle)
            },
            // The current form of the deprecated `fail_open`: what Envoy does
            // with requests when the VM failed (crashed, or could not load).
            "failure_policy": if o.fail_open { "FAIL_OPEN" } else { "FAIL_CLOSED" }
        }
    })
}

/// The dynamic-module HTTP filter config loading the native build at `path`
/// (`libtenantgate.so`) with the bundle as its `filter_config`.
pub fn native_filter(bundle: &Bundle, path: &Path) -> Value {
    json!({
        "@type": NATIVE_TYPE,
        "dynamic_module_config": {
            "module": { "local": { "filename": path.display().to_string() } }
        },
        "filter_name": FILTER_NAME,
        "filter_config": {
            "@type": STRING_VALUE_TYPE,
            "value": compact(bundle)
        }
    })
}

/// The bundle as one line of JSON, the filter's plugin configuration.
fn compact(bundle: &Bundle) -> String {
    serde_json::to_string(bundle).unwrap_or_default()
}

/// An ECDS `DiscoveryResponse` holding the filter config, for a
/// `path_config_source` file. `version_info` is the bundle version.
pub fn discovery_response(bundle: &Bundle, o: &Options) -> Value {
    json!({
        "version_info": bundle.version,
        "resources": [{
            "@type": TYPED_EXTENSION_CONFIG_TYPE,
            "name": FILTER_NAME,
            "typed_config": o.filter_config(bundle)
        }]
    })
}

fn bootstrap(bundle: &Bundle, o: &Options) -> Result<Value, String> {
    let listen = socket_address(&o.listen, "--listen")?;
    let admin = socket_address(&o.admin, "--admin")?;
    let (up_host, up_port) = host_port(&o.upstream, "--upstream")?;
    let internal = internal_address_config(&o.internal_cidrs)?;
    let mut clusters = vec![upstream_cluster(
        "upstream",
        cluster_type(&up_host),
        &up_host,
        up_port,
        o.upstream_protocol,
    )];
    if let Some(service) = &o.rls {
        let (host, port) = host_port(service, "--rls")?;
        let name = bundle
            .settings
            .rate_limit_service
            .as_ref()
            .map_or(tenantgate_engine::settings::DEFAULT_RLS_CLUSTER, |r| {
                r.cluster.as_str()
            });
        clusters.push(upstream_cluster(
            name,
            cluster_type(&host),
            &host,
            port,
            UpstreamProtocol::Http2,
        ));
    }
    let mut dynamic = None;
    let tenantgate = match (&o.ext_authz, &o.ecds) {
        _ if o.xds.is_some() => {
            let service = o.xds.as_deref().unwrap_or_default();
            let (host, port) = host_port(service, "--xds")?;
            clusters.push(upstream_cluster(
                XDS_CLUSTER,
                cluster_type(&host),
                &host,
                port,
                UpstreamProtocol::Http2,
            ));
            let source = match o.xds_api {
                XdsApi::Ads => {
                    dynamic = Some(json!({ "ads_config": xds_api_source() }));
                    json!({ "resource_api_version": "V3", "ads": {} })
                }
                XdsApi::Ecds => json!({
                    "resource_api_version": "V3",
                    "api_config_source": xds_api_source()
                }),
            };
            json!({
                "name": FILTER_NAME,
                "config_discovery": {
                    "config_source": source,
                    "type_urls": [o.filter_type()]
                }
            })
        }
        (Some(service), _) => {
            let (host, port) = host_port(service, "--ext-authz")?;
            clusters.push(upstream_cluster(
                AUTHZ_CLUSTER,
                cluster_type(&host),
                &host,
                port,
                UpstreamProtocol::Http2,
            ));
            ext_authz_filter(bundle, o.fail_open)
        }
        (None, None) => json!({
            "name": if o.native.is_some() { NATIVE_FILTER } else { WASM_FILTER },
            "typed_config": o.filter_config(bundle)
        }),
        (None, Some(path)) => json!({
            "name": FILTER_NAME,
            "config_discovery": {
                "config_source": {
                    "resource_api_version": "V3",
                    "path_config_source": { "path": path.display().to_string() }
                },
                "type_urls": [o.filter_type()]
            }
        }),
    };
    let mut doc = json!({
        // ECDS needs a node id and cluster; harmless otherwise.
        "node": { "id": o.node_id, "cluster": FILTER_NAME },
        "admin": { "address": admin },
        "stats_config": stats_config(),
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": listen,
                "filter_chains": [{
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM_TYPE,
                            "stat_prefix": "ingress",
                            // What upstreams may trust (SECURITY.md):
                            // - the client address is the peer's (or `--trusted-hops`
                            //   back in x-forwarded-for), and a client outside
                            //   `--internal-cidr` cannot set x-request-id or x-envoy-*;
                            // - header names with `_` are dropped before any filter:
                            //   CGI/WSGI upstreams fold `_` into `-`, so
                            //   `x_tenantgate_principal` would read as ours.
                            //   (REJECT_REQUEST would reset HTTP/2 streams of
                            //   clients that send harmless ones.)
                            "use_remote_address": true,
                            "xff_num_trusted_hops": o.trusted_hops,
                            "internal_address_config": internal,
                            "generate_request_id": true,
                            "preserve_external_request_id": false,
                            "common_http_protocol_options": {
                                "headers_with_underscores_action": "DROP_HEADER"
                            },
                            "route_config": {
                                "name": "local",
                                "virtual_hosts": [{
                                    "name": "all",
                                    "domains": ["*"],
                                    "routes": [{
                                        "match": { "prefix": "/" },
                                        "route": { "cluster": "upstream" }
                                    }]
                                }]
                            },
                            "http_filters": [
                                tenantgate,
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": { "@type": ROUTER_TYPE }
                                }
                            ]
                        }
                    }]
                }]
            }],
            "clusters": clusters
        }
    });
    if let (Some(d), Some(obj)) = (dynamic, doc.as_object_mut()) {
        obj.insert("dynamic_resources".into(), d);
    }
    if let (Some(path), Some(hcm)) = (
        &o.access_log,
        doc.pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
            .and_then(Value::as_object_mut),
    ) {
        hcm.insert("access_log".into(), access_log(path, o.native.is_some()));
    }
    Ok(doc)
}

/// The gRPC source of `tenantgate serve --xds`: state of the world, v3;
/// while the server is away Envoy keeps its config and retries every 0.5 s
/// growing to 5 s (Envoy's default grows to 30 s).
fn xds_api_source() -> Value {
    json!({
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": true,
        "grpc_services": [{
            "envoy_grpc": {
                "cluster_name": XDS_CLUSTER,
                "retry_policy": {
                    "retry_back_off": { "base_interval": "0.5s", "max_interval": "5s" }
                }
            }
        }]
    })
}

/// The filter's per-tenant and per-limit series carry their labels in the
/// stat name (`tenant=.=/acme/eu;.;limit=.=rps;.;tenantgate.limit.admitted`);
/// these tags make them Prometheus labels at `/stats/prometheus`
/// (`tenantgate_limit_admitted{tenant="/acme/eu",limit="rps"}`). Envoy's
/// default tags stay on.
pub fn stats_config() -> Value {
    let tags: Vec<Value> = names::TAGS
        .iter()
        .map(|t| json!({ "tag_name": t, "regex": names::tag_regex(t) }))
        .collect();
    json!({ "stats_tags": tags })
}

/// What the workload's proxy needs for the filter's labelled series in
/// Istio: the value of the pod annotation `proxy.istio.io/config` (or the
/// mesh's `defaultConfig`). Both are read when the proxy starts (its
/// bootstrap), so pods restart to pick them up; a `WasmPlugin` cannot set
/// them. `extraStatTags` makes Istio render the same regexes as
/// [`stats_config`]; the inclusion regex keeps the filter's series, which
/// Istio's default stats matcher would drop.
pub fn istio_proxy_config() -> Value {
    json!({
        "proxyStatsMatcher": { "inclusionRegexps": [r".*tenantgate\..*"] },
        "extraStatTags": names::TAGS,
    })
}

/// A hostname is resolved by DNS; an IP address is used as is.
pub(crate) fn cluster_type(host: &str) -> &'static str {
    if host.parse::<IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    }
}

/// The `ext_authz` HTTP filter asking `tenantgate serve` over gRPC. What
/// the mapping needs goes along: the raw header bytes (repeated names kept
/// apart, as the filter sees them) and the dynamic metadata of the filters
/// the bundle reads identities from. No body, no peer certificate. When the
/// service cannot answer, the request is refused with 503 (as the filter's
/// `on_error: deny`), unless `--fail-open`.
pub fn ext_authz_filter(bundle: &Bundle, fail_open: bool) -> Value {
    use tenantgate_engine::settings::Source;
    let s = &bundle.settings;
    let mut namespaces: Vec<&str> = [
        Some(&s.tenant),
        Some(&s.principal),
        s.principal_tenant.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|src| match src {
        Source::Metadata(path) => path.first().map(String::as_str),
        _ => None,
    })
    .collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    let mut config = json!({
        "@type": EXT_AUTHZ_TYPE,
        "transport_api_version": "V3",
        "grpc_service": {
            "envoy_grpc": { "cluster_name": AUTHZ_CLUSTER },
            "timeout": "0.5s"
        },
        "failure_mode_allow": fail_open,
        "status_on_error": { "code": "ServiceUnavailable" },
        "encode_raw_headers": true,
        "include_peer_certificate": false
    });
    if let (false, Some(obj)) = (namespaces.is_empty(), config.as_object_mut()) {
        obj.insert("metadata_context_namespaces".into(), json!(namespaces));
    }
    json!({ "name": EXT_AUTHZ_FILTER, "typed_config": config })
}

/// A cluster to `host:port`, with the protocol options `--upstream-protocol` asks for.
pub(crate) fn upstream_cluster(
    name: &str,
    kind: &str,
    host: &str,
    port: u16,
    protocol: UpstreamProtocol,
) -> Value {
    let mut cluster = json!({
                "name": name,
                "type": kind,
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{
                        "lb_endpoints": [{
                            "endpoint": {
                                "address": {
                                    "socket_address": { "address": host, "port_value": port }
                                }
                            }
                        }]
                    }]
                }
    });
    let options = match protocol {
        UpstreamProtocol::Http1 => None,
        UpstreamProtocol::Http2 => {
            Some(json!({ "explicit_http_config": { "http2_protocol_options": {} } }))
        }
        UpstreamProtocol::Downstream => Some(json!({
            "use_downstream_protocol_config": { "http_protocol_options": {}, "http2_protocol_options": {} }
        })),
    };
    if let (Some(mut options), Some(obj)) = (options, cluster.as_object_mut()) {
        if let Some(o) = options.as_object_mut() {
            o.insert("@type".into(), HTTP_PROTOCOL_OPTIONS_TYPE.into());
        }
        obj.insert(
            "typed_extension_protocol_options".into(),
            json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options }),
        );
    }
    cluster
}

/// `internal_address_config` with exactly the given ranges. Set explicitly:
/// its default changed between Envoy releases, and an empty `cidr_ranges`
/// still means Envoy's built-in list (loopback and RFC 1918 addresses are
/// internal, checked in Envoy 1.40). With no `--internal-cidr` the one range
/// is `0.0.0.0/32`, which no client connects from: every client is external.
fn internal_address_config(cidrs: &[String]) -> Result<Value, String> {
    if cidrs.is_empty() {
        return Ok(json!({
            "unix_sockets": false,
            "cidr_ranges": [{ "address_prefix": "0.0.0.0", "prefix_len": 32 }]
        }));
    }
    let mut ranges = Vec::new();
    for c in cidrs {
        let bad =
            || format!("error: `--internal-cidr {c}` is not an address range like `10.0.0.0/8`");
        let (ip, len) = c.split_once('/').ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > if ip.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        ranges.push(json!({ "address_prefix": ip.to_string(), "prefix_len": len }));
    }
    Ok(json!({ "unix_sockets": false, "cidr_ranges": ranges }))
}

/// `{"socket_address": {...}}` of an `ip:port` (`[v6]:port` for IPv6).
fn socket_address(s: &str, flag: &str) -> Result<Value, String> {
    let (host, port) = host_port(s, flag)?;
    if host.parse::<IpAddr>().is_err() {
        return Err(format!(
            "error: `{flag} {s}`: the address must be an IP address and a port, e.g. `127.0.0.1:10000`"
        ));
    }
    Ok(json!({ "socket_address": { "address": host, "port_value": port } }))
}

/// Splits `host:port` or `[v6]:port`.
pub(crate) fn host_port(s: &str, flag: &str) -> Result<(String, u16), String> {
    let bad = || format!("error: `{flag} {s}` is not `host:port`");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains(['/', ' ']) || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// The Istio `WasmPlugin` (field names of `extensions.istio.io/v1alpha1`).
fn wasm_plugin(bundle: &Bundle, o: &Options) -> Result<Value, String> {
    let sha256 = match (&o.sha256, file_sha256(o.wasm_path())) {
        (Some(want), Ok(got)) => {
            check_sha256(want, &got, o.wasm_path())?;
            got
        }
        // The module may only exist where it is served from (`--url`).
        (Some(want), Err(_)) if o.url.is_some() => {
            check_sha256(want, want, o.wasm_path())?;
            want.clone()
        }
        (_, Err(e)) => return Err(e),
        (None, Ok(got)) => got,
    };
    let url = match &o.url {
        Some(u) => u.clone(),
        None => format!("file://{}", absolute(o.wasm_path()).display()),
    };
    let mut labels = BTreeMap::new();
    for kv in &o.selector {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("error: `--selector {kv}` must be `key=value`"))?;
        if k.is_empty() {
            return Err(format!("error: `--selector {kv}` must be `key=value`"));
        }
        labels.insert(k.to_string(), Value::String(v.to_string()));
    }
    if !is_dns_label(&o.name) {
        return Err(format!(
            "error: `--name {}` is not a valid resource name (lowercase letters, digits and `-`, at most 63)",
            o.name
        ));
    }
    let mut metadata = Map::new();
    metadata.insert("name".into(), o.name.clone().into());
    if let Some(ns) = &o.namespace {
        metadata.insert("namespace".into(), ns.clone().into());
    }
    metadata.insert(
        "annotations".into(),
        json!({
            "tenantgate/bundle-version": bundle.version,
            // To copy into the workload's pod template as
            // `proxy.istio.io/config`: see `istio_proxy_config`.
            "tenantgate/proxy-config": istio_proxy_config().to_string(),
        }),
    );
    let mut spec = Map::new();
    if !labels.is_empty() {
        spec.insert("selector".into(), json!({ "matchLabels": labels }));
    }
    spec.insert("url".into(), url.into());
    spec.insert("sha256".into(), sha256.into());
    spec.insert("phase".into(), "AUTHZ".into());
    spec.insert(
        "failStrategy".into(),
        if o.fail_open {
            "FAIL_OPEN"
        } else {
            "FAIL_CLOSE"
        }
        .into(),
    );
    spec.insert("type".into(), "HTTP".into());
    spec.insert("pluginName".into(), FILTER_NAME.into());
    spec.insert("pluginConfig".into(), plugin_config(bundle)?);
    if let Some(mode) = o.mode {
        spec.insert("match".into(), json!([{ "mode": mode.as_str() }]));
    }
    Ok(json!({
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": metadata,
        "spec": spec
    }))
}

/// The bundle as a JSON object for `pluginConfig` (a protobuf `Struct`).
/// `null` values are left out: they mean the same as an absent key to the
/// filter, and Kubernetes may drop them. Istio hands the Struct to the
/// filter as JSON text; the version hash is over canonical JSON, so key
/// order and layout do not matter.
pub fn plugin_config(bundle: &Bundle) -> Result<Value, String> {
    let v = serde_json::to_value(bundle).map_err(|e| format!("error: {e}"))?;
    Ok(strip_nulls(v))
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Lowercase hex SHA-256 of a file.
pub fn file_sha256(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "{}: error: cannot read the Wasm module: {e}",
            path.display()
        )
    })?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_sha256(want: &str, got: &str, path: &Path) -> Result<(), String> {
    if want.len() != 64
        || !want
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "error: `--sha256 {want}` is not 64 lowercase hex digits"
        ));
    }
    if want != got {
        return Err(format!(
            "{}: error: the module's sha256 is `{got}`, not `{want}` (`--sha256`)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        assert_eq!(
            host_port("0.0.0.0:10000", "x").unwrap(),
            ("0.0.0.0".into(), 10000)
        );
        assert_eq!(host_port("[::1]:80", "x").unwrap(), ("::1".into(), 80));
        assert_eq!(
            host_port("backend:8080", "x").unwrap(),
            ("backend".into(), 8080)
        );
        assert!(host_port("10000", "x").is_err());
        assert!(host_port("a:0", "x").is_err());
        assert!(socket_address("backend:8080", "--listen").is_err());
    }

    #[test]
    fn stats_tags_match_the_filter_names() {
        let tags = stats_config()["stats_tags"].clone();
        assert_eq!(
            tags[0],
            json!({ "tag_name": "tenant", "regex": "(tenant=\\.=(.*?);\\.;)" })
        );
        let names: Vec<&str> = tags
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tag_name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["tenant", "parent", "limit", "reason", "bundle"]);
        assert_eq!(
            istio_proxy_config()["extraStatTags"],
            json!(["tenant", "parent", "limit", "reason", "bundle"])
        );
    }

    #[test]
    fn access_log_reads_the_filter_state_each_build_sets() {
        let wasm = access_log_format(false);
        assert_eq!(
            wasm["tenant"],
            "%FILTER_STATE(wasm.tenantgate.tenant:PLAIN)%"
        );
        assert_eq!(
            wasm["decision_id"],
            "%FILTER_STATE(wasm.tenantgate.decision_id:PLAIN)%"
        );
        let native = access_log_format(true);
        assert_eq!(native["tenant"], "%FILTER_STATE(tenantgate.tenant:PLAIN)%");
        assert_eq!(native["bundle"], "%FILTER_STATE(tenantgate.bundle:PLAIN)%");
        assert_eq!(native["status"], "%RESPONSE_CODE%");
        assert_eq!(keys_of(&wasm), keys_of(&native));
    }

    fn keys_of(v: &Value) -> Vec<&String> {
        v.as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default()
    }

    #[test]
    fn nulls_are_stripped_everywhere() {
        let v = strip_nulls(json!({"a": null, "b": [{"c": null, "d": 1}]}));
        assert_eq!(v, json!({"b": [{"d": 1}]}));
    }

    #[test]
    fn internal_ranges_are_explicit() {
        let none = internal_address_config(&[]).unwrap();
        assert_eq!(
            none["cidr_ranges"],
            json!([{ "address_prefix": "0.0.0.0", "prefix_len": 32 }]),
            "an empty list would mean Envoy's built-in ranges"
        );
        let some = internal_address_config(&["10.0.0.0/8".into(), "fd00::/8".into()]).unwrap();
        assert_eq!(some["cidr_ranges"][1]["prefix_len"], 8);
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129"] {
            assert!(internal_address_config(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_protocols() {
        let c = upstream_cluster(
            "upstream",
            "STATIC",
            "127.0.0.1",
            80,
            UpstreamProtocol::Http1,
        );
        assert!(c.get("typed_extension_protocol_options").is_none());
        let c = upstream_cluster(
            "upstream",
            "STATIC",
            "127.0.0.1",
            80,
            UpstreamProtocol::Http2,
        );
        let o = &c["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(o["@type"], HTTP_PROTOCOL_OPTIONS_TYPE);
        assert!(o["explicit_http_config"]["http2_protocol_options"].is_object());
    }

    #[test]
    fn ext_authz_passes_raw_headers_and_the_metadata_namespaces() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut bundle = Bundle::from_dir(&dir).unwrap();
        let f = ext_authz_filter(&bundle, false);
        assert_eq!(f["name"], EXT_AUTHZ_FILTER);
        let c = &f["typed_config"];
        assert_eq!(
            c["grpc_service"]["envoy_grpc"]["cluster_name"],
            AUTHZ_CLUSTER
        );
        assert_eq!(c["transport_api_version"], "V3");
        assert_eq!(c["encode_raw_headers"], true);
        assert_eq!(c["failure_mode_allow"], false);
        assert_eq!(c["include_peer_certificate"], false);
        assert!(c.get("with_request_body").is_none());
        assert!(
            c.get("metadata_context_namespaces").is_none(),
            "headers only"
        );
        let jwt = |k: &str| {
            tenantgate_engine::settings::Source::Metadata(vec![
                "envoy.filters.http.jwt_authn".into(),
                "payload".into(),
                k.into(),
            ])
        };
        bundle.settings.tenant = jwt("tenant");
        bundle.settings.principal = jwt("sub");
        let f = ext_authz_filter(&bundle, true);
        assert_eq!(
            f["typed_config"]["metadata_context_namespaces"],
            json!(["envoy.filters.http.jwt_authn"])
        );
        assert_eq!(f["typed_config"]["failure_mode_allow"], true);
    }
}
