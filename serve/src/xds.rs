//! `serve --xds ADDR`: the filter's configuration for a fleet of plain Envoys
//! over xDS. One resource, an ECDS `TypedExtensionConfig` named `tenantgate`
//! whose `typed_config` is the Wasm HTTP filter's config
//! (`envoy.extensions.filters.http.wasm.v3.Wasm`) with the bundle as its
//! plugin configuration, or with `--native` the native build's
//! (`envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter`)
//! with the bundle as its filter config, served state-of-the-world on both the aggregated
//! discovery service (ADS) and the extension config discovery service. The
//! version of a response is the bundle's version (`sha256:` of its canonical
//! JSON); the state of the rollout is [`crate::rollout`]'s. See
//! docs/reference.md ("The control plane").

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    async_data_source, data_source, AsyncDataSource, ControlPlane, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::dynamic_modules::v3::DynamicModuleConfig;
use envoy_types::pb::envoy::extensions::filters::http::dynamic_modules::v3::DynamicModuleFilter;
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    plugin_config, FailurePolicy, PluginConfig, VmConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::{Any, StringValue};
use prost::Message;
use tenantgate_daemon::Stop;
use tenantgate_engine::Bundle;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::rollout::{Fleet, Mode, Push, Seen};
use crate::{log, now_ns};

/// The ECDS resource's type.
pub const TYPED_EXTENSION_CONFIG: &str =
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// The type of the resource's `typed_config`.
pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The type of the resource's `typed_config` with `--native`.
pub const NATIVE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";
const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
/// The resource's name: the filter's name in Envoy's HTTP filter chain
/// (`tenantgate envoy --xds` renders it), its plugin name and VM id.
pub const RESOURCE: &str = "tenantgate";

/// How often the source's files are looked at.
pub const POLL: Duration = Duration::from_millis(200);

/// `serve --xds` and its flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The xDS gRPC address.
    pub addr: SocketAddr,
    /// The filter module as the Envoys see it (a path on their hosts).
    pub module: Module,
    /// Let requests through when the filter fails (default: refuse them;
    /// the Wasm filter's failure policy, ignored for the native build).
    pub fail_open: bool,
    pub mode: Mode,
    /// How many versions to keep for rollouts and rollbacks.
    pub keep: usize,
}

/// Which build the Envoys load, and where they find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Module {
    /// The Wasm filter (`tenantgate.wasm`) at this path.
    Wasm(String),
    /// The native build (`libtenantgate.so`, an Envoy dynamic module) at this path.
    Native(String),
}

impl Module {
    /// The type URL of the resource's `typed_config`.
    pub fn type_url(&self) -> &'static str {
        match self {
            Module::Wasm(_) => WASM_TYPE,
            Module::Native(_) => NATIVE_TYPE,
        }
    }
}

/// The control plane: the fleet's state and a signal for the streams.
pub struct Plane {
    fleet: Mutex<Fleet>,
    changed: watch::Sender<u64>,
    module: Module,
    fail_open: bool,
}

impl Plane {
    pub fn new(options: &Options) -> Plane {
        Plane {
            fleet: Mutex::new(Fleet::new(options.mode, options.keep)),
            changed: watch::Sender::new(0),
            module: options.module.clone(),
            fail_open: options.fail_open,
        }
    }

    /// The fleet's state, locked.
    pub fn fleet(&self) -> MutexGuard<'_, Fleet> {
        match self.fleet.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A bundle loaded from the source; whether a push follows (see
    /// [`Fleet::loaded`]). The caller notifies the streams.
    pub fn loaded(&self, bundle: &Bundle) -> bool {
        match serde_json::to_string(bundle) {
            Ok(json) => self
                .fleet()
                .loaded(&bundle.version, Arc::from(json), now_ns()),
            Err(e) => {
                self.fleet().refused(
                    vec![format!("error: cannot serialize the bundle: {e}")],
                    now_ns(),
                );
                false
            }
        }
    }

    /// Wakes every stream to look for something to push.
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The discovery response carrying a push.
    pub fn response(&self, push: &Push, type_url: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: push.version.clone(),
            resources: vec![any(TYPED_EXTENSION_CONFIG, &self.resource(&push.config))],
            type_url: type_url.to_string(),
            nonce: push.nonce.clone(),
            control_plane: Some(ControlPlane {
                identifier: format!("tenantgate serve {}", env!("CARGO_PKG_VERSION")),
            }),
            ..DiscoveryResponse::default()
        }
    }

    /// The ECDS resource for a bundle (one line of JSON).
    pub fn resource(&self, bundle: &str) -> TypedExtensionConfig {
        let typed_config = match &self.module {
            Module::Wasm(path) => any(WASM_TYPE, &wasm_filter(bundle, path, self.fail_open)),
            Module::Native(path) => any(NATIVE_TYPE, &native_filter(bundle, path)),
        };
        TypedExtensionConfig {
            name: RESOURCE.to_string(),
            typed_config: Some(typed_config),
        }
    }
}

/// The native build's filter config, as `tenantgate envoy --native` renders
/// it inline: the module from a local file, filter name `tenantgate`, the
/// bundle as a `StringValue` filter config. Only the filter config changes
/// from one bundle to the next; the quota buckets live in the Envoy process
/// and survive it.
pub fn native_filter(bundle: &str, path: &str) -> DynamicModuleFilter {
    DynamicModuleFilter {
        dynamic_module_config: Some(DynamicModuleConfig {
            module: Some(AsyncDataSource {
                specifier: Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(path.to_string())),
                    ..DataSource::default()
                })),
            }),
            ..DynamicModuleConfig::default()
        }),
        filter_name: RESOURCE.to_string(),
        filter_config: Some(any(
            STRING_VALUE_TYPE,
            &StringValue {
                value: bundle.to_string(),
            },
        )),
        ..DynamicModuleFilter::default()
    }
}

/// The Wasm HTTP filter's config, as `tenantgate envoy` renders it inline:
/// one VM id (`tenantgate`), V8, the module from a local file, the bundle as
/// a `StringValue` plugin configuration. Only the configuration changes from
/// one bundle to the next, so Envoy keeps its VMs (and the quota buckets in
/// their shared data).
pub fn wasm_filter(bundle: &str, wasm: &str, fail_open: bool) -> Wasm {
    let vm = VmConfig {
        vm_id: RESOURCE.to_string(),
        runtime: "envoy.wasm.runtime.v8".to_string(),
        code: Some(AsyncDataSource {
            specifier: Some(async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::Filename(wasm.to_string())),
                ..DataSource::default()
            })),
        }),
        ..VmConfig::default()
    };
    let policy = if fail_open {
        FailurePolicy::FailOpen
    } else {
        FailurePolicy::FailClosed
    };
    Wasm {
        config: Some(PluginConfig {
            name: RESOURCE.to_string(),
            root_id: RESOURCE.to_string(),
            configuration: Some(any(
                STRING_VALUE_TYPE,
                &StringValue {
                    value: bundle.to_string(),
                },
            )),
            failure_policy: policy.into(),
            vm: Some(plugin_config::Vm::VmConfig(vm)),
            ..PluginConfig::default()
        }),
    }
}

fn any(type_url: &str, m: &impl Message) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// The gRPC services over a plane.
#[derive(Clone)]
pub struct Service {
    plane: Arc<Plane>,
    stop: Stop,
}

impl Service {
    pub fn new(plane: Arc<Plane>, stop: Stop) -> Service {
        Service { plane, stop }
    }

    fn open(&self, requests: Streaming<DiscoveryRequest>, api: &'static str) -> Responses {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve_stream(
            Arc::clone(&self.plane),
            requests,
            tx,
            self.stop.clone(),
            api,
        ));
        Box::pin(ReceiverStream::new(rx))
    }
}

const DELTA: &str = "incremental (delta) xDS is not served; use the state-of-the-world API (`api_type: GRPC`, or ADS)";

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        Ok(Response::new(self.open(request.into_inner(), "ads")))
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented(DELTA))
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Service {
    type StreamExtensionConfigsStream = Responses;
    type DeltaExtensionConfigsStream = DeltaResponses;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        Ok(Response::new(self.open(request.into_inner(), "ecds")))
    }

    async fn delta_extension_configs(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented(DELTA))
    }

    async fn fetch_extension_configs(
        &self,
        _: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "REST-style fetches are not served; use a gRPC stream",
        ))
    }
}

/// Both services, for a tonic router.
pub fn services(
    plane: Arc<Plane>,
    stop: Stop,
) -> (
    AggregatedDiscoveryServiceServer<Service>,
    ExtensionConfigDiscoveryServiceServer<Service>,
) {
    let s = Service::new(plane, stop);
    (
        AggregatedDiscoveryServiceServer::new(s.clone()),
        ExtensionConfigDiscoveryServiceServer::new(s),
    )
}

/// One node's stream: the node id comes from the first request; every
/// request is an initial one, an ACK or a NACK (or stale); a response goes
/// out whenever the version meant for the node is not the one last sent.
async fn serve_stream(
    plane: Arc<Plane>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    stop: Stop,
    api: &'static str,
) {
    let mut changed = plane.changed.subscribe();
    let first = tokio::select! {
        r = requests.message() => r,
        () = stop.fired() => return,
    };
    let first = match first {
        Ok(Some(r)) => r,
        _ => return,
    };
    let Some(node) = first.node.as_ref().filter(|n| !n.id.is_empty()) else {
        let _ = tx
            .send(Err(Status::invalid_argument(
                "the first request must name the node (`node.id` in Envoy's bootstrap)",
            )))
            .await;
        return;
    };
    let (id, cluster) = (node.id.clone(), node.cluster.clone());
    let (stream, replaced) = plane.fleet().connect(&id, &cluster, now_ns());
    if replaced {
        log(format!(
            "xds: node `{id}` opened a new stream; its previous one closes (two Envoys with one node id fight over it)"
        ));
        plane.notify();
    }
    log(format!(
        "xds: node `{id}` connected ({api}, cluster `{cluster}`)"
    ));
    let mut type_url = TYPED_EXTENSION_CONFIG.to_string();
    let mut request = Some(first);
    loop {
        if let Some(r) = request.take() {
            if !r.type_url.is_empty() && r.type_url != TYPED_EXTENSION_CONFIG {
                // ADS may carry other types; only ECDS is served.
                log(format!(
                    "xds: node `{id}` asked for `{}`, which this server does not serve",
                    r.type_url
                ));
            } else {
                type_url = if r.type_url.is_empty() {
                    TYPED_EXTENSION_CONFIG.to_string()
                } else {
                    r.type_url.clone()
                };
                let error = r.error_detail.as_ref().map(|e| e.message.as_str());
                let seen = plane.fleet().request(
                    &id,
                    stream,
                    &r.version_info,
                    &r.response_nonce,
                    error,
                    now_ns(),
                );
                match seen {
                    Seen::Ack => log(format!("xds: node `{id}` ACKed {}", r.version_info)),
                    Seen::Nack => log(format!(
                        "xds: node `{id}` NACKed (runs {}): {}",
                        if r.version_info.is_empty() {
                            "nothing"
                        } else {
                            &r.version_info
                        },
                        error.unwrap_or("")
                    )),
                    Seen::Initial | Seen::Stale => {}
                }
            }
        }
        if !plane.fleet().current(&id, stream) {
            break;
        }
        let push = plane.fleet().push(&id, stream, now_ns());
        if let Some(p) = push {
            log(format!(
                "xds: sending {} to node `{id}` (nonce {})",
                p.version, p.nonce
            ));
            if tx.send(Ok(plane.response(&p, &type_url))).await.is_err() {
                break;
            }
        }
        tokio::select! {
            r = requests.message() => match r {
                Ok(Some(r)) => request = Some(r),
                _ => break,
            },
            c = changed.changed() => if c.is_err() { break },
            () = stop.fired() => break,
        }
    }
    plane.fleet().disconnect(&id, stream, now_ns());
    log(format!("xds: node `{id}` disconnected"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resource_is_the_wasm_filter_with_the_bundle() {
        let plane = Plane::new(&Options {
            addr: "127.0.0.1:0".parse().unwrap(),
            module: Module::Wasm("/opt/tenantgate.wasm".into()),
            fail_open: false,
            mode: Mode::Auto,
            keep: 5,
        });
        let push = Push {
            version: "sha256:ab".into(),
            nonce: "7".into(),
            config: Arc::from("{\"format\":1}"),
        };
        let r = plane.response(&push, TYPED_EXTENSION_CONFIG);
        assert_eq!(
            (r.version_info.as_str(), r.nonce.as_str()),
            ("sha256:ab", "7")
        );
        assert_eq!(r.type_url, TYPED_EXTENSION_CONFIG);
        assert!(r
            .control_plane
            .unwrap()
            .identifier
            .starts_with("tenantgate serve "));
        assert_eq!(r.resources.len(), 1);
        assert_eq!(r.resources[0].type_url, TYPED_EXTENSION_CONFIG);
        let tec = TypedExtensionConfig::decode(r.resources[0].value.as_slice()).unwrap();
        assert_eq!(tec.name, "tenantgate");
        let any = tec.typed_config.unwrap();
        assert_eq!(any.type_url, WASM_TYPE);
        let wasm = Wasm::decode(any.value.as_slice()).unwrap();
        let c = wasm.config.unwrap();
        assert_eq!(
            (c.name.as_str(), c.root_id.as_str()),
            ("tenantgate", "tenantgate")
        );
        assert_eq!(c.failure_policy, i32::from(FailurePolicy::FailClosed));
        let cfg = c.configuration.unwrap();
        assert_eq!(cfg.type_url, STRING_VALUE_TYPE);
        assert_eq!(
            StringValue::decode(cfg.value.as_slice()).unwrap().value,
            "{\"format\":1}"
        );
        let Some(plugin_config::Vm::VmConfig(vm)) = c.vm else {
            panic!("no vm_config")
        };
        assert_eq!(
            (vm.vm_id.as_str(), vm.runtime.as_str()),
            ("tenantgate", "envoy.wasm.runtime.v8")
        );
        let Some(async_data_source::Specifier::Local(local)) = vm.code.unwrap().specifier else {
            panic!("not a local module")
        };
        assert_eq!(
            local.specifier,
            Some(data_source::Specifier::Filename(
                "/opt/tenantgate.wasm".into()
            ))
        );
    }

    #[test]
    fn with_native_the_resource_is_the_dynamic_module_filter_with_the_bundle() {
        let plane = Plane::new(&Options {
            addr: "127.0.0.1:0".parse().unwrap(),
            module: Module::Native("/opt/libtenantgate.so".into()),
            fail_open: false,
            mode: Mode::Auto,
            keep: 5,
        });
        let tec = plane.resource("{\"format\":1}");
        assert_eq!(tec.name, "tenantgate");
        let any = tec.typed_config.unwrap();
        assert_eq!(any.type_url, NATIVE_TYPE);
        let f = DynamicModuleFilter::decode(any.value.as_slice()).unwrap();
        assert_eq!(f.filter_name, "tenantgate");
        let cfg = f.filter_config.unwrap();
        assert_eq!(cfg.type_url, STRING_VALUE_TYPE);
        assert_eq!(
            StringValue::decode(cfg.value.as_slice()).unwrap().value,
            "{\"format\":1}"
        );
        let module = f.dynamic_module_config.unwrap();
        assert_eq!(module.name, "");
        let Some(async_data_source::Specifier::Local(local)) = module.module.unwrap().specifier
        else {
            panic!("not a local module")
        };
        assert_eq!(
            local.specifier,
            Some(data_source::Specifier::Filename(
                "/opt/libtenantgate.so".into()
            ))
        );
    }
}
